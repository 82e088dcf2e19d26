"""Tiled generative VLMs: Idefics3 / SmolVLM (tiles + global image) and InternVL (tiles +
thumbnail) through the shared plumbing (adapters/vlm.py, generation.explain_vlm): image tokens
found and each tile's box checked against the pixels the processor put in it (non-square images,
several images, left-padded batches), the overlap rule of placement, per-token maps of every
method against a naive one-forward-and-backward-per-token recipe placed by hand, sdpa against
eager, the attention implementation and hooks left as they were, and bad input in one line."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_vlm
import torch
import vlm_checks as checks
from click.testing import CliRunner
from PIL import Image
from vlm_checks import one_line

import groundcam as gc
from groundcam.adapters.vlm import attention_implementations
from groundcam.cli import main
from groundcam.contract import TokenLayout
from groundcam.errors import InputError
from groundcam.placement import place

METHODS = ("attention", "attn-gradcam", "gradcam", "logit-lens")
PROMPT = "what is the sign"
TEXT = "red cat the dog"


@pytest.fixture(scope="module")
def tiny():
    """Idefics3 and InternVL with peaked attention, by family."""
    return {
        name: (tiny_vlm.sharpen(model), processor)
        for name, (model, processor) in (
            ("idefics3", tiny_vlm.idefics3()),
            ("internvl", tiny_vlm.internvl()),
        )
    }


def picture(w: int = 64, h: int = 32, seed: int = 0) -> Image.Image:
    """A seeded random image, 64 x 32 unless told: two tiles and the global image."""
    return checks.picture(w, h, seed)


def coded(w: int, h: int) -> Image.Image:
    """Red grows left to right, green top to bottom: a region's mean colour says where it is."""
    xs = torch.linspace(0, 255, w)[None, :].expand(h, w)
    ys = torch.linspace(0, 255, h)[:, None].expand(h, w)
    return Image.fromarray(torch.stack([xs, ys, torch.zeros_like(xs)], -1).byte().numpy())


def tile_pixels(processor, inputs) -> torch.Tensor:
    """The processor's tiles as [n, H, W, 3] in 0..255, in the order the model reads them."""
    ip = processor.image_processor
    pv = inputs["pixel_values"].flatten(0, -4).permute(0, 2, 3, 1)
    return (pv * torch.tensor(ip.image_std) + torch.tensor(ip.image_mean)) * 255


def assert_boxes_hold_their_pixels(processor, inputs, layout, images) -> None:
    """Each tile's mean colour equals the mean colour of its box on the original image."""
    tiles = tile_pixels(processor, inputs)
    real = tiles.flatten(1).abs().amax(1) > 0  # Idefics3 pads a batch with blank tiles
    tiles = tiles[real] if len(tiles) > len(layout.tiles) else tiles
    assert len(tiles) == len(layout.tiles)
    for tile, pixels in zip(layout.tiles, tiles, strict=True):
        image = torch.tensor(np.asarray(images[tile.image]), dtype=torch.float32)
        h, w = image.shape[:2]
        x0, y0, x1, y1 = tile.box
        box = image[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)]
        want = box[..., :2].mean((0, 1))
        got = pixels[..., :2].mean((0, 1))
        assert torch.allclose(got, want, atol=6), (tile, got, want)


def test_the_families_are_registered_with_their_methods(tiny):
    for name, family in (("idefics3", "idefics3"), ("internvl", "internvl")):
        ex = gc.load(*tiny[name][:1], processor=tiny[name][1])
        assert ex.family == family and gc.families()[family] == gc.families()["llava"]
        assert ex.layers("attention") == [0, 1] and ex.resolve("gradcam").layer == 0
    model, processor = tiny_vlm.smolvlm()
    assert gc.load(model, processor=processor).family == "smolvlm"


@pytest.mark.parametrize("w, h, grid", [(96, 40, (2, 3)), (40, 90, (3, 2)), (90, 90, (3, 3))])
def test_idefics3_tiles_cover_their_share_of_a_non_square_image(w, h, grid):
    model, processor = tiny_vlm.idefics3(max_tiles=3)
    a = gc.load(model, processor=processor).adapter
    image = coded(w, h)
    inputs = a.inputs([image], PROMPT)
    ids = inputs["input_ids"]
    layout = a.token_layout(inputs, ids, [(h, w)])
    rows, cols = grid
    assert torch.equal(layout.positions, torch.nonzero(ids[0] == model.config.image_token_id)[:, 0])
    assert len(layout.tiles) == rows * cols + 1 and len(layout.positions) == 4 * (rows * cols + 1)
    assert layout.tiles[1].box == pytest.approx((1 / cols, 0, 2 / cols, 1 / rows))
    assert layout.tiles[-1].box == (0, 0, 1, 1) and layout.sizes == ((h, w),)
    assert layout.row[:8].tolist() == [0, 0, 1, 1] * 2 and layout.col[:4].tolist() == [0, 1, 0, 1]
    assert_boxes_hold_their_pixels(processor, inputs, layout, [image])
    with pytest.raises(ValueError, match="form 1 image"):
        a.token_layout(inputs, ids, [(h, w), (h, w)])
    with pytest.raises(ValueError, match="a tile of this idefics3 model takes 2x2"):
        a.token_layout(inputs, ids[:, :-8], [(h, w)])  # the global image cut short


def test_an_image_that_fits_one_tile_has_only_the_global_image():
    model, processor = tiny_vlm.smolvlm(max_tiles=1)
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([coded(50, 20)], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(20, 50)])
    assert len(layout.positions) == 4 and len(layout.tiles) == 1
    assert layout.tiles[0].box == (0, 0, 1, 1)


@pytest.mark.parametrize("w, h, grid", [(96, 64, (2, 3)), (40, 90, (2, 1)), (20, 20, (1, 1))])
def test_internvl_tiles_and_thumbnail_cover_their_share(w, h, grid):
    model, processor = tiny_vlm.internvl(max_tiles=6)
    a = gc.load(model, processor=processor).adapter
    image = coded(w, h)
    inputs = a.inputs([image], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(h, w)])
    rows, cols = grid
    tiles = rows * cols + (rows * cols > 1)
    assert len(layout.tiles) == tiles and len(layout.positions) == 4 * tiles
    assert layout.tiles[-1].box == (0, 0, 1, 1)
    if tiles > 1:
        assert layout.tiles[cols].box == pytest.approx((0, 1 / rows, 1 / cols, 2 / rows))
    assert_boxes_hold_their_pixels(processor, inputs, layout, [image])
    with pytest.raises(ValueError, match="1 runs of image tokens for 2 image"):
        a.token_layout(inputs, inputs["input_ids"], [(h, w), (h, w)])


@pytest.mark.parametrize("name", ["idefics3", "internvl"])
def test_several_images_each_get_their_tiles_and_map(tiny, name):
    model, processor = tiny[name]
    ex = gc.load(model, processor=processor)
    images = [coded(64, 32), coded(32, 64), coded(30, 30)]
    inputs = ex.adapter.inputs(images, PROMPT)
    layout = ex.adapter.token_layout(inputs, inputs["input_ids"], [(32, 64), (64, 32), (30, 30)])
    assert layout.images == 3
    assert_boxes_hold_their_pixels(processor, inputs, layout, images)
    gen = ex.explain_generation(images, prompt=PROMPT, method="gradcam", text=TEXT)
    assert len(gen.image_maps) == 3 and torch.equal(gen.maps, gen.image_maps[0])
    assert gen.image_maps[0].shape[1:] == (2, 4) and gen.image_maps[1].shape[1:] == (4, 2)
    assert all(torch.isfinite(m).all() for m in gen.image_maps)


@pytest.mark.parametrize("name", ["idefics3", "internvl"])
def test_each_row_of_a_padded_batch_has_its_own_layout(tiny, name):
    """InternVL's processor pads on the left, Idefics3's on the right: a row's image tokens
    are found where that row has them, with the tiles of its own image."""
    model, processor = tiny[name]
    a = gc.load(model, processor=processor).adapter
    images = [coded(64, 32), coded(32, 64)]
    texts = [a.prompt_text("what", 1), a.prompt_text("what is the red sign , cat ?", 1)]
    batch = processor(images=[[im] for im in images], text=texts, padding=True, return_tensors="pt")
    pads = (batch["attention_mask"] == 0).sum(1).tolist()
    assert pads[0] > 0 and pads[1] == 0
    if name == "internvl":
        assert batch["attention_mask"][0, 0] == 0  # left
    for i, image in enumerate(images):
        single = a.inputs([image], texts[i])
        alone = a.token_layout(single, single["input_ids"], [(image.height, image.width)])
        row = a.token_layout(batch, batch["input_ids"][i : i + 1], [(image.height, image.width)])
        shift = pads[i] if name == "internvl" else 0
        assert torch.equal(row.positions, alone.positions + shift)
        assert [t.box for t in row.tiles] == [t.box for t in alone.tiles]


@pytest.mark.parametrize("name", ["idefics3", "internvl"])
def test_a_changed_patch_moves_only_the_tokens_whose_cells_cover_it(name):
    """With the vision tower's attention off, every image token sees only its own patches: a
    small square painted on a 96 x 48 image (1 x 2 tiles) must change exactly the tokens whose
    cell (tile box split s x s, row-major) covers it, one in a tile and one in the global image
    or thumbnail."""
    model, processor = tiny_vlm.BUILDERS[name]()
    a = gc.load(model, processor=processor).adapter
    silent = [
        m.register_forward_hook(lambda mod, args, out: (torch.zeros_like(out[0]), *out[1:]))
        for m in model.modules()
        if type(m).__name__.endswith("VisionAttention")
    ]
    base = coded(96, 48)
    marked = base.copy()
    marked.paste((0, 0, 255), (60, 32, 68, 40))  # centre (64, 36)
    try:
        feats = []
        for image in (base, marked):
            inputs = a.inputs([image], PROMPT)
            layout = a.token_layout(inputs, inputs["input_ids"], [(48, 96)])
            with torch.no_grad():
                out = model(**inputs, output_hidden_states=True)
            feats.append(out.hidden_states[0][0, layout.positions])
    finally:
        for handle in silent:
            handle.remove()
    change = (feats[1] - feats[0]).norm(dim=-1)
    moved = set(torch.nonzero(change > 0.05 * change.max())[:, 0].tolist())
    u, v = 64 / 96, 36 / 48
    covering = set()
    for m in range(len(layout.positions)):
        tile = layout.tiles[int(layout.tile[m])]
        x0, y0, x1, y1 = tile.box
        col, row = int(layout.col[m]), int(layout.row[m])
        cx = x0 + (x1 - x0) * col / tile.grid_w
        cy = y0 + (y1 - y0) * row / tile.grid_h
        if cx <= u < cx + (x1 - x0) / tile.grid_w and cy <= v < cy + (y1 - y0) / tile.grid_h:
            covering.add(m)
    assert len(layout.tiles) == 3 and len(covering) == 2
    assert moved == covering


def test_tiles_and_global_image_combine_by_their_mean(tiny):
    """A value on one tile only is halved by the global image over that tile's box, and 0
    elsewhere; one on the global image only is halved everywhere."""
    model, processor = tiny_vlm.idefics3(max_tiles=3)
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([coded(96, 64)], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(64, 96)])
    columns = TokenLayout(
        torch.arange(len(layout.positions)), layout.tile, layout.row, layout.col, layout.tiles
    )
    values = (layout.tile == 4).float()  # tile (row 1, col 1) of 2 x 3
    (placed,) = place(values, columns)
    want = torch.zeros(4, 6)
    want[2:4, 2:4] = 0.5
    assert torch.equal(placed, want)
    (placed,) = place((layout.tile == 6).float(), columns)
    assert torch.equal(placed, torch.full((4, 6), 0.5))
    (placed,) = place((layout.tile == 6).float(), columns, [(64, 96)])
    assert placed.shape == (64, 96) and torch.equal(placed, torch.full((64, 96), 0.5))


@pytest.mark.parametrize("name", ["idefics3", "internvl"])
@pytest.mark.parametrize("method", METHODS)
def test_maps_finite_and_not_flat_at_the_default_layer(tiny, name, method):
    model, processor = tiny[name]
    gen = gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method=method, text=TEXT
    )
    assert gen.tokens == TEXT.split() and gen.raw_maps.shape == (4, 2, 4)
    assert torch.isfinite(gen.raw_maps).all()
    spread = gen.raw_maps.amax((1, 2)) - gen.raw_maps.amin((1, 2))
    assert (spread > 1e-6 * gen.raw_maps.abs().amax()).all() and gen.raw_maps.abs().amax() > 0


def test_generated_text_is_explained(tiny):
    model, processor = tiny["internvl"]
    gen = gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method="logit-lens", max_new_tokens=3
    )
    assert gen.raw_maps.shape[1:] == (2, 4) and torch.isfinite(gen.raw_maps).all()
    assert len(gen.tokens) == gen.raw_maps.shape[0] <= 3


def by_hand(tile_values: torch.Tensor, rows: int, cols: int, s: int) -> torch.Tensor:
    """[K, N] values over (rows·cols tiles, then the global image) of s² cells each, placed on
    the (rows·s, cols·s) grid: the tiles stitched, the global image upsampled, their mean."""
    k = tile_values.shape[0]
    cells = tile_values.reshape(k, rows * cols + 1, s, s)
    mosaic = cells[:, :-1].reshape(k, rows, cols, s, s).permute(0, 1, 3, 2, 4)
    mosaic = mosaic.reshape(k, rows * s, cols * s)
    whole = cells[:, -1].repeat_interleave(rows, 1).repeat_interleave(cols, 2)
    return (mosaic + whole) / 2


def naive_maps(model, processor, adapter, image, method: str, layer: int) -> torch.Tensor:
    """The naive per-token recipe (vlm_checks): values over the image-token columns (1 x 2
    tiles, then the global image or thumbnail, 2 x 2 cells each) placed by hand."""
    enc = processor(images=[image], text=[adapter.prompt_text(PROMPT, 1)], return_tensors="pt")
    body = processor.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], body], 1)
    first = enc["input_ids"].shape[1]
    image_cols = torch.nonzero(ids[0] == model.config.image_token_id)[:, 0]
    assert len(image_cols) == 12
    side = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    values = checks.naive_token_values(model, ids, first, image_cols, side, method, layer)
    return by_hand(values, 1, 2, 2)


@pytest.mark.parametrize("name", ["idefics3", "internvl"])
@pytest.mark.parametrize("method", METHODS)
def test_batched_per_token_maps_equal_the_naive_recipe(tiny, name, method):
    model, processor = tiny[name]
    image = picture(seed=3)
    ex = gc.load(model, processor=processor)
    layer = 1 if method == "logit-lens" else 0
    gen = ex.explain_generation(image, prompt=PROMPT, method=method, text=TEXT)
    want = naive_maps(model, processor, ex.adapter, image, method, layer)
    assert gen.raw_maps.shape == want.shape == (4, 2, 4)
    scale = want.abs().amax()
    assert scale > 0
    assert torch.allclose(gen.raw_maps, want, atol=1e-5 * scale, rtol=1e-4)


def test_known_answer_a_text_token_attending_to_one_tile_cell():
    """Layer 0's queries read channel 0 (large in every text embedding), its keys channel 1,
    which only the image token of cell (1, 0) of tile (0, 1) carries: every text row attends
    there alone, and the placed map is 1/2 (that cell, averaged with the global image's ~0)
    on that cell's pixel of the right half, ~0 elsewhere."""
    model, processor = tiny_vlm.idefics3(seed=2)
    checks.focus_first_layer(model)
    ex = gc.load(model, processor=processor)
    inputs = ex.adapter.inputs([picture()], PROMPT)
    layout = ex.adapter.token_layout(inputs, inputs["input_ids"], [(32, 64)])
    (m,) = torch.nonzero((layout.tile == 1) & (layout.row == 1) & (layout.col == 0))[:, 0]
    cell = int(layout.positions[m])
    with checks.marked(model, cell):
        gen = ex.explain_generation(picture(), prompt=PROMPT, method="attention", text=TEXT)
    raw = gen.raw_maps
    assert raw.shape == (4, 2, 4)
    checks.assert_one_cell(raw, 1, 2, 0.49)


@pytest.fixture(scope="module")
def sdpa_twins(tiny):
    twins = {}
    for name, (model, processor) in tiny.items():
        twin = checks.sdpa_copy(model)
        twins[name] = twin, processor
    return twins


@pytest.mark.parametrize("name", ["idefics3", "internvl"])
def test_sdpa_and_eager_give_the_same_maps_and_sdpa_stays(tiny, sdpa_twins, name):
    (eager, processor), (sdpa, _) = tiny[name], sdpa_twins[name]
    image = picture(seed=5)
    before = attention_implementations(sdpa)
    for method in METHODS:
        _, b = checks.explain_on_both(eager, sdpa, processor, image, method)
        assert attention_implementations(sdpa) == before
        checks.assert_attention_note(b.notes, method)


@pytest.mark.parametrize("name", ["idefics3", "internvl"])
def test_attention_implementation_restored_after_an_error(sdpa_twins, name):
    model, processor = sdpa_twins[name]
    layer = model.get_decoder().layers[1]
    checks.assert_restored_after_an_error(model, processor, layer, picture(), "attention")


@pytest.mark.parametrize("name", ["smolvlm", "internvl"])
def test_load_from_a_saved_directory(name, tmp_path):
    model, processor = tiny_vlm.BUILDERS[name]()
    ex = gc.load(str(tiny_vlm.save(model, processor, tmp_path / name)))
    assert ex.family == name
    gen = ex.explain_generation(picture(), prompt=PROMPT, method="gradcam", text=TEXT)
    assert gen.raw_maps.shape == (4, 2, 4) and torch.isfinite(gen.raw_maps).all()


@pytest.mark.parametrize("name", ["idefics3", "internvl"])
def test_bad_input_is_one_line(tiny, name):
    model, processor = tiny[name]
    ex = gc.load(model, processor=processor)
    with pytest.raises(InputError) as e:
        ex.explain_generation([picture()] * 17, prompt=PROMPT)
    assert "at most 16 images" in one_line(e) and "17 images" in one_line(e)
    mark = tiny_vlm.PLACEHOLDER[name]
    with pytest.raises(InputError) as e:
        ex.explain_generation(picture(), prompt=f"{mark} {mark} what")
    assert "2 image placeholder" in one_line(e)
    with pytest.raises(InputError) as e:
        ex.explain(picture(), ["   "])  # a phrase (teacher-forced after the prompt) needs text
    one_line(e)
    phrase = ex.explain(picture(), ["a dog"])  # the phrase path works on tiled families too
    assert phrase.maps.shape[0] == 1 and torch.isfinite(phrase.maps).all()


def test_cli_refuses_a_prompt_with_too_many_placeholders(tmp_path):
    model, processor = tiny_vlm.internvl()
    path = tiny_vlm.save(model, processor, tmp_path / "internvl")
    image = tmp_path / "pic.png"
    picture().save(image)
    args = ["caption", str(image), "--model", str(path), "--method", "gradcam"]
    args += ["--max-new-tokens", "2", "--out", str(tmp_path / "out")]
    ok = CliRunner().invoke(main, [*args, "--prompt", "where is the cat"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, [*args, "--prompt", "<IMG_CONTEXT> <IMG_CONTEXT> what"])
    assert bad.exit_code == 2 and "placeholder" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
