"""The tiny generative VLMs of tests/tiny_vlm.py: image-token counts as DESIGN §12 predicts them,
one eager attention per LM layer, generation, determinism, and a saved directory that loads back
offline with the same logits."""

from __future__ import annotations

import math

import pytest
import tiny_vlm
import torch
from tiny import noise_images

from groundcam.adapters.vlm_compat import image_only_video_processor, load_processor
from groundcam.errors import InputError

HEIGHT, WIDTH = 40, 70  # non-square: every family's tiling and cropping shows in the counts
CHAT = "USER : {} what is the sign ? ASSISTANT :"


def llava_count(model, processor) -> int:
    """(crop/patch)² + num_additional_image_tokens − [strategy == "default"]."""
    crop = processor.image_processor.crop_size["height"]
    g = crop // processor.patch_size
    default = model.config.vision_feature_select_strategy == "default"
    return g * g + processor.num_additional_image_tokens - default


def best_canvas(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most of the image after an aspect-preserving
    resize into it, the least padded among equals."""
    best, kept_best, waste_best = None, -1, math.inf
    for ch, cw in pinpoints:
        s = min(cw / width, ch / height)
        kept = min(int(width * s) * int(height * s), width * height)
        waste = ch * cw - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (ch, cw), kept, waste
    return best


def anyres_count(model, height: int, width: int, max_tiles: int | None = None) -> int:
    """Base g² + rows·(cols+1): the canvas's patch grid without its centred padding, shrunk
    first for `anyres_max_N` when sqrt(r·c/(N·g²)) > 1.1."""
    vision = model.config.vision_config
    g = vision.image_size // vision.patch_size
    ch, cw = best_canvas(height, width, model.config.image_grid_pinpoints)
    rows, cols = ch // vision.image_size * g, cw // vision.image_size * g
    if width / height > cols / rows:
        pad = (rows - int(round(height * cols / width, 7))) // 2
        rows -= 2 * pad
    else:
        pad = (cols - int(round(width * rows / height, 7))) // 2
        cols -= 2 * pad
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * g * g))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return g * g + rows * (cols + 1)


def qwen_count(processor, height: int, width: int) -> int:
    """The smart-resized image's patch grid divided by merge²."""
    images = processor.image_processor
    factor = images.patch_size * images.merge_size
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > images.size["longest_edge"]:
        beta = math.sqrt(height * width / images.size["longest_edge"])
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < images.size["shortest_edge"]:
        beta = math.sqrt(images.size["shortest_edge"] / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return (h // images.patch_size) * (w // images.patch_size) // images.merge_size**2


def idefics_count(model, processor, height: int, width: int) -> int:
    """image_seq_len·(rows·cols + 1): the longest edge resized, each side rounded up to tiles;
    an image that fits one tile is the global image alone."""
    images = processor.image_processor
    tile = images.max_image_size["longest_edge"]
    scale = images.size["longest_edge"] / max(height, width)
    rows, cols = math.ceil(height * scale / tile), math.ceil(width * scale / tile)
    vision = model.config.vision_config
    seq_len = (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2
    return seq_len * (rows * cols + 1 if rows * cols > 1 else 1)


def internvl_count(model, processor, height: int, width: int) -> int:
    """image_seq_length per tile: the rows×cols grid of aspect closest to the image's (at most
    max_patches tiles; among equals, more tiles while the image covers over half of them), plus
    a thumbnail when there are several."""
    images = processor.image_processor
    grids = [
        (r, c)
        for n in range(images.min_patches, images.max_patches + 1)
        for r in range(1, n + 1)
        for c in range(1, n + 1)
        if r * c == n
    ]
    tile = images.size["height"]
    best, rows, cols = math.inf, 1, 1
    for r, c in grids:  # fewest tiles first; a tie goes to more tiles while they are needed
        diff = abs(width / height - c / r)
        if diff < best or (diff == best and height * width > 0.5 * tile * tile * r * c):
            best, rows, cols = diff, r, c
    vision = model.config.vision_config
    g = vision.image_size[0] // vision.patch_size[0]
    per_tile = int(g * g * model.config.downsample_ratio**2)
    return per_tile * (rows * cols + (rows * cols > 1))


# family: (builder options, prompt, predicted number of image tokens in input_ids)
FAMILIES = {
    "llava": ({}, CHAT.format("<image>"), lambda m, p, h, w: llava_count(m, p)),
    "llava_next": ({}, CHAT.format("<image>"), lambda m, p, h, w: anyres_count(m, h, w)),
    "llava_onevision": (
        {},
        CHAT.format("<image>"),
        lambda m, p, h, w: anyres_count(m, h, w, max_tiles=9),
    ),
    "llava_onevision_max1": (
        {"max_tiles": 1, "vision": "clip"},
        CHAT.format("<image>"),
        lambda m, p, h, w: anyres_count(m, h, w, max_tiles=1),
    ),
    "qwen2_vl": ({}, CHAT.format(tiny_vlm.QWEN_IMAGE), lambda m, p, h, w: qwen_count(p, h, w)),
    "qwen2_vl_small": (
        {"max_pixels": 32 * 32, "merge_size": 1},
        CHAT.format(tiny_vlm.QWEN_IMAGE),
        lambda m, p, h, w: qwen_count(p, h, w),
    ),
    "qwen2_5_vl": ({}, CHAT.format(tiny_vlm.QWEN_IMAGE), lambda m, p, h, w: qwen_count(p, h, w)),
    "qwen3_vl": ({}, CHAT.format(tiny_vlm.QWEN_IMAGE), lambda m, p, h, w: qwen_count(p, h, w)),
    "paligemma": (
        {},
        "<image>what is the sign ?",
        lambda m, p, h, w: (
            (m.config.vision_config.image_size // m.config.vision_config.patch_size) ** 2
        ),
    ),
    "gemma3": (
        {"tokens_per_side": 2},
        CHAT.format("<start_of_image>"),
        lambda m, p, h, w: m.config.mm_tokens_per_image,
    ),
    "idefics3": ({}, CHAT.format("<image>"), lambda m, p, h, w: idefics_count(m, p, h, w)),
    "idefics3_one_tile": (
        {"max_tiles": 1},
        CHAT.format("<image>"),
        lambda m, p, h, w: idefics_count(m, p, h, w),
    ),
    "smolvlm": (
        {"max_tiles": 3},
        CHAT.format("<image>"),
        lambda m, p, h, w: idefics_count(m, p, h, w),
    ),
    "internvl": (
        {},
        CHAT.format("<IMG_CONTEXT>"),
        lambda m, p, h, w: internvl_count(m, p, h, w),
    ),
    "blip2": ({}, "what is the sign ?", lambda m, p, h, w: m.config.num_query_tokens),
    "instructblip": ({}, "what is the sign ?", lambda m, p, h, w: m.config.num_query_tokens),
}


VARIANT_OF = {
    "llava_onevision_max1": "llava_onevision",
    "qwen2_vl_small": "qwen2_vl",
    "idefics3_one_tile": "idefics3",
}


def build(name: str):
    """The family's tiny model and processor, with the options of `FAMILIES`."""
    options, _, _ = FAMILIES[name]
    return tiny_vlm.BUILDERS[VARIANT_OF.get(name, name)](**options)


def test_every_family_is_tested_with_its_placeholder():
    assert {VARIANT_OF.get(name, name) for name in FAMILIES} == set(tiny_vlm.BUILDERS)
    for name, (_, prompt, _) in FAMILIES.items():
        assert tiny_vlm.PLACEHOLDER[VARIANT_OF.get(name, name)] in prompt


def lm_outputs(model, out):
    """The language model's outputs (BLIP-2 nests them)."""
    return getattr(out, "language_model_outputs", out)


@pytest.fixture(scope="module")
def image():
    return noise_images(1, HEIGHT, WIDTH)[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name, image, tmp_path, one_thread):
    """Count, attentions, hidden states, generation and the save/load round trip of one family."""
    model, processor = build(name)
    _, prompt, predicted = FAMILIES[name]
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    assert (ids == image_id).sum().item() == predicted(model, processor, HEIGHT, WIDTH)

    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    lm = lm_outputs(model, out)
    layers = model.config.text_config.num_hidden_layers
    heads = model.config.text_config.num_attention_heads
    assert len(lm.attentions) == layers == 2
    for attention in lm.attentions:
        assert attention.shape == (1, heads, ids.shape[1], ids.shape[1])
        torch.testing.assert_close(attention.sum(-1), torch.ones(1, heads, ids.shape[1]))
    assert len(lm.hidden_states) == layers + 1
    # The first image token sees the last one only in PaliGemma's and Gemma 3's bidirectional prefix.
    at = (ids[0] == image_id).nonzero()[:, 0]
    ahead = lm.attentions[0][0, :, at[0], at[-1]]
    bidirectional = VARIANT_OF.get(name, name) in ("paligemma", "gemma3")
    assert bool((ahead > 0).all()) if bidirectional else bool((ahead == 0).all())
    assert out.logits.shape[:2] == ids.shape

    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)
    assert torch.equal(generated[:, : ids.shape[1]], ids)

    loaded, loaded_processor = tiny_vlm.load(tiny_vlm.save(model, processor, tmp_path))
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    weights = loaded.state_dict()
    assert weights.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    again = loaded_processor(images=[image], text=[prompt], return_tensors="pt")
    assert again.keys() == inputs.keys()
    for key in inputs:
        assert torch.equal(again[key], inputs[key]), key
    with torch.no_grad():
        logits = loaded(**again).logits
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", tiny_vlm.BUILDERS)
def test_deterministic_under_a_seed(name, one_thread):
    builder = tiny_vlm.BUILDERS[name]
    first, second, other = builder(seed=3)[0], builder(seed=3)[0], builder(seed=4)[0]
    same, changed = second.state_dict(), other.state_dict()
    for key, weights in first.state_dict().items():
        assert torch.equal(weights, same[key]), key
    assert any(not torch.equal(w, changed[k]) for k, w in first.state_dict().items())


def test_gemma3_projector_sees_the_image(image, one_thread):
    """The zero-initialised projector weight is randomised: two images give different logits."""
    model, processor = tiny_vlm.gemma3()
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0
    prompt = CHAT.format("<start_of_image>")
    a, b = (
        processor(images=[im], text=[prompt], return_tensors="pt") for im in noise_images(2, 40, 70)
    )
    with torch.no_grad():
        assert not torch.allclose(model(**a).logits, model(**b).logits)


def test_geometry_options_change_the_counts(image, one_thread):
    """Options reach both the model and the processor: a smaller patch, more tokens."""
    fine, fine_processor = tiny_vlm.llava(patch_size=4)
    ids = fine_processor(images=[image], text=[CHAT.format("<image>")], return_tensors="pt")
    assert (ids["input_ids"] == fine.config.image_token_id).sum() == (32 // 4) ** 2
    with torch.no_grad():
        assert fine(**ids).logits.shape[1] == ids["input_ids"].shape[1]


def test_video_stub_refuses_videos():
    with pytest.raises(InputError, match="torchvision"):
        image_only_video_processor()(videos=[])


def test_missing_package_is_named(tmp_path, monkeypatch):
    """A processor that needs a package the install lacks: one line naming it."""
    from transformers.models.smolvlm import processing_smolvlm

    model, processor = tiny_vlm.smolvlm()
    tiny_vlm.save(model, processor, tmp_path)
    monkeypatch.setattr(processing_smolvlm, "num2words", None)
    with pytest.raises(InputError, match=r"'num2words'.*pip install num2words") as err:
        load_processor(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name",
    ["llava_next", "llava_onevision_max1", "qwen2_vl", "smolvlm", "idefics3_one_tile", "internvl"],
)
@pytest.mark.parametrize("height, width", [(70, 40), (33, 100), (90, 90), (20, 24)])
def test_counts_follow_the_image_shape(name, height, width, one_thread):
    """Portrait, very wide, square and small images: the processor's count is the formula's."""
    model, processor = build(name)
    _, prompt, predicted = FAMILIES[name]
    image = noise_images(1, height, width, seed=1)[0]
    ids = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"]
    assert (ids == model.config.image_token_id).sum().item() == predicted(
        model, processor, height, width
    )


def test_missing_library_is_named(tmp_path, monkeypatch):
    """transformers' "X requires the Torchvision library" ImportError becomes one line naming
    the package to install."""
    from transformers import AutoProcessor
    from transformers.utils.import_utils import TORCHVISION_IMPORT_ERROR

    def lacks_torchvision(*args, **kwargs):
        raise ImportError(TORCHVISION_IMPORT_ERROR.format("PixtralProcessor"))

    monkeypatch.setattr(AutoProcessor, "from_pretrained", lacks_torchvision)
    with pytest.raises(InputError, match=r"'torchvision'.*pip install torchvision") as err:
        load_processor(tmp_path)
    assert "\n" not in str(err.value)


def test_blip2_qformer_cross_attention(image, one_thread):
    """BLIP-2's queries reach the patches through the Q-Former's cross-attention, one map per
    layer (cross_attention_frequency 1): [B, heads, Q, 1 + patches]."""
    model, processor = tiny_vlm.blip2(queries=5)
    inputs = processor(images=[image], text=["what is the sign ?"], return_tensors="pt")
    with torch.no_grad():
        patches = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        out = model.qformer(
            query_embeds=model.query_tokens,
            encoder_hidden_states=patches,
            output_attentions=True,
        )
    grid = (32 // 8) ** 2
    assert [tuple(a.shape) for a in out.cross_attentions] == [(1, 4, 5, 1 + grid)] * 2


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "internvl"])
def test_sharpen_peaks_the_attention(name, image, one_thread):
    """At the default init the last row's attention over the image is nearly flat; `sharpen`
    makes it peaked, and changes nothing but the query and key weights."""
    model, processor = build(name)
    _, prompt, _ = FAMILIES[name]
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    columns = inputs["input_ids"][0] == model.config.image_token_id

    def spread() -> float:
        with torch.no_grad():
            row = model(**inputs, output_attentions=True).attentions[-1][0, :, -1, columns]
        row = row.mean(0)
        return (row.max() / row.min()).item()

    before = spread()
    weights = {k: w.clone() for k, w in model.state_dict().items()}
    assert before < 1.1
    tiny_vlm.sharpen(model)
    assert spread() > 2
    changed = {k for k, w in model.state_dict().items() if not torch.equal(w, weights[k])}
    assert changed and all(
        k.split(".")[-2] in ("q_proj", "k_proj", "query", "key") for k in changed
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_rows_match_single_forwards(name, one_thread):
    """A padded batch of a landscape and a portrait image with prompts of different lengths: each
    row holds its own image's count, and its logits at real tokens are the single forward's
    (InternVL's processor pads on the left, the others on the right)."""
    model, processor = build(name)
    _, prompt, predicted = FAMILIES[name]
    shapes = [(HEIGHT, WIDTH), (WIDTH, HEIGHT)]
    images = [noise_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(shapes)]
    texts = [prompt, prompt.replace("what", "what is the red sign")]
    per_sample = name not in ("paligemma", "blip2", "instructblip")  # those take a flat list
    batch = processor(
        images=[[im] for im in images] if per_sample else images,
        text=texts,
        padding=True,
        return_tensors="pt",
    )
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert counts == [predicted(model, processor, h, w) for h, w in shapes]
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (im, text) in enumerate(zip(images, texts, strict=True)):
            one = processor(images=[[im]] if per_sample else [im], text=[text], return_tensors="pt")
            real = batch["attention_mask"][row].bool()
            assert torch.equal(batch["input_ids"][row, real], one["input_ids"][0])
            torch.testing.assert_close(logits[row, real], model(**one).logits[0], rtol=0, atol=1e-6)
