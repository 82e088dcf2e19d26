"""CLIP adapter on tiny offline models: the model's own logit is explained; every method equals an
independent re-implementation (pytorch-grad-cam's recipe, Chefer's relevance and rollout from
`output_attentions`, one pair at a time with a full backward); a planted patch is found."""

from __future__ import annotations

import pytest
import torch
from tiny import VISION, WORD_TEXT, assert_close, cannot_switch_to_eager, noise_images, saved
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import groundcam as gc
from groundcam.adapters.clip import ClipAdapter
from groundcam.explainer import Explainer

METHODS = ["gradcam", "attention", "rollout", "relevance"]
pytestmark = pytest.mark.usefixtures("one_thread")

PHRASES = ["the red circle", "a small blue square", "green", "the star left of the red circle"]


def tiny_clip(vocab_size: int, seed: int = 0, attn: str = "eager") -> CLIPModel:
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(WORD_TEXT, vocab_size=vocab_size),
        vision_config=dict(VISION),
        projection_dim=32,
    )
    return CLIPModel._from_config(cfg, attn_implementation=attn).eval()


def processor_for(tokenizer) -> CLIPProcessor:
    ip = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return CLIPProcessor(image_processor=ip, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_clip(len(tokenizer), seed=1)


@pytest.fixture(scope="module")
def explainer(model, tokenizer):
    return gc.load(model, processor=processor_for(tokenizer))


@pytest.fixture(scope="module")
def images():
    return noise_images(2, 80, 96)


@pytest.fixture(scope="module")
def batch(explainer, images):
    """Two images, four phrases: image 0 has phrases 0 and 3, image 1 has phrases 1 and 2."""
    pixel_values = explainer.adapter.prepare_images(images)
    input_ids, mask = explainer.adapter.prepare_texts(PHRASES)
    return pixel_values, input_ids, mask, torch.tensor([0, 1, 1, 0])


def one_pair(explainer, pixel_values, b):
    """Pair b alone: its image's pixels, its unpadded text."""
    ids, mask = explainer.adapter.prepare_texts([PHRASES[b]])
    return pixel_values[None], ids, mask


# ---------------------------------------------------------------------- scores and maps


def test_scores_are_the_models_logits_and_cosines(explainer, model, batch):
    pixel_values, ids, mask, index = batch
    scores = explainer.adapter.forward(pixel_values, ids, mask, index, "similarity")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
    rows = torch.arange(4)
    assert torch.allclose(scores.explained, out.logits_per_image[index, rows])
    cosine = out.logits_per_image[index, rows] / model.logit_scale.exp()
    assert torch.allclose(scores.reported, cosine, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_default_maps_are_on_the_grid_and_not_degenerate(explainer, images, method):
    ex = explainer.explain(images[0], PHRASES, method=method)
    assert ex.maps.shape == (4, 4, 4)
    assert not ex.maps.isnan().any()
    assert ex.maps.min() >= 0 and ex.maps.max() <= 1
    flat = ex.raw_maps.flatten(1)
    assert (flat.abs().amax(1) > 0).all() and (flat.std(1) > 0).all()
    assert ex.text_conditioned == (method in ("gradcam", "relevance"))


@pytest.mark.parametrize("method", METHODS)
def test_non_square_inputs_give_non_square_grids(explainer, batch, method):
    pixel_values, ids, mask, index = batch
    wide = torch.nn.functional.interpolate(pixel_values, size=(64, 96), mode="bilinear")
    ex = explainer.explain_tensors(wide, ids, mask, method=method, image_index=index)
    assert ex.raw_maps.shape == (4, 4, 6)
    assert (ex.raw_maps.flatten(1).std(1) > 0).all()


# ---------------------------------------------------------------------- independent methods


def gradcam_like_pytorch_grad_cam(model, target_layer, pixel_values, ids, mask):
    """pytorch-grad-cam's recipe: a forward hook keeps the activation and its gradient, a full
    backward of the pair's logit, `reshape_transform` drops the CLS and makes [B, C, h, w]."""
    kept = {}

    def keep(module, inputs, output):
        kept["act"] = output
        output.register_hook(lambda g: kept.__setitem__("grad", g))

    def reshape_transform(t):
        return t[:, 1:, :].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

    handle = target_layer.register_forward_hook(keep)
    try:
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
        out.logits_per_image[0, 0].backward()
    finally:
        handle.remove()
    act, grad = reshape_transform(kept["act"].detach()), reshape_transform(kept["grad"])
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return (weights * act).sum(1).clamp(min=0)[0]


def test_gradcam_equals_pytorch_grad_cam_on_the_last_blocks_layer_norm1(explainer, model, batch):
    pixel_values, ids, mask, index = batch
    ex = explainer.explain_tensors(pixel_values, ids, mask, method="gradcam", image_index=index)
    assert ex.layer == 0  # = layers[-1].layer_norm1, pytorch-grad-cam's CLIP example target
    target = model.vision_model.encoder.layers[-1].layer_norm1
    for b in range(4):
        want = gradcam_like_pytorch_grad_cam(
            model, target, *one_pair(explainer, pixel_values[index[b]], b)
        )
        assert want.abs().max() > 0
        assert_close(ex.raw_maps[b], want)


def attentions_and_grads(model, pixel_values, ids, mask, grad: bool):
    """Vision attention probabilities from `output_attentions=True` (and their gradients from a
    full backward of the pair's logit)."""
    model.zero_grad()
    with torch.set_grad_enabled(grad):
        out = model(
            input_ids=ids, attention_mask=mask, pixel_values=pixel_values, output_attentions=True
        )
        probs = list(out.vision_model_output.attentions)
        if grad:
            for a in probs:
                a.retain_grad()
            out.logits_per_image[0, 0].backward()
    return probs


def test_relevance_equals_chefer_from_output_attentions(explainer, model, batch):
    pixel_values, ids, mask, index = batch
    ex = explainer.explain_tensors(pixel_values, ids, mask, method="relevance", image_index=index)
    for b in range(4):
        pair = one_pair(explainer, pixel_values[index[b]], b)
        probs = attentions_and_grads(model, *pair, grad=True)
        r = torch.eye(17)
        for a in probs:  # Chefer et al. 2021, eq. 6: R += mean_h(relu(grad * A)) R
            r = r + (a.grad * a).clamp(min=0).mean(1)[0] @ r
        want = r[0, 1:].reshape(4, 4)
        assert want.max() > 0
        assert_close(ex.raw_maps[b], want)


def test_rollout_and_attention_equal_output_attentions(explainer, model, batch):
    pixel_values, ids, mask, index = batch
    roll = explainer.explain_tensors(pixel_values, ids, mask, method="rollout", image_index=index)
    for b in range(4):
        probs = attentions_and_grads(
            model, *one_pair(explainer, pixel_values[index[b]], b), grad=False
        )
        r = torch.eye(17)
        for a in probs:  # Abnar & Zuidema: 0.5 A + 0.5 I, rows renormalised, first layer first
            a = 0.5 * a.mean(1)[0] + 0.5 * torch.eye(17)
            r = (a / a.sum(-1, keepdim=True)) @ r
        assert_close(roll.raw_maps[b], r[0, 1:].reshape(4, 4))
        for layer, a in enumerate(probs):
            att = explainer.explain_tensors(
                pixel_values, ids, mask, method="attention", layer=layer, image_index=index
            )
            assert_close(att.raw_maps[b], a[0, :, 0, 1:].mean(0).reshape(4, 4))


def test_the_last_blocks_patch_outputs_get_no_gradient(model, batch):
    """Why Grad-CAM stops one block early: CLIP's score reads only the CLS token."""
    pixel_values, ids, mask, _ = batch
    kept = {}
    last = model.vision_model.encoder.layers[-1]
    handle = last.register_forward_hook(lambda m, i, o: kept.__setitem__("out", o))
    try:
        out = model(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=pixel_values[:1])
        (grad,) = torch.autograd.grad(out.logits_per_image[0, 0], kept["out"])
    finally:
        handle.remove()
    assert (grad[0, 1:] == 0).all() and grad[0, 0].abs().max() > 0


# ---------------------------------------------------------------------- batching


@pytest.mark.parametrize("method", METHODS)
def test_batches_equal_one_pair_at_a_time(explainer, images, method):
    many = explainer.explain_many(images, [[PHRASES[0], PHRASES[3]], PHRASES[1:3]], method=method)
    one_image = explainer.explain(images[1], PHRASES, method=method)
    for row, (i, p) in enumerate([(0, 0), (0, 3), (1, 1), (1, 2)]):
        alone = explainer.explain(images[i], [PHRASES[p]], method=method)
        assert_close(many.raw_maps[row], alone.raw_maps[0])
        assert torch.allclose(many.scores[row], alone.scores[0], atol=1e-6)
    for p, phrase in enumerate(PHRASES):
        alone = explainer.explain(images[1], [phrase], method=method)
        assert_close(one_image.raw_maps[p], alone.raw_maps[0])


def test_a_frozen_model_gives_the_same_maps(tokenizer, images):
    model = tiny_clip(len(tokenizer), seed=1)
    ex = gc.load(model, processor=processor_for(tokenizer))
    want = {m: ex.explain(images[0], PHRASES[:2], method=m).raw_maps for m in METHODS}
    model.requires_grad_(False)
    for m in METHODS:
        assert_close(ex.explain(images[0], PHRASES[:2], method=m).raw_maps, want[m])
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------- a known answer


def planted_clip(vocab_size: int) -> CLIPModel:
    """Hand-set weights: blocks are identities except the last block's attention, whose heads
    0-1 look from the CLS at the planted patch and heads 2-3 look everywhere; the image embedding
    is the CLS (direction c) plus what the CLS read (direction p); every text embeds to p. The
    score therefore grows with what the CLS reads from the planted patch, and with nothing else."""
    model = tiny_clip(vocab_size)
    p = torch.tensor([1.0, -1.0] * 8 + [0.0] * 16)  # lives in heads 0-1
    c = torch.tensor([0.0] * 16 + [1.0, -1.0] * 8)  # lives in heads 2-3
    eye = torch.eye(32)
    vm, blocks = model.vision_model, model.vision_model.encoder.layers
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        vm.embeddings.patch_embedding.weight.zero_()
        vm.embeddings.patch_embedding.weight[:, 0] = p[:, None, None] / 256  # a patch of ones -> p
        vm.embeddings.position_embedding.weight.zero_()
        vm.embeddings.class_embedding.copy_(c)
        for block in blocks:
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
        first, last = blocks[0].self_attn, blocks[1].self_attn
        for lin in (first.q_proj, first.k_proj, first.out_proj, last.q_proj):
            lin.weight.zero_()
            lin.bias.zero_()
        last.q_proj.bias.copy_(5.0 * p)  # every query looks for p (logit ~20 in heads 0-1)
        for lin in (last.k_proj, last.v_proj, last.out_proj):
            lin.weight.copy_(eye)
            lin.bias.zero_()
        model.visual_projection.weight.copy_(eye)
        model.text_model.final_layer_norm.weight.zero_()
        model.text_model.final_layer_norm.bias.copy_(p)  # every text pools to p
        model.text_projection.weight.copy_(eye)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_maps_peak_at_the_planted_patch(tokenizer, method):
    ex = Explainer(ClipAdapter(planted_clip(len(tokenizer)), tokenizer=tokenizer))
    pixel_values = torch.zeros(1, 3, 64, 64)
    pixel_values[0, 0, 16:32, 32:48] = 1.0  # grid cell (1, 2)
    ids, mask = ex.adapter.prepare_texts(["red", "a blue square"])
    got = ex.explain_tensors(
        pixel_values, ids, mask, method=method, image_index=torch.tensor([0, 0])
    )
    for raw in got.raw_maps:
        assert divmod(int(raw.argmax()), 4) == (1, 2)
        if method in ("gradcam", "relevance"):  # nothing else carries any evidence
            others = torch.cat([raw.flatten()[:6], raw.flatten()[7:]])
            assert others.abs().max() <= 1e-6 * raw.max()


# ---------------------------------------------------------------------- bad input, loading


def test_sdpa_model_that_cannot_switch_is_a_clear_error(tokenizer, monkeypatch):
    model = tiny_clip(len(tokenizer), attn="sdpa")
    cannot_switch_to_eager(monkeypatch, model)
    with pytest.raises(ValueError, match="eager"):
        gc.load(model, tokenizer=tokenizer)


def test_an_sdpa_model_is_switched_to_eager(tokenizer):
    model = tiny_clip(len(tokenizer), attn="sdpa")
    gc.load(model, tokenizer=tokenizer)
    assert model.config.vision_config._attn_implementation == "eager"


def test_unsupported_method_target_and_layer_are_clear_errors(explainer, images):
    with pytest.raises(ValueError, match=r"not defined for the clip family.*'relevance'"):
        explainer.explain(images[0], ["red"], method="attn-gradcam")
    with pytest.raises(ValueError, match="target 'itm' is not available"):
        explainer.explain(images[0], ["red"], method="gradcam", target="itm")
    with pytest.raises(ValueError, match=r"valid layers are \[0\]"):  # the last block: no gradient
        explainer.explain(images[0], ["red"], method="gradcam", layer=1)


def test_a_long_phrase_is_truncated_with_a_warning(explainer, images):
    long = " ".join(["red circle"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        ex = explainer.explain(images[0], [long, "red"], method="gradcam")
    assert len(ex.tokens[0]) == WORD_TEXT["max_position_embeddings"]
    assert not ex.maps.isnan().any()


def test_load_from_a_saved_directory(tmp_path, model, tokenizer, explainer, images):
    loaded = gc.load(saved(tmp_path, model, processor_for(tokenizer)))
    assert isinstance(loaded.adapter, ClipAdapter)
    assert loaded.model.config.vision_config._attn_implementation == "eager"
    for method in METHODS:
        want = explainer.explain(images[0], PHRASES, method=method)
        got = loaded.explain(images[0], PHRASES, method=method)
        assert_close(got.raw_maps, want.raw_maps)
        assert torch.allclose(got.scores, want.scores, atol=1e-6)
    assert gc.families()["clip"] == ["attention", "gradcam", "relevance", "rollout"]
