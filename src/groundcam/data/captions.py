"""Flickr30k / Flickr8k (and COCO) captions in their four common layouts (DESIGN §7, §11).

- `csv` (`captions.txt`): CSV `image,caption`, captions quoted when they contain commas or quotes;
- `pipe` (`results.csv`): `image_name| comment_number| comment`; the public Flickr30k copy has one
  row whose `| ` before the caption is missing (`<image>| 4   <caption>`): it is repaired, counted
  in `report.repaired_rows` and listed in `report.errors`, never fatal;
- `token` (`*.token`, `Flickr8k.token.txt`): `<image>#<n><TAB><caption>`;
- `karpathy` (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`): Karpathy's
  split files, `{"images": [{"filename", "split", "sentences": [{"raw", "tokens"}, ...]}, ...]}`.
  Each caption is a sentence's `raw` text; `Caption.split` is the image's split (`train`, `val`,
  `test` or `restval`) and `Caption.index` the sentence's position in the image's list. The
  `filepath` of COCO entries is not part of `Caption.image`; `tokens` are not used (the captioner
  tokenises `raw` itself, `groundcam.data.caption_text`).

The layout is picked from the file name, then from the first non-blank line.

What real files hold and the readers take in their stride: a UTF-8 byte-order mark, CRLF or CR line
ends, blank lines and surrounding whitespace (ignored); header variants (`Image , Caption`,
`image_name,caption`, `image_name,comment_number,comment`, any case and spacing); numbers beyond 4
(`#7`, `| 12|`: kept as written). Rows that need a decision are recorded in the `ReadReport`
(`file:line: ...`, or `file:images[i]...` for Karpathy files), never raised:

- repaired (`report.repaired_rows`): a CSV caption with unquoted commas (the fields after the image
  are joined back with commas: they are the caption) or unbalanced quotes; the known `results.csv`
  row; a `.token` row with spaces instead of the tab;
- skipped (`report.skipped_rows`): a row that is not `image,caption` (or that the csv module
  cannot read, e.g. a field over `csv.field_size_limit()` characters), an empty caption, an exact
  duplicate of an earlier row (same image, same number where the layout has one, same caption;
  the message names the first line), a repeated header row, a Karpathy sentence without raw text;
- skipped images (`report.skipped_samples`): a Karpathy image entry that is not an object, has no
  `filename`, or whose `sentences` is not a list or is empty.

An empty file (or one without a single caption) gives no captions and a line in `report.errors`.
A file that is not UTF-8, or a Karpathy file that is not valid JSON or has no `images` list, is a
one-line ValueError naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from groundcam.data.sample import ReadReport

LAYOUTS = ("csv", "pipe", "token", "karpathy")
SPLITS = ("train", "val", "test", "restval")
KARPATHY_FILES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
CAPTION_FILES = (
    "captions.txt",
    "results.csv",
    "results_20130124.token",
    "Flickr8k.token.txt",
    *KARPATHY_FILES,
)
VAL_FRACTION = 0.05  # share of a file's images without splits that validate (by name hash)
WARN_LIMIT = 20  # problems of one file that each warn; all of them are in `report.errors`
_NUMBER_THEN_CAPTION = re.compile(r"^\s*(\d+)\s+(\S.*)$")
_TOKEN_WITH_SPACES = re.compile(r"^(\S*#\d+) +(\S.*)$")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_IMAGE_HEADERS = {
    "image",
    "images",
    "image_name",
    "image_id",
    "image_file",
    "filename",
    "file_name",
}
_NUMBER_HEADERS = {"comment_number", "caption_number", "number", "index", "n"}
_CAPTION_HEADERS = {"caption", "captions", "comment", "comments", "sentence", "text"}


@dataclass(frozen=True)
class Caption:
    image: str  # file name, e.g. "1000092795.jpg"
    caption: str
    index: int  # 0..4 within the image (as numbered in the file; beyond 4 where the file says so)
    split: str = ""  # Karpathy files: "train", "val", "test" or "restval"; "" for other layouts


def detect_layout(path: str | Path) -> str:
    """`csv`, `pipe`, `token` or `karpathy` for a caption file, by name and else by its first
    non-blank line. An empty `.csv`/`.txt` file counts as `csv`; a file that is not UTF-8 is a
    ValueError."""
    path = Path(path)
    by_name = _layout_from_name(path)
    if by_name:
        return by_name
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if len(head) == 1 << 16:  # the first lines are enough; cut at a line end to decode cleanly
        cut = max(head.rfind(b"\n"), 0)
        head = head[:cut] if cut else head
    return _layout_from_text(path, _decode(path, head, partial=True))


def find_caption_file(root: str | Path) -> Path:
    """The caption file in a directory (first of CAPTION_FILES, then any `*.token`, then any
    Karpathy-style `dataset_*.json`)."""
    root = Path(root)
    for name in CAPTION_FILES:
        if (root / name).is_file():
            return root / name
    for pattern in ("*.token", "dataset_*.json"):
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found[0]
    raise FileNotFoundError(
        f"no caption file found in {root}: expected one of {', '.join(CAPTION_FILES)}, *.token "
        "or dataset_*.json"
    )


def read_captions(
    path: str | Path,
    layout: str | None = None,
    report: ReadReport | None = None,
    split: str | None = None,
) -> list[Caption]:
    """Every (image, caption) of a caption file (or of the caption file in a directory).

    `split` ("train", "val", "test" or "restval") keeps one split of a Karpathy file; "train"
    includes "restval", the images Karpathy set aside from COCO val and everyone trains on
    (their captions keep `split == "restval"`). Asking for a split of a file without splits is a
    ValueError.

    Malformed rows are skipped or repaired and recorded in `report` with `file:line` (see the
    module docstring), never raised."""
    path = Path(path)
    if path.is_dir():
        path = find_caption_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown caption layout {layout!r}; use one of {LAYOUTS}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    report = report if report is not None else ReadReport()
    text = _decode(path, path.read_bytes())
    if not text.strip():
        report.error(str(path), "empty caption file: no captions")
        return []
    layout = layout or _layout_from_name(path) or _layout_from_text(path, text)
    if split is not None and layout != "karpathy":
        raise ValueError(
            f"{path}: a {layout!r} caption file has no splits; split={split!r} needs a Karpathy "
            "split file (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json)"
        )
    reader = {
        "csv": _read_csv,
        "pipe": _read_pipe,
        "token": _read_token,
        "karpathy": _read_karpathy,
    }
    log = _Log(report, path)
    out = reader[layout](path, text, log)
    log.close()
    if split is not None:
        present = sorted({c.split or "(none)" for c in out})
        wanted = ("train", "restval") if split == "train" else (split,)
        out = [c for c in out if c.split in wanted]
        if not out:
            report.error(str(path), f"no captions in split {split!r} (splits present: {present})")
    elif not out:
        report.error(str(path), "no captions read")
    report.samples += len(out)
    return out


def is_val_image(image: str, fraction: float = VAL_FRACTION) -> bool:
    """Whether `image` is among the `fraction` of images, chosen by a hash of the file name, that
    validate (and never train) in a caption file without splits."""
    digest = hashlib.sha1(image.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def by_image(captions: Iterable[Caption]) -> dict[str, list[str]]:
    """Captions grouped per image, in file order."""
    out: dict[str, list[str]] = {}
    for c in captions:
        out.setdefault(c.image, []).append(c.caption)
    return out


# --- layout and text ----------------------------------------------------------------------------


def _layout_from_name(path: Path) -> str | None:
    name = path.name.lower()
    if ".token" in name:
        return "token"
    if name.endswith(".json"):
        return "karpathy"
    return None


def _layout_from_text(path: Path, text: str) -> str:
    first = next((line.strip() for _, line in _lines(text) if line.strip()), "")
    if first.startswith("{"):
        return "karpathy"
    if re.match(r"^\S*#\d+(\t| +\S)", first):
        return "token"
    if "|" in first and "," not in first.split("|", 1)[0]:
        return "pipe"
    if path.name.lower().endswith((".csv", ".txt")) or "," in first:
        return "csv"
    raise ValueError(f"{path}: cannot tell the caption layout from {first[:80]!r}")


def _decode(path: Path, data: bytes, partial: bool = False) -> str:
    """UTF-8 text (a byte-order mark dropped); anything else is a one-line ValueError."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if partial and e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            return data[: e.start].decode("utf-8-sig")
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ValueError(
            f"{path}: not UTF-8 text{hint}: byte 0x{data[e.start]:02x} at offset {e.start}; "
            "save it as UTF-8"
        ) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) with CRLF, CR and LF all ending a line."""
    return enumerate(_LINE_BREAK.split(text), 1)


class _Log:
    """`report.error` for the first `WARN_LIMIT` problems of a file; the rest go to `report.errors`
    without a warning each (a file with thousands of bad rows warns once more, with the count)."""

    def __init__(self, report: ReadReport, path: Path) -> None:
        self.report, self.path, self.count = report, path, 0

    def error(self, where: str, message: str) -> None:
        self.count += 1
        if self.count <= WARN_LIMIT:
            self.report.error(where, message)
        else:
            self.report.errors.append(f"{where}: {message}")

    def close(self) -> None:
        if self.count > WARN_LIMIT:
            warnings.warn(
                f"{self.path}: {self.count - WARN_LIMIT} more problems, listed in the report's errors",
                stacklevel=3,
            )


def _skip(log: _Log, where: str, message: str) -> None:
    log.report.skipped_rows += 1
    log.error(where, f"{message}; row skipped")


def _repair(log: _Log, where: str, message: str) -> None:
    log.report.repaired_rows += 1
    log.error(where, message)


class _Seen:
    """First line of each row key, to skip exact duplicates naming the line they repeat."""

    def __init__(self) -> None:
        self.lines: dict[tuple, int] = {}

    def duplicate(self, log: _Log, where: str, key: tuple, lineno: int) -> bool:
        first = self.lines.setdefault(key, lineno)
        if first != lineno:
            _skip(log, where, f"duplicate of line {first}")
            return True
        return False


# --- readers ------------------------------------------------------------------------------------


def _header_name(cell: str) -> str:
    return "_".join(cell.lower().split())


def _csv_header(cells: list[str]) -> tuple[int, ...] | None:
    """The columns (image, caption) or (image, number, caption) a header row names, else None."""
    if len(cells) not in (2, 3) or _header_name(cells[0]) not in _IMAGE_HEADERS:
        return None
    names = [_header_name(c) for c in cells]
    if len(names) == 2 and names[0] in _IMAGE_HEADERS and names[1] in _CAPTION_HEADERS:
        return (0, 1)
    if (
        len(names) == 3
        and names[0] in _IMAGE_HEADERS
        and names[1] in _NUMBER_HEADERS
        and names[2] in _CAPTION_HEADERS
    ):
        return (0, 1, 2)
    return None


def _read_csv(path: Path, text: str, log: _Log) -> list[Caption]:
    out: list[Caption] = []
    counts: dict[str, int] = {}
    seen = _Seen()
    columns: tuple[int, ...] | None = None
    first = True
    for lineno, line in _lines(text):
        line = line.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        repairs = []
        try:  # one line at a time: a stray quote cannot swallow the rest of the file
            row = next(csv.reader([line], strict=True))
        except csv.Error:
            try:
                row = next(csv.reader([line]))
            except csv.Error as e:  # e.g. a field over csv.field_size_limit() characters
                _skip(log, where, f"not a CSV row ({e})")
                continue
            repairs.append("unbalanced quotes")
        header = _csv_header(row)
        if first:
            first = False
            if header is not None:
                columns = header
                continue
        if header is not None:
            _skip(log, where, f"a repeated header row {line!r}")
            continue
        width = 3 if columns == (0, 1, 2) else 2
        if len(row) > width or repairs:  # `a.jpg, "A dog, running"`: a space before the quote
            try:
                spaced = next(csv.reader([line], strict=True, skipinitialspace=True))
            except csv.Error:
                spaced = []
            if len(spaced) == width:
                row, repairs = spaced, []
        if len(row) > width and not row[-1].strip():
            while len(row) > width and not row[-1].strip():
                row.pop()  # trailing empty fields (a spreadsheet's ",,")
            repairs.append("trailing empty fields")
        if len(row) > width:
            row = [*row[: width - 1], ",".join(row[width - 1 :])]
            repairs.append("unquoted commas in the caption, fields joined")
        if len(row) != width or not row[0].strip():
            names = "image,number,caption" if width == 3 else "image,caption"
            _skip(log, where, f"expected {width} fields {names}, got {line!r}")
            continue
        image, caption = row[0].strip(), row[-1].strip()
        if width == 3 and not row[1].strip().isdigit():
            _skip(log, where, f"the caption number {row[1].strip()!r} is not a number")
            continue
        if not caption:
            _skip(log, where, f"empty caption for {image}")
            continue
        number = int(row[1]) if width == 3 else None
        if seen.duplicate(log, where, (image, number, caption), lineno):
            continue
        if repairs:
            _repair(log, where, f"{' and '.join(repairs)}, repaired: caption {caption!r}")
        if number is None:
            number = counts.get(image, 0)
            counts[image] = number + 1
        out.append(Caption(image, caption, number))
    return out


def _read_pipe(path: Path, text: str, log: _Log) -> list[Caption]:
    out: list[Caption] = []
    seen = _Seen()
    first = True
    for lineno, line in _lines(text):
        line = line.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split("|", 2)]
        is_header = _header_name(parts[0]) in _IMAGE_HEADERS and (
            len(parts) < 2 or not parts[1].isdigit()
        )
        where = f"{path}:{lineno}"
        if first:
            first = False
            if is_header:
                continue
        if is_header:
            _skip(log, where, f"a repeated header row {line!r}")
            continue
        if len(parts) == 2:
            m = _NUMBER_THEN_CAPTION.match(parts[1])
            if m is None:
                _skip(log, where, f"expected 3 '|'-separated fields, got {line!r}")
                continue
            parts = [parts[0], m.group(1), m.group(2)]
            _repair(log, where, f"missing '|' before the caption, repaired: {line!r}")
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
            _skip(log, where, f"expected image| number| caption, got {line!r}")
            continue
        if not parts[2]:
            _skip(log, where, f"empty caption for {parts[0]}")
            continue
        if seen.duplicate(log, where, (parts[0], int(parts[1]), parts[2]), lineno):
            continue
        out.append(Caption(parts[0], parts[2], int(parts[1])))
    return out


def _read_token(path: Path, text: str, log: _Log) -> list[Caption]:
    out: list[Caption] = []
    seen = _Seen()
    for lineno, line in _lines(text):
        line = line.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        key, sep, caption = line.partition("\t")
        if not sep:
            m = _TOKEN_WITH_SPACES.match(line)
            if m is not None:
                key, caption = m.group(1), m.group(2)
                _repair(log, where, f"spaces instead of a tab after {key}, repaired")
        key, caption = key.strip(), caption.strip()
        image, hash_, number = key.rpartition("#")
        if not hash_ or not image or not number.isdigit():
            _skip(log, where, f"expected <image>#<n><TAB><caption>, got {line!r}")
            continue
        if not caption:
            _skip(log, where, f"empty caption for {key}")
            continue
        if seen.duplicate(log, where, (image, int(number), caption), lineno):
            continue
        out.append(Caption(image, caption, int(number)))
    return out


def _read_karpathy(path: Path, text: str, log: _Log) -> list[Caption]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(
            f'{path}: not a Karpathy split file: expected {{"images": [...]}} at the top level'
        )
    out: list[Caption] = []
    for i, entry in enumerate(images):
        where = f"{path}:images[{i}]"
        problem = None
        if not isinstance(entry, dict):
            problem = f"an image entry is an object, got {type(entry).__name__}"
        elif not isinstance(entry.get("filename"), str) or not entry["filename"].strip():
            problem = "no 'filename'"
        elif not isinstance(entry.get("sentences"), list):
            problem = f"'sentences' of {entry['filename']} is not a list"
        elif not entry["sentences"]:
            problem = f"no sentences for {entry['filename']}"
        if problem is not None:
            log.report.skipped_samples += 1
            log.error(where, f"{problem}; image skipped")
            continue
        image = entry["filename"].strip()
        split = entry.get("split", "")
        split = split.strip().lower() if isinstance(split, str) else ""
        for j, sentence in enumerate(entry["sentences"]):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                _skip(log, f"{where}.sentences[{j}]", f"no raw text for {image}")
                continue
            out.append(Caption(image, raw.strip(), j, split))
    return out
