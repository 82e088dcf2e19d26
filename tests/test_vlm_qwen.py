"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL through the shared generative-VLM plumbing: merged-patch grids
read from `image_grid_thw` and placed back on non-square images (checked against the pixels the
processor packed into each token), several images with one map each, video steps on constructed
grids, `mm_token_type_ids` extended as generate() does, per-token maps of every method against a
naive one-forward-and-backward-per-token recipe, sdpa against eager, nothing left changed, and bad
input in one line."""

from __future__ import annotations

import pytest
import tiny_vlm
import torch
import vlm_checks as checks
from PIL import Image
from vlm_checks import one_line

import groundcam as gc
from groundcam.adapters.qwen_vl import merged_grids
from groundcam.errors import InputError
from groundcam.explanation import normalize_maps
from groundcam.placement import place

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
METHODS = ("attention", "attn-gradcam", "gradcam", "logit-lens")
PROMPT = "what is the sign"
TEXT = "red cat the dog"
IMAGE = tiny_vlm.QWEN_IMAGE


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = tiny_vlm.BUILDERS[request.param]()
    return tiny_vlm.sharpen(model), processor


def picture(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    """A seeded random image, 48 x 32 unless told: a non-square grid of tokens."""
    return checks.picture(w, h, seed)


def test_the_three_qwen_classes_are_one_registered_family(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    assert ex.family == "qwen-vl"
    assert gc.families()["qwen-vl"] == gc.families()["llava"]
    assert ex.layers("attention") == [0, 1] and ex.layers("logit-lens") == [1]
    assert ex.resolve("attention").layer == 0  # 22/28 of 2 layers, never the last


def token_corners(inputs, processor, size: tuple[int, int]) -> list[tuple[float, float]]:
    """Per image token, the original-image point (x, y in fractions) whose coded colour sits in
    the top-left pixel of the token's first patch (the processor packs each token's merge²
    patches consecutively, each patch channel-first)."""
    ip = processor.image_processor
    p, m = ip.patch_size, ip.merge_size
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    patches = inputs["pixel_values"].reshape(-1, 3, ip.temporal_patch_size, p, p)
    first = patches[:: m * m, :, 0, 0, 0]  # [tokens, 3]
    rgb = (first * std + mean) * 255
    h, w = size
    return [(float(r) / 255 * (w - 1) / w, float(g) / 255 * (h - 1) / h) for r, g, _ in rgb]


def coded(w: int, h: int) -> Image.Image:
    """Red codes x, green codes y (0..255 across the image)."""
    xs = (torch.arange(w) * 255 / (w - 1)).round()[None, :].expand(h, w)
    ys = (torch.arange(h) * 255 / (h - 1)).round()[:, None].expand(h, w)
    return Image.fromarray(torch.stack([xs, ys, torch.zeros_like(xs)], -1).to(torch.uint8).numpy())


@pytest.mark.parametrize(
    "patch, merge, width, height, grid",
    [
        (8, 2, 64, 32, (2, 4)),
        (8, 2, 100, 44, (2, 6)),
        (4, 2, 40, 72, (9, 5)),
        (4, 1, 20, 12, (3, 5)),
    ],
)
def test_tokens_are_a_row_major_grid_over_the_whole_resized_image(
    patch, merge, width, height, grid
):
    """Other sizes and aspects (some resized by smart_resize, one without merging): every token's
    cell is where the processor took its pixels from, within one resized patch."""
    model, processor = tiny_vlm.qwen2_vl(patch_size=patch, merge_size=merge)
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([coded(width, height)], PROMPT)
    ids = inputs["input_ids"]
    layout = a.token_layout(inputs, ids, [(height, width)])
    assert torch.equal(layout.positions, torch.nonzero(ids[0] == a.image_token_id)[:, 0])
    (tile,) = layout.tiles
    assert (tile.grid_h, tile.grid_w) == grid and tile.box == (0.0, 0.0, 1.0, 1.0)
    assert layout.row.tolist() == [r for r in range(grid[0]) for _ in range(grid[1])]
    assert layout.col.tolist() == list(range(grid[1])) * grid[0]
    assert layout.sizes == ((height, width),)
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    slack = (1 / gw, 1 / gh)  # one patch of the resized image, in fractions
    for (x, y), r, c in zip(
        token_corners(inputs, processor, (height, width)), layout.row, layout.col, strict=True
    ):
        assert (
            abs(x - int(c) / tile.grid_w) <= slack[0] and abs(y - int(r) / tile.grid_h) <= slack[1]
        )


def test_several_images_get_one_map_each_in_prompt_order(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    a = ex.adapter
    images = [picture(64, 32), picture(32, 48, seed=1), picture(48, 48, seed=2)]
    inputs = a.inputs(images, PROMPT)
    ids = inputs["input_ids"]
    sizes = [(im.height, im.width) for im in images]
    layout = a.token_layout(inputs, ids, sizes)
    assert torch.equal(layout.positions, torch.nonzero(ids[0] == a.image_token_id)[:, 0])
    assert [(t.image, t.grid_h, t.grid_w) for t in layout.tiles] == [
        (0, 2, 4),
        (1, 3, 2),
        (2, 3, 3),
    ]
    assert layout.image.tolist() == [0] * 8 + [1] * 6 + [2] * 9
    # a vision start token before each run, a vision end token after it
    cfg = model.config
    assert ids[0, layout.positions[[0, 8, 14]] - 1].tolist() == [cfg.vision_start_token_id] * 3
    assert ids[0, layout.positions[[7, 13, 22]] + 1].tolist() == [cfg.vision_end_token_id] * 3
    gen = ex.explain_generation(images, prompt=PROMPT, method="gradcam", text=TEXT)
    assert [tuple(m.shape) for m in gen.image_maps] == [(4, 2, 4), (4, 3, 2), (4, 3, 3)]
    assert torch.equal(gen.raw_maps, gen.raw_maps[:, :2, :4])  # image 0's grid


def test_video_steps_are_one_map_each_after_the_images_before_them():
    """Constructed grids (the tiny processor cannot make videos without torchvision): an image,
    then a video of 2 temporal steps written Qwen3-VL's way (text between the steps)."""
    model, processor = tiny_vlm.qwen3_vl()
    a = gc.load(model, processor=processor).adapter
    cfg = model.config
    img, vid = cfg.image_token_id, cfg.video_token_id
    ids = torch.tensor(
        [[1, img, img, 5, vid, vid, vid, vid, vid, vid, 7, vid, vid, vid, vid, vid, vid, 9]]
    )
    inputs = {
        "image_grid_thw": torch.tensor([[1, 2, 4]]),  # 1 x 2 tokens
        "video_grid_thw": torch.tensor([[2, 4, 6]]),  # 2 steps of 2 x 3 tokens
    }
    layout = a.token_layout(inputs, ids, [(20, 40), (30, 45)])
    assert layout.positions.tolist() == [1, 2, *range(4, 10), *range(11, 17)]
    assert [(t.image, t.grid_h, t.grid_w) for t in layout.tiles] == [
        (0, 1, 2),
        (1, 2, 3),
        (2, 2, 3),
    ]
    assert layout.sizes == ((20, 40), (30, 45), (30, 45))
    assert layout.row.tolist() == [0, 0] + [0, 0, 0, 1, 1, 1] * 2
    values = torch.arange(18.0)
    maps = place(values, layout)
    assert maps[1].tolist() == [[4, 5, 6], [7, 8, 9]] and maps[2].tolist() == [
        [11, 12, 13],
        [14, 15, 16],
    ]
    # the video first in the sequence: its steps are maps 0 and 1, the image map 2
    swapped = torch.tensor([[vid] * 6 + [7] + [vid] * 6 + [img, img]])
    layout = a.token_layout(inputs, swapped, [(20, 40), (30, 45)])
    assert [t.grid_w for t in layout.tiles] == [3, 3, 2]
    assert layout.sizes == ((30, 45), (30, 45), (20, 40))
    assert merged_grids(torch.tensor([[2, 4, 6]]), 2) == [(2, 2, 3)]
    with pytest.raises(ValueError, match="13 tokens of id"):
        a.token_layout(inputs, torch.cat([ids, torch.tensor([[vid]])], 1), [(20, 40), (30, 45)])
    with pytest.raises(ValueError, match="1 sizes for 2 images and videos"):
        a.token_layout(inputs, ids, [(20, 40)])
    with pytest.raises(ValueError, match="merge size 2"):
        merged_grids(torch.tensor([[1, 3, 4]]), 2)


def test_teacher_forced_forward_extends_mm_token_type_ids_as_generate_does(tiny):
    """`mm_token_type_ids` padded with 0 for the text; the explanation's probabilities of the
    generated tokens equal generate()'s own scores."""
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    a = ex.adapter
    inputs = a.inputs([picture()], PROMPT)
    n = inputs["input_ids"].shape[1]
    ids, first = a.teacher_ids(inputs, TEXT)
    full = a.teacher_inputs(inputs, ids)
    assert (
        full["mm_token_type_ids"][0].tolist() == inputs["mm_token_type_ids"][0].tolist() + [0] * 4
    )
    assert full["mm_token_type_ids"][0, :n].sum() == 6  # the image tokens are type 1
    out = model.generate(
        **inputs,
        max_new_tokens=3,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, n:]
    probs = torch.stack([s[0].softmax(-1)[t] for s, t in zip(out.scores, new, strict=True)])
    gen = ex.explain_generation(picture(), prompt=PROMPT, method="logit-lens", max_new_tokens=3)
    keep = [i for i, t in enumerate(new.tolist()) if t not in a.special_ids()]
    assert gen.token_ids == new[keep].tolist()
    assert torch.allclose(gen.scores, probs[keep], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_maps_finite_and_not_flat_at_the_default_layer(tiny, method):
    model, processor = tiny
    gen = gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method=method, text=TEXT
    )
    assert len(gen.tokens) == gen.raw_maps.shape[0] == 4 and gen.raw_maps.shape[1:] == (2, 3)
    assert torch.isfinite(gen.raw_maps).all()
    spread = gen.raw_maps.amax((1, 2)) - gen.raw_maps.amin((1, 2))
    assert (spread > 1e-6 * gen.raw_maps.abs().amax().clamp(min=1e-30)).all()
    assert gen.raw_maps.abs().amax() > 0


def naive_maps(model, processor, images, method: str, layer: int) -> list[torch.Tensor]:
    """One forward and one backward per text token, from the definitions (DESIGN §12): the logits
    at row t-1 score token t; each image's token run reshaped to its merged grid
    (image_grid_thw / merge), in prompt order; mm_token_type_ids 0 for the text."""
    text = f"<|im_start|>user\n{IMAGE * len(images)}{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    enc = processor(images=images, text=[text], return_tensors="pt")
    body = processor.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], body], 1)
    first = enc["input_ids"].shape[1]
    types = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(body)], 1)
    cols = torch.nonzero(ids[0] == model.config.image_token_id)[:, 0]
    merge = processor.image_processor.merge_size
    grids = [(h // merge, w // merge) for _, h, w in enc["image_grid_thw"].tolist()]
    side = {
        "mm_token_type_ids": types,
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": enc["image_grid_thw"],
    }
    flat = checks.naive_token_values(model, ids, first, cols, side, method, layer)
    sizes = [h * w for h, w in grids]
    return [v.reshape(-1, h, w) for v, (h, w) in zip(flat.split(sizes, 1), grids, strict=True)]


@pytest.mark.parametrize("method", METHODS)
def test_batched_per_token_maps_of_two_images_equal_the_naive_recipe(tiny, method):
    model, processor = tiny
    images = [picture(64, 32, seed=3), picture(32, 48, seed=4)]
    layer = 1 if method == "logit-lens" else 0
    gen = gc.load(model, processor=processor).explain_generation(
        images, prompt=PROMPT, method=method, text=TEXT
    )
    want = naive_maps(model, processor, images, method, layer)
    assert gen.tokens == TEXT.split() and len(gen.image_maps) == 2
    assert [m.shape for m in gen.image_maps] == [w.shape for w in want]
    scale = max(w.abs().amax() for w in want)
    assert scale > 0
    assert torch.allclose(gen.raw_maps, want[0], atol=1e-5 * scale, rtol=1e-4)
    assert torch.allclose(gen.image_maps[1], normalize_maps(want[1]), atol=1e-4)


@pytest.fixture(scope="module")
def sdpa_twin(tiny):
    model, processor = tiny
    twin = checks.sdpa_copy(model)
    return twin, processor


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_and_eager_give_the_same_maps_and_sdpa_stays(tiny, sdpa_twin, method):
    (eager, processor), (sdpa, _) = tiny, sdpa_twin
    images = [picture(seed=5), picture(32, 32, seed=6)]
    a, b = checks.explain_on_both(eager, sdpa, processor, images, method)
    assert sdpa.config._attn_implementation == "sdpa"
    assert torch.allclose(a.image_maps[1], b.image_maps[1], atol=1e-4)
    checks.assert_attention_note(b.notes, method)


def test_attention_implementation_and_hooks_restored_after_an_error(sdpa_twin):
    model, processor = sdpa_twin
    layer = model.get_decoder().layers[1]
    checks.assert_restored_after_an_error(model, processor, layer, picture(), "attention")


def test_each_class_loads_back_from_a_saved_directory(tiny, tmp_path):
    model, processor = tiny
    path = tiny_vlm.save(model, processor, tmp_path / "qwen")
    ex = gc.load(str(path))
    assert ex.family == "qwen-vl" and type(ex.adapter.model) is type(model)
    gen = ex.explain_generation(picture(), prompt=PROMPT, method="logit-lens", text=TEXT)
    want = gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method="logit-lens", text=TEXT
    )
    assert torch.allclose(gen.raw_maps, want.raw_maps, rtol=1e-4, atol=1e-6)


def test_a_prompt_that_places_its_own_images_is_used_as_given(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    prompt = f"{IMAGE} where is the cat {IMAGE} ?"
    assert ex.adapter.prompt_text(prompt, 2) == prompt
    gen = ex.explain_generation(
        [picture(), picture(32, 64)], prompt=prompt, method="gradcam", text=TEXT
    )
    assert gen.prompt == prompt and [m.shape[1:] for m in gen.image_maps] == [(2, 3), (4, 2)]


def test_bad_input_is_one_line(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    with pytest.raises(InputError) as e:
        ex.explain_generation([picture(), picture()], prompt=f"{IMAGE} what")
    assert "1 image placeholder(s)" in one_line(e) and "2 image(s)" in one_line(e)
    bare = gc.load(model, processor=processor)
    bare.adapter.template = None
    with pytest.raises(InputError) as e:
        bare.explain_generation(picture(), prompt=PROMPT)
    assert f"placeholder {IMAGE!r}" in one_line(e)
    with pytest.raises(InputError) as e:  # a bare image token: the processor's count refuses
        ex.explain_generation(picture(), prompt=f"<|image_pad|> {IMAGE} what")
    assert "processor refused" in one_line(e)


def test_the_chat_template_wraps_each_image_in_vision_tokens():
    """A Qwen-style chat template (the real one writes each image as vision start, image pad,
    vision end): the prompt goes through it, and the default prompt is "Describe the image."."""
    model, processor = tiny_vlm.qwen2_vl()
    processor.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ex = gc.load(model, processor=processor)
    want = f"<|im_start|>user\n{IMAGE}{IMAGE}what is it<|im_end|>\n<|im_start|>assistant\n"
    assert ex.adapter.prompt_text("what is it", 2) == want
    assert "Describe the image." in ex.adapter.prompt_text(None, 1)
    gen = ex.explain_generation([picture(), picture(64, 32)], prompt="what is it", text=TEXT)
    assert gen.prompt == want and gen.method == "attn-gradcam" and len(gen.image_maps) == 2


def test_an_image_smart_resize_cannot_take_is_one_line(tiny):
    model, processor = tiny
    with pytest.raises(InputError) as e:
        gc.load(model, processor=processor).explain_generation(
            Image.new("RGB", (450, 2)), prompt=PROMPT, max_new_tokens=2
        )
    assert "aspect ratio must be smaller than 200" in one_line(e)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_steps_laid_out_as_the_model_reads_them(family):
    """Constructed video inputs (2 steps of 2 x 3 tokens) through the model itself: changing the
    frames of step 1 changes the language model's inputs at the layout's step-1 columns only,
    so the steps are where the layout puts them (Qwen3-VL writes each step in its own run)."""
    model, processor = tiny_vlm.BUILDERS[family]()
    cfg = model.config
    start, end, vid = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id
    steps = [[start, *[vid] * 6, end] for _ in range(2)]
    body = steps[0] + [7] + steps[1] if family == "qwen3_vl" else [start, *[vid] * 12, end]
    ids = torch.tensor([[5, *body, 9]])
    grid = torch.tensor([[2, 4, 6]])
    layout = gc.load(model, processor=processor).adapter.token_layout(
        {"video_grid_thw": grid}, ids, [(30, 45)]
    )
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(2 * 4 * 6, 3 * 2 * 8 * 8, generator=g)
    changed = frames.clone()
    changed[24:] += 1.0  # the patches of step 1 (t-major)

    def lm_inputs(pixels: torch.Tensor) -> torch.Tensor:
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == vid).long() * 2,
            pixel_values_videos=pixels,
            video_grid_thw=grid,
            output_hidden_states=True,
        )
        return out.hidden_states[0][0]

    with torch.no_grad():
        diff = (lm_inputs(frames) - lm_inputs(changed)).abs().amax(-1)
    step = layout.tile[layout.has_cell]
    assert (diff[layout.positions[step == 0]] == 0).all()
    assert (diff[layout.positions[step == 1]] > 1e-4).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_known_answer_a_text_token_attending_to_one_image_token(family):
    """Layer 0's queries read channel 0 (large in every embedding), its keys channel 1, which
    only the image token of cell (1, 2) carries: every text row attends there alone (the
    slowest rotary pair, so positions barely matter)."""
    model, processor = tiny_vlm.BUILDERS[family](seed=2)
    # Qwen3's per-head RMS norms would undo the scale of 5
    checks.focus_first_layer(model, norm_fill=10.0)
    ex = gc.load(model, processor=processor)
    inputs = ex.adapter.inputs([picture()], PROMPT)
    cell = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[1 * 3 + 2, 0]
    with checks.marked(model, cell):
        gen = ex.explain_generation(picture(), prompt=PROMPT, method="attention", text=TEXT)
    raw = gen.raw_maps
    assert raw.shape == (4, 2, 3)
    checks.assert_one_cell(raw, 1, 2, 0.99)
