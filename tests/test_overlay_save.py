"""Overlays that leave low values transparent, keep red red, bound huge photos, carry a colour
bar; cmap/alpha through every entry point; saves that replace their own stale PNGs only."""

from __future__ import annotations

import colorsys

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from groundcam.errors import InputError
from groundcam.explanation import GRID_DPI, Explanation, GenerationExplanation
from groundcam.maps import upsample
from groundcam.viz.overlay import (
    BOX_COLOUR,
    DEFAULT_CMAP,
    MAX_SIDE,
    POINT_FILL,
    add_colorbar,
    drawn_size,
    overlay,
)


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def cmap_rgb(value: float, name: str = DEFAULT_CMAP) -> np.ndarray:
    return np.array(matplotlib.colormaps[name](value, bytes=True)[:3], dtype=np.int64)


def hue_degrees(rgb) -> float:
    r, g, b = (float(c) / 255 for c in rgb)
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360


# ----------------------------------------------------------------------------- colour


@pytest.mark.parametrize("cmap", [DEFAULT_CMAP, "jet", "turbo", "viridis"])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_a_zero_map_leaves_the_image_unchanged(cmap, alpha):
    image = photo()
    result = overlay(image, torch.zeros(5, 7), alpha=alpha, cmap=cmap)
    assert np.array_equal(np.asarray(result), np.asarray(image))


def test_pixels_where_the_map_is_zero_are_unchanged_and_the_rest_is_tinted():
    image = photo(60, 40)
    grid = torch.zeros(4, 6)
    grid[1:3, 3:] = 1.0
    result = np.asarray(overlay(image, grid, alpha=0.8)).astype(np.int64)
    values = upsample(grid, (40, 60)).clamp(0, 1).numpy()
    original = np.asarray(image).astype(np.int64)
    zero = values == 0
    assert zero.sum() > 500 and (~zero).sum() > 500
    assert np.array_equal(result[zero], original[zero])
    high = values >= 0.999
    expected = np.rint(original[high] + 0.8 * values[high, None] * (cmap_rgb(1.0) - original[high]))
    assert np.abs(result[high] - expected).max() <= 1
    assert np.abs(result[high] - original[high]).mean() > 20


@pytest.mark.parametrize("value", [0.25, 0.5, 0.75, 1.0])
def test_a_red_object_under_the_map_stays_reddish(value):
    image = Image.new("RGB", (40, 40), (200, 200, 200))
    image.paste((210, 25, 25), (10, 10, 30, 30))  # a red square
    grid = torch.zeros(40, 40)
    grid[10:30, 10:30] = value
    result = overlay(image, grid, alpha=0.5, resample="bilinear")  # same size: no resize
    r, g, b = result.getpixel((20, 20))
    hue = hue_degrees((r, g, b))
    assert hue <= 30 or hue >= 345, (value, (r, g, b), hue)  # red/orange, not purple (~280)
    assert r >= 190 and r > 1.5 * max(g, b)
    assert result.getpixel((2, 2)) == (200, 200, 200)  # the scene around it untouched
    # the constant jet blend this replaces turned the red square purple wherever the map was low
    jet_low = 0.5 * np.array([210, 25, 25]) + 0.5 * cmap_rgb(0.0, "jet")
    assert 240 <= hue_degrees(jet_low) <= 330


def test_unknown_colour_map_and_bad_alpha_are_one_line_input_errors():
    image = photo()
    with pytest.raises(InputError) as error:
        overlay(image, torch.rand(3, 3), cmap="infernoo")
    message = str(error.value)
    assert "\n" not in message
    assert "unknown colour map 'infernoo'" in message and "inferno" in message and "jet" in message
    for alpha in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(InputError, match="alpha must be"):
            overlay(image, torch.rand(3, 3), alpha=alpha)
    with pytest.raises(InputError, match="heatmap contains NaN"):
        overlay(image, torch.tensor([[0.0, float("nan")]]))


# ----------------------------------------------------------------------------- size


def test_huge_photo_is_drawn_bounded_with_boxes_and_point_scaled():
    width, height = 4800, 3200
    image = Image.new("RGB", (width, height), (0, 0, 0))
    grid = torch.zeros(8, 12)
    grid[6, 9] = 1.0  # cell centre at (3800, 2600) of the photo
    box = [1200.0, 800.0, 2400.0, 1600.0]
    result = overlay(image, grid, alpha=1.0, boxes=[box], point=(3600, 2400), hit=True)
    assert result.size == drawn_size((width, height)) == (MAX_SIDE, 683)
    sx, sy = MAX_SIDE / width, 683 / height
    x1, y1, x2, y2 = round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)
    assert (x1, y1, x2, y2) == (256, 171, 512, 342)
    for x in range(x1, x2 + 1, 17):
        assert result.getpixel((x, y1)) == BOX_COLOUR and result.getpixel((x, y2)) == BOX_COLOUR
    for y in range(y1, y2 + 1, 13):
        assert result.getpixel((x1, y)) == BOX_COLOUR and result.getpixel((x2, y)) == BOX_COLOUR
    assert result.getpixel((384, 256)) == (0, 0, 0)  # inside the box: black photo, map ~0
    # the point's pixel centre (3600.5, 2400.5) lands on the drawn pixel (768, 512)
    assert result.getpixel((768, 512)) == POINT_FILL[True]
    # markers grow with the drawn size (a unit of round(683 / 200) = 3 px): a dot of radius 9
    # whose outer unit is a white ring
    assert result.getpixel((768, 512 - 7)) == (255, 255, 255)
    assert result.getpixel((768, 512 - 10)) == (0, 0, 0)  # then a unit of black edge
    # the map is drawn at the drawn size: its peak is where the photo's peak is, scaled
    values = np.asarray(overlay(image, grid, alpha=1.0), dtype=np.int64)[..., 0]  # no markers
    peak_y, peak_x = np.unravel_index(int(values.argmax()), values.shape)
    assert abs(peak_x - 3800 * sx) <= 4 and abs(peak_y - 2600 * sy) <= 4


def test_max_side_is_a_parameter_and_none_draws_at_full_size():
    image = photo(300, 120)
    small = overlay(image, torch.rand(3, 3), max_side=100, boxes=[[30, 12, 270, 108]])
    assert small.size == (100, 40)
    assert small.getpixel((10, 4)) == BOX_COLOUR and small.getpixel((90, 36)) == BOX_COLOUR
    assert overlay(image, torch.rand(3, 3), max_side=None).size == (300, 120)
    assert overlay(image, torch.rand(3, 3), max_side=300).size == (300, 120)  # never upscaled
    assert drawn_size((5000, 10)) == (1024, 2)
    assert drawn_size((10, 5000), 100) == (1, 100)


def test_sixteen_bit_photo_is_scaled_not_white():
    wide = Image.fromarray(np.full((20, 30), 30000, dtype=np.uint16))
    result = overlay(wide, torch.zeros(2, 2))
    assert result.mode == "RGB" and abs(result.getpixel((5, 5))[0] - 30000 // 256) <= 1


# ----------------------------------------------------------------------------- colour bar


def test_colour_bar_is_inset_keeps_the_size_and_reads_1_to_0():
    image = Image.new("RGB", (200, 160), (90, 90, 90))
    grid = torch.rand(4, 4)
    plain = np.asarray(overlay(image, grid))
    barred = np.asarray(overlay(image, grid, colorbar=True))
    assert barred.shape == plain.shape
    changed = np.argwhere((barred != plain).any(-1))
    (top, left), (bottom, right) = changed.min(0), changed.max(0)
    assert left > 200 * 0.7 and top < 10 and bottom < 160 * 0.45  # a small top-right panel
    assert np.array_equal(barred[:, : left - 1], plain[:, : left - 1])  # the rest untouched
    assert np.array_equal(barred[bottom + 1 :], plain[bottom + 1 :])
    panel = np.asarray(overlay(image, grid, alpha=0.0, colorbar=True))  # on a uniform photo
    assert tuple(panel[top, left]) == (214, 214, 214)  # 90 lightened by 75%
    column = panel[:, left + 4]  # through the bar
    rows = [y for y in range(top, bottom + 1) if tuple(column[y]) != (214, 214, 214)]
    bar_top, bar_bottom = min(rows), max(rows)
    assert rows == list(range(bar_top, bar_bottom + 1)) and bar_bottom - bar_top + 1 >= 0.25 * 160
    assert np.abs(column[bar_top].astype(int) - cmap_rgb(1.0)).max() <= 2
    assert np.abs(column[bar_bottom].astype(int) - cmap_rgb(0.0)).max() <= 2
    labels = panel[top : bottom + 1, left + 10 : right + 1]
    assert (labels.max(-1) < 80).sum() > 10  # dark "1" and "0" on the light panel


def test_colour_bar_at_the_side_grows_the_image_and_tiny_images_get_none():
    image = photo(120, 90)
    side = add_colorbar(image, "jet", inset=False)
    assert side.height == 90 and side.width > 120
    assert np.array_equal(np.asarray(side)[:, :120], np.asarray(image))
    tiny = photo(20, 16)
    assert np.array_equal(np.asarray(add_colorbar(tiny)), np.asarray(tiny))
    with pytest.raises(InputError, match="unknown colour map"):
        add_colorbar(image, "nope")


# ----------------------------------------------------------------------------- explanations


def explanation(phrases: list[str], image: Image.Image | None = None) -> Explanation:
    p = len(phrases)
    maps = torch.rand(p, 4, 4, generator=torch.Generator().manual_seed(p))
    return Explanation(
        maps=maps,
        raw_maps=maps * 3,
        scores=torch.linspace(0.1, 0.9, p),
        phrases=phrases,
        tokens=[[w] for w in phrases],
        method="gradcam",
        layer=1,
        target="itm",
        model="test",
        images=[image or photo(64, 48)],
        image_index=[0] * p,
    )


def generation(tokens: list[str], image: Image.Image | None = None) -> GenerationExplanation:
    k = len(tokens)
    maps = torch.rand(k, 3, 5, generator=torch.Generator().manual_seed(k))
    return GenerationExplanation(
        text="".join(tokens),
        tokens=tokens,
        token_ids=list(range(k)),
        positions=list(range(k)),
        maps=maps,
        raw_maps=maps,
        scores=torch.full((k,), 0.5),
        method="attention",
        layer=0,
        model="test",
        image=image or photo(80, 30),
    )


def test_explanation_overlay_and_save_take_cmap_alpha_and_draw_the_colour_bar(tmp_path):
    ex = explanation(["a red ball"])
    image = ex.image(0)
    expected = overlay(image, ex.maps[0], alpha=0.7, cmap="turbo", colorbar=True)
    assert np.array_equal(
        np.asarray(ex.overlay(0, alpha=0.7, cmap="turbo", colorbar=True)), expected
    )
    assert np.array_equal(np.asarray(ex.overlay(0)), np.asarray(overlay(image, ex.maps[0])))
    out = ex.save(tmp_path / "out", cmap="turbo", alpha=0.7)
    saved = Image.open(out / "000_a-red-ball.png")
    assert saved.size == image.size
    assert np.array_equal(np.asarray(saved), np.asarray(expected))
    plain = ex.save(tmp_path / "plain", colorbar=False)
    assert np.array_equal(
        np.asarray(Image.open(plain / "000_a-red-ball.png")), np.asarray(overlay(image, ex.maps[0]))
    )


def test_bad_style_is_refused_before_anything_is_written(tmp_path):
    ex = explanation(["x"])
    with pytest.raises(InputError, match="unknown colour map 'nope'"):
        ex.save(tmp_path / "a", cmap="nope")
    with pytest.raises(InputError, match="alpha must be in"):
        generation(["a"]).save(tmp_path / "b", alpha=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_generation_overlay_grid_and_save_take_cmap_alpha(tmp_path):
    gen = generation(["a", "b1"])
    expected = overlay(gen.image, gen.maps[1], alpha=0.9, cmap="jet")
    assert np.array_equal(np.asarray(gen.overlay(1, alpha=0.9, cmap="jet")), np.asarray(expected))
    grid = gen.grid(cmap="jet", alpha=0.9)  # the per-token paper figure at GRID_DPI
    width, height = gen.figure(tokens=True).get_size_inches()
    assert grid.size == pytest.approx((width * GRID_DPI, height * GRID_DPI), abs=1)
    assert not np.array_equal(np.asarray(grid), np.asarray(gen.grid()))  # jet, not inferno
    assert not np.array_equal(np.asarray(grid), np.asarray(gen.grid(cmap="jet", alpha=0.9,
                                                                     colorbar=False)))  # fmt: skip
    out = gen.save(tmp_path / "gen", cmap="jet", alpha=0.9)
    assert sorted(p.name for p in out.iterdir()) == [
        "000_a.png",
        "001_b1.png",
        "maps.npz",
        "meta.json",
        "tokens.png",
    ]
    assert np.array_equal(np.asarray(Image.open(out / "tokens.png")), np.asarray(grid))
    saved = np.asarray(Image.open(out / "001_b1.png"))
    assert np.array_equal(saved, np.asarray(gen.overlay(1, alpha=0.9, cmap="jet", colorbar=True)))


# ----------------------------------------------------------------------------- stale files


def test_saving_again_removes_the_previous_runs_overlays_only(tmp_path):
    out = tmp_path / "run"
    explanation(["the red circle", "a blue square", "star"]).save(out)
    assert sorted(p.name for p in out.glob("*.png")) == [
        "000_the-red-circle.png",
        "001_a-blue-square.png",
        "002_star.png",
    ]
    keep = ["notes.txt", "my-figure.png", "12_short.png", "abc_def.png", "000_UPPER.png"]
    for name in keep:
        (out / name).write_text("mine")
    (out / "000_folder.png").mkdir()  # a folder with an overlay-like name stays
    (out / "000_folder.png" / "inside.png").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "000_x.png").write_text("mine")  # only the top level is ours
    generation(["q"]).save(out)  # writes tokens.png and 000_q.png, removes the three overlays
    overlays = [p.name for p in out.glob("0*.png") if p.is_file() and p.name not in keep]
    assert overlays == ["000_q.png"]
    assert (out / "tokens.png").is_file()

    explanation(["a green triangle"]).save(out)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [*keep, "000_a-green-triangle.png", "000_folder.png", "maps.npz", "meta.json", "sub"]
    )
    for name in keep:
        assert (out / name).read_text() == "mine"
    assert (out / "000_folder.png" / "inside.png").read_text() == "mine"
    assert (out / "sub" / "000_x.png").read_text() == "mine"


def test_saving_without_images_still_clears_stale_overlays(tmp_path):
    out = explanation(["one", "two"]).save(tmp_path / "r")
    ex = explanation(["three"])
    ex.images, ex.image_index = [], []
    ex.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["maps.npz", "meta.json"]


def test_an_existing_file_as_the_directory_is_an_input_error(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    for save in (explanation(["x"]).save, generation(["x"]).save):
        with pytest.raises(InputError, match=f"^{target} exists and is not a directory$"):
            save(target)
        with pytest.raises(InputError, match=f"^{target} exists and is not a directory$"):
            save(target / "deeper" / "still")
    assert target.read_text() == "a file"
