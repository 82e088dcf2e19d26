"""Differentiable maps (explain_tensors(..., differentiable=True)): the same maps as always, now
with a graph back to the parameters whose gradients equal finite differences; nothing kept
without the flag."""

from __future__ import annotations

import pytest
import torch
from test_blip import make_processor as blip_processor
from test_blip import tiny as tiny_blip
from test_clip import processor_for as clip_processor
from test_clip import tiny_clip
from test_flava import processor as flava_processor
from test_flava import tiny_flava
from test_siglip import processor_for as siglip_processor
from test_siglip import tiny_siglip
from test_vilt import processor as vilt_processor
from test_vilt import tiny_vilt
from tiny import assert_close, noise_images, tiny_albef
from transformers import BlipForImageTextRetrieval

import groundcam as gc
from groundcam.errors import InputError

PHRASES = ["the red circle", "a blue square left of the star", "green"]


def albef(tokenizer, dtype=torch.float32):
    explainer = gc.load(tiny_albef(len(tokenizer)).to(dtype), tokenizer=tokenizer)
    explainer.model.train()  # as a trainer has it (the tiny model has no dropout)
    return explainer


def inputs(explainer, n=3, dtype=torch.float32):
    pv, ids, mask = explainer.prepare(noise_images(n, 64, 64), PHRASES[:n])
    return pv.to(dtype), ids, mask


BOTH = ("attn-gradcam", "gradcam")
FAMILIES = {  # family -> (build(tokenizer) -> explainer, the gradient methods it has)
    "albef": (albef, BOTH),
    "blip-itm": (
        lambda t: gc.load(tiny_blip(BlipForImageTextRetrieval, t), processor=blip_processor(t)),
        BOTH,
    ),
    "vilt": (lambda t: gc.load(tiny_vilt(len(t)), processor=vilt_processor(t)), BOTH),
    "clip": (lambda t: gc.load(tiny_clip(len(t)), processor=clip_processor(t)), ("gradcam",)),
    "siglip": (
        lambda t: gc.load(tiny_siglip(len(t)), processor=siglip_processor(t)),
        ("gradcam",),
    ),
    "flava": (lambda t: gc.load(tiny_flava(len(t)), processor=flava_processor(t)), BOTH),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_differentiable_maps_equal_the_usual_ones(tokenizer, family):
    build, methods = FAMILIES[family]
    explainer = build(tokenizer)
    torch.manual_seed(0)  # ViLT draws its patch order: the same draw for both runs
    pv, ids, mask = inputs(explainer)
    for method in methods:
        torch.manual_seed(1)
        plain = explainer.explain_tensors(pv, ids, mask, method=method)
        torch.manual_seed(1)
        diff = explainer.explain_tensors(pv, ids, mask, method=method, differentiable=True)
        assert plain.raw_maps.grad_fn is None and not plain.raw_maps.requires_grad
        assert diff.raw_maps.requires_grad and diff.raw_maps.grad_fn is not None
        assert_close(diff.raw_maps.detach().cpu(), plain.raw_maps, rel=1e-5)
        assert torch.equal(diff.maps, plain.maps) or torch.allclose(
            diff.maps, plain.maps, atol=1e-5
        )
        if plain.raw_token_maps is not None:
            assert diff.raw_token_maps.requires_grad
            assert_close(diff.raw_token_maps.detach().cpu(), plain.raw_token_maps, rel=1e-5)


def test_without_the_flag_no_parameter_gets_a_gradient(tokenizer):
    explainer = albef(tokenizer)
    pv, ids, mask = inputs(explainer)
    ex = explainer.explain_tensors(pv, ids, mask, method="attn-gradcam")
    assert all(p.grad is None for p in explainer.model.parameters())
    assert not ex.raw_maps.requires_grad and ex.raw_maps.device.type == "cpu"


def named(model, names):
    params = dict(model.named_parameters())
    return [params[n] for n in names]


ALBEF_PARAMS = [
    "text_encoder.encoder.layer.1.crossattention.self.query.weight",  # the recorded layer
    "text_encoder.encoder.layer.2.crossattention.self.value.weight",  # after it
    "text_encoder.encoder.layer.0.attention.self.key.weight",  # text before it
    "itm_head.weight",  # the score
    "visual_encoder.blocks.1.attn.qkv.weight",  # vision
    "visual_encoder.patch_embed.proj.weight",
]


@pytest.mark.parametrize(("method", "layer"), [("attn-gradcam", 1), ("gradcam", 1)])
def test_parameter_gradients_of_a_map_loss_equal_finite_differences(tokenizer, method, layer):
    explainer = albef(tokenizer, torch.float64)
    pv, ids, mask = inputs(explainer, dtype=torch.float64)
    weights = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss() -> torch.Tensor:
        ex = explainer.explain_tensors(
            pv, ids, mask, method=method, layer=layer, differentiable=True
        )
        return (ex.raw_maps.double() * weights).sum()

    params = named(explainer.model, ALBEF_PARAMS)
    grads = torch.autograd.grad(loss(), params, allow_unused=True)
    rng = torch.Generator().manual_seed(4)
    for name, p, g in zip(ALBEF_PARAMS, params, grads, strict=True):
        if method == "gradcam" and name.startswith("text_encoder.encoder.layer.0"):
            continue  # the vision map does not read text layer 0 through the recorded block
        assert g is not None, f"{name}: no gradient reached it"
        for _ in range(3):
            i = int(torch.randint(p.numel(), (1,), generator=rng))
            eps = 1e-6
            with torch.no_grad():
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + eps
                up = loss().item()
                p.view(-1)[i] = old - eps
                down = loss().item()
                p.view(-1)[i] = old
            numeric = (up - down) / (2 * eps)
            analytic = g.reshape(-1)[i].item()
            assert abs(numeric - analytic) <= 1e-6 + 1e-4 * abs(numeric), (name, numeric, analytic)


def test_maps_of_shared_images_are_differentiable_too(tokenizer):
    """Several phrases of one image (rows shared): one backward per score, with a graph."""
    explainer = albef(tokenizer)
    pv, ids, mask = explainer.prepare(noise_images(1, 64, 64), PHRASES)
    index = torch.zeros(3, dtype=torch.long)
    plain = explainer.explain_tensors(pv, ids, mask, method="gradcam", image_index=index)
    diff = explainer.explain_tensors(
        pv, ids, mask, method="gradcam", image_index=index, differentiable=True
    )
    assert diff.raw_maps.requires_grad
    assert_close(diff.raw_maps.detach(), plain.raw_maps, rel=1e-5)


def test_differentiable_needs_a_gradient_method_and_trainable_parameters(tokenizer):
    explainer = albef(tokenizer)
    pv, ids, mask = inputs(explainer)
    with pytest.raises(InputError, match="'attention' has no gradient to differentiate"):
        explainer.explain_tensors(pv, ids, mask, method="attention", differentiable=True)
    for p in explainer.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(InputError, match="no parameter of the model requires grad"):
        explainer.explain_tensors(pv, ids, mask, method="attn-gradcam", differentiable=True)
