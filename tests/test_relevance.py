"""Relevance (Chefer et al. 2021): known answers on constructed attentions, and equality with an
independent per-pair implementation on a tiny ALBEF (several images, several phrases each)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tiny import tiny_albef

from groundcam.adapters.albef import AlbefAdapter
from groundcam.explainer import Explainer
from groundcam.geometry import Geometry
from groundcam.gradients import per_target_grads
from groundcam.methods import ATTENTION_GRAPH, AttentionGraph, AttentionStep, get_method
from groundcam.methods.relevance import without_residual

GEOM = Geometry(2, 2, prefix=1)  # 4 patches after a CLS


def one_hot_attention(n_query: int, n_key: int, row: int, col: int) -> torch.Tensor:
    a = torch.zeros(1, 2, n_query, n_key)
    a[..., torch.arange(n_query), 0] = 1.0  # every query on the first key...
    a[..., row, 0] = 0.0
    a[..., row, col] = 1.0  # ...except `row`, which looks at `col`
    return a


def test_single_stream_relevance_reads_the_cls_row():
    probs = one_hot_attention(5, 5, row=0, col=3)  # CLS looks at patch 2 (position 3)
    graph = AttentionGraph((AttentionStep("image", "image"),), "image", "image")
    out = get_method("relevance").compute(
        ATTENTION_GRAPH, [probs], [torch.ones_like(probs)], GEOM, None, graph
    )
    assert out.raw_maps[0].flatten().tolist() == [0.0, 0.0, 1.0, 0.0]


def test_negative_gradients_are_clamped_per_head_before_the_mean():
    probs = one_hot_attention(5, 5, row=0, col=3)
    grad = torch.ones_like(probs)
    grad[0, 1] = -1.0  # head 1 argues against: clamped to 0, then the head mean halves head 0
    graph = AttentionGraph((AttentionStep("image", "image"),), "image", "image")
    out = get_method("relevance").compute(ATTENTION_GRAPH, [probs], [grad], GEOM, None, graph)
    assert out.raw_maps[0].flatten().tolist() == [0.0, 0.0, 0.5, 0.0]


def test_co_attention_moves_text_relevance_onto_the_attended_patch():
    vision = one_hot_attention(5, 5, row=0, col=1)  # image self-attention: irrelevant here
    text = torch.full((1, 2, 3, 3), 1 / 3)
    cross = one_hot_attention(3, 5, row=0, col=4)  # text CLS looks at patch 3 (position 4)
    steps = (AttentionStep("image", "image"), AttentionStep("text", "text"))
    steps += (AttentionStep("text", "image"),)
    graph = AttentionGraph(steps, "text", "image")
    zero_vision = torch.zeros_like(vision)  # no gradient reaches the image self-attention
    grads = [zero_vision, torch.zeros_like(text), torch.ones_like(cross)]
    out = get_method("relevance").compute(
        ATTENTION_GRAPH, [vision, text, cross], grads, GEOM, torch.ones(1, 3), graph
    )
    assert out.raw_maps[0].flatten().tolist() == [0.0, 0.0, 0.0, 1.0]
    assert out.raw_token_maps.shape == (1, 3, 2, 2)


def test_residual_removal_keeps_identity_rows_finite():
    r = torch.eye(3)[None].clone()
    r[0, 1] += torch.tensor([0.2, 0.0, 0.6])
    bar = without_residual(r)
    assert torch.allclose(bar[0, 0], torch.tensor([1.0, 0.0, 0.0]))  # untouched row: no NaN
    assert torch.allclose(bar[0, 1], torch.tensor([0.25, 1.0, 0.75]))


def test_per_target_grads_batched_equals_separate_backwards():
    w = torch.randn(3, 4)
    shared = (torch.randn(2, 4) @ torch.eye(4)).requires_grad_()  # two "images"
    index = torch.tensor([0, 1, 1, 0, 1])
    own = torch.randn(5, 4, requires_grad=True)
    scores = (shared[index] * own).sum(-1) * (w.sum() + 1)
    rows = [index, torch.arange(5)]
    got = per_target_grads(scores, [shared, own], rows, chunk=2)
    for b in range(5):
        g_shared, g_own = torch.autograd.grad(scores[b], [shared, own], retain_graph=True)
        assert torch.allclose(got[0][b], g_shared[index[b]])
        assert torch.allclose(got[1][b], g_own[b])


def naive_albef_relevance(model, pixel_values, input_ids, mask):
    """One pair, full backward of the ITM match logit, Chefer's rules over plain 2-D matrices."""
    seen = {}

    def keep(mod, inp, out):
        out.retain_grad()
        seen[mod] = out

    vit, text = model.visual_encoder, model.text_encoder
    mods = [b.attn.probs for b in vit.blocks]
    for layer in text.encoder.layer:
        mods.append(layer.attention.self.probs)
        if layer.crossattention is not None:
            mods.append(layer.crossattention.self.probs)
    handles = [m.register_forward_hook(keep) for m in mods]
    try:
        model.itm_logits(pixel_values, input_ids, mask)[0, 1].backward()
    finally:
        for h in handles:
            h.remove()
    probs = [seen[m] for m in mods]  # the model runs its text layers before the image

    def bar(a):
        return (a.grad * a).clamp(min=0).mean(1)[0]

    def residual_free(r):
        off = r - torch.eye(len(r))
        s = off.sum(-1, keepdim=True)
        return torch.where(s != 0, off / torch.where(s != 0, s, 1), 0) + torch.eye(len(r))

    depth = len(vit.blocks)
    n, t = probs[0].shape[-1], input_ids.shape[1]
    r_ii = torch.eye(n)
    for a in probs[:depth]:
        r_ii = r_ii + bar(a) @ r_ii
    r_tt, r_ti = torch.eye(t), torch.zeros(t, n)
    rest = iter(probs[depth:])
    for layer in text.encoder.layer:
        a = bar(next(rest))
        r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti
        if layer.crossattention is not None:
            r_ti = r_ti + residual_free(r_tt).T @ bar(next(rest)) @ residual_free(r_ii)
    return r_ti[0, 1:].reshape(4, 4)


def test_albef_relevance_equals_independent_per_pair_implementation(tokenizer):
    model = tiny_albef(len(tokenizer), seed=3)
    ex = Explainer(AlbefAdapter(model, tokenizer))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    phrases = ["the red circle", "a blue square", "green", "the small star left of it"]
    pixel_values = ex.adapter.prepare_images(images)
    input_ids, mask = ex.adapter.prepare_texts(phrases)
    index = torch.tensor([0, 1, 1, 0])
    got = ex.explain_tensors(
        pixel_values, input_ids, mask, method="relevance", image_index=index
    ).raw_maps
    for b in range(4):
        ids, m = ex.adapter.prepare_texts([phrases[b]])
        model.zero_grad()
        want = naive_albef_relevance(model, pixel_values[index[b]][None], ids, m)
        assert torch.allclose(got[b], want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
