"""Dataset text and JSON files as they come: a byte-order mark dropped, a file that is not UTF-8
decoded as cp1252 (else Latin-1) with a warning naming it, bad JSON one line naming the file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from groundcam.data.sample import ReadReport
from groundcam.errors import GroundcamWarning, InputError


def read_text(path: str | Path, report: ReadReport | None = None) -> str:
    """The text of `path`; UTF-8 (a BOM dropped), else cp1252, else Latin-1, the fallback counted
    in `report.recoded_files` and reported (or warned, without a report) naming the file."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        where = f"byte 0x{data[e.start]:02x} at offset {e.start}"
    for encoding in ("cp1252", "latin-1"):  # Latin-1 decodes any byte: the loop always returns
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        message = f"not UTF-8 ({where}); read as {encoding}"
        if report is not None:
            report.recoded_files += 1
            report.error(str(path), message)
        else:
            warnings.warn(f"{path}: {message}", GroundcamWarning, stacklevel=2)
        return text
    raise AssertionError("unreachable: latin-1 decodes every byte")


def read_json(path: str | Path, report: ReadReport | None = None) -> Any:
    """The JSON value of `path` (decoded as `read_text`); invalid JSON is an `InputError` naming
    the file, line and column."""
    path = Path(path)
    try:
        return json.loads(read_text(path, report))
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise InputError(f"{path}: not usable JSON (nested too deeply)") from None
