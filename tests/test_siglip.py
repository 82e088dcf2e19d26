"""SigLIP adapter on tiny offline models: the model's own logit (scale and bias included) is
explained; Grad-CAM and relevance (ending at the attention-pooling probe) equal independent
re-implementations, one pair at a time with a full backward; a planted patch is found."""

from __future__ import annotations

import pytest
import torch
from tiny import VISION, WORD_TEXT, assert_close, cannot_switch_to_eager, noise_images, saved
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

import groundcam as gc
from groundcam.adapters.siglip import SiglipAdapter
from groundcam.explainer import Explainer

METHODS = ["gradcam", "relevance"]
pytestmark = pytest.mark.usefixtures("one_thread")

PHRASES = ["the red circle", "a small blue square", "green", "the star left of the red circle"]


def tiny_siglip(vocab_size: int, seed: int = 0, attn: str = "eager") -> SiglipModel:
    torch.manual_seed(seed)
    cfg = SiglipConfig(
        text_config=dict(WORD_TEXT, vocab_size=vocab_size), vision_config=dict(VISION)
    )
    return SiglipModel._from_config(cfg, attn_implementation=attn).eval()


def processor_for(tokenizer) -> SiglipProcessor:
    ip = SiglipImageProcessor(size={"height": 64, "width": 64})
    return SiglipProcessor(image_processor=ip, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_siglip(len(tokenizer), seed=1)


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
    """Pair b alone: its image's pixels, its text."""
    ids, mask = explainer.adapter.prepare_texts([PHRASES[b]])
    return pixel_values[None], ids, mask


# ---------------------------------------------------------------------- scores and maps


def test_scores_are_the_models_logits_and_probabilities(explainer, model, batch):
    pixel_values, ids, mask, index = batch
    assert ids.shape[1] == WORD_TEXT["max_position_embeddings"]  # padded as SigLIP was trained
    scores = explainer.adapter.forward(pixel_values, ids, mask, index, "similarity")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
    logits = out.logits_per_image[index, torch.arange(4)]
    assert torch.allclose(scores.explained, logits, atol=1e-5)
    assert torch.allclose(scores.reported, torch.sigmoid(logits), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_default_maps_are_on_the_grid_and_not_degenerate(explainer, images, method):
    ex = explainer.explain(images[0], PHRASES, method=method)
    assert ex.layer == (1 if method == "gradcam" else None)  # the last block: the head reads it
    assert ex.maps.shape == (4, 4, 4)
    assert not ex.maps.isnan().any()
    assert ex.maps.min() >= 0 and ex.maps.max() <= 1
    flat = ex.raw_maps.flatten(1)
    assert (flat.abs().amax(1) > 0).all() and (flat.std(1) > 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_non_square_inputs_give_non_square_grids(explainer, batch, method):
    pixel_values, ids, mask, index = batch
    wide = torch.nn.functional.interpolate(pixel_values, size=(64, 96), mode="bilinear")
    ex = explainer.explain_tensors(wide, ids, mask, method=method, image_index=index)
    assert ex.raw_maps.shape == (4, 4, 6)
    assert (ex.raw_maps.flatten(1).std(1) > 0).all()


def test_the_last_blocks_tokens_all_get_gradient(model, batch):
    """Unlike CLIP, the attention-pooling head reads every token of the last block."""
    pixel_values, ids, mask, _ = batch
    kept = {}
    last = model.vision_model.encoder.layers[-1]
    handle = last.register_forward_hook(lambda m, i, o: kept.__setitem__("out", o))
    try:
        out = model(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=pixel_values[:1])
        (grad,) = torch.autograd.grad(out.logits_per_image[0, 0], kept["out"])
    finally:
        handle.remove()
    assert (grad[0].abs().amax(-1) > 0).all()


# ---------------------------------------------------------------------- independent methods


def gradcam_like_pytorch_grad_cam(model, target_layer, pixel_values, ids, mask):
    """pytorch-grad-cam's recipe: a forward hook keeps the activation and its gradient, a full
    backward of the pair's logit, `reshape_transform` makes [B, C, h, w] (no CLS to drop)."""
    kept = {}

    def keep(module, inputs, output):
        kept["act"] = output
        output.register_hook(lambda g: kept.__setitem__("grad", g))

    def reshape_transform(t):
        return t.reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

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


@pytest.mark.parametrize("layer", [0, 1])
def test_gradcam_equals_pytorch_grad_cam(explainer, model, batch, layer):
    pixel_values, ids, mask, index = batch
    ex = explainer.explain_tensors(
        pixel_values, ids, mask, method="gradcam", layer=layer, image_index=index
    )
    vm = model.vision_model  # block i's output as read next: block i+1's layer_norm1, or the
    target = vm.encoder.layers[1].layer_norm1 if layer == 0 else vm.post_layernorm  # head's input
    for b in range(4):
        want = gradcam_like_pytorch_grad_cam(
            model, target, *one_pair(explainer, pixel_values[index[b]], b)
        )
        assert want.abs().max() > 0
        assert_close(ex.raw_maps[b], want)


def chefer_with_probe(model, pixel_values, ids, mask) -> torch.Tensor:
    """Vision attentions from `output_attentions=True`, the pooling head written out by hand (its
    probe -> patch attention per head), a full backward of the pair's logit, then Chefer's rules:
    self-attention R += Ā R, and for the probe's co-attention R_probe = R̄_pp^T Ā R̄_ii."""
    model.zero_grad()
    vision = model.vision_model(pixel_values=pixel_values, output_attentions=True)
    probs = list(vision.attentions)
    for a in probs:
        a.retain_grad()
    head = model.vision_model.head
    mha, x = head.attention, vision.last_hidden_state
    d, h = x.shape[-1], mha.num_heads
    w, bias = mha.in_proj_weight, mha.in_proj_bias

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], h, d // h).permute(0, 2, 1, 3)

    q = split(head.probe @ w[:d].T + bias[:d])
    k = split(x @ w[d : 2 * d].T + bias[d : 2 * d])
    v = split(x @ w[2 * d :].T + bias[2 * d :])
    probe = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
    probe.retain_grad()
    pooled = mha.out_proj((probe @ v).permute(0, 2, 1, 3).reshape(1, 1, d))
    pooled = (pooled + head.mlp(head.layernorm(pooled)))[:, 0]
    assert torch.allclose(pooled, vision.pooler_output, atol=1e-5)  # the head, reproduced
    text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    cosine = torch.nn.functional.cosine_similarity(pooled, text)
    logit = cosine * model.logit_scale.exp() + model.logit_bias
    logit.sum().backward()

    def bar(a):
        return (a.grad * a).clamp(min=0).mean(1)[0]

    def residual_free(r):
        off = r - torch.eye(len(r))
        s = off.sum(-1, keepdim=True)
        return torch.where(s != 0, off / torch.where(s != 0, s, 1), 0) + torch.eye(len(r))

    r_ii = torch.eye(16)
    for a in probs:
        r_ii = r_ii + bar(a) @ r_ii
    r_pi = residual_free(torch.eye(1)).T @ bar(probe) @ residual_free(r_ii)
    return r_pi[0].reshape(4, 4)


def test_relevance_equals_chefer_with_the_pooling_probe(explainer, model, batch):
    pixel_values, ids, mask, index = batch
    ex = explainer.explain_tensors(pixel_values, ids, mask, method="relevance", image_index=index)
    for b in range(4):
        want = chefer_with_probe(model, *one_pair(explainer, pixel_values[index[b]], b))
        assert want.max() > 0
        assert_close(ex.raw_maps[b], want)


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
    model = tiny_siglip(len(tokenizer), seed=1)
    ex = gc.load(model, processor=processor_for(tokenizer))
    want = {m: ex.explain(images[0], PHRASES[:2], method=m).raw_maps for m in METHODS}
    model.requires_grad_(False)
    for m in METHODS:
        assert_close(ex.explain(images[0], PHRASES[:2], method=m).raw_maps, want[m])
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------- a known answer


def planted_siglip(vocab_size: int) -> SiglipModel:
    """Hand-set weights: every block is an identity; the pooling head's heads 0-1 look for the
    planted patch (direction p), heads 2-3 look everywhere (where there is nothing); the head's
    MLP adds a constant c; every text embeds to p. The score therefore grows with what the probe
    reads from the planted patch, and with nothing else."""
    model = tiny_siglip(vocab_size)
    p = torch.tensor([1.0, -1.0] * 8 + [0.0] * 16)  # lives in heads 0-1
    c = torch.tensor([0.0] * 16 + [1.0, -1.0] * 8)
    eye = torch.eye(32)
    vm = model.vision_model
    head = vm.head
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        emb = vm.embeddings
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.weight[:, 0] = p[:, None, None] / 256  # a patch of ones -> p
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.zero_()
        for block in vm.encoder.layers:
            for lin in (block.self_attn.out_proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        head.attention.in_proj_weight.copy_(torch.cat([torch.zeros(32, 32), eye, eye]))
        head.attention.in_proj_bias.copy_(torch.cat([5.0 * p, torch.zeros(64)]))  # queries: p
        head.attention.out_proj.weight.copy_(eye)
        head.attention.out_proj.bias.zero_()
        for lin in (head.mlp.fc1, head.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        head.mlp.fc2.bias.copy_(c)
        model.text_model.head.weight.zero_()
        model.text_model.head.bias.copy_(p)  # every text embeds to p
    return model


@pytest.mark.parametrize("method", METHODS)
def test_maps_peak_at_the_planted_patch(tokenizer, method):
    ex = Explainer(SiglipAdapter(planted_siglip(len(tokenizer)), tokenizer=tokenizer))
    pixel_values = torch.zeros(1, 3, 64, 64)
    pixel_values[0, 0, 16:32, 32:48] = 1.0  # grid cell (1, 2)
    ids, mask = ex.adapter.prepare_texts(["red", "a blue square"])
    got = ex.explain_tensors(
        pixel_values, ids, mask, method=method, image_index=torch.tensor([0, 0])
    )
    for raw in got.raw_maps:
        assert divmod(int(raw.argmax()), 4) == (1, 2)
        others = torch.cat([raw.flatten()[:6], raw.flatten()[7:]])
        assert others.abs().max() <= 1e-6 * raw.max()  # nothing else carries any evidence


# ---------------------------------------------------------------------- bad input, loading


def test_sdpa_model_that_cannot_switch_is_a_clear_error(tokenizer, monkeypatch):
    model = tiny_siglip(len(tokenizer), attn="sdpa")
    cannot_switch_to_eager(monkeypatch, model)
    with pytest.raises(ValueError, match="eager"):
        gc.load(model, tokenizer=tokenizer)


def test_unsupported_methods_and_targets_are_clear_errors(explainer, images):
    for method in ("attention", "rollout", "attn-gradcam"):
        with pytest.raises(
            ValueError, match=r"not defined for the siglip family.*\['gradcam', 'relevance'\]"
        ):
            explainer.explain(images[0], ["red"], method=method)
    with pytest.raises(ValueError, match="target 'itm' is not available"):
        explainer.explain(images[0], ["red"], method="gradcam", target="itm")
    with pytest.raises(ValueError, match=r"valid layers are \[0, 1\]"):
        explainer.explain(images[0], ["red"], method="gradcam", layer=2)


def test_a_model_without_a_pooling_head_is_a_clear_error(tokenizer):
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(WORD_TEXT, vocab_size=len(tokenizer)),
        vision_config=dict(VISION, vision_use_head=False),
    )
    model = SiglipModel._from_config(cfg, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match="no attention-pooling head"):
        gc.load(model, tokenizer=tokenizer)


def test_a_long_phrase_is_truncated_with_a_warning(explainer, images):
    long = " ".join(["red circle"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        ex = explainer.explain(images[0], [long, "red"], method="gradcam")
    assert len(ex.tokens[0]) == WORD_TEXT["max_position_embeddings"]
    assert not ex.maps.isnan().any()


def test_load_from_a_saved_directory(tmp_path, model, tokenizer, explainer, images):
    loaded = gc.load(saved(tmp_path, model, processor_for(tokenizer)))
    assert isinstance(loaded.adapter, SiglipAdapter)
    assert loaded.model.config.vision_config._attn_implementation == "eager"
    for method in METHODS:
        want = explainer.explain(images[0], PHRASES, method=method)
        got = loaded.explain(images[0], PHRASES, method=method)
        assert_close(got.raw_maps, want.raw_maps)
        assert torch.allclose(got.scores, want.scores, atol=1e-6)
    assert gc.families()["siglip"] == ["gradcam", "relevance"]
