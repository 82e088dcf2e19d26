"""Flickr30k / Flickr8k captions in their three common layouts (DESIGN §7).

- `captions.txt`: CSV `image,caption`, captions quoted when they contain commas or quotes;
- `results.csv`: `image_name| comment_number| comment`; the public Flickr30k copy has one row
  whose `| ` before the caption is missing (`<image>| 4   <caption>`): it is repaired, counted in
  `report.repaired_rows` and listed in `report.errors`, never fatal;
- `*.token`: `<image>#<n><TAB><caption>`.

The layout is picked from the file name, then from the first line.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from groundcam.data.sample import ReadReport

LAYOUTS = ("csv", "pipe", "token")
CAPTION_FILES = ("captions.txt", "results.csv", "results_20130124.token", "Flickr8k.token.txt")
_NUMBER_THEN_CAPTION = re.compile(r"^\s*(\d+)\s+(\S.*)$")


@dataclass(frozen=True)
class Caption:
    image: str  # file name, e.g. "1000092795.jpg"
    caption: str
    index: int  # 0..4 within the image


def detect_layout(path: str | Path) -> str:
    """`csv`, `pipe` or `token` for a caption file, by name and else by its first line."""
    path = Path(path)
    name = path.name.lower()
    if ".token" in name:
        return "token"
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
    if "|" in first:
        return "pipe"
    if "\t" in first and "#" in first.split("\t", 1)[0]:
        return "token"
    if name.endswith((".csv", ".txt")):
        return "csv"
    raise ValueError(f"{path}: cannot tell the caption layout from {first[:80]!r}")


def find_caption_file(root: str | Path) -> Path:
    """The caption file in a directory (first of CAPTION_FILES, then any `*.token`)."""
    root = Path(root)
    for name in CAPTION_FILES:
        if (root / name).is_file():
            return root / name
    tokens = sorted(root.glob("*.token"))
    if tokens:
        return tokens[0]
    raise FileNotFoundError(
        f"no caption file found in {root}: expected one of {', '.join(CAPTION_FILES)} or *.token"
    )


def read_captions(
    path: str | Path, layout: str | None = None, report: ReadReport | None = None
) -> list[Caption]:
    """Every (image, caption) of a caption file (or of the caption file in a directory).

    Malformed rows are skipped (or, for the known `results.csv` row, repaired) and recorded in
    `report` with `file:line`, never raised."""
    path = Path(path)
    if path.is_dir():
        path = find_caption_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    layout = layout or detect_layout(path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown caption layout {layout!r}; use one of {LAYOUTS}")
    report = report if report is not None else ReadReport()
    reader = {"csv": _read_csv, "pipe": _read_pipe, "token": _read_token}[layout]
    out = reader(path, report)
    report.samples += len(out)
    return out


def by_image(captions: Iterable[Caption]) -> dict[str, list[str]]:
    """Captions grouped per image, in file order."""
    out: dict[str, list[str]] = {}
    for c in captions:
        out.setdefault(c.image, []).append(c.caption)
    return out


def _skip(report: ReadReport, where: str, message: str) -> None:
    report.skipped_rows += 1
    report.error(where, f"{message}; row skipped")


def _read_csv(path: Path, report: ReadReport) -> list[Caption]:
    out: list[Caption] = []
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        for row in rows:
            lineno = rows.line_num
            if lineno == 1 and [c.strip().lower() for c in row] == ["image", "caption"]:
                continue
            if not row:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                _skip(report, f"{path}:{lineno}", f"expected 2 fields image,caption, got {row!r}")
                continue
            image = row[0].strip()
            n = counts.get(image, 0)
            counts[image] = n + 1
            out.append(Caption(image, row[1].strip(), n))
    return out


def _read_pipe(path: Path, report: ReadReport) -> list[Caption]:
    out: list[Caption] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split("|", 2)]
            if lineno == 1 and parts[0].lower() == "image_name":
                continue
            where = f"{path}:{lineno}"
            if len(parts) == 2:
                m = _NUMBER_THEN_CAPTION.match(parts[1])
                if m is None:
                    _skip(report, where, f"expected 3 '|'-separated fields, got {line!r}")
                    continue
                parts = [parts[0], m.group(1), m.group(2)]
                report.repaired_rows += 1
                report.error(where, f"missing '|' before the caption, repaired: {line!r}")
            if len(parts) != 3 or not parts[0] or not parts[2] or not parts[1].isdigit():
                _skip(report, where, f"expected image| number| caption, got {line!r}")
                continue
            out.append(Caption(parts[0], parts[2], int(parts[1])))
    return out


def _read_token(path: Path, report: ReadReport) -> list[Caption]:
    out: list[Caption] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            image, hash_, number = key.rpartition("#")[0], "#" in key, key.rpartition("#")[2]
            if not sep or not hash_ or not image or not number.isdigit() or not caption.strip():
                _skip(
                    report, f"{path}:{lineno}", f"expected <image>#<n><TAB><caption>, got {line!r}"
                )
                continue
            out.append(Caption(image, caption.strip(), int(number)))
    return out
