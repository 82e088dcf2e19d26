"""The autograd graph of an explanation is minimal: nothing below the recorded layer keeps one, the
only leaf is the recorded layer's input (or the recorded tensor itself), and no parameter is made
to require grad; `differentiable=True` keeps the full graph to the parameters."""

from __future__ import annotations

import pytest
import torch
from test_blip import make_processor
from test_blip import tiny as tiny_blip
from test_vision_encoder_decoder import SIZE, picture, tiny_ved
from tiny import assert_close, noise_images, tiny_albef
from transformers import BlipForImageTextRetrieval

import groundcam as gc
from groundcam.adapters.albef import AlbefAdapter
from groundcam.explainer import Explainer
from groundcam.train.trocr_glyphs import char_tokenizer, image_processor

PHRASES = ["the red circle", "a small blue square", "green"]


def graph_leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the graph of `t` accumulates gradients into (leaves and parameters)."""
    found, seen, stack = [], set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.append(fn.variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


class Watch:
    """Forward hooks keeping outputs (item 0 of tuples) of named modules, and whether any
    parameter of `model` required grad while the last one ran."""

    def __init__(self, model: torch.nn.Module, modules: dict[str, torch.nn.Module]):
        self.model, self.out, self.params_required = model, {}, []
        self.handles = [m.register_forward_hook(self._keep(n)) for n, m in modules.items()]

    def _keep(self, name):
        def hook(module, inputs, output):
            t = output[0] if isinstance(output, tuple) else output
            self.out[name] = getattr(t, "last_hidden_state", t)
            self.params_required.append(any(p.requires_grad for p in self.model.parameters()))

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def images():
    return noise_images(2, 64, 64, seed=7)


@pytest.mark.parametrize("frozen", [True, False])
def test_blip_attn_gradcam_graph_starts_at_the_recorded_layer(tokenizer, images, frozen):
    model = tiny_blip(BlipForImageTextRetrieval, tokenizer, seed=2)
    model.requires_grad_(not frozen)
    explainer = gc.load(model, processor=make_processor(tokenizer))
    text = explainer.adapter.text_layers
    watch = Watch(
        model,
        {"vision": model.vision_model, "text0": text[0], "text1": text[1], "head": model.itm_head},
    )
    try:
        ex = explainer.explain_many(images, [PHRASES, PHRASES[:2]], layer=1)
    finally:
        watch.close()
    assert ex.raw_maps.abs().max() > 0
    for below in ("vision", "text0"):  # ran without a graph
        assert watch.out[below].grad_fn is None and not watch.out[below].requires_grad
    assert watch.out["text1"].grad_fn is not None
    leaves = graph_leaves(watch.out["head"])
    if frozen:
        # the one leaf: layer 1's cross-attention input (5 pairs x tokens x hidden 32)
        assert len(leaves) == 1 and leaves[0].shape[0] == 5 and leaves[0].shape[-1] == 32
        assert not any(watch.params_required)
        assert not any(p.requires_grad for p in model.parameters())
    else:  # parameters of the layers at and after the recorded one, nothing below
        params = {id(p) for p in model.parameters()}
        below = {id(p) for p in model.vision_model.parameters()} | {
            id(p) for p in text[0].parameters()
        }
        assert not below & {id(t) for t in leaves}
        assert {id(t) for t in leaves} - params  # plus the cut leaf
        assert all(p.requires_grad for p in model.parameters())


def test_albef_graph_leaf_is_the_recorded_probabilities(tokenizer, images):
    model = tiny_albef(len(tokenizer), seed=1)
    model.requires_grad_(False)
    explainer = Explainer(AlbefAdapter(model, tokenizer))
    watch = Watch(model, {"vision": model.visual_encoder, "head": model.itm_head})
    try:
        ex = explainer.explain_many(images, [PHRASES, PHRASES[:1]], layer=1)
    finally:
        watch.close()
    assert ex.raw_maps.abs().max() > 0
    assert watch.out["vision"].grad_fn is None
    (leaf,) = graph_leaves(watch.out["head"])
    assert leaf.shape[:2] == (4, model.config.text_heads)  # [pairs, heads, T, 1 + patches]
    assert leaf.shape[-1] == 1 + model.config.grid**2
    assert not any(watch.params_required)


def test_generation_graph_leaves_the_encoder_out():
    tok = char_tokenizer()
    model = tiny_ved(len(tok), "trocr")
    model.requires_grad_(False)
    explainer = gc.load(model, processor=image_processor(SIZE), tokenizer=tok)
    watch = Watch(model, {"encoder": model.encoder})
    try:
        gen = explainer.explain_generation(picture(), method="attn-gradcam", text="abc")
    finally:
        watch.close()
    assert gen.raw_maps.abs().max() > 0
    assert watch.out["encoder"].grad_fn is None
    assert not any(watch.params_required)


def test_differentiable_maps_still_reach_every_layer(tokenizer, images):
    model = tiny_albef(len(tokenizer), seed=1)
    explainer = Explainer(AlbefAdapter(model, tokenizer))
    pv = explainer.prepare_images(images)
    ids, mask = explainer.prepare_texts(PHRASES[:2])
    ex = explainer.explain_tensors(pv, ids, mask, layer=1, differentiable=True)
    leaves = {id(t) for t in graph_leaves(ex.raw_maps)}
    assert id(model.visual_encoder.patch_embed.proj.weight) in leaves
    assert id(model.text_encoder.encoder.layer[0].attention.self.query.weight) in leaves


@pytest.mark.parametrize("method", ["gradcam", "attn-gradcam"])
def test_generation_runs_the_lm_head_once_on_the_chosen_rows(method):
    """The vocabulary-sized logits exist only for the explained positions, and their gradient
    is taken once (not batched per token): the batched backward starts below the head."""
    tok = char_tokenizer()
    model = tiny_ved(len(tok), "trocr")
    explainer = gc.load(model, processor=image_processor(SIZE), tokenizer=tok)
    head = explainer.adapter.output_head()
    seen, grads = [], []

    def keep(module, inputs, output):
        seen.append(tuple(output.shape))
        if output.requires_grad:
            output.register_hook(lambda g: grads.append(tuple(g.shape)))

    handle = head.register_forward_hook(keep)
    try:
        gen = explainer.explain_generation(picture(), method=method, text="abcd")
    finally:
        handle.remove()
    k = len(gen.positions)
    assert k == 4 and seen == [(1, k, len(tok))]
    assert grads == [(1, k, len(tok))]


def test_a_failing_generation_leaves_no_hook_and_restores_grad_mode():
    tok = char_tokenizer()
    model = tiny_ved(len(tok), "trocr")
    explainer = gc.load(model, processor=image_processor(SIZE), tokenizer=tok)
    explainer.explain_generation(picture(), method="gradcam", text="ab")  # transformers' own hooks
    before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    layer = explainer.adapter.decoder_layers[1]

    def fail(module, args):
        raise RuntimeError("decoder broke")

    handle = layer.register_forward_pre_hook(fail)
    try:
        for method in ("gradcam", "attn-gradcam", "attention"):
            with pytest.raises(RuntimeError, match="decoder broke"):
                explainer.explain_generation(picture(), method=method, text="ab")
            assert torch.is_grad_enabled()
    finally:
        handle.remove()
    after = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    assert after == before


def test_shared_image_rows_take_one_seed_per_phrase_slot(tokenizer, monkeypatch):
    """Per-image records (CLIP's vision tokens): the batched backward is seeded with the k-th
    phrase of every image at once, so it runs max-phrases-per-image times, not once per pair;
    the maps equal one pair at a time."""
    from test_clip import processor_for, tiny_clip

    explainer = gc.load(tiny_clip(len(tokenizer), seed=2), processor=processor_for(tokenizer))
    images = noise_images(3, 64, 64, seed=9)
    phrases = [PHRASES, PHRASES[:1], PHRASES[1:]]
    seeds = []
    real = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kwargs):
        if kwargs.get("is_grads_batched"):
            seeds.append(grad_outputs.shape[0])
        return real(outputs, inputs, grad_outputs=grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    ex = explainer.explain_many(images, phrases, method="gradcam")
    monkeypatch.undo()
    assert sum(seeds) == 3  # slots, not the 6 pairs
    row = 0
    for image, group in zip(images, phrases, strict=True):
        for phrase in group:
            alone = explainer.explain(image, [phrase], method="gradcam")
            assert_close(ex.raw_maps[row], alone.raw_maps[0])
            row += 1
