"""Overlays and the self-contained HTML report."""

import base64
import io
import re

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from groundcam.viz.html import image_data_uri, render_report, write_report
from groundcam.viz.overlay import DEFAULT_CMAP, colorize, overlay


def gradient_image(width: int = 40, height: int = 30) -> Image.Image:
    """A deterministic RGB test picture with distinct pixel values."""
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([xs, ys, 255 - xs], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def jet_bytes(value: float) -> tuple[int, int, int]:
    """The expected RGB of the default colormap at one value."""
    return tuple(int(c) for c in matplotlib.colormaps[DEFAULT_CMAP](value, bytes=True)[:3])


def blended(pixel, value: float, alpha: float = 1.0) -> tuple[int, int, int]:
    """The overlay's pixel: the colormap at opacity alpha * value over the image's pixel."""
    colour = np.array(jet_bytes(value), dtype=np.float32)
    pixel = np.array(pixel, dtype=np.float32)
    out = pixel + np.float32(alpha * value) * (colour - pixel)
    return tuple(int(c) for c in np.clip(np.rint(out), 0, 255))


def test_colorize_size_mode_and_values():
    heatmap = torch.linspace(0, 1, 12).reshape(3, 4)
    img = colorize(heatmap)
    assert img.mode == "RGB"
    assert img.size == (4, 3)
    assert img.getpixel((0, 0)) == jet_bytes(0.0)
    assert img.getpixel((3, 2)) == jet_bytes(1.0)


def test_colorize_clamps_and_handles_zero_map():
    clamped = colorize(np.array([[-3.0, 7.0]]))
    assert clamped.getpixel((0, 0)) == jet_bytes(0.0)
    assert clamped.getpixel((1, 0)) == jet_bytes(1.0)
    zeros = colorize(np.zeros((5, 6)))
    assert zeros.size == (6, 5)
    assert np.all(np.asarray(zeros) == np.array(jet_bytes(0.0), dtype=np.uint8))


def test_overlay_returns_image_size_rgb():
    image = gradient_image().convert("RGBA")
    result = overlay(image, torch.rand(4, 4))
    assert result.size == image.size
    assert result.mode == "RGB"


def test_overlay_alpha_zero_returns_original_pixels():
    image = gradient_image()
    result = overlay(image, np.random.default_rng(0).random((4, 4)), alpha=0.0)
    assert np.array_equal(np.asarray(result), np.asarray(image))


def test_overlay_alpha_one_is_the_colormap_at_opacity_value():
    image = gradient_image(width=8, height=6)
    heatmap = torch.zeros(6, 8)
    heatmap[2, 5] = 0.3
    heatmap[4, 1] = 0.85
    heatmap[1, 7] = 1.0
    result = overlay(image, heatmap, alpha=1.0)
    assert result.getpixel((5, 2)) == blended(image.getpixel((5, 2)), 0.3)
    assert result.getpixel((1, 4)) == blended(image.getpixel((1, 4)), 0.85)
    assert result.getpixel((7, 1)) == jet_bytes(1.0)  # full opacity at the maximum
    assert result.getpixel((0, 0)) == image.getpixel((0, 0))  # value 0: the image untouched


def test_overlay_resizes_bicubically_and_clamps():
    image = gradient_image(width=32, height=32)
    grid = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(4, 1)  # bicubic overshoots this step
    result = np.asarray(overlay(image, grid, alpha=1.0))
    values = torch.nn.functional.interpolate(
        grid[None, None], size=(32, 32), mode="bicubic", align_corners=False
    )[0, 0].clamp(0, 1)
    colours = np.asarray(colorize(values), dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32)
    expected = np.rint(pixels + values.numpy()[..., None] * (colours - pixels)).astype(np.uint8)
    assert np.array_equal(result, expected)


def test_overlay_draws_box_edges_white_inside_a_black_edge():
    image = Image.new("RGB", (40, 30), (200, 30, 30))  # red: a green or red box could vanish
    result = overlay(image, np.zeros((4, 4)), alpha=0.0, boxes=[[5, 4, 20, 25]])
    white, black = (255, 255, 255), (0, 0, 0)
    for y in range(4, 26):
        assert result.getpixel((5, y)) == white  # left edge
        assert result.getpixel((6, y)) == white  # 2 px wide
        assert result.getpixel((4, y)) == black  # its edge outside
        assert result.getpixel((7, y)) == black or y in (4, 5, 24, 25)  # and inside the corners
        assert result.getpixel((20, y)) == white  # right edge
    for x in range(5, 21):
        assert result.getpixel((x, 4)) == white  # top edge
        assert result.getpixel((x, 25)) == white  # bottom edge
    assert result.getpixel((12, 14)) == (200, 30, 30)  # interior untouched
    assert result.getpixel((2, 2)) == (200, 30, 30)  # outside untouched


@pytest.mark.parametrize(
    ("hit", "fill"), [(True, (26, 152, 80)), (False, (215, 48, 39)), (None, (255, 255, 255))]
)
def test_overlay_draws_point_marker(hit, fill):
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    result = overlay(image, np.zeros((4, 4)), alpha=0.0, point=(10, 12), hit=hit)
    assert result.getpixel((10, 12)) == fill  # the figures' hit and miss colours
    assert result.getpixel((10, 9)) == (255, 255, 255)  # white ring at radius 3
    assert result.getpixel((10, 8)) == (0, 0, 0)  # black edge around it
    assert result.getpixel((20, 20)) == (200, 30, 30)


def test_data_uri_round_trips_pixels():
    image = gradient_image()
    uri = image_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.format == "PNG"
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))


def example_sections() -> list[dict]:
    """Two sections, three rows, six overlay cells: eight images in all."""
    image = gradient_image()
    cell = overlay(image, torch.rand(4, 4))
    return [
        {
            "title": "image <1>",
            "image": image,
            "rows": [
                {
                    "phrase": "<b>& friends",
                    "score": 0.123456,
                    "hit": True,
                    "cells": [
                        {"label": "gradcam", "image": cell},
                        {"label": "attn", "image": cell},
                    ],
                },
                {
                    "phrase": "plain",
                    "score": None,
                    "hit": False,
                    "cells": [{"label": "gradcam", "image": cell}],
                },
            ],
        },
        {
            "title": "image 2",
            "image": image,
            "rows": [
                {
                    "phrase": "x",
                    "score": 1.0,
                    "hit": None,
                    "cells": [
                        {"label": "a", "image": cell},
                        {"label": "b", "image": cell},
                        {"label": "c", "image": cell},
                    ],
                },
            ],
        },
    ]


def test_render_report_is_self_contained_and_escaped():
    page = render_report("Run <7>", {"accuracy": "0.5 & up", "n": "3"}, example_sections())
    assert page.startswith("<!DOCTYPE html>")
    assert "&lt;b&gt;&amp; friends" in page
    assert "<b>&" not in page
    assert "Run &lt;7&gt;" in page
    assert "image &lt;1&gt;" in page
    assert "0.5 &amp; up" in page
    assert page.count("<img") == 8
    assert page.count("data:image/png;base64,") == 8
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page
    assert "0.123" in page and "0.1235" not in page
    assert "1.000" in page
    assert len(re.findall(r'class="badge hit"', page)) == 1
    assert len(re.findall(r'class="badge miss"', page)) == 1
    for label in ("gradcam", "attn", "a", "b", "c"):
        assert f"<figcaption>{label}</figcaption>" in page


def test_write_report_writes_utf8(tmp_path):
    path = write_report(tmp_path / "sub" / "report.html", "Über ✓", {}, example_sections())
    assert path == tmp_path / "sub" / "report.html"
    text = path.read_bytes().decode("utf-8")
    assert "Über ✓" in text
    assert '<meta charset="utf-8">' in text
    assert text.count("<img") == 8
