"""Grouped cross-attention (each image's keys and values once, its phrases as one query block):
the layouts, and per family maps, scores, logits, recorded probabilities and their gradients
equal to the ungrouped path and to one pair at a time; hooks removed, also on errors."""

from __future__ import annotations

import pytest
import torch
from test_blip import make_processor
from test_blip import tiny as tiny_blip
from test_vision_encoder_decoder import SIZE, picture, tiny_ved
from tiny import assert_close, noise_images, tiny_albef
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

import groundcam as gc
from groundcam import grouping
from groundcam.adapters.albef import AlbefAdapter
from groundcam.capture import HookPoint, Recorder
from groundcam.explainer import Explainer
from groundcam.grouping import ImageGroups
from groundcam.train.trocr_glyphs import char_tokenizer, image_processor

PHRASES = [
    ["the red circle", "a small blue square", "green"],
    ["the star"],
    ["a big yellow triangle left of the circle", "blue"],
]
METHODS = ["attn-gradcam", "attention", "gradcam", "relevance"]


def ungrouped(monkeypatch) -> None:
    """Every forward takes the per-pair path (keys and values per pair), as before grouping."""
    monkeypatch.setattr(ImageGroups, "of", classmethod(lambda cls, *a, **k: None))


def hooks(model: torch.nn.Module) -> list[int]:
    """How many forward and pre-forward hooks each module holds (transformers installs some of
    its own for output capturing)."""
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def no_hooks(model: torch.nn.Module, before: list[int] | None = None) -> bool:
    return not grouping._ACTIVE and hooks(model) == (before or [0] * len(hooks(model)))


# ----------------------------------------------------------------------------- layouts


def test_irregular_groups_round_trip():
    index = torch.tensor([1, 0, 1, 1, 3])  # image 2 has no rows; rows are not sorted
    g = ImageGroups.of(index, 4)
    assert (g.n_images, g.size, g.regular) == (4, 3, False)
    x = torch.randn(5, 2, 6)
    blocks = g.rows_to_blocks(x)
    assert blocks.shape == (4, 6, 6)
    assert torch.equal(blocks[1, :2], x[0]) and torch.equal(blocks[1, 2:4], x[2])
    assert torch.equal(blocks[0, :2], x[1]) and torch.equal(blocks[3, :2], x[4])
    assert torch.equal(g.blocks_to_rows(blocks, 2), x)
    probs = torch.rand(5, 4, 2, 7)
    grouped_probs = g.rows_to_probs(probs)
    assert grouped_probs.shape == (4, 4, 6, 7)
    assert torch.equal(g.probs_to_rows(grouped_probs, 2), probs)
    batched = torch.stack([grouped_probs, 2 * grouped_probs])  # gradients keep leading axes
    assert torch.equal(g.probs_to_rows(batched, 2), torch.stack([probs, 2 * probs]))


def test_sorted_equal_groups_are_views_and_single_rows_are_not_grouped():
    g = ImageGroups.of(torch.tensor([0, 0, 1, 1]), 2)
    assert g.regular
    x = torch.randn(4, 3, 5)
    assert g.rows_to_blocks(x).data_ptr() == x.data_ptr()
    assert ImageGroups.of(torch.tensor([2, 0, 1]), 3) is None
    assert ImageGroups.of(torch.tensor([], dtype=torch.long), 2) is None


# ----------------------------------------------------------------------------- phrase families


@pytest.fixture(scope="module")
def albef(tokenizer):
    return Explainer(AlbefAdapter(tiny_albef(len(tokenizer), seed=3), tokenizer))


@pytest.fixture(scope="module")
def blip_itm(tokenizer):
    return gc.load(
        tiny_blip(BlipForImageTextRetrieval, tokenizer), processor=make_processor(tokenizer)
    )


@pytest.fixture(scope="module")
def images():
    return noise_images(3, 64, 80, seed=4)


def explain_all(explainer, images, method):
    return explainer.explain_many(images, PHRASES, method=method)


def per_pair(explainer, images, method):
    """Each phrase alone with its image: nothing to group."""
    parts = [
        explainer.explain(image, [phrase], method=method)
        for image, group in zip(images, PHRASES, strict=True)
        for phrase in group
    ]
    return parts


@pytest.mark.parametrize("family", ["albef", "blip_itm"])
@pytest.mark.parametrize("method", METHODS)
def test_grouped_maps_equal_ungrouped_and_per_pair(request, monkeypatch, images, family, method):
    explainer = request.getfixturevalue(family)
    calls = []
    real = grouping.grouped

    def spy(modules, groups):
        calls.append(groups)
        return real(modules, groups)

    monkeypatch.setattr(grouping, "grouped", spy)
    grouped_ex = explain_all(explainer, images, method)
    if family == "blip_itm":  # the text side ran grouped (ALBEF groups inside its own model)
        assert calls and calls[-1] is not None and not calls[-1].regular
    singles = per_pair(explainer, images, method)
    with monkeypatch.context() as m:
        ungrouped(m)
        plain = explain_all(explainer, images, method)
    for other in (plain, None):
        for p in range(len(grouped_ex)):
            ref = other if other is not None else singles[p]
            q = p if other is not None else 0
            if other is not None:
                assert_close(grouped_ex.raw_maps[p], ref.raw_maps[q], 1e-4)
            # attn-gradcam's raw maps average over padded positions, which differ alone
            assert_close(grouped_ex.maps[p], ref.maps[q], 1e-3)
            assert_close(grouped_ex.scores[p : p + 1], ref.scores[q : q + 1], 1e-5)
            if grouped_ex.raw_token_maps is not None:
                t = (
                    ref.raw_token_maps.shape[1]
                    if other is None
                    else grouped_ex.raw_token_maps.shape[1]
                )
                assert_close(grouped_ex.raw_token_maps[p, :t], ref.raw_token_maps[q, :t], 1e-4)
    assert no_hooks(explainer.model)


@pytest.mark.parametrize("family", ["albef", "blip_itm"])
def test_unsorted_pairs_of_explain_tensors_and_forward_only_scores(request, monkeypatch, family):
    explainer = request.getfixturevalue(family)
    pv = explainer.prepare_images(noise_images(3, 64, 64, seed=5))
    ids, mask = explainer.prepare_texts(["red", "a blue square", "the star", "green", "circle"])
    index = torch.tensor([2, 0, 2, 2, 0])  # image 1 unused, pairs out of order
    ex = explainer.explain_tensors(pv, ids, mask, image_index=index)
    scores = explainer.score_tensors(pv, ids, mask, image_index=index)
    with monkeypatch.context() as m:
        ungrouped(m)
        ref = explainer.explain_tensors(pv, ids, mask, image_index=index)
        ref_scores = explainer.score_tensors(pv, ids, mask, image_index=index)
    assert_close(ex.raw_maps, ref.raw_maps, 1e-4)
    assert_close(ex.raw_token_maps, ref.raw_token_maps, 1e-4)
    assert_close(scores.explained, ref_scores.explained, 1e-5)
    assert_close(scores.reported, ref_scores.reported, 1e-5)
    assert_close(ex.scores, scores.reported.float(), 1e-5)


def test_hooks_are_removed_when_a_grouped_forward_fails(blip_itm, images):
    pv = blip_itm.prepare_images(images[:1])
    ids = torch.tensor([[2, 10_000, 3], [2, 5, 3]])  # an id outside the vocabulary
    with pytest.raises(IndexError):
        blip_itm.explain_tensors(
            pv, ids, torch.ones_like(ids), image_index=torch.zeros(2, dtype=torch.long)
        )
    assert no_hooks(blip_itm.model)
    cores = list(blip_itm.adapter.cross.values())
    groups = ImageGroups.of(torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="3 pairs"), grouping.grouped(cores, groups):
        # two query rows for three pairs: refused inside the first cross-attention
        blip_itm.adapter.model.text_encoder(
            input_ids=torch.tensor([[2, 5, 3], [2, 6, 3]]),
            encoder_hidden_states=torch.zeros(1, 17, 32),
        )
    assert no_hooks(blip_itm.model)


def test_a_recorder_registered_after_the_grouping_is_refused(blip_itm):
    core = blip_itm.adapter.cross[0]
    groups = ImageGroups.of(torch.zeros(2, dtype=torch.long), 1)
    ids = torch.tensor([[2, 5, 3], [2, 6, 3]])
    with grouping.grouped([core], groups), Recorder([HookPoint("x", core, 1)]):
        with pytest.raises(RuntimeError, match="hooks registered before the grouping"):
            blip_itm.adapter.model.text_encoder(
                input_ids=ids, encoder_hidden_states=torch.zeros(1, 17, 32)
            )
    assert no_hooks(blip_itm.model)


# ----------------------------------------------------------------------------- decoders


@pytest.fixture(scope="module")
def char_tok():
    return char_tokenizer()


def decoder_cases(tokenizer, char_tok):
    """(explainer, one image's pixels, three texts' ids [3, T]) for BLIP captioning and the
    VisionEncoderDecoder decoders."""
    blip = gc.load(
        tiny_blip(BlipForConditionalGeneration, tokenizer, seed=1),
        processor=make_processor(tokenizer),
    )
    yield (
        "blip-caption",
        blip,
        blip.prepare_images(noise_images(1, 64, 64)),
        torch.tensor(
            [
                [len(tokenizer), 5, 9, 12, 3],
                [len(tokenizer), 7, 7, 4, 3],
                [len(tokenizer), 6, 8, 10, 3],
            ]
        ),
    )
    for decoder in ("trocr", "gpt2", "bert"):
        ved = gc.load(
            tiny_ved(len(char_tok), decoder), processor=image_processor(SIZE), tokenizer=char_tok
        )
        ids = torch.tensor([[0, 5, 9, 12, 2], [0, 7, 7, 4, 2], [0, 6, 8, 10, 2]])
        yield decoder, ved, ved.prepare_images([picture()]), ids


@pytest.mark.parametrize("case", range(4), ids=["blip-caption", "trocr", "gpt2", "bert"])
def test_decoder_texts_of_one_image_attend_as_one_block(tokenizer, char_tok, case):
    name, explainer, pv, ids = list(decoder_cases(tokenizer, char_tok))[case]
    a = explainer.adapter
    a.decoder_logits(pv, ids[:1])  # transformers adds its output-capturing hooks on first use
    before = hooks(explainer.model)
    layer = a.record_spec("cross_attention", 0, "token").points[0]

    def run(pixels):
        with torch.enable_grad(), Recorder([layer], leaf=True, cut=True) as rec:
            logits = a.decoder_logits(pixels, ids)
            (probs,), (unfold,) = rec.tensors(), rec.unfolds()
            score = logits[:, -2].log_softmax(-1)[torch.arange(3), ids[:, -1]]
            (grad,) = torch.autograd.grad(score.sum(), [probs])
        if unfold is not None:
            probs, grad = unfold(probs), unfold(grad)
        return logits.detach(), probs.detach(), grad, unfold

    logits, probs, grad, unfold = run(pv)
    assert unfold is not None  # grouped: the record is in the block layout
    ref_logits, ref_probs, ref_grad, ref_unfold = run(pv.expand(3, -1, -1, -1))
    assert ref_unfold is None
    assert_close(logits, ref_logits, 1e-5)
    assert_close(probs, ref_probs, 1e-5)
    assert_close(grad, ref_grad, 1e-4)
    for b in range(3):  # one text at a time
        alone = a.decoder_logits(pv, ids[b : b + 1])
        assert_close(logits[b : b + 1], alone.detach(), 1e-5)
    assert no_hooks(explainer.model, before)
