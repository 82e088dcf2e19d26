"""Reading user images: every common mode becomes RGB; unreadable files get one clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from groundcam.io import read_image


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (12, 10), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).convert(mode)
    im.save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png")
    assert out.mode == "RGB" and out.size == (10, 12)
    if mode == "I;16":  # 16-bit values are scaled down, not clipped to white
        assert np.asarray(out).std() > 20


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="cannot read image .*bad.jpg"):
        read_image(tmp_path / "bad.jpg")


def test_sixteen_bit_images_reach_the_model_scaled_not_clipped():
    import numpy as np
    from PIL import Image

    from groundcam.io import to_rgb

    wide = np.full((8, 8), 30000, dtype=np.uint16)  # ~46% grey in 16 bits
    rgb = np.asarray(to_rgb(Image.fromarray(wide)))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb[0, 0, 0]) - 30000 // 256) <= 1
