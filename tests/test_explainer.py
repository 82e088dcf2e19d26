"""The explanation flow on a tiny ALBEF: batching, hooks, defaults, errors, saved files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_albef

import groundcam as gc
from groundcam.adapters.albef import AlbefAdapter
from groundcam.explainer import Explainer

PHRASES = ["the red circle", "the small blue square", "the star left of the green square", "a"]
ALL = [
    ("attn-gradcam", "itm"),
    ("attention", "itm"),
    ("gradcam", "itm"),
    ("rollout", "itm"),
    ("gradcam", "similarity"),
    ("rollout", "similarity"),
    ("relevance", "itm"),
    ("relevance", "similarity"),
]


@pytest.fixture(scope="module")
def explainer(tokenizer):
    return Explainer(AlbefAdapter(tiny_albef(len(tokenizer)), tokenizer, name="tiny"))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))


@pytest.mark.parametrize(("method", "target"), ALL)
def test_a_batch_of_phrases_equals_one_phrase_at_a_time(explainer, image, method, target):
    batch = explainer.explain(image, PHRASES, method=method, target=target)
    for p, phrase in enumerate(PHRASES):
        one = explainer.explain(image, [phrase], method=method, target=target)
        assert torch.allclose(batch.maps[p], one.maps[0], atol=1e-5)
        assert torch.allclose(batch.scores[p], one.scores[0], atol=1e-6)
        if batch.raw_token_maps is not None:
            t = len(one.tokens[0])
            assert torch.allclose(batch.token_maps[p], one.token_maps[0], atol=1e-5)
            assert (batch.raw_token_maps[p, t:] == 0).all()  # padding contributes nothing
            assert len(batch.token_maps[p]) == t


@pytest.mark.parametrize(("method", "target"), ALL)
def test_default_layers_give_maps_that_are_not_degenerate(explainer, image, method, target):
    ex = explainer.explain(image, PHRASES, method=method, target=target)
    assert ex.maps.shape == (4, 4, 4)
    assert not ex.maps.isnan().any()
    flat = ex.maps.flatten(1)
    assert (flat.max(1).values == 1).all() and (flat.min(1).values == 0).all()


def test_last_vision_block_is_blind_for_similarity(explainer, image):
    """Why the similarity default is not the last block: ITC reads only the image CLS."""
    ex = explainer.explain(image, PHRASES, method="gradcam", layer=1, target="similarity")
    assert ex.raw_maps.abs().max() == 0 and ex.maps.abs().max() == 0
    assert explainer.explain(image, PHRASES, method="gradcam", target="similarity").layer == 0


def test_gradcam_equals_a_naive_full_backward_per_pair(explainer, image):
    """Independent recipe: one pair per forward, retain_grad on the block output, backward()."""
    ex = explainer.explain(image, PHRASES, method="gradcam")
    a, m = explainer.adapter, explainer.model
    pv = a.prepare_images([image])
    for p, phrase in enumerate(PHRASES):
        ids, mask = a.prepare_texts([phrase])
        x = m.visual_encoder.patch_embed(pv)
        x = torch.cat([m.visual_encoder.cls_token, x], 1) + m.visual_encoder.pos_embed
        x = m.visual_encoder.blocks[0](x)
        act = m.visual_encoder.blocks[1](x)
        act.retain_grad()
        image_embeds = m.visual_encoder.norm(act)
        text = m.text_encoder.encode_text(ids, mask)
        m.itm_from(image_embeds, text, mask)[0, 1].backward()
        w = act.grad[0, 1:].mean(0)
        cam = (act[0, 1:] * w).sum(-1).clamp(min=0).reshape(4, 4).detach()
        m.zero_grad()
        assert torch.allclose(ex.raw_maps[p], cam, rtol=1e-4, atol=1e-6 * cam.abs().max())


def test_hooks_are_removed_even_when_the_forward_fails(explainer, image):
    ids = torch.tensor([[2, 10_000, 3]])  # an id outside the vocabulary breaks the embedding
    pv = explainer.adapter.prepare_images([image])
    with pytest.raises(IndexError):
        explainer.explain_tensors(pv, ids, torch.ones_like(ids))
    assert all(not mod._forward_hooks for mod in explainer.model.modules())
    explainer.explain(image, PHRASES[:1])
    assert all(not mod._forward_hooks for mod in explainer.model.modules())


def test_frozen_weights_still_explain(tokenizer, image):
    model = tiny_albef(len(tokenizer))
    model.requires_grad_(False)
    ex = Explainer(AlbefAdapter(model, tokenizer)).explain(image, PHRASES[:2])
    assert ex.raw_maps.abs().max() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "lime"}, "unknown method 'lime'; methods are"),
        (
            {"layer": 0},
            r"layer 0 is not a cross-attention layer of this model; valid layers are \[1, 2\]",
        ),
        ({"target": "similarity"}, "similarity .* never passes through the fusion layers"),
        ({"target": "token"}, "target 'token' is not available for this model"),
        ({"method": "rollout", "layer": 1}, "uses every layer"),
    ],
)
def test_bad_arguments_get_clear_errors(explainer, image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        explainer.explain(image, PHRASES[:1], **kwargs)


def test_bad_phrases_and_images(explainer, image):
    with pytest.raises(ValueError, match="no phrases given"):
        explainer.explain(image, [])
    with pytest.raises(ValueError, match="empty phrase"):
        explainer.explain(image, ["the red circle", "  "])
    with pytest.raises(TypeError, match="must be a PIL.Image"):
        explainer.explain(np.zeros((4, 4, 3)), ["x"])


def test_save_writes_overlays_maps_and_metadata(explainer, image, tmp_path):
    ex = explainer.explain(image, PHRASES[:2], method="attn-gradcam")
    out = ex.save(tmp_path / "out")
    npz = np.load(out / "maps.npz")
    assert npz["maps"].shape == (2, 4, 4) and npz["raw_token_maps"].shape[:2] == (2, 6)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "attn-gradcam" and meta["layer"] == 1 and meta["target"] == "itm"
    assert meta["phrases"] == PHRASES[:2] and meta["tokens"][0][0] == "[CLS]"
    assert {"torch", "transformers", "groundcam"} <= set(meta["versions"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["000_the-red-circle.png", "001_the-small-blue-square.png"]
    assert Image.open(out / pngs[0]).size == image.size


def test_resize_is_unclamped_bicubic(explainer, image):
    ex = explainer.explain(image, PHRASES[:1])
    up = ex.resize((40, 30))
    ref = torch.nn.functional.interpolate(ex.maps[:, None], (40, 30), mode="bicubic")[:, 0]
    assert torch.equal(up, ref)


def test_load_from_a_saved_directory_and_by_instance(tiny_model_dir, image, tokenizer):
    by_dir = gc.load(tiny_model_dir)
    by_instance = gc.load(by_dir.model, tokenizer=tokenizer)
    a = by_dir.explain(image, PHRASES[:2])
    b = by_instance.explain(image, PHRASES[:2])
    assert torch.equal(a.maps, b.maps)
    assert by_dir.model.training is False


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no/such-model'"):
        gc.load("no/such-model")
    with pytest.raises(ValueError, match="unsupported model class Linear; supported classes"):
        gc.load(torch.nn.Linear(2, 2))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a supported family"):
        gc.load(tmp_path)


def test_a_bert_vocab_txt_beside_the_model_is_used(tmp_path, tokenizer, image):
    tiny_albef(len(tokenizer)).save_pretrained(tmp_path)
    vocab = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = gc.load(tmp_path)
    ids, _ = model.adapter.prepare_texts(["The red circle!"])
    assert ids.tolist() == tokenizer(["the red circle"])["input_ids"]
    assert model.explain(image, ["the red circle"]).tokens[0] == [
        "[CLS]",
        "the",
        "red",
        "circle",
        "[SEP]",
    ]


@pytest.mark.parametrize(
    ("method", "vision_rows"),
    [
        ("attn-gradcam", [1, 1]),  # every vision block once, on the one image
        ("attention", [1, 1]),
        ("rollout", [1, 1]),
        (
            "gradcam",
            [1, 4],
        ),  # blocks from the recorded one on run per phrase (their gradients differ)
    ],
)
def test_the_image_is_encoded_once_for_all_phrases(explainer, image, method, vision_rows):
    seen = []
    blocks = explainer.model.visual_encoder.blocks
    handles = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[0])) for b in blocks]
    try:
        explainer.explain(image, PHRASES, method=method)
    finally:
        for h in handles:
            h.remove()
    assert seen == vision_rows


@pytest.mark.parametrize(("method", "target"), ALL)
def test_many_images_with_their_phrases_equal_one_pair_at_a_time(explainer, method, target):
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    groups = [PHRASES[:2], PHRASES[2:3], PHRASES[1:]]
    ex = explainer.explain_many(images, groups, method=method, target=target)
    assert ex.image_index == [0, 0, 1, 2, 2, 2]
    row = 0
    for image, group in zip(images, groups, strict=True):
        for phrase in group:
            one = explainer.explain(image, [phrase], method=method, target=target)
            assert torch.allclose(ex.maps[row], one.maps[0], atol=1e-5)
            assert torch.allclose(ex.scores[row], one.scores[0], atol=1e-6)
            row += 1
    with pytest.raises(ValueError, match="2 images but 1 phrase lists"):
        explainer.explain_many(images[:2], [PHRASES])
