"""Reading user images with one clear error for anything unreadable.

Every refusal is an `ImageError` (a ValueError) whose message is one line naming the file:
a file that is empty, a directory, not an image, truncated or corrupt, or larger than
`MAX_PIXELS`. The size limit is checked on the dimensions the file's header declares, before any
pixel is decoded, so a decompression bomb (a small PNG that claims 100000x100000) costs nothing.
A missing file stays a `FileNotFoundError` ("image not found: ...").
"""

from __future__ import annotations

import struct
from pathlib import Path

from PIL import Image

from groundcam.errors import ImageError, InputError

# Larger images are refused rather than exhausting memory (64 MP: a 48 MP photo passes). Read at
# call time, so `groundcam.io.MAX_PIXELS = ...` changes it. Pillow refuses images above
# 2 * PIL.Image.MAX_IMAGE_PIXELS (~179 MP) on its own; raise that too to go beyond it.
MAX_PIXELS = 64_000_000

# What Pillow raises for files it cannot identify or decode (its own open loop catches the
# middle four; decoders raise OSError, ValueError or EOFError on corrupt data).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    IndexError,
    TypeError,
    struct.error,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # when a caller has turned Pillow's warning into an error
)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for the model: 16-bit and integer/float grayscale are scaled to 8 bits first (a plain
    `convert("RGB")` would clip them to white), palette/RGBA/L converted."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _too_large(what: str, width: int, height: int) -> ImageError:
    return ImageError(
        f"{what}: {width}x{height} ({width * height:,} pixels) is larger than the limit of "
        f"{MAX_PIXELS:,} pixels (groundcam.io.MAX_PIXELS)"
    )


def check_image(image: Image.Image, what: str = "image") -> Image.Image:
    """Refuse a PIL image that cannot be explained: not a PIL image (`InputError`), zero width or
    height, or more than `MAX_PIXELS` pixels (`ImageError`, one line starting with `what`).
    Returns the image unchanged, so calls can be chained."""
    if not isinstance(image, Image.Image):
        raise InputError(f"{what} must be a PIL.Image, got {type(image).__name__}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} is empty ({width}x{height} pixels)")
    if width * height > MAX_PIXELS:
        raise _too_large(what, width, height)
    return image


def _declared_size(path: Path) -> tuple[int, int] | None:
    """(W, H) as the file's header declares it, read by Pillow's own format plugins but without
    Pillow's decompression-bomb check (which would raise or warn before the size could be named).
    Nothing is decoded. None when no plugin recognises the header."""
    Image.preinit()
    with path.open("rb") as fp:
        prefix = fp.read(16)
        for loader in (None, Image.init):
            if loader is not None:
                loader()
            for name in list(Image.ID):
                factory, accept = Image.OPEN[name]
                try:
                    accepted = not accept or accept(prefix)
                    if not accepted or isinstance(accepted, str):
                        continue
                    fp.seek(0)
                    return tuple(factory(fp, str(path)).size)  # type: ignore[return-value]
                except (SyntaxError, IndexError, TypeError, struct.error):
                    continue  # this plugin's format, but not this file: try the next
                except Exception:  # noqa: BLE001 - Image.open below reports it
                    return None
    return None


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from `path` (grayscale, RGBA, palette and 16-bit are converted).

    Raises `FileNotFoundError` for a missing path and `ImageError` (one line naming the file) for
    a directory, an empty file, a file that is not an image, a truncated or corrupt one, and one
    whose header declares more than `MAX_PIXELS` pixels (refused before decoding)."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"cannot read image {path}: it is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"cannot read image {path}: the file is empty (0 bytes)")
        size = _declared_size(path)
        if size is not None:
            if size[0] * size[1] > MAX_PIXELS:
                raise _too_large(str(path), *size)
        with Image.open(path) as im:
            check_image(im, str(path))
            return to_rgb(im)  # decodes here: truncated and corrupt data raise now
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        # only when MAX_PIXELS was raised past Pillow's own limit
        raise ImageError(
            f"{path}: {_one_line(e)} (PIL.Image.MAX_IMAGE_PIXELS; refused before decoding)"
        ) from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot read image {path}: {_one_line(e)}") from None
