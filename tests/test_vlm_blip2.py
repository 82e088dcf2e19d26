"""BLIP-2 and InstructBLIP through the shared generative-VLM plumbing: the language model's maps
over the query tokens composed to the ViT's patches by the Q-Former's cross-attention. Checked
against a naive recipe (one forward and backward per token, the cross-attention read from the
Q-Former's own `output_attentions`), sdpa against eager, a known answer, the attention
implementations and hooks left as they were, and bad input in one line."""

from __future__ import annotations

import copy

import pytest
import tiny_vlm
import torch
import vlm_checks as checks
from click.testing import CliRunner
from PIL import Image
from vlm_checks import one_line

import groundcam as gc
from groundcam.cli import main
from groundcam.errors import InputError

METHODS = ("attention", "attn-gradcam", "gradcam", "logit-lens")
FAMILIES = ("blip2", "instructblip")
PROMPT = "what is the sign"
TEXT = "red cat the dog"


def picture(w: int = 40, h: int = 32, seed: int = 0) -> Image.Image:
    """A seeded random image, 40 x 32 unless told: squashed to the square patch grid."""
    return checks.picture(w, h, seed)


def strong(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Sharpened attention, random query tokens and a random vision tower: BLIP-2 initialises
    the queries to zeros and the ViT with std 1e-10, so every query would read alike patches."""
    tiny_vlm.sharpen(model, std=0.5, seed=seed)
    with torch.no_grad():
        model.query_tokens.normal_(0, 1)
        for p in model.vision_model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = getattr(tiny_vlm, request.param)()
    return strong(model), processor


def cross_attention(model, enc) -> torch.Tensor:
    """C [Q, patches]: the Q-Former's own cross-attention maps (output_attentions), mean over
    layers and heads, CLS dropped."""
    vision = model.vision_model(pixel_values=enc["pixel_values"]).last_hidden_state
    extra = {}
    if "qformer_input_ids" in enc:
        extra = dict(
            input_ids=enc["qformer_input_ids"], attention_mask=enc["qformer_attention_mask"]
        )
    out = model.qformer(
        query_embeds=model.query_tokens,
        encoder_hidden_states=vision,
        output_attentions=True,
        **extra,
    )
    return torch.stack([a[0] for a in out.cross_attentions]).mean((0, 1))[:, 1:]


def naive_maps(model, processor, image, method: str, layer: int, template: str) -> torch.Tensor:
    """One eager forward and backward per token: the method's values over the query columns of
    the LM, times the Q-Former's cross-attention, as a g x g grid."""
    enc = processor(images=[image], text=[template.format(prompt=PROMPT)], return_tensors="pt")
    body = processor.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], body], 1)
    first = enc["input_ids"].shape[1]
    queries = torch.nonzero(ids[0] == model.config.image_token_id)[:, 0]
    with torch.no_grad():
        mix = cross_attention(model, enc)
    side = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    values = checks.naive_token_values(
        model, ids, first, queries, side, method, layer, lambda out: out.language_model_outputs
    )
    g_side = int(mix.shape[1] ** 0.5)
    return (values @ mix).reshape(-1, g_side, g_side)


def test_registered_and_the_layout_is_the_patch_grid_and_the_queries(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    assert ex.family == type(model).__name__.removesuffix("ForConditionalGeneration").lower()
    a = ex.adapter
    inner = model.language_model.model
    assert a.lm_layers is (inner.decoder if ex.family == "blip2" else inner).layers
    inputs = a.inputs([picture()], PROMPT)
    ids = inputs["input_ids"]
    layout = a.token_layout(inputs, ids, [(32, 40)])
    assert layout.tiles[0].grid_h == layout.tiles[0].grid_w == 4
    assert layout.positions.tolist() == list(range(1, 17))  # vision positions, CLS at 0
    assert layout.row.tolist() == [r for r in range(4) for _ in range(4)]
    assert layout.sizes == ((32, 40),)
    queries = a.lm_columns(ids, layout)
    assert queries.tolist() == [0, 1, 2, 3]  # before the prompt
    mix, note = a.composition(inputs)
    assert mix.shape == (4, 16) and "cross-attention" in note
    assert torch.allclose(mix, cross_attention(model, inputs), atol=1e-6)
    assert bool((mix.sum(1) < 1).all())  # the CLS column's share is gone, rows not renormalised


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_finite_and_not_flat_at_the_default_layer(tiny, method):
    model, processor = tiny
    calls = []
    handle = model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        gen = gc.load(model, processor=processor).explain_generation(
            picture(), prompt=PROMPT, method=method, text=TEXT
        )
    finally:
        handle.remove()
    assert len(calls) == 1  # the composition is kept from the one teacher-forced forward
    assert gen.tokens == TEXT.split() and gen.raw_maps.shape == (4, 4, 4)
    assert torch.isfinite(gen.raw_maps).all()
    flat = gen.raw_maps.flatten(1)
    assert bool((flat.amax(1) > 1.05 * flat.amin(1)).any()) and flat.amax() > 0
    assert "composition" in gen.notes
    assert gen.image_maps[0].shape == gen.maps.shape


@pytest.mark.parametrize("method", METHODS)
def test_batched_per_token_maps_equal_the_naive_recipe(tiny, method):
    model, processor = tiny
    image = picture(seed=3)
    ex = gc.load(model, processor=processor)
    layer = 1 if method == "logit-lens" else 0
    gen = ex.explain_generation(image, prompt=PROMPT, method=method, text=TEXT)
    want = naive_maps(model, processor, image, method, layer, ex.adapter.template)
    assert gen.raw_maps.shape == want.shape
    scale = want.abs().amax()
    assert scale > 0
    assert torch.allclose(gen.raw_maps, want, atol=1e-5 * scale, rtol=1e-4)


def test_another_size_and_query_count_at_another_layer():
    """48 px images of 8 px patches (6 x 6) and 6 queries; layer 1."""
    model, processor = tiny_vlm.blip2(image_size=48, queries=6, seed=1)
    model = strong(model, seed=1)
    ex = gc.load(model, processor=processor)
    image = picture(w=30, h=70, seed=2)
    for method in ("attn-gradcam", "gradcam"):
        gen = ex.explain_generation(image, prompt=PROMPT, method=method, layer=1, text=TEXT)
        want = naive_maps(model, processor, image, method, 1, ex.adapter.template)
        assert gen.raw_maps.shape == (4, 6, 6)
        assert torch.allclose(gen.raw_maps, want, atol=1e-5 * want.abs().amax(), rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_and_eager_give_the_same_maps_and_sdpa_stays(tiny, method):
    eager, processor = tiny
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config.qformer_config._attn_implementation == "sdpa"
    _, b = checks.explain_on_both(eager, sdpa, processor, picture(seed=5), method)
    assert "recorded layers only" in b.notes["composition"]
    checks.assert_attention_note(b.notes, method)  # the language model switched for attention only


def test_attention_implementation_restored_after_an_error_in_the_qformer():
    model, processor = tiny_vlm.blip2()
    model.set_attn_implementation("sdpa")
    layer = model.qformer.encoder.layer[1].crossattention.attention
    checks.assert_restored_after_an_error(model, processor, layer, picture(), "attention")


def test_known_answer_every_query_reads_one_patch():
    """The Q-Former's keys read channel 0 of the ViT output, which only patch (1, 2) carries,
    and every query asks for it: the cross-attention, so every token's attention map, sits on
    that patch alone."""
    model, processor = tiny_vlm.blip2(seed=3)
    patch = 1 * 4 + 2
    with torch.no_grad():
        for layer in model.qformer.encoder.layer:
            cross = layer.crossattention.attention
            cross.key.weight.zero_()
            cross.key.bias.zero_()
            cross.key.weight[:, 0] = 1.0
            cross.query.weight.zero_()
            cross.query.bias.fill_(1.0)

    def mark(module, args, output):
        x = torch.zeros_like(output.last_hidden_state)
        x[:, 1 + patch, 0] = 20.0  # position 0 is CLS
        output.last_hidden_state = x
        return output

    handle = model.vision_model.register_forward_hook(mark)
    try:
        gen = gc.load(model, processor=processor).explain_generation(
            picture(), prompt=PROMPT, method="attention", text=TEXT
        )
    finally:
        handle.remove()
    raw = gen.raw_maps.flatten(1)
    assert (raw.argmax(1) == patch).all()
    others = raw.clone()
    others[:, patch] = 0
    assert (others < 1e-3 * raw[:, patch, None]).all()


def test_bad_input_is_one_line(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    with pytest.raises(InputError) as e:
        ex.explain_generation([picture(), picture()], prompt=PROMPT)
    assert "one image" in one_line(e)
    with pytest.raises(InputError) as e:
        ex.explain_generation(picture(), prompt="<image> what is it")
    assert "'<image>'" in one_line(e) and "leave it out" in one_line(e)
    with pytest.raises(InputError) as e:
        ex.explain_generation(picture(), prompt=PROMPT, method="rollout")
    assert "rollout" in one_line(e)
    for method in ("attention", "relevance", "tam"):  # sinks live among LM image tokens
        with pytest.raises(InputError) as e:
            ex.explain_generation(picture(), prompt=PROMPT, method=method, sinks="drop")
        assert 'sinks="drop"' in one_line(e) and "queries" in one_line(e)


def test_generation_and_the_template(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    expected = "Question: what is the sign Answer:" if ex.family == "blip2" else PROMPT
    assert ex.adapter.prompt_text(PROMPT, 1) == expected
    gen = ex.explain_generation(picture(), prompt=PROMPT, method="gradcam", max_new_tokens=3)
    inputs = ex.adapter.inputs([picture()], PROMPT)
    ids, first = ex.adapter.generate(inputs, 3)
    assert first == inputs["input_ids"].shape[1] and ids.shape[1] == first + 3
    new = [t for t in ids[0, first:].tolist() if t not in ex.adapter.special_ids()]
    assert gen.prompt == expected and gen.token_ids == new
    assert gen.raw_maps.shape == (len(new), 4, 4)
    if ex.family == "instructblip":  # (the tiny BLIP-2 writes <unk>, a special token)
        assert len(new) == 3 and torch.isfinite(gen.raw_maps).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_load_from_a_saved_directory_and_the_cli(family, tmp_path):
    model, processor = getattr(tiny_vlm, family)()
    path = tiny_vlm.save(strong(model), processor, tmp_path / family)
    ex = gc.load(str(path))
    assert ex.family == family
    gen = ex.explain_generation(picture(), prompt=PROMPT, method="attention", text=TEXT)
    want = gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method="attention", text=TEXT
    )
    assert torch.allclose(gen.raw_maps, want.raw_maps, atol=1e-6)
    image = tmp_path / "pic.png"
    picture().save(image)
    args = ["caption", str(image), "--model", str(path), "--prompt", PROMPT, "--method"]
    args += ["gradcam", "--max-new-tokens", "2", "--out", str(tmp_path / "out"), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(main, [*args[:5], "<image> what", *args[6:]])
    assert bad.exit_code == 2 and "leave it out" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_an_encoder_decoder_language_model_is_one_line():
    """BLIP-2 with Flan-T5: refused by name, not an AttributeError from inside the model."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    _, processor = tiny_vlm.blip2()
    tok = processor.tokenizer
    text = dict(model_type="t5", vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1)
    config = Blip2Config(text_config=text, **tiny_vlm._blip2_configs(tok, 32, 8, 4))
    model = Blip2ForConditionalGeneration._from_config(config).eval()
    with pytest.raises(InputError) as e:
        gc.load(model, processor=processor)
    assert "t5" in one_line(e) and "decoder-only" in one_line(e)


def test_instructblip_composition_reads_the_prompt_and_blip2s_does_not(tiny):
    """InstructBLIP's Q-Former reads the prompt beside the queries, BLIP-2's only the image."""
    model, processor = tiny
    a = gc.load(model, processor=processor).adapter
    one = a.composition(a.inputs([picture()], PROMPT))[0]
    two = a.composition(a.inputs([picture()], "red cat"))[0]
    other = a.composition(a.inputs([picture(seed=9)], PROMPT))[0]
    assert not torch.allclose(one, other, atol=1e-4)
    if a.family == "instructblip":
        assert not torch.allclose(one, two, atol=1e-4)
    else:
        assert torch.equal(one, two)


def test_a_processor_that_does_not_expand_the_queries_is_one_line():
    model, processor = tiny_vlm.blip2()
    processor = copy.deepcopy(processor)
    processor.num_query_tokens = 2  # an old or mismatched processor: 2 image tokens for 4 queries
    with pytest.raises(InputError) as e:
        gc.load(model, processor=processor).explain_generation(
            picture(), prompt=PROMPT, method="gradcam", text=TEXT
        )
    assert "2 image tokens" in one_line(e) and "num_query_tokens = 4" in one_line(e)


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_instructblips_relative_attention_is_refused_with_the_reason(family):
    """relevance and tam reach the patches through the Q-Former (tests/test_vlm_blip2_relevance.py);
    InstructBLIP's prompt-dependent Q-Former rules out relative attention: refused in one line
    saying why, and absent from the family's method list."""
    methods = gc.families()[family]
    assert {"attention", "attn-gradcam", "gradcam", "logit-lens", "relevance", "tam"} <= set(
        methods
    )
    assert ("relative-attention" in methods) == (family == "blip2")
    model, processor = tiny_vlm.BUILDERS[family]()
    ex = gc.load(model, processor=processor)
    if family == "instructblip":
        with pytest.raises(InputError, match="generic prompt's forward") as e:
            ex.resolve("relative-attention", None, "token")
        assert "\n" not in str(e.value) and str(methods) in str(e.value)
