"""ViLT retrieval maps: equal to an independent per-pair recipe on the model's own forward (with the
patch shuffle switched off), the same whatever order ViLT draws, batched like one pair at a time,
and right on a hand-built model whose score reads one planted patch."""

from __future__ import annotations

import pytest
import torch
from tiny import VISION, assert_close, cannot_switch_to_eager, noise_images, saved
from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltProcessor
from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

import groundcam as gc

PHRASES = ["the red circle", "a small blue square left of the star", "green"]
METHODS = ["attention", "attn-gradcam", "gradcam", "relevance"]
GRID = (4, 5)  # 64 x 80 px inputs, 16 px patches
PLANT = (2, 3)  # the planted patch's cell


def tiny_vilt(vocab: int, seed: int = 0, **overrides) -> ViltForImageAndTextRetrieval:
    """hidden 32, 2 layers, 4 heads, patch 16; weights wide enough for well-scaled gradients."""
    torch.manual_seed(seed)
    cfg = ViltConfig(
        vocab_size=vocab,
        **VISION,
        max_position_embeddings=16,
        initializer_range=0.2,
        **overrides,
    )
    return ViltForImageAndTextRetrieval(cfg).eval()


def processor(tokenizer) -> ViltProcessor:
    return ViltProcessor(
        ViltImageProcessorPil(size={"shortest_edge": 64}, size_divisor=16), tokenizer
    )


@pytest.fixture(scope="module")
def explainer(tokenizer):
    return gc.load(tiny_vilt(len(tokenizer)), processor=processor(tokenizer))


@pytest.fixture(scope="module")
def image():
    return noise_images(1, 80, 100)[0]  # -> 64 x 80


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 80, generator=torch.Generator().manual_seed(seed))


def naive(model, pv, ids, method: str, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pair: the model's own forward with the image tokens in grid order (no shuffle),
    output_attentions + output_hidden_states, retain_grad, a full backward of the logit.
    Returns the raw map and the per-token maps (attention methods), patches in row-major order."""
    n, t = GRID[0] * GRID[1], ids.shape[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "multinomial", lambda w, k, *a, **kw: torch.arange(k))
        out = model(
            input_ids=ids, pixel_values=pv, output_attentions=True, output_hidden_states=True
        )
    for x in (*out.attentions, *out.hidden_states):
        x.retain_grad()
    out.logits[0, 0].backward()
    patches = slice(t + 1, t + 1 + n)
    if method in ("attention", "attn-gradcam"):
        a = out.attentions[layer][0, :, :t, patches]
        g = out.attentions[layer].grad[0, :, :t, patches]
        per_token = (a if method == "attention" else a * g.clamp(min=0)).mean(0)
        return per_token.mean(0).reshape(GRID), per_token.reshape(t, *GRID)
    if method == "gradcam":
        h = out.hidden_states[layer + 1]
        act, grad = h[0, patches], h.grad[0, patches]
        return (act @ grad.mean(0)).clamp(min=0).reshape(GRID), None
    r = torch.eye(out.attentions[0].shape[-1])
    for a in out.attentions:  # Chefer et al.: R += mean_h relu(grad * A) @ R
        r = r + (a.grad[0] * a[0]).clamp(min=0).mean(0) @ r
    return r[0, patches].reshape(GRID), None


@pytest.mark.parametrize("method", METHODS)
def test_maps_have_the_grid_shape_and_default_layers_are_not_degenerate(explainer, image, method):
    ex = explainer.explain(image, PHRASES, method=method)
    assert ex.maps.shape == (3, *GRID) and not ex.maps.isnan().any()
    assert ex.maps.min() >= 0 and ex.maps.max() <= 1
    flat = ex.raw_maps.flatten(1)
    assert (flat.max(1).values > 0).all() and (flat.std(1) > 1e-3 * flat.max(1).values).all()
    if method != "relevance":
        assert ex.layer == 0  # the input of the last block (2 blocks)
    assert ex.target == "itm" and ex.scores.shape == (3,)


@pytest.mark.parametrize(("method", "layer"), [(m, 0) for m in METHODS] + [("attention", 1)])
def test_equal_to_an_independent_per_pair_recipe(explainer, tokenizer, method, layer):
    """Ours runs batched (2 images, 3 phrases, padding) with ViLT's random patch order; the
    naive recipe runs each pair alone with the patches in grid order."""
    a, model = explainer.adapter, explainer.model
    pv, index = pixels(2), torch.tensor([0, 1, 1])
    ids, mask = a.prepare_texts(PHRASES)
    layer_arg = None if method == "relevance" else layer
    ex = explainer.explain_tensors(pv, ids, mask, method, layer_arg, image_index=index)
    for p, phrase in enumerate(PHRASES):
        one_ids, _ = a.prepare_texts([phrase])
        raw, per_token = naive(model, pv[index[p] : index[p] + 1], one_ids, method, layer)
        t = one_ids.shape[1]
        if per_token is not None:  # our text mean runs over the padded length
            assert_close(ex.raw_token_maps[p, :t], per_token)
            raw = raw * t / ids.shape[1]
        assert_close(ex.raw_maps[p], raw)
        with torch.no_grad():
            logit = model(input_ids=one_ids, pixel_values=pv[index[p] : index[p] + 1]).logits
        assert torch.allclose(ex.scores[p], logit[0, 0].sigmoid(), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_equals_one_pair_at_a_time(explainer, method):
    a = explainer.adapter
    pv, index = pixels(3), torch.tensor([0, 0, 1, 2, 2, 2])
    phrases = PHRASES + PHRASES[::-1]
    ids, mask = a.prepare_texts(phrases)
    batch = explainer.explain_tensors(pv, ids, mask, method, image_index=index)
    for p, phrase in enumerate(phrases):
        one_ids, one_mask = a.prepare_texts([phrase])
        one = explainer.explain_tensors(pv[index[p] : index[p] + 1], one_ids, one_mask, method)
        assert_close(batch.maps[p], one.maps[0], 1e-4)
        assert torch.allclose(batch.scores[p], one.scores[0], atol=1e-6)
        if batch.raw_token_maps is None:
            assert_close(batch.raw_maps[p], one.raw_maps[0])
        else:
            t = one_ids.shape[1]
            assert_close(batch.raw_token_maps[p, :t], one.raw_token_maps[0])
            assert (batch.raw_token_maps[p, t:] == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_the_patch_order_vilt_draws_does_not_change_a_map(explainer, method, monkeypatch):
    a = explainer.adapter
    ids, mask = a.prepare_texts(PHRASES)
    pv = pixels(1).expand(3, -1, -1, -1)
    forward, cells, maps = a.forward, [], []

    def spy(*args, **kwargs):
        scores = forward(*args, **kwargs)
        cells.append(scores.geometry.cells)
        return scores

    monkeypatch.setattr(a, "forward", spy)
    for seed in (0, 1):
        torch.manual_seed(seed)
        maps.append(explainer.explain_tensors(pv, ids, mask, method).raw_maps)
    assert not torch.equal(cells[0], cells[1])  # two different orders ...
    assert_close(maps[0], maps[1])  # ... the same maps
    every_cell = torch.arange(GRID[0] * GRID[1]).expand(3, -1)
    assert all(torch.equal(c.sort(-1).values, every_cell) for c in cells)


def test_patches_left_out_by_max_image_length_stay_zero(tokenizer):
    explainer = gc.load(
        tiny_vilt(len(tokenizer), max_image_length=7), processor=processor(tokenizer)
    )
    ids, mask = explainer.adapter.prepare_texts(PHRASES)
    for method in ("attention", "gradcam", "relevance"):
        ex = explainer.explain_tensors(pixels(3), ids, mask, method)
        kept = (ex.raw_maps.flatten(1) != 0).sum(1)
        assert (kept <= 7).all() and (kept > 0).all()
    ex = explainer.explain_tensors(pixels(3), ids, mask, "attention")
    assert ((ex.raw_maps.flatten(1) > 0).sum(1) == 7).all()  # softmax: every kept cell > 0


def planted_vilt(vocab: int) -> ViltForImageAndTextRetrieval:
    """Block 0 is the identity; in block 1 every query attends by the key (y0 - y1) of the
    LayerNormed token, and head 0 carries (y0 - y1) into channel 2, which the pooler and the rank
    head read (increasing). Every token but the planted patch has y0 = y1, so the score depends
    on the image through that patch alone, and only its attention column has a gradient.
    Block 1's LayerNorm is made near-linear (large eps): a LayerNorm ignores its input's scale,
    so a token read only through one gets a gradient orthogonal to itself, and Grad-CAM (which
    reads activations linearly) would not see the patch."""
    model = tiny_vilt(vocab, seed=3)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, generator=g)
    base[1] = base[0]
    with torch.no_grad():
        emb = model.vilt.embeddings
        emb.position_embeddings.zero_()
        emb.token_type_embeddings.weight.zero_()
        emb.cls_token.copy_(base)
        text = emb.text_embeddings
        for table in (text.word_embeddings, text.position_embeddings, text.token_type_embeddings):
            table.weight[:, :2] = 0
        conv = emb.patch_embeddings.projection
        conv.weight.zero_()
        conv.bias.copy_(base)
        conv.weight[0] = 2.0 / conv.weight[0].numel()  # a patch of ones adds +2 to channel 0
        conv.weight[1] = -2.0 / conv.weight[1].numel()  # and -2 to channel 1
        for block in model.vilt.encoder.layer:
            for lin in (block.attention.output.dense, block.output.dense):
                lin.weight.zero_()
                lin.bias.zero_()
            att = block.attention.attention
            for lin in (att.query, att.key, att.value):
                lin.weight.zero_()
                lin.bias.zero_()
        att = model.vilt.encoder.layer[1].attention.attention
        att.query.bias.fill_(1.0)
        att.key.weight[:, 0], att.key.weight[:, 1] = 100.0, -100.0
        att.value.weight[0, 0], att.value.weight[0, 1] = 1.0, -1.0
        model.vilt.encoder.layer[1].attention.output.dense.weight[2, 0] = 1.0
        model.vilt.encoder.layer[1].layernorm_before.eps = 1e4
        model.vilt.pooler.dense.weight.zero_()
        model.vilt.pooler.dense.bias.zero_()
        model.vilt.pooler.dense.weight[0, 2] = 1.0
        model.rank_output.weight.zero_()
        model.rank_output.bias.zero_()
        model.rank_output.weight[0, 0] = 5.0
    return model


@pytest.mark.parametrize("method", METHODS)
def test_known_answer_a_planted_patch(tokenizer, method):
    explainer = gc.load(planted_vilt(len(tokenizer)), processor=processor(tokenizer))
    pv = torch.zeros(1, 3, 64, 80)
    r, c = PLANT
    pv[:, :, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] = 1.0
    ids, mask = explainer.adapter.prepare_texts(PHRASES)
    layer = None if method == "relevance" else (0 if method == "gradcam" else 1)
    ex = explainer.explain_tensors(pv.expand(3, -1, -1, -1), ids, mask, method, layer)
    flat = ex.raw_maps.flatten(1)
    cell = r * GRID[1] + c
    others = torch.cat([flat[:, :cell], flat[:, cell + 1 :]], 1)
    assert (flat.argmax(1) == cell).all()
    assert (flat[:, cell] > others.max(1).values).all()
    assert (others == others[:, :1]).all()  # every other cell holds the same value
    if method in ("attn-gradcam", "relevance"):
        assert (others == 0).all()


def test_bad_input(explainer, image, tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="'rollout' is not defined for the vilt family"):
        explainer.explain(image, PHRASES, method="rollout")
    with pytest.raises(ValueError, match="target 'similarity' is not available"):
        explainer.explain(image, PHRASES, method="gradcam", target="similarity")
    with pytest.raises(ValueError, match="layer 5 is not a"):
        explainer.explain(image, PHRASES, method="gradcam", layer=5)
    with pytest.warns(UserWarning, match="truncated to the text encoder's 16 tokens"):
        ex = explainer.explain(image, ["red " * 30], method="gradcam")
    assert len(ex.tokens[0]) == 16
    small = image.resize((40, 40))
    with pytest.raises(ValueError, match="one image at a time"):
        explainer.adapter.prepare_images([image, small])
    model = tiny_vilt(len(tokenizer))
    model.config._attn_implementation = "sdpa"
    cannot_switch_to_eager(monkeypatch, model)
    with pytest.raises(ValueError, match="could not be switched to eager"):
        gc.load(model, processor=processor(tokenizer))


def test_load_from_saved_directory(explainer, image, tokenizer, tmp_path):
    loaded = gc.load(saved(tmp_path, explainer.model, processor(tokenizer)))
    assert loaded.adapter.family == "vilt"
    torch.manual_seed(0)
    a = loaded.explain(image, PHRASES, method="attn-gradcam")
    b = explainer.explain(image, PHRASES, method="attn-gradcam")
    assert_close(a.raw_maps, b.raw_maps, 1e-5)
    assert a.tokens == b.tokens
    assert gc.families()["vilt"] == ["attention", "attn-gradcam", "gradcam", "relevance"]
