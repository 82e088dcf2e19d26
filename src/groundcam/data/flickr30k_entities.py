"""Flickr30k Entities read straight from the raw release (DESIGN §6 `amc`, §7).

Layout under `root`: `Annotations/<id>.xml`, `Sentences/<id>.txt` and `<split>.txt` (one image id
per line); the images (`<id>.jpg`) live in the `images` directory given separately.

Boxes follow the reference parser (`flickr30k_entities_utils.get_annotations`): **1 is subtracted
from every coordinate** of the 1-based `<bndbox>` values, so boxes are `(xmin-1, ymin-1, xmax-1,
ymax-1)` in pixels of the original image.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# ReadReport is imported from here too (it lived here before it moved to `sample`).
from groundcam.data.sample import Box, GroundingSample, Phrase, ReadReport
from groundcam.data.textfile import read_text

SPLITS = ("train", "val", "test")
_PHRASE_HEAD = re.compile(r"^\[/EN#(\d+)((?:/[^/\s\]]+)+)$")


@dataclass
class SentencePhrase:
    """One `[/EN#<chain>/<type>... words]` mention of a caption."""

    text: str
    chain: str
    types: list[str]
    first_word: int


class MalformedLine(ValueError):
    """A sentence line the phrase markup cannot be parsed from."""


def parse_sentence(line: str) -> tuple[str, list[SentencePhrase]]:
    """The plain caption and its phrase mentions, as the reference parser splits them.

    Raises `MalformedLine` on an unclosed or nested bracket, a stray `]`, or a phrase head that is
    not `[/EN#<digits>/<type>[/<type>...]`."""
    words: list[str] = []
    phrases: list[SentencePhrase] = []
    current: list[str] | None = None
    head: tuple[str, list[str], int] | None = None
    for token in line.split():
        if current is None:
            if token.startswith("["):
                m = _PHRASE_HEAD.match(token)
                if m is None:
                    raise MalformedLine(f"bad phrase head {token!r}")
                head = (m.group(1), m.group(2).strip("/").split("/"), len(words))
                current = []
            elif token.endswith("]") and token != "]":
                raise MalformedLine(f"']' outside a phrase in {token!r}")
            else:
                words.append(token)
            continue
        if token.startswith("[/EN#"):
            raise MalformedLine(f"nested phrase at {token!r}")
        closes = token.endswith("]")
        if closes:
            token = token[:-1]
        current.append(token)
        words.append(token)
        if closes:
            assert head is not None
            chain, types, first = head
            phrases.append(SentencePhrase(" ".join(current), chain, types, first))
            current = None
    if current is not None:
        raise MalformedLine("unclosed phrase (missing ']')")
    return " ".join(words), phrases


def parse_annotation(
    path: Path,
) -> tuple[tuple[int, int], dict[str, list[Box]], set[str], set[str]]:
    """`(width, height)`, boxes per chain id (minus 1 on every coordinate), scene and no-box chains.

    Raises `ValueError` naming the file (and line, for XML syntax errors) when it is malformed."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line = e.position[0] if e.position else "?"
        raise ValueError(f"{path}:{line}: malformed XML ({e})") from None
    try:
        size = root.find("size")
        width = int(size.findtext("width"))  # type: ignore[union-attr, arg-type]
        height = int(size.findtext("height"))  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{path}: missing or bad <size> width/height") from None
    boxes: dict[str, list[Box]] = {}
    scene: set[str] = set()
    nobox: set[str] = set()
    for k, obj in enumerate(root.iter("object")):
        names = [(n.text or "").strip() for n in obj.findall("name")]
        if not names or not all(names):
            raise ValueError(f"{path}: <object> #{k} has no chain id <name>")
        bnd = obj.find("bndbox")
        if bnd is not None:
            try:
                coords = [float(bnd.findtext(t)) - 1 for t in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{path}: <object> #{k} has a bad <bndbox>") from None
            if not all(math.isfinite(c) for c in coords):
                raise ValueError(
                    f"{path}: <object> #{k} (chain {names[0]}) has a non-finite <bndbox> "
                    f"{[c + 1 for c in coords]}"
                )
            for name in names:
                boxes.setdefault(name, []).append(tuple(coords))  # type: ignore[arg-type]
            continue
        if (obj.findtext("scene") or "0").strip() == "1":
            scene.update(names)
        if (obj.findtext("nobndbox") or "0").strip() == "1":
            nobox.update(names)
    return (width, height), boxes, scene, nobox


def read_split(root: str | Path, split: str) -> list[str]:
    """Image ids of `root/<split>.txt`; FileNotFoundError naming the file when it is absent."""
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"Flickr30k Entities split file not found: {path} (is root the Flickr30k Entities "
            "directory with Annotations/, Sentences/ and train.txt/val.txt/test.txt?)"
        )
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


class Flickr30kEntities:
    """One `GroundingSample` per image of the split, one `Phrase` per phrase mention of every
    caption whose chain has boxes (chain 0 `notvisual`, scene-only and no-box chains dropped).

    `Phrase.text` is the raw phrase words (the model adapter applies `pre_caption`), `kind` the
    first type, `meta` holds `types`, `caption_index`, `first_word` and `chain`. Every box of the
    chain is a ground-truth box (a box shared by several chains appears in each). Problems are
    collected in `self.report` (a `ReadReport`) rather than raised: a missing image sets
    `sample.meta["error"]`, a malformed XML (or a NaN/infinite box) skips its sample, a malformed
    sentence line its phrases; a sentence file that is not UTF-8 is read as cp1252 (else
    Latin-1) and counted in `report.recoded_files`, a byte-order mark is dropped. A wrong `root`
    raises FileNotFoundError naming the missing file at construction.
    """

    def __init__(self, root: str | Path, split: str = "test", images: str | Path | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown Flickr30k Entities split {split!r}; use one of {SPLITS}")
        self.root = Path(root)
        self.split = split
        self.images = Path(images) if images is not None else self.root / "flickr30k_images"
        self.ids = read_split(self.root, split)
        for sub in ("Annotations", "Sentences"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(
                    f"Flickr30k Entities directory not found: {self.root / sub}"
                )
        self.report = ReadReport()

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[GroundingSample]:
        self.report = ReadReport()
        for image_id in self.ids:
            sample = self._read(image_id)
            if sample is not None:
                yield sample

    def samples(self) -> list[GroundingSample]:
        return list(self)

    def _read(self, image_id: str) -> GroundingSample | None:
        report = self.report
        xml_path = self.root / "Annotations" / f"{image_id}.xml"
        txt_path = self.root / "Sentences" / f"{image_id}.txt"
        for path in (xml_path, txt_path):
            if not path.is_file():
                report.skipped_samples += 1
                report.error(str(path), "file not found; sample skipped")
                return None
        try:
            size, boxes, _scene, _nobox = parse_annotation(xml_path)
        except ValueError as e:
            report.skipped_samples += 1
            report.error(str(e), "sample skipped")
            return None
        phrases: list[Phrase] = []
        captions: list[str | None] = []  # one per non-empty line; None where it was malformed
        for lineno, line in enumerate(read_text(txt_path, report).splitlines(), 1):
            if not line.strip():
                continue
            caption_index = len(captions)
            try:
                caption, mentions = parse_sentence(line)
            except MalformedLine as e:
                captions.append(None)
                report.skipped_lines += 1
                report.error(f"{txt_path}:{lineno}", f"{e}; line skipped")
                continue
            captions.append(caption)
            for m in mentions:
                chain_boxes = boxes.get(m.chain)
                if m.chain == "0" or not chain_boxes:
                    continue
                phrases.append(
                    Phrase(
                        text=m.text,
                        boxes=list(chain_boxes),
                        kind=m.types[0] if m.types else "",
                        id=f"{image_id}:{caption_index}:{m.first_word}",
                        meta={
                            "types": m.types,
                            "caption_index": caption_index,
                            "first_word": m.first_word,
                            "chain": m.chain,
                            "caption": caption,
                        },
                    )
                )
        image_path = self.images / f"{image_id}.jpg"
        meta: dict = {"captions": captions}
        if not image_path.is_file():
            meta["error"] = f"image not found: {image_path}"
            report.missing_images.append(str(image_path))
            report.error(str(image_path), "image not found")
        report.samples += 1
        report.phrases += len(phrases)
        return GroundingSample(
            image_id=image_id,
            phrases=phrases,
            image_size=size,
            image_path=image_path,
            caption=next((c for c in captions if c is not None), None),
            split=self.split,
            meta=meta,
        )
