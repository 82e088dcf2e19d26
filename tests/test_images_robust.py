"""Images that cannot be used are refused with one-line ImageErrors naming the file: bombs (before
decoding), truncated, empty, not-an-image, directories; check_image guards PIL images passed in."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import groundcam.io as gio
from groundcam.data.sample import GroundingSample
from groundcam.errors import ImageError, InputError
from groundcam.io import check_image, read_image


def png_bytes(width: int = 6, height: int = 4, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR is patched to declare width x height (CRC recomputed)."""
    data = bytearray(png_bytes(1, 1, "L"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def sample_of(**kwargs) -> GroundingSample:
    return GroundingSample(phrases=[], image_size=(1, 1), **kwargs)


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (9_000, 9_000), (8_001, 8_000)])
def test_bomb_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch, width, height):
    path = bomb_png(tmp_path / "bomb.png", width, height)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning on the way
        with pytest.raises(ImageError) as error:
            read_image(path)
    assert_one_line(
        error, str(path), f"{width}x{height}", f"{width * height:,} pixels", "64,000,000"
    )
    assert decoded == []  # refused on the declared size, nothing decoded
    with pytest.raises(ImageError, match=f"{width}x{height}"):
        sample_of(image_id="b", image_path=path).load_image()


def test_max_pixels_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    path.write_bytes(png_bytes(6, 4))
    assert read_image(path).size == (6, 4)
    monkeypatch.setattr(gio, "MAX_PIXELS", 23)
    with pytest.raises(ImageError) as error:
        read_image(path)
    assert_one_line(error, "6x4 (24 pixels)", "limit of 23 pixels", "groundcam.io.MAX_PIXELS")
    monkeypatch.setattr(gio, "MAX_PIXELS", 24)
    assert read_image(path).size == (6, 4)


def test_max_pixels_above_pillows_limit_is_still_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(gio, "MAX_PIXELS", 10**12)
    path = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageError) as error:
        read_image(path)
    assert_one_line(error, str(path), "10000000000 pixels", "MAX_IMAGE_PIXELS")


def test_truncated_png_is_an_image_error(tmp_path):
    data = png_bytes(64, 64)
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as error:
        read_image(path)
    assert_one_line(error, "cannot read image", str(path), "truncated")
    with pytest.raises(ImageError, match="truncated"):
        sample_of(image_id="c", image_path=path).load_image()


def test_truncated_jpeg_is_an_image_error(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, "JPEG"
    )
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:300])
    with pytest.raises(ImageError) as error:
        read_image(path)
    assert_one_line(error, "cannot read image", str(path))


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "the file is empty (0 bytes)"), (b"not an image at all\n", "cannot identify")],
)
def test_empty_and_text_files_are_image_errors(tmp_path, content, expected):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(ImageError) as error:
        read_image(path)
    assert_one_line(error, "cannot read image", str(path), expected)
    with pytest.raises(ImageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        sample_of(image_id="t", image_path=path).load_image()


def test_directory_is_an_image_error(tmp_path):
    folder = tmp_path / "photos.png"
    folder.mkdir()
    with pytest.raises(ImageError) as error:
        read_image(folder)
    assert_one_line(error, str(folder), "is a directory")
    with pytest.raises(ImageError, match="is a directory"):
        sample_of(image_id="d", image_path=folder).load_image()


def test_missing_file_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="image not found"):
        sample_of(image_id="m", image_path=tmp_path / "nope.png").load_image()


def test_image_errors_are_value_errors():
    assert issubclass(ImageError, ValueError) and issubclass(ImageError, InputError)


def test_check_image_size_limit_and_empty_images(monkeypatch):
    image = Image.new("RGB", (10, 7))
    assert check_image(image, "image 0") is image
    with pytest.raises(ImageError) as error:
        check_image(Image.new("RGB", (0, 5)), "image 3")
    assert_one_line(error, "image 3 is empty (0x5 pixels)")
    with pytest.raises(ImageError, match="image 1 is empty"):
        check_image(Image.new("L", (4, 0)), "image 1")
    monkeypatch.setattr(gio, "MAX_PIXELS", 69)
    with pytest.raises(ImageError) as error:
        check_image(image, "image 2")
    assert_one_line(error, "image 2: 10x7 (70 pixels)", "limit of 69 pixels")
    with pytest.raises(InputError, match="image 4 must be a PIL.Image, got ndarray"):
        check_image(np.zeros((3, 3, 3)), "image 4")


def test_in_memory_sample_image_is_checked_and_converted(monkeypatch):
    wide = Image.fromarray(np.full((4, 5), 30000, dtype=np.uint16))
    sample = sample_of(image_id="s1", image=wide)
    rgb = sample.load_image()
    assert rgb.mode == "RGB" and rgb.size == (5, 4)
    assert abs(int(np.asarray(rgb)[0, 0, 0]) - 30000 // 256) <= 1  # scaled, not clipped white
    monkeypatch.setattr(gio, "MAX_PIXELS", 19)
    with pytest.raises(ImageError, match="sample s1: image: 5x4"):
        sample.load_image()


def test_good_images_still_read(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(png_bytes(9, 5, "RGBA"))
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (9, 5)
    sample = sample_of(image_id="ok", image_path=path).load_image()
    assert np.array_equal(np.asarray(sample), np.asarray(image))
