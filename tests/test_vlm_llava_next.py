"""LLaVA-NeXT and LLaVA-OneVision through the shared generative-VLM plumbing: the base tile and
the unpadded any-res grid (one newline per row) found in the sequence and placed back on
non-square images, OneVision's `anyres_max_N` shrink and multi-image samples, several images per
prompt, per-token maps of every method against a naive one-forward-and-backward-per-token recipe,
sdpa against eager, nothing left changed after an error, and bad input in one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tiny_vlm
import torch
import vlm_checks as checks
from click.testing import CliRunner
from PIL import Image
from vlm_checks import one_line, picture

import groundcam as gc
from groundcam.adapters.vlm import attention_implementations
from groundcam.cli import main
from groundcam.contract import TokenLayout
from groundcam.errors import InputError
from groundcam.explanation import normalize_maps
from groundcam.placement import place

METHODS = ("attention", "attn-gradcam", "gradcam", "logit-lens")
PROMPT = "what is the sign"
TEXT = "red cat the dog"
FAMILIES = ("llava_next", "llava_onevision")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = getattr(tiny_vlm, request.param)()
    return tiny_vlm.sharpen(model), processor


def coded(w: int, h: int) -> Image.Image:
    """Red = x, green = y of every pixel (both < 256)."""
    xs = torch.arange(w)[None, :].expand(h, w)
    ys = torch.arange(h)[:, None].expand(h, w)
    return Image.fromarray(torch.stack([xs, ys, torch.zeros_like(xs)], -1).to(torch.uint8).numpy())


def test_both_families_are_registered_with_their_methods():
    for builder, family in zip(FAMILIES, ("llava-next", "llava-onevision"), strict=True):
        model, processor = getattr(tiny_vlm, builder)()
        ex = gc.load(model, processor=processor)
        assert ex.family == family
        assert gc.families()[family] == gc.families()["llava"]
        assert ex.layers("attention") == [0, 1] and ex.resolve("attention").layer == 0


def embeds_of(model, inputs) -> torch.Tensor:
    """The decoder's input embeddings of one forward (image features spliced in)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = kwargs["inputs_embeds"][0].detach()

    handle = model.get_decoder().register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["x"]


@pytest.mark.parametrize("width, height", [(101, 48), (40, 90), (50, 50)])
def test_layout_matches_the_tokens_the_model_writes(tiny, width, height):
    """Counts from the processor, newlines exactly where the model put `image_newline`, the base
    tile's cells equal to the base tile's projected features."""
    model, processor = tiny
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([picture(width, height)], PROMPT)
    ids = inputs["input_ids"]
    layout = a.token_layout(inputs, ids, [(height, width)])
    assert torch.equal(layout.positions, torch.nonzero(ids[0] == a.image_token_id)[:, 0])
    base, hires = layout.tiles
    assert (base.grid_h, base.grid_w, base.box, base.newline) == (4, 4, (0, 0, 1, 1), False)
    assert hires.newline and layout.sizes == ((height, width),)
    x = embeds_of(model, inputs)[layout.positions]
    newline = model.model.image_newline.detach()
    is_newline = torch.isclose(x, newline, atol=1e-6).all(-1)
    assert torch.equal(is_newline, ~layout.has_cell)
    assert int(is_newline.sum()) == hires.grid_h  # one per row of the hi-res grid
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    features = torch.cat(list(features)) if isinstance(features, list | tuple) else features
    assert torch.allclose(x, features.reshape(x.shape), atol=1e-6)
    assert layout.row[:16].tolist() == [r for r in range(4) for _ in range(4)]


@pytest.mark.parametrize("builder", FAMILIES)
@pytest.mark.parametrize("width, height", [(101, 48), (40, 90), (77, 61)])
def test_hires_box_is_where_the_processor_put_the_image(builder, width, height):
    """A point (u, v) of the original image, read through the hi-res tile's box into the kept
    grid (after the model's own unpadding, 8 canvas px per cell), lands on the canvas pixel that
    holds the original pixel (u W, v H): read back from a coded image."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    model, processor = getattr(tiny_vlm, builder)()
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([coded(width, height)], PROMPT)
    hires = a.token_layout(inputs, inputs["input_ids"], [(height, width)]).tiles[1]
    ip = processor.image_processor
    canvas_h, canvas_w = select_best_resolution((height, width), ip.image_grid_pinpoints)
    rows, cols = canvas_h // 32, canvas_w // 32
    tiles = inputs["pixel_values"][0, 1 : 1 + rows * cols]  # row-major on the canvas
    canvas = tiles.reshape(rows, cols, 3, 32, 32).permute(0, 3, 1, 4, 2)
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    canvas = (canvas.reshape(canvas_h, canvas_w, 3) * std + mean) * 255
    cells = torch.meshgrid(torch.arange(rows * 4), torch.arange(cols * 4), indexing="ij")
    kept = unpad_image(torch.stack(cells), (height, width))
    r0, c0 = int(kept[0, 0, 0]), int(kept[1, 0, 0])
    assert (hires.grid_h, hires.grid_w) == tuple(kept.shape[1:])  # no shrink at this size
    x0, y0, x1, y1 = hires.box
    # every canvas pixel's centre, through the box, to original pixel coordinates (centres at
    # k + 0.5): the value the processor put there
    xs = x0 + ((torch.arange(canvas_w) + 0.5) / 8 - c0) / hires.grid_w * (x1 - x0)
    ys = y0 + ((torch.arange(canvas_h) + 0.5) / 8 - r0) / hires.grid_h * (y1 - y0)
    want_x, want_y = xs * width - 0.5, ys * height - 0.5
    inside_x = (want_x > 1) & (want_x < width - 2)  # away from the padding and the edges
    inside_y = (want_y > 1) & (want_y < height - 2)
    red = canvas[inside_y][:, inside_x, 0]
    green = canvas[inside_y][:, inside_x, 1]
    assert inside_x.sum() > 20 and inside_y.sum() > 20
    assert (red - want_x[inside_x][None, :]).abs().max() < 0.8
    assert (green - want_y[inside_y][:, None]).abs().max() < 0.8


def newline_columns(model, inputs, layout: TokenLayout) -> torch.Tensor:
    """Per layout column, whether the model put its `image_newline` there."""
    x = embeds_of(model, inputs)[layout.positions]
    return torch.isclose(x, model.model.image_newline.detach(), atol=1e-6).all(-1)


@pytest.mark.parametrize("width, height, grid", [(64, 64, (4, 4)), (101, 48, (2, 5))])
def test_onevision_shrinks_a_large_grid_as_anyres_max_says(width, height, grid):
    """`anyres_max_1`: an unpadded 8x8 grid (ratio 2) becomes 4x4, a 4x8 one (ratio 1.41) 2x5;
    the box stays the unpadded grid's."""
    model, processor = tiny_vlm.llava_onevision(max_tiles=1)
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([picture(width, height)], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(height, width)])
    hires = layout.tiles[1]
    assert (hires.grid_h, hires.grid_w) == grid
    unshrunk = tiny_vlm.llava_onevision(max_tiles=9)
    big = gc.load(*unshrunk).adapter
    enc = big.inputs([picture(width, height)], PROMPT)
    full = big.token_layout(enc, enc["input_ids"], [(height, width)])
    assert full.tiles[1].box == hires.box and full.tiles[1].grid_w > grid[1]
    assert torch.equal(newline_columns(model, inputs, layout), ~layout.has_cell)


def test_onevision_multi_image_sample_reads_base_tiles_and_one_newline_each():
    """Images given as one sample (`batch_num_images` = 2): the model reads each image's base
    tile only, then one newline."""
    model, processor = tiny_vlm.llava_onevision()
    a = gc.load(model, processor=processor).adapter
    images = [picture(101, 48), picture(40, 90, seed=1)]
    enc = processor(images=[images], text=["<image> <image> " + PROMPT], return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    assert inputs["batch_num_images"].tolist() == [2]
    layout = a.token_layout(inputs, inputs["input_ids"], [(48, 101), (90, 40)])
    assert [(t.image, t.grid_h, t.grid_w, t.newline) for t in layout.tiles] == [
        (0, 4, 4, False),
        (1, 4, 4, False),
    ]
    assert layout.row.tolist() == ([r for r in range(4) for _ in range(4)] + [-1]) * 2
    assert torch.equal(newline_columns(model, inputs, layout), ~layout.has_cell)


TWO = "<image> <image> " + PROMPT  # placeholders given: the prompt is used as it is


def naive_values(model, processor, images, method: str, layer: int) -> torch.Tensor:
    """The naive per-token recipe (vlm_checks): values over the image-token columns in sequence
    order."""
    enc = processor(images=images, text=[TWO], return_tensors="pt")
    side = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    body = processor.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], body], 1)
    first = enc["input_ids"].shape[1]
    cols = torch.nonzero(ids[0] == model.config.image_token_id)[:, 0]
    return checks.naive_token_values(model, ids, first, cols, side, method, layer)


@pytest.mark.parametrize("method", METHODS)
def test_batched_per_token_maps_of_two_images_equal_the_naive_recipe(tiny, method):
    """Two images of other aspects in one prompt: each image's map is its own columns' values
    (base and hi-res cells averaged where both cover a pixel), as the naive recipe gives."""
    model, processor = tiny
    images = [picture(101, 48, seed=3), picture(40, 90, seed=4)]
    ex = gc.load(model, processor=processor)
    layer = 1 if method == "logit-lens" else 0
    gen = ex.explain_generation(images, prompt=TWO, method=method, text=TEXT)
    values = naive_values(model, processor, images, method, layer)
    a = ex.adapter
    inputs = a.inputs(images, TWO)
    layout = a.token_layout(inputs, inputs["input_ids"], [(48, 101), (90, 40)])
    columns = TokenLayout(
        torch.arange(len(layout.positions)), layout.tile, layout.row, layout.col, layout.tiles
    )
    want = place(values, columns)
    assert gen.tokens == TEXT.split() and len(gen.image_maps) == 2
    scale = want[0].abs().amax()
    assert scale > 0 and gen.raw_maps.shape == want[0].shape
    assert torch.allclose(gen.raw_maps, want[0], atol=1e-5 * scale, rtol=1e-4)
    assert torch.allclose(gen.image_maps[1], normalize_maps(want[1]), atol=1e-4)
    assert torch.isfinite(gen.image_maps[1]).all()
    spread = want[1].amax((1, 2)) - want[1].amin((1, 2))
    assert (spread > 1e-3 * want[1].abs().amax()).sum() >= 3  # the second image is read too


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_and_eager_give_the_same_maps_and_sdpa_stays(tiny, method):
    eager, processor = tiny
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    a, b = checks.explain_on_both(eager, sdpa, processor, picture(77, 61, seed=5), method)
    assert set(attention_implementations(sdpa)) == {"sdpa"} and a.raw_maps.abs().amax() > 0
    assert ("attention" in b.notes) == (method in ("attention", "attn-gradcam"))


def test_attention_implementation_restored_after_an_error_mid_forward(tiny):
    model, processor = tiny
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("sdpa")
    layer = twin.get_decoder().layers[1]
    checks.assert_restored_after_an_error(twin, processor, layer, picture(), "attn-gradcam")


@pytest.mark.parametrize("method", METHODS)
def test_maps_finite_and_not_flat_at_the_default_layer(tiny, method):
    model, processor = tiny
    gen = gc.load(model, processor=processor).explain_generation(
        picture(61, 45), prompt=PROMPT, method=method, text=TEXT
    )
    assert len(gen.tokens) == gen.raw_maps.shape[0] == 4
    assert torch.isfinite(gen.raw_maps).all() and gen.raw_maps.abs().amax() > 0
    spread = gen.raw_maps.amax((1, 2)) - gen.raw_maps.amin((1, 2))
    assert (spread > 1e-6 * gen.raw_maps.abs().amax()).all()


def test_load_from_a_saved_directory(tiny, tmp_path):
    model, processor = tiny
    ex = gc.load(str(tiny_vlm.save(model, processor, tmp_path / "saved")))
    assert ex.family == gc.load(model, processor=processor).family
    gen = ex.explain_generation(picture(50, 30), prompt=PROMPT, method="logit-lens", text=TEXT)
    assert gen.tokens == TEXT.split() and torch.isfinite(gen.raw_maps).all()


def test_bad_input_is_one_line(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    with pytest.raises(InputError) as e:
        ex.explain_generation([picture(), picture()], prompt="<image> " + PROMPT, text=TEXT)
    assert "1 image placeholder" in one_line(e) and "2 image(s)" in one_line(e)
    # a processor whose any-res canvases are not the model's: its token count cannot be placed
    other = copy.deepcopy(processor)
    other.image_processor.image_grid_pinpoints = [[32, 32]]
    with pytest.raises(InputError) as e:
        gc.load(model, processor=other).explain_generation(picture(64, 32), text=TEXT)
    assert "image_grid_pinpoints" in one_line(e)


@pytest.mark.parametrize("builder", FAMILIES)
def test_known_answer_a_text_token_attending_to_one_hires_cell(builder):
    """Layer 0's queries read channel 0 (large in every text embedding), its keys channel 1,
    which only the token of hi-res cell (5, 2) carries: every text row attends there alone. On a
    64 x 64 image (2 x 2 tiles, an 8 x 8 grid, no padding) the map is 0.5 on that cell (its mean
    with the base tile's cell, which gets nothing) and 0 elsewhere."""
    model, processor = getattr(tiny_vlm, builder)(seed=2)
    checks.focus_first_layer(model)
    ex = gc.load(model, processor=processor)
    image = picture(64, 64)
    inputs = ex.adapter.inputs([image], PROMPT)
    layout = ex.adapter.token_layout(inputs, inputs["input_ids"], [(64, 64)])
    assert (layout.tiles[1].grid_h, layout.tiles[1].grid_w) == (8, 8)
    cell = layout.positions[(layout.tile == 1) & (layout.row == 5) & (layout.col == 2)]
    with checks.marked(model, cell):
        gen = ex.explain_generation(image, prompt=PROMPT, method="attention", text=TEXT)
    raw = gen.raw_maps
    assert raw.shape == (4, 8, 8)
    assert ((raw[:, 5, 2] - 0.5).abs() < 5e-3).all()
    others = raw.clone()
    others[:, 5, 2] = 0
    assert (others < 1e-3).all()


def test_cli_caption_of_a_wide_image(tmp_path):
    model, processor = tiny_vlm.llava_onevision()
    path = tiny_vlm.save(model, processor, tmp_path / "onevision")
    image = tmp_path / "wide.png"
    picture(101, 48).save(image)
    args = ["caption", str(image), "--model", str(path), "--prompt", "where is the cat"]
    args += ["--method", "gradcam", "--text", TEXT, "--out", str(tmp_path / "out"), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "where is the cat" in result.output
    maps = np.load(tmp_path / "out" / "maps.npz")
    assert any(maps[k].shape == (4, 4, 8) for k in maps.files)  # the 4 x 8 hi-res grid's size
    bad = CliRunner().invoke(main, [*args[:5], "<image> <image> what", *args[6:]])
    assert bad.exit_code == 2 and "placeholder" in bad.output and "Traceback" not in bad.output


def test_a_padded_grid_reaching_past_the_image_is_placed_as_it_lies():
    """A tile whose box reaches past the image (its outer cells half padding): each pixel reads
    the cell over its centre; a box that misses the image, or is inverted, is refused."""
    from groundcam.contract import Tile

    tile = Tile(0, 0, 1, 2, (-0.5, 0.0, 1.5, 1.0))
    layout = TokenLayout.from_tiles(torch.arange(2), (tile,))
    (placed,) = place(torch.tensor([[1.0, 2.0]]), layout, [(1, 4)])
    assert placed[0].tolist() == [[1.0, 1.0, 2.0, 2.0]]
    for box in ((1.0, 0.0, 2.0, 1.0), (0.0, -1.0, 1.0, 0.0), (0.6, 0.0, 0.4, 1.0)):
        with pytest.raises(ValueError, match="tile box"):
            Tile(0, 0, 1, 2, box)


def test_onevision_with_a_clip_tower_drops_the_cls_token_as_the_model_does():
    model, processor = tiny_vlm.llava_onevision(vision="clip")
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([picture(40, 90)], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(90, 40)])
    assert [(t.grid_h, t.grid_w) for t in layout.tiles] == [(4, 4), (8, 4)]
    assert torch.equal(newline_columns(model, inputs, layout), ~layout.has_cell)


def test_onevision_video_frames_each_get_a_pooled_grid_and_the_video_one_newline():
    """Video needs torchvision's video processor (absent here): the frames' pixel values are
    given directly, the prompt holds the video tokens; the layout gives frame f a 2 x 2 grid
    (4 x 4 cells pooled), in frame order, then one newline, as the model writes them."""
    model, processor = tiny_vlm.llava_onevision()
    a = gc.load(model, processor=processor).adapter
    frames = 3
    video = model.config.video_token_id
    prompt = processor.tokenizer("what is the sign", return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.full((1, frames * 4 + 1), video), prompt], 1)
    layout = a.video_tokens(ids, frames)
    assert layout.images == frames and layout.positions.tolist() == list(range(frames * 4 + 1))
    assert layout.image.tolist() == [f for f in range(frames) for _ in range(4)] + [frames - 1]
    pixels = torch.randn(1, frames, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = embeds_of(model, {"input_ids": ids, "pixel_values_videos": pixels})[layout.positions]
    with torch.no_grad():
        want = model.model.get_video_features(pixel_values_videos=pixels).pooler_output[0]
    assert torch.allclose(x, want, atol=1e-6)
    assert torch.equal(
        torch.isclose(x, model.model.image_newline.detach(), atol=1e-6).all(-1), ~layout.has_cell
    )
    with pytest.raises(InputError) as e:
        a.video_tokens(ids, frames + 1)
    assert "video tokens" in one_line(e)
    with pytest.raises(ValueError, match="videos need torchvision"):
        processor.video_processor(videos=[pixels[0]])


@pytest.mark.parametrize("builder", FAMILIES)
@pytest.mark.parametrize(
    "options, width, height",
    [
        (dict(image_size=48, patch_size=8), 130, 70),  # 6 x 6 cells per tile
        (dict(image_size=48, patch_size=16, pinpoints=[[48, 144], [144, 48], [96, 96]]), 33, 97),
        (dict(image_size=32, patch_size=8, pinpoints=[[32, 96], [64, 64]]), 150, 41),
    ],
)
def test_other_tile_sizes_and_canvases_are_laid_out_as_the_model_writes_them(
    builder, options, width, height
):
    model, processor = getattr(tiny_vlm, builder)(**options)
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([picture(width, height)], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(height, width)])
    g = options["image_size"] // options["patch_size"]
    assert (layout.tiles[0].grid_h, layout.tiles[0].grid_w) == (g, g)
    assert torch.equal(newline_columns(model, inputs, layout), ~layout.has_cell)
    x0, y0, x1, y1 = layout.tiles[1].box
    assert x0 <= 0 < 1 <= x1 + 1e-9 or y0 <= 0 < 1 <= y1 + 1e-9  # one axis is filled
