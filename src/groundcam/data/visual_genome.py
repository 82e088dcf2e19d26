"""Visual Genome region descriptions (`region_descriptions.json`, DESIGN §7) as GroundingSamples.

The file is a list, one entry per image, `{"id": <image_id>, "regions": [{phrase, x, y, width,
height, image_id, region_id}, ...]}`. One sample per image, one `Phrase` per region, box
`(x, y, x + width, y + height)`. Image sizes come from an optional `image_data.json`
(`{image_id|id, width, height}`), else from the image file's header, else `(0, 0)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from groundcam.data.sample import GroundingSample, Phrase, ReadReport
from groundcam.data.textfile import read_json
from groundcam.errors import InputError


class VisualGenomeRegions:
    """Samples of `region_descriptions.json`; `images` is a directory (or several, e.g.
    `VG_100K` and `VG_100K_2`) holding `<image_id>.jpg`. Malformed entries (no `regions` list)
    and regions (a phrase that is not a non-empty string, a box that is not finite) are skipped
    and counted in `self.report`; a missing or unreadable image sets `sample.meta["error"]`."""

    def __init__(
        self,
        path: str | Path,
        images: str | Path | Sequence[str | Path] | None = None,
        image_data: str | Path | None = None,
    ) -> None:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "region_descriptions.json"
        if not path.is_file():
            raise FileNotFoundError(f"Visual Genome region file not found: {path}")
        self.path = path
        if images is None:
            self.image_dirs: list[Path] = []
        elif isinstance(images, (str, Path)):
            self.image_dirs = [Path(images)]
        else:
            self.image_dirs = [Path(p) for p in images]
        self.sizes: dict[int, tuple[int, int]] = {}
        self._size_problems: list[tuple[str, str]] = []  # reported again on every iteration
        if image_data is not None:
            self._read_sizes(Path(image_data))
        self.report = ReadReport()
        self._data = read_json(path)
        if not isinstance(self._data, list):
            raise InputError(f"{path}: expected a list of images, got {type(self._data).__name__}")

    def _read_sizes(self, path: Path) -> None:
        """`self.sizes` from `image_data.json`; malformed entries are noted and left out."""
        entries = read_json(path)
        if not isinstance(entries, list):
            raise InputError(f"{path}: expected a list of images, got {type(entries).__name__}")
        for i, im in enumerate(entries):
            try:
                key = im.get("image_id", im.get("id"))
                self.sizes[int(key)] = (int(im["width"]), int(im["height"]))
            except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
                self._size_problems.append((f"{path}: entry #{i}", f"malformed entry ({e!r})"))

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[GroundingSample]:
        self.report = ReadReport()
        for where, message in self._size_problems:
            self.report.skipped_rows += 1
            self.report.error(where, f"{message}; size left out")
        for k, entry in enumerate(self._data):
            sample = self._sample(k, entry)
            if sample is not None:
                yield sample

    def _image_path(self, image_id: int) -> Path | None:
        for d in self.image_dirs:
            p = d / f"{image_id}.jpg"
            if p.is_file():
                return p
        return None

    def _sample(self, k: int, entry: dict) -> GroundingSample | None:
        report = self.report
        where = f"{self.path}: image entry #{k}"
        try:
            regions = entry["regions"]
            if not isinstance(regions, list):
                raise TypeError(f"'regions' is {type(regions).__name__}, not a list")
            image_id = entry.get("id", entry.get("image_id"))
            if image_id is None and regions:
                image_id = regions[0]["image_id"]
            image_id = int(image_id)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            report.skipped_samples += 1
            report.error(where, f"malformed entry ({e!r}); skipped")
            return None
        where = f"{where} (image {image_id})"
        phrases: list[Phrase] = []
        for j, r in enumerate(regions):
            try:
                x, y = float(r["x"]), float(r["y"])
                w, h = float(r["width"]), float(r["height"])
                text = r["phrase"]
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"phrase {text!r:.60} is not a non-empty string")
                if not all(math.isfinite(v) for v in (x, y, w, h)):
                    raise ValueError(f"box x={x}, y={y}, width={w}, height={h} is not finite")
                text = text.strip()
            except (KeyError, TypeError, ValueError) as e:
                report.skipped_lines += 1
                report.error(f"{where} region #{j}", f"malformed region ({e!r}); skipped")
                continue
            rid = r.get("region_id", j)
            phrases.append(
                Phrase(text, [(x, y, x + w, y + h)], "region", str(rid), {"region_id": rid})
            )
        meta: dict = {}
        path = self._image_path(image_id)
        size = self.sizes.get(image_id)
        if path is None:
            guess = self.image_dirs[0] / f"{image_id}.jpg" if self.image_dirs else None
            meta["error"] = f"image not found: {guess or f'{image_id}.jpg (no image directory)'}"
            report.missing_images.append(str(guess or f"{image_id}.jpg"))
            path = guess
        elif size is None:
            try:
                with Image.open(path) as im:
                    size = im.size
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                meta["error"] = f"{path}: unreadable image ({e})"
                report.error(str(path), f"unreadable image ({e})")
        report.samples += 1
        report.phrases += len(phrases)
        return GroundingSample(
            image_id=str(image_id),
            phrases=phrases,
            image_size=size or (0, 0),
            image_path=path,
            meta=meta,
        )
