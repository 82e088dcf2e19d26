"""Image files a person might drop on the page: broken, huge-by-header, odd modes and shapes."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header is patched to declare width x height (CRC recomputed)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def noise_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """Random pixels (incompressible: the file is about 3 bytes a pixel)."""
    Image.fromarray(_pixels(width, height, seed)).save(path)
    return path


# name -> True when every reader must refuse it, False when every reader must read it
CORPUS: dict[str, bool] = {
    "bomb.png": True,
    "truncated.png": True,
    "empty.png": True,
    "text.jpg": True,
    "rgba.png": False,
    "gray16.png": False,
    "palette.gif": False,
    "cmyk.jpg": False,
    "one-pixel.png": False,
    "wide.png": False,
}


def write_corpus(directory: Path) -> dict[str, Path]:
    """Each file of `CORPUS` written into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    files = {"bomb.png": bomb_png(d / "bomb.png", 100_000, 100_000)}
    good = noise_png(d / "good.png", 40, 30)
    (d / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("not an image at all\n" * 20)
    Image.fromarray(_pixels(20, 10)).convert("RGBA").save(d / "rgba.png")
    gray = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).astype(np.uint16)
    Image.fromarray(gray).save(d / "gray16.png")
    Image.fromarray(_pixels(20, 10)).convert("P").save(d / "palette.gif")
    Image.fromarray(_pixels(20, 10)).convert("CMYK").save(d / "cmyk.jpg")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one-pixel.png")
    Image.fromarray(_pixels(600, 6)).save(d / "wide.png")
    for name in CORPUS:
        files[name] = d / name
    return files
