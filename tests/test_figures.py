"""Paper figures: files in each format at the requested size and DPI, titles and the marker where
they should be (read back from the pixels), the photo untouched where the map is 0, and
`explain --method all` writing one column per supported method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny import noise_images, tiny_albef

from groundcam.adapters.albef import AlbefAdapter
from groundcam.cli import main
from groundcam.errors import InputError
from groundcam.explainer import Explainer, supported_methods
from groundcam.viz import figures
from groundcam.viz.figures import map_figure, save_figure

RED = (200, 30, 30)


def _red_image(width: int = 80, height: int = 60) -> Image.Image:
    return Image.new("RGB", (width, height), RED)


def _half_map() -> torch.Tensor:
    heat = torch.zeros(6, 8)
    heat[:, 4:] = torch.linspace(0.2, 1.0, 6)[:, None]
    return heat


def _pixels(fig, tmp_path, dpi: int) -> np.ndarray:
    path = save_figure(fig, tmp_path / "f.png", dpi)
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _to_pixel(fig, ax, x: float, y: float) -> tuple[int, int]:
    """Data (x, y) on `ax` -> (column, row) of the PNG last saved (the layout of that save;
    matplotlib's origin is bottom left)."""
    px, py = ax.transData.transform((x, y))
    return int(px), int(fig.bbox.height - py)


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_each_format_is_written_at_the_requested_size_and_dpi(tmp_path, fmt):
    fig = map_figure(_red_image(), _half_map(), "the red square  0.93")
    path = save_figure(fig, tmp_path / f"figure.{fmt}", dpi=200)
    data = path.read_bytes()
    width_in, height_in = fig.get_size_inches()
    if fmt == "png":
        with Image.open(path) as png:
            assert png.size == (round(width_in * 200), round(height_in * 200))
            assert png.info["dpi"] == pytest.approx((200, 200), abs=0.01)
    elif fmt == "pdf":
        assert data.startswith(b"%PDF-")
        # the page is the figure's size in points (72 per inch), whatever the dpi
        assert f"/MediaBox [ 0 0 {width_in * 72:g} {height_in * 72:g} ]".encode() in data
    else:
        assert b"<svg" in data[:2000] and f'width="{width_in * 72:g}pt"'.encode() in data


def test_bad_format_and_dpi_are_input_errors(tmp_path):
    fig = map_figure(_red_image(), _half_map())
    with pytest.raises(InputError, match="figure format 'jpg'"):
        save_figure(fig, tmp_path / "f.jpg")
    with pytest.raises(InputError, match="dpi must be between 30 and 1200"):
        save_figure(fig, tmp_path / "f.png", dpi=5)


def test_marker_is_drawn_at_the_pointed_pixel_in_the_hit_colour(tmp_path):
    fig = map_figure(_red_image(), _half_map(), point=(60, 30), hit=True, boxes=[[50, 20, 70, 40]])
    ax = fig.axes[0]
    pixels = _pixels(fig, tmp_path, int(fig.dpi))
    column, row = _to_pixel(fig, ax, 60, 30)
    green = np.array(Image.new("RGB", (1, 1), figures.HIT_COLOUR).getpixel((0, 0)))
    assert np.abs(pixels[row, column] - green).max() <= 3
    # a miss is drawn in the miss colour at the same place
    miss = map_figure(_red_image(), _half_map(), point=(60, 30), hit=False)
    pixels = _pixels(miss, tmp_path, int(miss.dpi))
    column, row = _to_pixel(miss, miss.axes[0], 60, 30)
    red = np.array(Image.new("RGB", (1, 1), figures.MISS_COLOUR).getpixel((0, 0)))
    assert np.abs(pixels[row, column] - red).max() <= 3


def test_box_outline_is_white_inside_a_black_edge(tmp_path):
    fig = map_figure(_red_image(), torch.zeros(6, 8), boxes=[[20, 10, 60, 50]])
    ax = fig.axes[0]
    pixels = _pixels(fig, tmp_path, int(fig.dpi))
    column, row = _to_pixel(fig, ax, 40, 10)  # the middle of the box's top edge
    line = pixels[row - 3 : row + 4, column]
    assert line.min(axis=1).max() >= 240  # white at the line
    assert line.max(axis=1).min() <= 40  # black beside it


def test_title_is_above_the_panel_and_absent_without_one(tmp_path):
    titled = map_figure(_red_image(), _half_map(), "the red square  0.93")
    plain = map_figure(_red_image(), _half_map())
    titled_pixels = _pixels(titled, tmp_path, int(titled.dpi))
    box = titled.axes[0].title.get_window_extent()
    height = titled.bbox.height
    rows = slice(int(height - box.y1), int(height - box.y0) + 1)
    columns = slice(int(box.x0), int(box.x1) + 1)
    assert box.y0 >= titled.axes[0].get_window_extent().y1 - 1  # above the picture
    dark = (titled_pixels[rows, columns] < 100).all(axis=2)
    assert dark.sum() > 20
    assert (_pixels(plain, tmp_path, int(plain.dpi))[rows, columns] < 100).all(axis=2).sum() == 0


def test_pixel_where_the_map_is_zero_keeps_the_photo(tmp_path):
    fig = map_figure(_red_image(), _half_map())
    ax = fig.axes[0]
    pixels = _pixels(fig, tmp_path, int(fig.dpi))
    column, row = _to_pixel(fig, ax, 10, 30)  # left half: map 0
    assert tuple(pixels[row, column]) == RED
    column, row = _to_pixel(fig, ax, 75, 55)  # right half near the bottom: heat drawn
    assert np.abs(pixels[row, column] - np.array(RED)).max() > 30


def test_contour_style_leaves_the_zero_region_untouched(tmp_path):
    fig = map_figure(_red_image(), _half_map(), style="contour")
    pixels = _pixels(fig, tmp_path, int(fig.dpi))
    column, row = _to_pixel(fig, fig.axes[0], 10, 30)
    assert tuple(pixels[row, column]) == RED
    with pytest.raises(InputError, match="figure style 'dots'"):
        map_figure(_red_image(), _half_map(), style="dots")


def test_muted_style_greys_the_photo_and_keeps_the_heat_visible_on_red(tmp_path):
    from groundcam.viz.figures import MUTED_FLOOR, muted

    grey = muted(_red_image()).getpixel((10, 30))
    luminance = round(0.299 * RED[0] + 0.587 * RED[1] + 0.114 * RED[2])
    expected = round((MUTED_FLOOR + (1 - MUTED_FLOOR) * luminance / 255) * 255)
    assert abs(grey[0] - expected) <= 1 and grey[0] == grey[1] == grey[2]
    heat = map_figure(_red_image(), _half_map(), style="muted", alpha=0.9)
    plain = map_figure(_red_image(), _half_map(), alpha=0.9)
    muted_pixels = _pixels(heat, tmp_path, int(heat.dpi))
    plain_pixels = _pixels(plain, tmp_path, int(plain.dpi))
    column, row = _to_pixel(heat, heat.axes[0], 10, 30)  # map 0: the grey photo, no heat
    assert np.abs(muted_pixels[row, column].astype(int) - np.array(grey)).max() <= 1
    column, row = _to_pixel(heat, heat.axes[0], 75, 55)  # heat: colour against grey
    spread = lambda p: int(p.max()) - int(p.min())  # noqa: E731
    assert spread(muted_pixels[row, column]) > 60
    # the only colour in the panel is the heat's: the same heat as over the photo
    assert np.abs(muted_pixels[row, column].astype(int) - np.array(grey)).max() > 60
    assert tuple(plain_pixels[row, column]) != tuple(muted_pixels[row, column])


def test_notebook_shows_png_and_html(one_thread, tokenizer):
    explainer = Explainer(AlbefAdapter(tiny_albef(len(tokenizer)), tokenizer, name="tiny"))
    ex = explainer.explain(noise_images(1, 48, 64)[0], ["red", "a star"], method="gradcam", layer=1)
    png = ex._repr_png_()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    html = ex._repr_html_()
    assert html.startswith("<div><code>Explanation(2 phrases") and "data:image/png;base64," in html


def test_full_res_maps_are_the_pointing_games_view(one_thread, tokenizer, tmp_path):
    from groundcam.maps import upsample

    explainer = Explainer(AlbefAdapter(tiny_albef(len(tokenizer)), tokenizer, name="tiny"))
    ex = explainer.explain(noise_images(1, 48, 64)[0], ["red", "a star"], method="gradcam", layer=1)
    ex.save(tmp_path / "plain")
    assert "full_res_maps" not in np.load(tmp_path / "plain" / "maps.npz")
    ex.save(tmp_path / "full", full_res=True)
    arrays = np.load(tmp_path / "full" / "maps.npz")
    assert arrays["full_res_maps"].shape == (2, 48, 64)
    assert arrays["maps"].shape == tuple(ex.maps.shape)
    np.testing.assert_array_equal(
        arrays["full_res_maps"][1], upsample(ex.maps[1], (48, 64)).numpy()
    )


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_method_all_writes_one_column_per_supported_method(tiny_model_dir, image_file, tmp_path):
    out = tmp_path / "out"
    r = _run(
        "explain",
        image_file,
        "the red circle",
        "the blue star",
        "--model",
        tiny_model_dir,
        "--method",
        "all",
        "--box",
        "10,10,40,50",
        "--dpi",
        "100",
        "--out",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.splitlines()[-1])
    methods = supported_methods(AlbefAdapter)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == methods
    assert str(out / "figure.png") in doc["results"][0]["files"]
    with Image.open(out / "figure.png") as png:
        # image column + one per method, each CELL_INCHES wide, plus the colour bar's margin
        assert png.size[0] == round((figures.CELL_INCHES * (len(methods) + 1) + 0.6) * 100)
        assert png.info["dpi"] == pytest.approx((100, 100), abs=0.01)


def test_layer_all_and_formats_from_the_cli(tiny_model_dir, image_file, tmp_path):
    out = tmp_path / "out"
    r = _run(
        "explain",
        image_file,
        "the red circle",
        "--model",
        tiny_model_dir,
        "--method",
        "gradcam",
        "--layer",
        "all",
        "--format",
        "svg",
        "--full-res",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    layers = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert layers and all(name.startswith("layer-") for name in layers)
    assert b"<svg" in (out / "figure.svg").read_bytes()[:2000]
    assert np.load(out / layers[0] / "maps.npz")["full_res_maps"].shape == (1, 70, 90)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--box", "1,2,3"], "--box '1,2,3': expected x0,y0,x1,y1"),
        (["--box", "5,5,2,9"], "x1 > x0"),
        (["--layer", "top"], "--layer 'top': expected a layer number or 'all'"),
    ],
)
def test_bad_figure_options_are_one_line(tiny_model_dir, image_file, tmp_path, args, message):
    r = _run(
        "explain", image_file, "a cat", "--model", tiny_model_dir, *args, "--out", tmp_path / "o"
    )
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groundcam: error: ") and message in lines[0]


def test_word_grid_holds_the_text_model_and_method_above_titled_panels(tmp_path):
    maps = torch.stack([_half_map(), _half_map().flip(1), torch.zeros(6, 8)])
    fig = figures.word_grid_figure(
        _red_image(),
        maps,
        ["a", " red", "square"],
        [0.99, 0.5, 0.25],
        text="a red square",
        subtitle="tiny-captioner · attention · layer 0",
        columns=2,
    )
    pixels = _pixels(fig, tmp_path, 100)
    heading = fig.get_suptitle()
    assert heading == "“a red square”\ntiny-captioner · attention · layer 0"
    shown = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert shown == ["a  p=0.99", "red  p=0.50", "square  p=0.25"]
    # the heading is drawn in the band above the first row of panels
    top = fig.bbox.height - max(ax.get_window_extent().y1 for ax in fig.axes[:3])
    assert (pixels[: int(top)] < 100).all(axis=2).sum() > 50
    # the fourth cell of the 2x2 grid is empty, not a blank panel with a frame
    assert sum(ax.get_visible() for ax in fig.axes) == 3 + 1  # three panels and the colour bar


def test_triptych_is_image_heatmap_and_overlay_per_phrase(one_thread, tokenizer):
    explainer = Explainer(AlbefAdapter(tiny_albef(len(tokenizer)), tokenizer, name="tiny"))
    ex = explainer.explain(noise_images(1, 48, 64)[0], ["red", "a star"], method="gradcam", layer=1)
    fig = ex.figure(triptych=True, boxes=[[4, 4, 30, 30]])  # scored by the pointing game
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 * 3
    assert [ax.get_title() for ax in panels[:3]] == [
        "image",
        "gradcam: heatmap",
        "gradcam: overlay",
    ]
    assert panels[0].get_ylabel().startswith("red\n")
    # only the overlay is scored: its label says hit or miss under the protocol
    assert panels[1].get_xlabel() == "" and panels[2].get_xlabel() in ("hit (amc)", "miss (amc)")


def test_caption_cli_writes_the_word_grid_figure_and_full_res_maps(tmp_path):
    from groundcam.data.shapes import generate_scene

    image = tmp_path / "scene.png"
    generate_scene("test", 0, image_size=96).image.save(image)
    out = tmp_path / "out"
    r = _run(
        "caption",
        image,
        "--model",
        "captioner-tiny-shapes",
        "--text",
        "a red square",
        "--format",
        "pdf",
        "--dpi",
        "72",
        "--full-res",
        "--out",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout.splitlines()[-1])["results"][0]["files"]
    assert str(out / "figure.pdf") in files
    assert (out / "figure.pdf").read_bytes().startswith(b"%PDF-")
    arrays = np.load(out / "maps.npz")
    assert arrays["full_res_maps"].shape == (arrays["maps"].shape[0], 96, 96)


def test_generation_shows_its_word_grid_in_a_notebook():
    from groundcam.api import load
    from groundcam.data.shapes import generate_scene

    gen = load("captioner-tiny-shapes").explain_generation(generate_scene("test", 1).image)
    fig = gen.figure()
    *text, subtitle = fig.get_suptitle().split("\n")  # the text wrapped to the grid's width
    assert " ".join(text) == f"“{gen.text}”"
    assert subtitle == f"captioner-tiny-shapes · {gen.method} · layer {gen.layer}"
    assert gen._repr_png_().startswith(b"\x89PNG") and "<img src=" in gen._repr_html_()


def test_each_row_shows_its_own_image_when_phrases_come_from_several(one_thread, tokenizer):
    explainer = Explainer(AlbefAdapter(tiny_albef(len(tokenizer)), tokenizer, name="tiny"))
    wide, tall = noise_images(1, 48, 64)[0], noise_images(1, 40, 32, seed=1)[0]
    ex = explainer.explain_many([wide, tall], [["red"], ["a star"]], method="gradcam", layer=1)
    fig = ex.figure(boxes=[[2, 2, 20, 20]])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 * 2
    assert panels[0].images[0].get_extent() == [-0.5, 63.5, 47.5, -0.5]
    assert panels[2].images[0].get_extent() == [-0.5, 31.5, 39.5, -0.5]
    # the pointed pixel of the second row lies inside the second image
    x, y = panels[3].lines[0].get_xydata()[0]
    assert 0 <= x < 32 and 0 <= y < 40
