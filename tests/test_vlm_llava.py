"""LLaVA-1.5 through the shared generative-VLM plumbing (adapters/vlm.py, generation.explain_vlm):
image tokens found and placed (centre crop, non-square images), per-token maps of every method
against a naive one-forward-and-backward-per-token recipe, sdpa against eager, the attention
implementation and hooks left as they were, a known answer, and bad input in one line."""

from __future__ import annotations

import pytest
import tiny_vlm
import torch
import vlm_checks as checks
from click.testing import CliRunner
from PIL import Image
from vlm_checks import one_line, picture

import groundcam as gc
from groundcam.adapters.vlm import _EAGER, attention_implementations
from groundcam.cli import main
from groundcam.errors import GroundcamWarning, InputError
from groundcam.explanation import normalize_maps
from groundcam.generation import group_words

METHODS = ("attention", "attn-gradcam", "gradcam", "logit-lens")
PROMPT = "what is the sign"
TEXT = "red cat the dog"


def strong(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random LM weights large enough that attention is not uniform (init std 0.02 leaves
    every query row nearly uniform over the keys)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.get_decoder().named_parameters():
            if p.dim() == 2 and ("q_proj" in name or "k_proj" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_vlm.llava()
    return strong(model), processor


def test_llava_is_a_registered_family_with_its_methods(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    assert ex.family == "llava"
    assert gc.families()["llava"] == sorted(METHODS + ("relative-attention", "relevance", "tam"))
    assert ex.layers("attention") == [0, 1] and ex.layers("logit-lens") == [1]
    assert ex.resolve("attention").layer == 0  # 14/32 of 2 layers, never the last


def test_image_tokens_located_and_placed_over_the_centre_crop(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    a = ex.adapter
    # 64 x 32: resized to 64 x 32 (shortest edge 32), the middle 32 columns kept
    stripes = Image.new("RGB", (64, 32), (0, 255, 0))
    stripes.paste((255, 0, 0), (0, 0, 16, 32))
    stripes.paste((0, 0, 255), (48, 0, 64, 32))
    inputs = a.inputs([stripes], PROMPT)
    pv = inputs["pixel_values"][0]
    assert torch.allclose(pv, pv[:, :1, :1].expand_as(pv))  # the crop holds green only
    ids = inputs["input_ids"]
    layout = a.token_layout(inputs, ids, [(32, 64)])
    expected = torch.nonzero(ids[0] == model.config.image_token_index)[:, 0]
    assert torch.equal(layout.positions, expected) and len(expected) == 16
    assert layout.tiles[0].box == (0.25, 0.0, 0.75, 1.0)
    assert layout.row.tolist() == [r for r in range(4) for _ in range(4)]
    gen = ex.explain_generation(stripes, prompt=PROMPT, method="attention", text=TEXT)
    assert gen.raw_maps.shape == (4, 4, 8)
    assert (gen.raw_maps[:, :, :2] == 0).all() and (gen.raw_maps[:, :, 6:] == 0).all()
    assert (gen.raw_maps[:, :, 2:6] > 0).all()
    # a tall image: the top and bottom quarters are cropped away
    tall = a.token_layout(a.inputs([picture(32, 64)], PROMPT), ids, [(64, 32)])
    assert tall.tiles[0].box == (0.0, 0.25, 1.0, 0.75)


def test_full_feature_strategy_gives_the_cls_token_no_cell():
    model, processor = tiny_vlm.llava(strategy="full")
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([picture()], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(32, 32)])
    assert len(layout.positions) == 17
    assert layout.row[0] == -1 and layout.row[1:].tolist() == [
        r for r in range(4) for _ in range(4)
    ]


@pytest.mark.parametrize("method", METHODS)
def test_maps_finite_and_not_flat_at_the_default_layer(tiny, method):
    model, processor = tiny
    gen = gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method=method, max_new_tokens=4
    )
    assert len(gen.tokens) == gen.raw_maps.shape[0] >= 1
    assert torch.isfinite(gen.raw_maps).all()
    spread = gen.raw_maps.amax((1, 2)) - gen.raw_maps.amin((1, 2))
    assert (spread > 1e-6 * gen.raw_maps.abs().amax().clamp(min=1e-30)).all()
    assert gen.raw_maps.abs().amax() > 0
    assert gen.prompt is not None and "what is the sign" in gen.prompt


def teacher_forced(model, processor, image, text: str = TEXT):
    """LLaVA's prompt with `text` after it as the model reads it: the processor's output, the
    ids, where the text starts and the image-token columns."""
    enc = processor(
        images=[image], text=[f"USER: <image>\n{PROMPT} ASSISTANT:"], return_tensors="pt"
    )
    body = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], body], 1)
    first = enc["input_ids"].shape[1]
    return enc, ids, first, torch.nonzero(ids[0] == model.config.image_token_index)[:, 0]


def naive_maps(model, processor, image, method: str, layer: int) -> torch.Tensor:
    """The naive per-token recipe (vlm_checks) over the image-token columns as a 4 x 4 grid (a
    square image: the crop is the whole image)."""
    enc, ids, first, image_cols = teacher_forced(model, processor, image)
    side = {"pixel_values": enc["pixel_values"]}
    values = checks.naive_token_values(model, ids, first, image_cols, side, method, layer)
    return values.reshape(-1, 4, 4)


@pytest.mark.parametrize("method", METHODS)
def test_batched_per_token_maps_equal_the_naive_recipe(tiny, method):
    model, processor = tiny
    image = picture(seed=3)
    ex = gc.load(model, processor=processor)
    layer = 1 if method == "logit-lens" else 0
    gen = ex.explain_generation(image, prompt=PROMPT, method=method, text=TEXT)
    want = naive_maps(model, processor, image, method, layer)
    assert gen.tokens == TEXT.split()
    assert gen.raw_maps.shape == want.shape
    scale = want.abs().amax()
    assert scale > 0
    assert torch.allclose(gen.raw_maps, want, atol=1e-5 * scale, rtol=1e-4)


def test_batched_maps_equal_the_naive_recipe_at_another_layer(tiny):
    model, processor = tiny
    image = picture(seed=4)
    ex = gc.load(model, processor=processor)
    for method in ("attn-gradcam", "gradcam"):
        gen = ex.explain_generation(image, prompt=PROMPT, method=method, layer=1, text=TEXT)
        want = naive_maps(model, processor, image, method, 1)
        assert torch.allclose(gen.raw_maps, want, atol=1e-5 * want.abs().amax(), rtol=1e-4)


@pytest.fixture(scope="module")
def sdpa_twin(tiny):
    model, processor = tiny
    twin = checks.sdpa_copy(model)
    return twin, processor


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_and_eager_give_the_same_maps_and_sdpa_stays(tiny, sdpa_twin, method):
    (eager, processor), (sdpa, _) = tiny, sdpa_twin
    _, b = checks.explain_on_both(eager, sdpa, processor, picture(seed=5), method)
    assert sdpa.config._attn_implementation == "sdpa"
    checks.assert_attention_note(b.notes, method)


def test_attention_implementation_restored_after_an_error_mid_forward(sdpa_twin):
    model, processor = sdpa_twin
    layer = model.get_decoder().layers[1]
    checks.assert_restored_after_an_error(model, processor, layer, picture(), "attn-gradcam")


def test_known_answer_a_text_token_attending_to_one_image_token():
    """Layer 0's queries read channel 0 (large in every text embedding), its keys channel 1,
    which only the image token of cell (2, 1) carries: every text row attends there alone."""
    model, processor = tiny_vlm.llava(seed=2)
    checks.focus_first_layer(model)
    ex = gc.load(model, processor=processor)
    inputs = ex.adapter.inputs([picture()], PROMPT)
    cell = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_index)[2 * 4 + 1, 0]
    with checks.marked(model, cell):
        gen = ex.explain_generation(picture(), prompt=PROMPT, method="attention", text=TEXT)
    raw = gen.raw_maps
    checks.assert_one_cell(raw, 2, 1, 0.99)
    assert (gen.maps.flatten(1).argmax(1) == 2 * 4 + 1).all()


def test_words_group_sub_word_tokens_and_average_their_maps(tiny):
    class Pieces:
        """A SentencePiece-like decoder: "▁" starts a word, the first one's space dropped."""

        table = ["▁the", "▁ca", "t", "!", "▁dog"]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.table[i] for i in ids).replace("▁", " ").lstrip()

    assert group_words(Pieces(), [0, 1, 2, 3, 4]) == (["the", "cat!", "dog"], [[0], [1, 2, 3], [4]])
    model, processor = tiny
    gen = gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method="gradcam", text=TEXT
    )
    assert gen.words == TEXT.split() and gen.word_tokens == [[0], [1], [2], [3]]
    want = normalize_maps(torch.stack([gen.raw_maps[t].mean(0) for t in gen.word_tokens]))
    assert torch.allclose(gen.word_maps, want)


def test_load_from_a_saved_directory(tiny, tmp_path):
    model, processor = tiny
    path = tiny_vlm.save(model, processor, tmp_path / "llava")
    ex = gc.load(str(path))
    assert ex.family == "llava"
    gen = ex.explain_generation(picture(), prompt=PROMPT, method="logit-lens", max_new_tokens=3)
    assert gen.raw_maps.shape[1:] == (4, 4) and torch.isfinite(gen.raw_maps).all()
    meta = gen.meta()
    assert meta["words"] == gen.words and meta["prompt"] == gen.prompt


def test_bad_input_is_one_line(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    with pytest.raises(InputError) as e:
        ex.explain_generation([picture(), picture()], prompt=PROMPT)
    assert "one image" in one_line(e) and "2 images" in one_line(e)
    with pytest.raises(InputError) as e:
        ex.explain_generation(picture(), prompt="USER: <image> <image> what ASSISTANT:")
    assert "2 image placeholder" in one_line(e)
    bare = gc.load(model, processor=processor)
    bare.adapter.template = None  # a processor with no chat template, a family with no template
    with pytest.raises(InputError) as e:
        bare.explain_generation(picture(), prompt=PROMPT)
    assert "placeholder '<image>'" in one_line(e)
    with pytest.raises(InputError) as e:
        ex.explain_generation(picture(), prompt=PROMPT, method="rollout")
    assert "rollout" in one_line(e)


def test_cli_caption_passes_the_prompt(tiny, tmp_path):
    model, processor = tiny
    path = tiny_vlm.save(model, processor, tmp_path / "llava")
    image = tmp_path / "pic.png"
    picture().save(image)
    args = ["caption", str(image), "--model", str(path), "--prompt", "where is the cat"]
    args += [
        "--method",
        "gradcam",
        "--max-new-tokens",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "where is the cat" in result.output
    bad = CliRunner().invoke(main, [*args[:5], "<image> <image> what", *args[6:]])
    assert bad.exit_code == 2 and "placeholder" in bad.output


@pytest.mark.parametrize("width, height", [(101, 48), (48, 77)])
def test_crop_box_is_where_the_processor_crops(width, height):
    """Another size (48 px, 6 x 6 tokens) and odd aspects: the resize is the identity (the short
    side is already 48), so each kept column (row) is read back from a coded image."""
    model, processor = tiny_vlm.llava(image_size=48, patch_size=8)
    a = gc.load(model, processor=processor).adapter
    xs = torch.arange(width)[None, :].expand(height, width)
    ys = torch.arange(height)[:, None].expand(height, width)
    coded = torch.stack([xs, ys, torch.zeros_like(xs)], -1).to(torch.uint8)
    image = Image.fromarray(coded.numpy())
    inputs = a.inputs([image], PROMPT)
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    pixels = (inputs["pixel_values"][0].permute(1, 2, 0) * std + mean) * 255
    left, top = round(float(pixels[0, 0, 0])), round(float(pixels[0, 0, 1]))
    layout = a.token_layout(inputs, inputs["input_ids"], [(height, width)])
    x0, y0, x1, y1 = layout.tiles[0].box
    assert (layout.tiles[0].grid_h, layout.tiles[0].grid_w) == (6, 6)
    assert (x0 * width, y0 * height) == pytest.approx((left, top))
    assert ((x1 - x0) * width, (y1 - y0) * height) == pytest.approx((48, 48))


@pytest.mark.parametrize("method", ["attention", "attn-gradcam", "gradcam"])
def test_a_layer_range_is_the_mean_of_its_layers_maps(tiny, method):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    image = picture(seed=6)
    one = [
        ex.explain_generation(image, prompt=PROMPT, method=method, layer=n, text=TEXT).raw_maps
        for n in (0, 1)
    ]
    for layers in ((0, 1), "0-1", [0, 1], range(2)):
        gen = ex.explain_generation(image, prompt=PROMPT, method=method, layer=layers, text=TEXT)
        assert gen.layer == (0, 1) and gen.meta()["layer"] == (0, 1)
        assert torch.allclose(gen.raw_maps, (one[0] + one[1]) / 2, rtol=1e-5, atol=1e-8)
    with pytest.raises(InputError) as e:
        ex.explain_generation(image, prompt=PROMPT, method=method, layer="1-0", text=TEXT)
    assert "empty" in one_line(e)
    with pytest.raises(InputError) as e:
        ex.explain_generation(image, prompt=PROMPT, method=method, layer=(0, 5), text=TEXT)
    assert "layer 2 is not" in one_line(e)


def test_teacher_inputs_extend_per_token_side_inputs_as_generate_does(tiny):
    """The family hook: a per-token side input is padded with the family's value for each
    generated token (PaliGemma: token_type_ids 1); the mask with ones; the rest untouched."""
    model, processor = tiny
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([picture()], PROMPT)
    n = inputs["input_ids"].shape[1]
    inputs["token_type_ids"] = torch.zeros(1, n, dtype=torch.long)
    ids, first = a.teacher_ids(inputs, TEXT)
    assert first == n and ids.shape[1] == n + 4
    a.per_token_inputs = {"token_type_ids": 1}
    full = a.teacher_inputs(inputs, ids)
    assert full["token_type_ids"][0].tolist() == [0] * n + [1] * 4
    assert full["attention_mask"][0].tolist() == [1] * (n + 4)
    assert full["pixel_values"] is inputs["pixel_values"] and full["input_ids"] is ids


def test_the_chat_template_places_the_image_when_the_processor_has_one():
    model, processor = tiny_vlm.llava()
    processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    ex = gc.load(model, processor=processor)
    assert ex.adapter.prompt_text("what is it", 1) == "USER: <image> what is it ASSISTANT:"
    assert ex.adapter.prompt_text(None, 1) == "USER: <image> Describe the image. ASSISTANT:"
    gen = ex.explain_generation(picture(), prompt=PROMPT, method="logit-lens", text=TEXT)
    assert gen.prompt == "USER: <image> what is the sign ASSISTANT:"  # as templated
    assert gen.tokens == TEXT.split()
    with pytest.warns(GroundcamWarning, match="unknown"):  # "</s>" is read as words here
        empty = ex.explain_generation(picture(), prompt=PROMPT, method="gradcam", text="</s>")
    assert empty.tokens == [] and empty.maps.shape == (0, 4, 4) and empty.word_maps is None


def test_attention_that_cannot_be_recorded_says_which_methods_still_work(sdpa_twin):
    """An attention module whose model code has no eager function: one line naming the methods
    that read no attention; nothing switched."""
    from groundcam.adapters.vlm import eager_only

    model, processor = sdpa_twin

    class Opaque(torch.nn.Module):  # defined here: this module has no eager_attention_forward
        pass

    before = attention_implementations(model)
    with pytest.raises(InputError) as e, eager_only(model.get_decoder(), [Opaque()]):
        pass
    assert "gradcam and logit-lens still work" in one_line(e)
    assert attention_implementations(model) == before and not _EAGER


def test_a_model_without_its_processor_is_one_line(tiny):
    model, _ = tiny
    with pytest.raises(InputError) as e:
        gc.load(model)
    assert "processor=" in one_line(e)
