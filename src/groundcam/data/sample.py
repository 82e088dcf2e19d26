"""The one sample type every dataset reader yields: an image and the phrases grounded in it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the original image


@dataclass
class ReadReport:
    """What a reader read and what it had to skip; `errors` holds `file[:line]: message` lines."""

    samples: int = 0
    phrases: int = 0
    skipped_samples: int = 0
    skipped_lines: int = 0
    skipped_rows: int = 0
    repaired_rows: int = 0
    recoded_files: int = 0  # files read as cp1252/Latin-1 because they were not UTF-8
    missing_images: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def error(self, where: str, message: str) -> None:
        text = f"{where}: {message}"
        self.errors.append(text)
        warnings.warn(text, stacklevel=3)


@dataclass
class Phrase:
    """A piece of text and the ground-truth boxes of what it names (any box counts as a hit)."""

    text: str
    boxes: list[Box]
    kind: str = ""  # phrase type, e.g. "attribute", "relation", Flickr30k's "people"
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # COCO RLE of each box's object ({"size": [h, w], "counts": str}), where the data has masks
    masks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class GroundingSample:
    """One image with its phrases; the image is held in memory or read lazily from `image_path`."""

    image_id: str
    phrases: list[Phrase]
    image_size: tuple[int, int]  # (width, height) of the original image
    image: Image.Image | None = None
    image_path: Path | None = None
    caption: str | None = None
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """The image as RGB (16-bit and float images scaled to 8 bits, as `groundcam.io.to_rgb`).

        Raises FileNotFoundError naming the path when it is missing, and `ImageError` (one line
        naming the file, or the sample for an image held in memory) for an image that is empty,
        corrupt, truncated, a directory, or larger than `groundcam.io.MAX_PIXELS` (checked on the
        header, before decoding)."""
        from groundcam.io import check_image, read_image, to_rgb

        if self.image is not None:
            return to_rgb(check_image(self.image, f"sample {self.image_id}: image"))
        if self.image_path is None:
            raise FileNotFoundError(f"sample {self.image_id}: no image and no image path")
        return read_image(self.image_path)
