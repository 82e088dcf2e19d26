"""Reading user images with one clear error for anything unreadable."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # larger images are refused rather than exhausting memory


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for the model: 16-bit and integer/float grayscale are scaled to 8 bits first (a plain
    `convert("RGB")` would clip them to white), palette/RGBA/L converted."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from `path` (grayscale, RGBA, palette and 16-bit are converted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(
                    f"{path}: {im.width}x{im.height} is larger than {MAX_PIXELS} pixels"
                )
            return to_rgb(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
