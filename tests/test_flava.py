"""FLAVA maps (ITM head and contrastive similarity): equal to an independent per-pair recipe on
FlavaForPreTraining's own forward, batched like one pair at a time, right on a hand-built model
whose scores read one planted patch; a bare FlavaModel explains similarity only."""

from __future__ import annotations

import pytest
import torch
from tiny import SMALL, VISION, assert_close, cannot_switch_to_eager, noise_images, saved
from transformers import FlavaConfig, FlavaForPreTraining, FlavaModel, FlavaProcessor
from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil

import groundcam as gc

PHRASES = ["the red circle", "a small blue square left of the star", "green"]
N = 16  # a 4 x 4 grid: 64 px images, 16 px patches
PLANT = (2, 1)
# (method, target, layer); gradcam layers 0-1 are image blocks, 2-3 multimodal blocks
CASES = [
    ("attention", "itm", 0),
    ("attention", "itm", 1),
    ("attn-gradcam", "itm", 0),
    ("gradcam", "itm", 1),
    ("gradcam", "itm", 2),
    ("rollout", "itm", None),
    ("relevance", "itm", None),
    ("gradcam", "similarity", 0),
    ("rollout", "similarity", None),
    ("relevance", "similarity", None),
]
DEFAULTS = sorted({(m, t) for m, t, _ in CASES})


def config(vocab: int) -> FlavaConfig:
    return FlavaConfig(
        image_config=dict(VISION),
        text_config=dict(SMALL, vocab_size=vocab, max_position_embeddings=16),
        multimodal_config=dict(SMALL),
        hidden_size=32,
        projection_dim=16,
        init_codebook=False,
        initializer_range=0.2,
    )


def tiny_flava(vocab: int, seed: int = 0, cls=FlavaForPreTraining):
    """hidden 32, 2 image / text / multimodal blocks, 4 heads, patch 16, wide random weights."""
    torch.manual_seed(seed)
    model = cls._from_config(config(vocab), attn_implementation="eager").eval()
    with torch.no_grad():  # FLAVA zero-initialises these; give the tokens positions
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings")):
                p.normal_(0, 0.2)
    return model


def processor(tokenizer) -> FlavaProcessor:
    size = {"height": 64, "width": 64}
    return FlavaProcessor(FlavaImageProcessorPil(size=size, crop_size=size), tokenizer)


@pytest.fixture(scope="module")
def explainer(tokenizer):
    return gc.load(tiny_flava(len(tokenizer)), processor=processor(tokenizer))


@pytest.fixture(scope="module")
def image():
    return noise_images(1, 80, 100)[0]


def pixels(n: int, width: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, width, generator=torch.Generator().manual_seed(seed))


def naive(model, pv, ids, method, target, layer):
    """One pair through FlavaForPreTraining itself (return_loss=False; multimodal attentions
    switched on in its config), retain_grad, a full backward of the ITM match logit or the
    contrastive logit. The raw map and per-token maps in the model's own token layout:
    multimodal [mm-CLS, image CLS, patches, text], image [CLS, patches]."""
    with pytest.MonkeyPatch.context() as mp:
        for flag in ("output_attentions", "output_hidden_states"):
            mp.setattr(model.flava.multimodal_model.config, flag, True)
        out = model(
            input_ids=ids,
            input_ids_masked=ids,
            pixel_values=pv,
            return_loss=False,
            output_attentions=True,
            output_hidden_states=True,
        )
    # the ITM head reads the second ("masked") pass; the contrastive head the first
    image = out.image_masked_output if target == "itm" else out.image_output
    mm = out.multimodal_masked_output
    tensors = [*image.attentions, *image.hidden_states, *mm.attentions, *mm.hidden_states]
    for x in tensors:
        x.retain_grad()
    score = out.itm_logits[0, 1] if target == "itm" else out.contrastive_logits_per_image[0, 0]
    score.backward()
    t, grid = ids.shape[1], (4, 4)
    if method in ("attention", "attn-gradcam"):
        a = mm.attentions[layer][0, :, 2 + N :, 2 : 2 + N]
        g = mm.attentions[layer].grad[0, :, 2 + N :, 2 : 2 + N]
        per_token = (a if method == "attention" else a * g.clamp(min=0)).mean(0)
        return per_token.mean(0).reshape(grid), per_token.reshape(t, *grid)
    if method == "gradcam":
        if layer < 2:
            h, cut = image.hidden_states[layer + 1], slice(1, 1 + N)
        else:
            h, cut = mm.hidden_states[layer - 1], slice(2, 2 + N)
        return (h[0, cut] @ h.grad[0, cut].mean(0)).clamp(min=0).reshape(grid), None
    if method == "rollout":
        r = torch.eye(1 + N)
        for a in image.attentions:
            a = 0.5 * a[0].mean(0) + 0.5 * torch.eye(1 + N)
            r = (a / a.sum(-1, keepdim=True)) @ r
        return r[0, 1:].reshape(grid), None
    atts, cut = (
        (mm.attentions, slice(2, 2 + N)) if target == "itm" else (image.attentions, slice(1, 1 + N))
    )
    r = torch.eye(atts[0].shape[-1])
    for a in atts:  # Chefer et al.: R += mean_h relu(grad * A) @ R, read at the CLS row
        r = r + (a.grad[0] * a[0]).clamp(min=0).mean(0) @ r
    return r[0, cut].reshape(grid), None


@pytest.mark.parametrize(("method", "target"), DEFAULTS)
def test_maps_have_the_grid_shape_and_default_layers_are_not_degenerate(
    explainer, image, method, target
):
    ex = explainer.explain(image, PHRASES, method=method, target=target)
    assert ex.maps.shape == (3, 4, 4) and not ex.maps.isnan().any()
    assert ex.maps.min() >= 0 and ex.maps.max() <= 1
    flat = ex.raw_maps.flatten(1)
    assert (flat.max(1).values > 0).all() and (flat.std(1) > 1e-3 * flat.max(1).values).all()
    assert ex.target == target
    wide = explainer.explain_tensors(
        pixels(3, width=96), *explainer.adapter.prepare_texts(PHRASES), method, target=target
    )
    assert wide.maps.shape == (3, 4, 6) and not wide.maps.isnan().any()


def test_default_layers(explainer, image):
    layer = {
        (m, t): explainer.explain(image, PHRASES[:1], method=m, target=t).layer
        for m, t in [("attn-gradcam", "itm"), ("gradcam", "itm"), ("gradcam", "similarity")]
    }
    # multimodal block 0 (its text rows reach the ITM head); the multimodal stream's image
    # tokens at the input of its last block; the image block before the last
    assert layer == {
        ("attn-gradcam", "itm"): 0,
        ("gradcam", "itm"): 2,
        ("gradcam", "similarity"): 0,
    }
    blind = explainer.explain(image, PHRASES, method="gradcam", layer=1, target="similarity")
    assert blind.raw_maps.abs().max() == 0  # the contrastive head reads only the image CLS


@pytest.mark.parametrize(("method", "target", "layer"), CASES)
def test_equal_to_an_independent_per_pair_recipe(explainer, method, target, layer):
    """Ours runs batched (2 images, 3 phrases, padding, each image encoded once)."""
    a, model = explainer.adapter, explainer.model
    pv, index = pixels(2), torch.tensor([0, 1, 1])
    ids, mask = a.prepare_texts(PHRASES)
    ex = explainer.explain_tensors(pv, ids, mask, method, layer, target, image_index=index)
    for p, phrase in enumerate(PHRASES):
        one, _ = a.prepare_texts([phrase])
        raw, per_token = naive(model, pv[index[p] : index[p] + 1], one, method, target, layer)
        if per_token is not None:  # our text mean runs over the padded length
            assert_close(ex.raw_token_maps[p, : one.shape[1]], per_token)
            raw = raw * one.shape[1] / ids.shape[1]
        assert_close(ex.raw_maps[p], raw)


def test_scores_are_the_models_own(explainer):
    a, model = explainer.adapter, explainer.model
    pv, index = pixels(2), torch.tensor([0, 1, 1])
    ids, mask = a.prepare_texts(PHRASES)
    with torch.no_grad():
        itm = a.forward(pv, ids, mask, index, "itm")
        sim = a.forward(pv, ids, mask, index, "similarity")
        for p, phrase in enumerate(PHRASES):
            one, _ = a.prepare_texts([phrase])
            out = model(
                input_ids=one,
                input_ids_masked=one,
                pixel_values=pv[index[p], None],
                return_loss=False,
            )
            assert torch.allclose(itm.explained[p], out.itm_logits[0, 1], atol=1e-5)
            assert torch.allclose(itm.reported[p], out.itm_logits.softmax(-1)[0, 1], atol=1e-6)
            logit = out.contrastive_logits_per_image[0, 0]
            assert torch.allclose(sim.explained[p], logit, atol=1e-5)
            assert torch.allclose(sim.reported[p], logit / model.flava.logit_scale.exp(), atol=1e-6)


@pytest.mark.parametrize(("method", "target", "layer"), CASES)
def test_a_batch_equals_one_pair_at_a_time(explainer, method, target, layer):
    a = explainer.adapter
    pv, index = pixels(3), torch.tensor([0, 0, 1, 2, 2, 2])
    phrases = PHRASES + PHRASES[::-1]
    ids, mask = a.prepare_texts(phrases)
    batch = explainer.explain_tensors(pv, ids, mask, method, layer, target, image_index=index)
    for p, phrase in enumerate(phrases):
        one_ids, one_mask = a.prepare_texts([phrase])
        i = index[p]
        one = explainer.explain_tensors(pv[i : i + 1], one_ids, one_mask, method, layer, target)
        assert_close(batch.maps[p], one.maps[0])
        assert torch.allclose(batch.scores[p], one.scores[0], atol=1e-6)
        if batch.raw_token_maps is None:
            assert_close(batch.raw_maps[p], one.raw_maps[0])
        else:
            t = one_ids.shape[1]
            assert_close(batch.raw_token_maps[p, :t], one.raw_token_maps[0])
            assert (batch.raw_token_maps[p, t:] == 0).all()


def _identity(block) -> None:
    """A block that passes its input on unchanged (uniform attention, no outputs)."""
    att = block.attention.attention
    for lin in (att.query, att.key, att.value, block.attention.output.dense, block.output.dense):
        lin.weight.zero_()
        lin.bias.zero_()


def _reader(block) -> None:
    """Every query attends by the key (y0 - y1) of the LayerNormed token; head 0 carries
    (y0 - y1) into channel 2. The LayerNorm is made near-linear (large eps): a LayerNorm ignores
    its input's scale, so a token read only through one gets a gradient orthogonal to itself,
    and Grad-CAM (which reads activations linearly) would not see the patch."""
    _identity(block)
    att = block.attention.attention
    att.query.bias.fill_(1.0)
    att.key.weight[:, 0], att.key.weight[:, 1] = 100.0, -100.0
    att.value.weight[0, 0], att.value.weight[0, 1] = 1.0, -1.0
    block.attention.output.dense.weight[2, 0] = 1.0
    block.layernorm_before.eps = 1e4


def planted_flava(vocab: int) -> FlavaForPreTraining:
    """Image block 0 is the identity and image block 1 a reader; multimodal block 0 is a reader
    and in block 1 every token reads channel 2 of the text tokens only (keyed on channel 3, which
    only text tokens carry). The image projection and the ITM head read channel 2 (increasing),
    the text projection is constant. Only the planted patch has channels 0 and 1 apart, so both
    scores depend on the image through that patch alone, and the ITM logit reaches the patch
    through the text rows of multimodal block 0."""
    model = tiny_flava(vocab, seed=3)
    f = model.flava
    base = torch.randn(32, generator=torch.Generator().manual_seed(0))
    base[1], base[3] = base[0], 0.0
    with torch.no_grad():
        emb = f.image_model.embeddings
        emb.position_embeddings.zero_()
        emb.cls_token.copy_(base)
        f.multimodal_model.cls_token.copy_(base)
        conv = emb.patch_embeddings.projection
        conv.weight.zero_()
        conv.bias.copy_(base)
        conv.weight[0] = 2.0 / conv.weight[0].numel()  # a patch of ones adds +2 to channel 0
        conv.weight[1] = -2.0 / conv.weight[1].numel()  # and -2 to channel 1
        image, mm = f.image_model.encoder.layer, f.multimodal_model.encoder.layer
        _identity(image[0])
        _reader(image[1])
        _reader(mm[0])
        _reader(mm[1])
        att = mm[1].attention.attention
        att.key.weight.zero_()
        att.key.weight[:, 3] = 1000.0
        att.value.weight.zero_()
        att.value.weight[0, 2] = 1.0
        f.image_to_mm_projection.weight.copy_(torch.eye(32))
        f.image_to_mm_projection.bias.zero_()
        f.text_to_mm_projection.weight[:4] = 0
        f.text_to_mm_projection.bias[:4] = torch.tensor([0.0, 0.0, 0.0, 5.0])
        for lin, row, col, w in [
            (model.itm_head.pooler.dense, 0, 2, 1.0),
            (model.itm_head.seq_relationship, 1, 0, 5.0),
            (f.image_projection, 0, 2, 1.0),
            (f.text_projection, 0, 0, 0.0),
        ]:
            lin.weight.zero_()
            lin.bias.zero_()
            lin.weight[row, col] = w
        f.image_projection.bias[1] = 1.0  # cos = x / sqrt(x^2 + 1) grows with x = channel 2
        f.text_projection.bias[0] = 1.0
    return model


@pytest.mark.parametrize(
    ("method", "target", "layer"),
    [
        ("attention", "itm", 0),
        ("attn-gradcam", "itm", 0),
        ("gradcam", "itm", 1),
        ("relevance", "itm", None),
        ("rollout", "itm", None),
        ("gradcam", "similarity", None),
        ("relevance", "similarity", None),
    ],
)
def test_known_answer_a_planted_patch(tokenizer, method, target, layer):
    explainer = gc.load(planted_flava(len(tokenizer)), processor=processor(tokenizer))
    pv = torch.zeros(1, 3, 64, 64)
    r, c = PLANT
    pv[:, :, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] = 1.0
    ids, mask = explainer.adapter.prepare_texts(PHRASES)
    ex = explainer.explain_tensors(pv.expand(3, -1, -1, -1), ids, mask, method, layer, target)
    flat = ex.raw_maps.flatten(1)
    cell = r * 4 + c
    others = torch.cat([flat[:, :cell], flat[:, cell + 1 :]], 1)
    assert (flat.argmax(1) == cell).all()
    assert (flat[:, cell] > others.max(1).values).all()
    assert (others == others[:, :1]).all()  # every other cell holds the same value
    if method in ("attn-gradcam", "relevance"):
        assert (others == 0).all()


def test_a_bare_flava_model_explains_similarity_only(tokenizer, image):
    explainer = gc.load(tiny_flava(len(tokenizer), cls=FlavaModel), processor=processor(tokenizer))
    assert explainer.adapter.default_target == "similarity"
    ex = explainer.explain(image, PHRASES, method="gradcam")
    assert ex.target == "similarity" and ex.maps.shape == (3, 4, 4)
    assert explainer.adapter.layers("tokens") == [0, 1]
    for method in ("gradcam", "attn-gradcam", "relevance"):
        with pytest.raises(ValueError, match="FlavaModel has no ITM head.*FlavaForPreTraining"):
            explainer.explain(image, PHRASES, method=method, target="itm")


def test_bad_input(explainer, image, tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="similarity .* never passes through the multimodal"):
        explainer.explain(image, PHRASES, method="attn-gradcam", target="similarity")
    with pytest.raises(ValueError, match="layer 2 is a multimodal block"):
        explainer.explain(image, PHRASES, method="gradcam", layer=2, target="similarity")
    with pytest.raises(ValueError, match="layer 4 is not a"):
        explainer.explain(image, PHRASES, method="gradcam", layer=4)
    with pytest.raises(ValueError, match="target 'token' is not available"):
        explainer.explain(image, PHRASES, method="gradcam", target="token")
    with pytest.warns(UserWarning, match="truncated to the text encoder's 16 tokens"):
        ex = explainer.explain(image, ["red " * 30], method="gradcam")
    assert len(ex.tokens[0]) == 16
    model = tiny_flava(len(tokenizer))
    model.config._attn_implementation = "sdpa"
    cannot_switch_to_eager(monkeypatch, model)
    with pytest.raises(ValueError, match="could not be switched to eager"):
        gc.load(model, processor=processor(tokenizer))


def test_load_from_saved_directory(explainer, image, tokenizer, tmp_path):
    loaded = gc.load(saved(tmp_path, explainer.model, processor(tokenizer)))
    assert loaded.adapter.family == "flava" and type(loaded.model).__name__ == "FlavaForPreTraining"
    for method, target in [("attn-gradcam", "itm"), ("relevance", "similarity")]:
        a = loaded.explain(image, PHRASES, method=method, target=target)
        b = explainer.explain(image, PHRASES, method=method, target=target)
        assert_close(a.raw_maps, b.raw_maps, 1e-5)
        assert a.tokens == b.tokens
    assert gc.families()["flava"] == [
        "attention",
        "attn-gradcam",
        "gradcam",
        "relevance",
        "rollout",
    ]
