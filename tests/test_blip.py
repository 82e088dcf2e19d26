"""BLIP adapters on tiny models built offline: every method and target, equality with independent
per-pair recipes (the model's own forward, hooks with retain_grad, full backward), batching, a
planted-patch known answer, per-token caption maps, bad input, and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import SMALL, VISION, assert_close, cannot_switch_to_eager, noise_images, saved
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
    BlipProcessor,
)

import groundcam as gc
from groundcam.adapters.blip import BlipCaptionAdapter, BlipItmAdapter, middle_layer

PHRASES = ["the red circle", "a small blue square left of the star", "green"]
ITM_COMBOS = [
    ("attn-gradcam", "itm"),
    ("attention", "itm"),
    ("gradcam", "itm"),
    ("rollout", "itm"),
    ("relevance", "itm"),
    ("gradcam", "similarity"),
    ("rollout", "similarity"),
    ("relevance", "similarity"),
]
CAPTION_METHODS = ["gradcam", "attn-gradcam", "attention", "relevance"]


def blip_config(tokenizer) -> BlipConfig:
    """hidden 32, 2 vision + 2 text layers, 4 heads, 64 px, patch 16 (a 4x4 grid). The bos ([DEC])
    token is one id past the word vocabulary, as BLIP's is past BERT's."""
    init = {"initializer_range": 0.2}  # BLIP's vision default (1e-10) makes every map ~1e-10
    sep = tokenizer.sep_token_id
    text = dict(
        SMALL,
        vocab_size=len(tokenizer) + 1,
        max_position_embeddings=16,
        bos_token_id=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=sep,
        eos_token_id=sep,
        **init,
    )
    vision = dict(VISION, **init)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16, **init)


def tiny(cls, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return cls._from_config(blip_config(tokenizer), attn_implementation="eager").eval()


def make_processor(tokenizer, normalize: bool = True) -> BlipProcessor:
    image_processor = BlipImageProcessorPil(size={"height": 64, "width": 64})
    if not normalize:  # black stays exactly 0 (for the planted-patch construction)
        image_processor.do_normalize = False
    return BlipProcessor(image_processor, tokenizer)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_processor(tokenizer)


@pytest.fixture(scope="module")
def itm(tokenizer, processor):
    return gc.load(tiny(BlipForImageTextRetrieval, tokenizer), processor=processor)


@pytest.fixture(scope="module")
def caption(tokenizer, processor):
    return gc.load(tiny(BlipForConditionalGeneration, tokenizer, seed=1), processor=processor)


@pytest.fixture(scope="module")
def images():
    return noise_images(2, 80, 96)


@pytest.fixture(scope="module")
def batch(itm, images):
    """Two images, each with all of PHRASES: rows b pair text b with image `index[b]`."""
    a = itm.adapter
    pv = a.prepare_images(images)
    ids, mask = a.prepare_texts(PHRASES * 2)
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    return pv, ids, mask, index


# -- independent reference recipes: plain torch on the model's own forward ------------------------


def grab(points: dict[str, tuple[torch.nn.Module, int | None]], run):
    """Run `run()` (returns the scalar score) with forward hooks keeping each module's output (or
    its item `index`) with `retain_grad`, then a full `backward()`: the ALBEF/LAVIS recipe.
    Returns {name: (value, gradient)} for the one pair."""
    kept: dict[str, torch.Tensor] = {}

    def keep(name, index):
        def hook(module, inputs, output):
            t = output if index is None else output[index]
            t.retain_grad()
            kept[name] = t

        return hook

    handles = [m.register_forward_hook(keep(n, i)) for n, (m, i) in points.items()]
    try:
        score = run()
        score.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: (t.detach()[0], t.grad[0]) for n, t in kept.items()}


def itm_score(model, pv, ids, mask, target):
    out = model(input_ids=ids, pixel_values=pv, attention_mask=mask, use_itm_head=target == "itm")
    return out.itm_score[0, 1] if target == "itm" else out.itm_score[0, 0]


def ref_attn_gradcam(probs, grad, mask):
    """relu(grad) * attn on the patch columns, times the text mask, head mean -> per token; then
    the mean over every (padded) position, as ALBEF's Grounding.py does."""
    cam = grad[..., 1:].clamp(min=0) * probs[..., 1:] * mask[None, :, None]
    per_token = cam.mean(0)
    return per_token.mean(0).reshape(4, 4), per_token.reshape(-1, 4, 4)


def ref_gradcam(acts, grad):
    weights = grad[1:].mean(0)
    return (acts[1:] @ weights).clamp(min=0).reshape(4, 4)


def ref_rollout(attentions):
    n = attentions[0].shape[-1]
    r = torch.eye(n)
    for a in attentions:
        a = 0.5 * a.mean(0) + 0.5 * torch.eye(n)
        r = (a / a.sum(-1, keepdim=True)) @ r
    return r[0, 1:].reshape(4, 4)


def bar(probs, grad):
    """Chefer's Ā: relu(grad * attn) per head, then the head mean."""
    return (grad * probs).clamp(min=0).mean(0)


def normalized(r):
    """R̄ = (R - I) with rows summing to one, plus I."""
    eye = torch.eye(r.shape[-1])
    off = r - eye
    total = off.sum(-1, keepdim=True)
    return torch.where(total != 0, off / torch.where(total != 0, total, 1), 0) + eye


def ref_relevance(vision, text=()):
    """Chefer et al. 2021 for BLIP: vision self-attention layers, then per text layer its
    self-attention and its cross-attention to the image. Returns (R_ii, R_ti)."""
    n = vision[0][0].shape[-1]
    r_ii = torch.eye(n)
    for probs, grad in vision:
        r_ii = r_ii + bar(probs, grad) @ r_ii
    r_ti = None
    for (sp, sg), (cp, cg) in text:
        if r_ti is None:
            r_tt, r_ti = torch.eye(sp.shape[-1]), torch.zeros(sp.shape[-1], n)
        a = bar(sp, sg)
        r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti
        # co-attention: R_ti += R̄_tt^T Ā R̄_ii; R_tt gains Ā R_it, which is zero (the image
        # never attends to the text)
        r_ti = r_ti + normalized(r_tt).T @ bar(cp, cg) @ normalized(r_ii)
    return r_ii, r_ti


def hook_points(vision, text, what: str, layer: int):
    """`cross`: one text layer's cross-attention; `tokens`: one vision block's output; else every
    vision self-attention and every text self- and cross-attention (the relevance graph)."""
    if what == "cross":
        return {"cross": (text[layer].crossattention.self, 1)}
    if what == "tokens":
        return {"tokens": (vision[layer], None)}
    points = {f"v{i}": (b.self_attn, 1) for i, b in enumerate(vision)}
    for i, t in enumerate(text):
        points[f"t{i}.self"] = (t.attention.self, 1)
        points[f"t{i}.cross"] = (t.crossattention.self, 1)
    return points


def itm_points(model, what: str, layer: int = 0):
    """The hook points of the reference recipes, by transformers' own module paths."""
    text = model.text_encoder.encoder.layer
    return hook_points(model.vision_model.encoder.layers, text, what, layer)


def graph_inputs(kept, n_vision, n_text):
    vision = [kept[f"v{i}"] for i in range(n_vision)]
    text = [(kept[f"t{i}.self"], kept[f"t{i}.cross"]) for i in range(n_text)]
    return vision, text


# -- every method and target ----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "target"), ITM_COMBOS)
def test_every_method_and_target_gives_non_degenerate_maps_at_default_layers(
    itm, images, method, target
):
    ex = itm.explain(images[0], PHRASES, method=method, target=target)
    assert ex.maps.shape == (3, 4, 4) and ex.raw_maps.shape == (3, 4, 4)
    assert not ex.maps.isnan().any() and not ex.raw_maps.isnan().any()
    flat = ex.maps.flatten(1)
    assert (flat.max(1).values == 1).all() and (flat.min(1).values == 0).all()  # not constant
    assert (ex.raw_maps.flatten(1).abs().max(1).values > 0).all()
    assert ex.scores.shape == (3,)
    if target == "itm":
        assert ((ex.scores > 0) & (ex.scores < 1)).all()  # the match probability


@pytest.mark.parametrize("method", ["attention", "attn-gradcam"])
def test_similarity_never_reaches_a_cross_attention(itm, images, method):
    with pytest.raises(ValueError, match="similarity"):
        itm.explain(images[0], PHRASES, method=method, target="similarity")


def test_default_layers_are_the_middle_text_layer_and_the_readable_vision_block(itm):
    a = itm.adapter
    assert a.layers("cross_attention") == [0, 1] and a.layers("tokens") == [0, 1]
    assert a.default_layer("cross_attention", "itm") == 0  # of 2: never the last
    assert middle_layer(list(range(12))) == 6  # LAVIS compute_gradcam's block_num for BLIP
    assert middle_layer([0]) == 0
    assert a.default_layer("tokens", "itm") == 1
    assert a.default_layer("tokens", "similarity") == 0


def test_why_the_defaults_avoid_the_last_layers(itm, images):
    """Only the CLS row of the last text layer's cross-attention reaches the ITM head; ITC reads
    only the image CLS, so the last vision block's patch outputs get no gradient."""
    ex = itm.explain(images[0], PHRASES, method="attn-gradcam", layer=1)
    assert ex.raw_token_maps[:, 0].abs().amax() > 0
    assert ex.raw_token_maps[:, 1:].abs().amax() == 0
    blind = itm.explain(images[0], PHRASES, method="gradcam", layer=1, target="similarity")
    assert blind.raw_maps.abs().amax() == 0 and blind.maps.abs().amax() == 0


def test_non_square_inputs_keep_their_own_grid(itm, batch):
    """Geometry is read from the input: 48x80 pixels are a 3x5 grid (position embeddings are
    interpolated to it, as the model's own `interpolate_pos_encoding=True` does)."""
    _, ids, mask, _ = batch
    pv = torch.randn(2, 3, 48, 80)
    index = torch.tensor([0, 0, 0, 1, 1, 1])
    for method in ("attn-gradcam", "gradcam", "relevance", "rollout"):
        ex = itm.explain_tensors(pv, ids, mask, method, image_index=index)
        assert ex.maps.shape == (6, 3, 5) and not ex.maps.isnan().any()
        assert (ex.maps.flatten(1).max(1).values == 1).all()
    with torch.no_grad():
        out = itm.model(
            input_ids=ids[:1],
            pixel_values=pv[:1],
            attention_mask=mask[:1],
            interpolate_pos_encoding=True,
        )
    assert torch.allclose(ex.scores[0], out.itm_score.softmax(-1)[0, 1], atol=1e-5)


# -- equality with independent per-pair recipes ---------------------------------------------------


def test_scores_are_the_models_own_outputs(itm, batch):
    """itm: explained = the match logit, reported = its softmax probability; similarity: the ITC
    cosine BLIP outputs with use_itm_head=False (explained and reported)."""
    pv, ids, mask, index = batch
    a, m = itm.adapter, itm.model
    with torch.no_grad():
        for target in ("itm", "similarity"):
            ours = a.forward(pv, ids, mask, index, target)
            for b in range(len(ids)):
                out = m(
                    input_ids=ids[b : b + 1],
                    pixel_values=pv[index[b]][None],
                    attention_mask=mask[b : b + 1],
                    use_itm_head=target == "itm",
                ).itm_score[0]
                if target == "itm":
                    assert torch.allclose(ours.explained[b], out[1], atol=1e-5)
                    assert torch.allclose(ours.reported[b], out.softmax(-1)[1], atol=1e-5)
                else:
                    assert torch.allclose(ours.explained[b], out[0], atol=1e-5)
                    assert torch.allclose(ours.reported[b], out[0], atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_attn_gradcam_equals_the_lavis_recipe_one_pair_at_a_time(itm, batch, layer):
    """ALBEF Grounding.py / LAVIS compute_gradcam: the model's forward for one pair, retain_grad on
    the hooked cross-attention probabilities, backward() of the match logit."""
    pv, ids, mask, index = batch
    m = itm.model
    ex = itm.explain_tensors(pv, ids, mask, "attn-gradcam", layer=layer, image_index=index)
    for b in range(len(ids)):
        one = (pv[index[b]][None], ids[b : b + 1], mask[b : b + 1])
        kept = grab(itm_points(m, "cross", layer), lambda one=one: itm_score(m, *one, "itm"))
        probs, grad = kept["cross"]
        mean, per_token = ref_attn_gradcam(probs, grad, mask[b].float())
        assert_close(ex.raw_maps[b], mean)
        assert_close(ex.raw_token_maps[b], per_token)


@pytest.mark.parametrize("target", ["itm", "similarity"])
def test_gradcam_equals_a_full_backward_per_pair(itm, batch, target):
    pv, ids, mask, index = batch
    m, layer = itm.model, itm.adapter.default_layer("tokens", target)
    ex = itm.explain_tensors(pv, ids, mask, "gradcam", target=target, image_index=index)
    for b in range(len(ids)):
        one = (pv[index[b]][None], ids[b : b + 1], mask[b : b + 1])
        kept = grab(itm_points(m, "tokens", layer), lambda one=one: itm_score(m, *one, target))
        assert_close(ex.raw_maps[b], ref_gradcam(*kept["tokens"]))


def test_attention_and_rollout_equal_the_models_output_attentions(itm, batch):
    pv, ids, mask, index = batch
    m = itm.model
    attention = itm.explain_tensors(pv, ids, mask, "attention", image_index=index)
    rollout = itm.explain_tensors(pv, ids, mask, "rollout", image_index=index)
    with torch.no_grad():
        for b in range(len(ids)):
            vision = m.vision_model(pixel_values=pv[index[b]][None], output_attentions=True)
            text = m.text_encoder(
                input_ids=ids[b : b + 1],
                attention_mask=mask[b : b + 1],
                encoder_hidden_states=vision.last_hidden_state,
                output_attentions=True,
            )
            cross = text.cross_attentions[0][0, :, :, 1:].mean(0) * mask[b, :, None]
            assert_close(attention.raw_maps[b], cross.mean(0).reshape(4, 4))
            assert_close(rollout.raw_maps[b], ref_rollout([a[0] for a in vision.attentions]))


@pytest.mark.parametrize("target", ["itm", "similarity"])
def test_relevance_equals_an_independent_chefer_per_pair(itm, batch, target):
    pv, ids, mask, index = batch
    m = itm.model
    ex = itm.explain_tensors(pv, ids, mask, "relevance", target=target, image_index=index)
    for b in range(len(ids)):
        one = (pv[index[b]][None], ids[b : b + 1], mask[b : b + 1])
        points = itm_points(m, "graph")
        if target == "similarity":  # the ITC path runs no cross-attention
            points = {k: v for k, v in points.items() if k.startswith("v")}
        kept = grab(points, lambda one=one: itm_score(m, *one, target))
        if target == "similarity":
            r_ii, _ = ref_relevance([kept["v0"], kept["v1"]])
            expected = r_ii[0, 1:]
        else:
            _, r_ti = ref_relevance(*graph_inputs(kept, 2, 2))
            expected = r_ti[0, 1:]
        assert_close(ex.raw_maps[b], expected.reshape(4, 4))


# -- batching ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "target"), ITM_COMBOS)
def test_many_images_with_many_phrases_equal_one_pair_at_a_time(itm, batch, method, target):
    pv, ids, mask, index = batch
    ex = itm.explain_tensors(pv, ids, mask, method, target=target, image_index=index)
    for b in range(len(ids)):
        i = int(index[b])
        one = itm.explain_tensors(
            pv[i : i + 1], ids[b : b + 1], mask[b : b + 1], method, target=target
        )
        assert_close(ex.raw_maps[b], one.raw_maps[0], 1e-5)
        assert_close(ex.scores[b : b + 1], one.scores, 1e-5)


def test_one_image_with_several_phrases_equals_each_phrase_alone(itm, images):
    ex = itm.explain(images[1], PHRASES)
    for p, phrase in enumerate(PHRASES):
        one = itm.explain(images[1], phrase)
        assert torch.allclose(ex.maps[p], one.maps[0], atol=1e-5)  # raw scale follows padding
        assert torch.allclose(ex.scores[p], one.scores[0], atol=1e-6)
        assert ex.tokens[p] == one.tokens[0]


# -- a known answer: every piece of evidence sits in one planted patch -----------------------------


def plant(model, cross_attentions, pixel_values, cell: int) -> None:
    """Make `cell` the only informative image token, by hand:
    - vision: no position or class embedding, no patch bias, every block the identity except a
      constant shift in the last one; a black patch therefore becomes one shared token x0 (as does
      the CLS), the planted patch its own token xp;
    - every text cross-attention: keys and values blind to x0 (projected out), the query a fixed
      vector aligned with the planted key, so each head and row attends to the planted patch with
      probability ~1 and to every other token with ~exp(-hundreds)."""
    v = model.vision_model
    with torch.no_grad():
        v.embeddings.class_embedding.zero_()
        v.embeddings.position_embedding.zero_()
        v.embeddings.patch_embedding.bias.zero_()
        for block in v.encoder.layers:
            for linear in (block.self_attn.projection, block.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        v.encoder.layers[-1].mlp.fc2.bias.normal_()
        tokens = v(pixel_values=pixel_values).last_hidden_state[0]
        xp, x0 = tokens[1 + cell], tokens[0]
        u = x0 / x0.norm()
        blind = torch.eye(len(u)) - torch.outer(u, u)
        for att in cross_attentions:
            att.key.weight.copy_(att.key.weight @ blind)
            att.value.weight.copy_(att.value.weight @ blind)
            att.key.bias.zero_()
            att.value.bias.zero_()
            att.query.weight.zero_()
            att.query.bias.copy_(20.0 * att.key(xp))


def planted_image(cell: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    r, c = divmod(cell, 4)
    pixels[16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = rng.integers(30, 255, (16, 16, 3))
    return Image.fromarray(pixels)


def slope(score_of, model, pixel_values, how: str, layer: int = 0) -> torch.Tensor:
    """d score / d s where s scales the planted patch's brightness ("brightness") or what the
    text reads from the image at cross-attention `layer` ("value"): plain autograd."""
    s = torch.ones((), requires_grad=True)
    handle = None
    if how == "value":
        value = cross_modules(model)[layer].value
        handle = value.register_forward_hook(lambda mod, inputs, out: out * s)
    try:
        score = score_of(pixel_values * s if how == "brightness" else pixel_values)
    finally:
        if handle is not None:
            handle.remove()
    return torch.stack([torch.autograd.grad(x, s, retain_graph=True)[0] for x in score.flatten()])


def cross_modules(model):
    text = model.text_encoder if hasattr(model, "text_encoder") else model.text_decoder.bert
    return [layer.crossattention.self for layer in text.encoder.layer]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("method", "layer", "how"),
    [
        ("attention", None, "value"),
        ("attn-gradcam", None, "value"),
        ("relevance", None, "value"),
        ("gradcam", 0, "brightness"),
    ],
)
def test_itm_maps_peak_at_the_one_patch_that_carries_the_evidence(
    tokenizer, method, layer, how, seed
):
    """The planted patch is evidence *for* the match: the ITM head's sign is chosen so that
    reading more of it (value) or brightening it raises the match logit. Every other patch has
    ~zero attention and zero evidence, so every map must peak there. (Grad-CAM reads block 0:
    a token's own gradient is orthogonal to its activation right before a LayerNorm.)"""
    cell = 6 + seed
    model = tiny(BlipForImageTextRetrieval, tokenizer, seed=seed)
    proc = make_processor(tokenizer, normalize=False)
    pv = proc(images=[planted_image(cell, seed)], return_tensors="pt")["pixel_values"]
    plant(model, cross_modules(model), pv, cell)
    ids = tokenizer(["the red circle"], return_tensors="pt")

    def match(pixels):
        return itm_score(model, pixels, ids["input_ids"], ids["attention_mask"], "itm")

    if slope(match, model, pv, how)[0] < 0:
        with torch.no_grad():
            model.itm_head.weight[1].neg_()
            model.itm_head.bias[1].neg_()
    assert slope(match, model, pv, how)[0] > 0
    ex = gc.load(model, processor=proc).explain(
        planted_image(cell, seed), ["the red circle"], method=method, layer=layer
    )
    raw = ex.raw_maps[0].flatten()
    assert int(raw.argmax()) == cell and raw[cell] > 0
    others = torch.cat([raw[:cell], raw[cell + 1 :]])
    assert others.abs().max() <= 1e-6 * raw[cell]


@pytest.mark.parametrize(
    ("method", "layer", "how"),
    [("attention", None, "value"), ("attn-gradcam", None, "value"), ("gradcam", 0, "brightness")],
)
def test_caption_token_maps_peak_at_the_planted_patch(tokenizer, method, layer, how):
    """The same construction on the captioner; the explained token is the word whose
    log-probability the planted patch raises most (so the patch is evidence for that word)."""
    cell = 9
    model = tiny(BlipForConditionalGeneration, tokenizer)
    proc = make_processor(tokenizer, normalize=False)
    image = planted_image(cell, 3)
    pv = proc(images=[image], return_tensors="pt")["pixel_values"]
    plant(model, cross_modules(model), pv, cell)
    bos = torch.tensor([[model.config.text_config.bos_token_id]])

    def next_word(pixels):
        return model(pixel_values=pixels, input_ids=bos).logits[0, 0].log_softmax(-1)

    gains = slope(next_word, model, pv, how)
    gains[list(BlipCaptionAdapter(model, processor=proc).special_ids())] = -torch.inf
    word = tokenizer.convert_ids_to_tokens(int(gains.argmax()))
    assert gains.max() > 0
    gen = gc.load(model, processor=proc).explain_generation(
        image, method=method, layer=layer, text=word
    )
    assert gen.tokens == [word]
    raw = gen.raw_maps[0].flatten()
    assert int(raw.argmax()) == cell
    others = torch.cat([raw[:cell], raw[cell + 1 :]])
    assert others.abs().max() <= 1e-6 * raw[cell]


# -- captioning: one map per generated token --------------------------------------------------------


def test_caption_generation_ids_and_teacher_forcing_agree(caption, images):
    a = caption.adapter
    pv = a.prepare_images(images[:1])
    with torch.no_grad():
        ids, first = a.generate(pv, max_new_tokens=6)
        logits = a.decoder_logits(pv, ids)
    assert first == 1 and int(ids[0, 0]) == caption.model.config.text_config.bos_token_id
    assert ids.shape[1] > 2
    assert torch.equal(logits[0, :-1].argmax(-1), ids[0, 1:])  # greedy = teacher-forced argmax
    gen = caption.explain_generation(images[0], max_new_tokens=6)
    assert gen.text == a.decode(ids[0].tolist()) and gen.text
    assert gen.maps.shape == (len(gen.positions), 4, 4)
    assert all(int(ids[0, p]) not in a.special_ids() for p in gen.positions)


def test_caption_prompt_and_given_text(caption, images, tokenizer):
    a = caption.adapter
    pv = a.prepare_images(images[:1])
    a.prompt = "the red"
    try:
        with torch.no_grad():
            ids, first = a.generate(pv, max_new_tokens=3)
        prompt = tokenizer(["the red"])["input_ids"][0]  # [CLS] the red [SEP]
        assert first == len(prompt) - 1 and ids[0, 1:first].tolist() == prompt[1:-1]
        given, start = a.teacher_ids("circle")
        assert start == first and tokenizer.convert_ids_to_tokens(int(given[0, first])) == "circle"
        gen = caption.explain_generation(images[0], text="circle")
        assert gen.tokens == ["circle"] and gen.positions == [first] and gen.text == "circle"
    finally:
        a.prompt = None


def caption_points(model, what: str, layer: int = 0):
    text = model.text_decoder.bert.encoder.layer
    return hook_points(model.vision_model.encoder.layers, text, what, layer)


@pytest.mark.parametrize("method", CAPTION_METHODS)
def test_token_maps_equal_one_forward_and_backward_per_token(caption, images, method):
    """The naive recipe: per generated token k a fresh forward of the model and a backward of
    log softmax(logits[:, k-1])[ids[k]] (the logit that produced token k)."""
    a, m = caption.adapter, caption.model
    gen = caption.explain_generation(images[0], method=method, max_new_tokens=6)
    pv = a.prepare_images(images[:1])
    with torch.no_grad():
        ids, _ = a.generate(pv, max_new_tokens=6)
    assert len(gen.positions) >= 2
    what = {"gradcam": "tokens", "relevance": "graph"}.get(method, "cross")
    layer = gen.layer if gen.layer is not None else 0
    for j, k in enumerate(gen.positions):

        def score(k=k):
            logits = m(pixel_values=pv, input_ids=ids).logits
            return logits[0, k - 1].log_softmax(-1)[ids[0, k]]

        kept = grab(caption_points(m, what, layer), score)
        if method == "gradcam":
            expected = ref_gradcam(*kept["tokens"])
        elif method == "attn-gradcam":
            expected = ref_attn_gradcam(*kept["cross"], torch.ones(ids.shape[1]))[1][k - 1]
        elif method == "attention":
            expected = kept["cross"][0][:, k - 1, 1:].mean(0).reshape(4, 4)
        else:
            _, r_ti = ref_relevance(*graph_inputs(kept, 2, 2))
            expected = r_ti[k - 1, 1:].reshape(4, 4)
        assert_close(gen.raw_maps[j], expected, 1e-5)


def test_caption_defaults_and_methods(caption, images):
    a = caption.adapter
    assert a.default_layer("cross_attention", "token") == 0
    assert a.default_layer("tokens", "token") == 1
    for method in CAPTION_METHODS:
        gen = caption.explain_generation(images[1], method=method, max_new_tokens=5)
        flat = gen.maps.flatten(1)
        assert not gen.maps.isnan().any()
        assert (flat.max(1).values == 1).all() and (flat.min(1).values == 0).all()


# -- bad input ------------------------------------------------------------------------------------------


def test_a_model_that_cannot_switch_to_eager_is_refused(tokenizer, monkeypatch):
    model = tiny(BlipForImageTextRetrieval, tokenizer)
    model.config._attn_implementation = "sdpa"
    cannot_switch_to_eager(monkeypatch, model)
    with pytest.raises(ValueError, match="eager"):
        gc.load(model, tokenizer=tokenizer)


def test_a_text_model_without_cross_attention_is_refused(tokenizer):
    cfg = blip_config(tokenizer)
    cfg.text_config.is_decoder = False
    model = BlipForImageTextRetrieval._from_config(cfg, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match="no cross-attention"):
        gc.load(model, tokenizer=tokenizer)


def test_unsupported_methods_targets_and_layers_are_clear_errors(itm, caption, images):
    with pytest.raises(ValueError, match="unknown method"):
        itm.explain(images[0], PHRASES, method="saliency")
    with pytest.raises(ValueError, match="not available"):
        itm.explain(images[0], PHRASES, target="token")
    with pytest.raises(ValueError, match="valid layers are"):
        itm.explain(images[0], PHRASES, method="attn-gradcam", layer=2)
    with pytest.raises(ValueError, match="does not generate"):
        itm.explain_generation(images[0])
    with pytest.raises(ValueError, match="not defined for the blip-caption"):
        caption.explain_generation(images[0], method="rollout")
    with pytest.raises(ValueError, match="explain_generation"):
        caption.explain(images[0], "a caption")


def test_a_long_phrase_is_truncated_with_a_warning(itm, images):
    phrase = " ".join(["red circle"] * 12)
    with pytest.warns(UserWarning, match="truncated"):
        ex = itm.explain(images[0], [phrase, "green"])
    assert len(ex.tokens[0]) == 16 and ex.maps.shape == (2, 4, 4)


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BlipForImageTextRetrieval, BlipForConditionalGeneration])
def test_a_saved_directory_loads_back_with_its_processor(
    tokenizer, processor, images, tmp_path, cls
):
    model = tiny(cls, tokenizer)
    loaded = gc.load(str(saved(tmp_path, model, processor)))
    direct = gc.load(model, processor=processor, tokenizer=tokenizer)
    assert type(loaded.adapter) is type(direct.adapter)
    if cls is BlipForImageTextRetrieval:
        assert isinstance(loaded.adapter, BlipItmAdapter)
        one, two = loaded.explain(images[0], PHRASES), direct.explain(images[0], PHRASES)
        assert torch.allclose(one.raw_maps, two.raw_maps, atol=1e-7)
        assert one.tokens == two.tokens
    else:
        assert isinstance(loaded.adapter, BlipCaptionAdapter)
        one = loaded.explain_generation(images[0], max_new_tokens=4)
        two = direct.explain_generation(images[0], max_new_tokens=4)
        assert one.text == two.text and torch.allclose(one.raw_maps, two.raw_maps, atol=1e-7)


def test_families_list_both_blip_models_with_their_methods():
    families = gc.families()
    assert families["blip-itm"] == ["attention", "attn-gradcam", "gradcam", "relevance", "rollout"]
    assert families["blip-caption"] == ["attention", "attn-gradcam", "gradcam", "relevance"]
