"""The attention captioner: model, decoding, files, its adapter's maps and the word evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import assert_close

import groundcam as gc
from groundcam.data.caption_text import Vocabulary, tokenize
from groundcam.data.shapes import generate_scene, vocabulary
from groundcam.errors import GroundcamWarning, InputError
from groundcam.eval.caption_pointing import caption_records, shapes_samples, summarize_captions
from groundcam.models.captioner import CaptionerConfig, ShowAttendTell

RESNET_MICRO = {
    "embedding_size": 8,
    "hidden_sizes": [8, 16],
    "depths": [1, 1],
    "layer_type": "basic",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
}


def tiny_captioner(seed: int = 0, image_size: int = 64, words=None) -> ShowAttendTell:
    """A random captioner over the shapes words: 64 px -> an 8x8 grid of 16 channels."""
    torch.manual_seed(seed)
    from transformers import ResNetConfig

    vocab = Vocabulary([*(words or vocabulary())])
    cfg = CaptionerConfig(
        vocab_size=len(vocab),
        encoder="resnet-micro",
        encoder_config=ResNetConfig(**RESNET_MICRO).to_dict(),
        image_size=image_size,
        embed_dim=12,
        attention_dim=10,
        decoder_dim=14,
        dropout=0.0,
        freeze_encoder=False,
        max_length=12,
    )
    return ShowAttendTell(cfg, vocab).eval()


def images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = tiny_captioner()
    model.save_pretrained(tmp_path / "cap")
    return tmp_path / "cap"


# --------------------------------------------------------------------------- text


def test_tokenize_and_vocabulary() -> None:
    assert tokenize("A dog, running! Don't stop; t-shirt.") == [
        "a",
        "dog",
        "running",
        "don't",
        "stop",
        "t-shirt",
    ]
    v = Vocabulary.build(["a red circle", "a red star", "a blue star."], min_count=2)
    assert v.words == ["<PAD>", "<SOS>", "<EOS>", "<UNK>", "a", "red", "star"]
    assert v.encode("A red cube") == [1, 4, 5, 3, 2]
    assert v.decode([1, 4, 5, 2, 6]) == "a red"  # stops at <EOS>
    assert v.unknown_share("blue cube") == 1.0 and v.unknown_share("") == 1.0


# --------------------------------------------------------------------------- model


def test_grid_formula_matches_the_resnet() -> None:
    model = tiny_captioner()
    for h, w in [(64, 64), (65, 97), (33, 50), (128, 96)]:
        feats, grid = model.encoder(torch.zeros(1, 3, h, w))
        assert model.encoder.grid(h, w) == grid and feats.shape[1] == grid[0] * grid[1]


def test_padding_never_reaches_the_loss() -> None:
    model = tiny_captioner()
    v = model.vocab
    pixels = model.preprocess(images(2))
    rows = [v.encode("a red circle and a blue star"), v.encode("a star")]

    def loss(width: int, pad: int = 0):
        ids = torch.full((2, width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return model(pixels, ids, labels=True)

    short, wide = loss(9), loss(14)
    assert_close(short.cross_entropy, wide.cross_entropy, 1e-6)
    assert_close(short.regularizer, wide.regularizer, 1e-5)
    # the cross-entropy is the mean over the real target tokens, computed one caption at a time
    total, count = 0.0, 0
    for i, r in enumerate(rows):
        out = model(pixels[i : i + 1], torch.tensor([r]))
        logp = out.logits[0, :-1].log_softmax(-1)
        total += -logp.gather(-1, torch.tensor(r[1:])[:, None]).sum()
        count += len(r) - 1
    assert_close(short.cross_entropy, total / count, 1e-6)


def test_regularizer_is_the_doubly_stochastic_sum() -> None:
    model = tiny_captioner()
    ids = torch.tensor([model.vocab.encode("a red circle")])
    out = model(model.preprocess(images(1)), ids, labels=True)
    coverage = out.alphas[0].sum(0)  # over the 4 steps that predict a word or <EOS>
    assert_close(out.regularizer, ((1 - coverage) ** 2).sum(), 1e-6)
    assert_close(out.alphas.sum(-1), torch.ones(1, 4), 1e-6)


def test_known_answer_attention_on_a_constructed_grid() -> None:
    """Region (5, 2) is the only one whose feature matches what the attention scores: every
    word's `attention` map peaks there, and its weight there is near 1."""
    model = tiny_captioner()
    target = 5 * 8 + 2
    grid = torch.zeros(1, 64, 16)
    grid[0, target, 3] = 1.0

    class Constructed(torch.nn.Module):
        def forward(self, x):
            return grid.expand(x.shape[0], -1, -1).clone()

    model.encoder.regions = Constructed()
    att = model.decoder.attention
    with torch.no_grad():
        for p in att.parameters():
            p.zero_()
        att.feature.weight[0, 3] = 4.0
        att.score.weight[0, 0] = 10.0
    explainer = gc.load(model)
    gen = explainer.explain_generation(images(1)[0], method="attention", text="a red circle")
    assert gen.tokens == ["a", "red", "circle"]
    for k in range(3):
        assert int(gen.raw_maps[k].argmax()) == target
        assert float(gen.raw_maps[k].flatten()[target]) > 0.99


def test_beam_one_is_greedy_and_wider_beams_score_at_least_as_well() -> None:
    model = tiny_captioner(seed=3)
    pixels = model.preprocess(images(4, seed=1))
    with torch.no_grad():
        feats, _ = model.encoder(pixels)
        greedy = model._greedy(feats, 12)
        beam1 = [model._beam(feats[i : i + 1], 1, 12) for i in range(4)]
    assert beam1 == greedy
    assert model.generate(pixels, beam=1) == greedy

    def logprob(i: int, ids: list[int]) -> float:
        with torch.no_grad():
            out = model(pixels[i : i + 1], torch.tensor([ids]))
        logp = model._next_scores(out.logits[0])
        return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())

    wide = model.generate(pixels, beam=4)
    for i in range(4):
        if greedy[i][-1] == model.vocab.eos_id and wide[i][-1] == model.vocab.eos_id:
            assert logprob(i, wide[i]) >= logprob(i, greedy[i]) - 1e-5
    with pytest.raises(ValueError, match="beam"):
        model.generate(pixels, beam=0)


def test_generation_never_writes_pad_or_sos() -> None:
    model = tiny_captioner(seed=5)
    with torch.no_grad():
        model.decoder.out.bias[:2] += 100.0  # <PAD>, <SOS> would win every step
    for ids in model.generate(model.preprocess(images(3)), beam=1) + model.generate(
        model.preprocess(images(2)), beam=3
    ):
        assert ids[0] == model.vocab.sos_id and not {0, 1} & set(ids[1:])


def test_save_load_round_trip(saved: Path) -> None:
    model = tiny_captioner()
    loaded = ShowAttendTell.from_pretrained(saved)
    pixels = model.preprocess(images(2))
    ids = torch.tensor([model.vocab.encode("a small red circle")] * 2)
    assert torch.equal(model(pixels, ids).logits, loaded(pixels, ids).logits)
    assert loaded.vocab == model.vocab and loaded.config == model.config
    assert json.loads((saved / "config.json").read_text())["model_type"] == "groundcam-captioner"


def test_vocabulary_that_does_not_match_the_checkpoint(saved: Path) -> None:
    words = json.loads((saved / "vocab.json").read_text())["words"]
    (saved / "vocab.json").write_text(json.dumps({"words": words[:-2]}))
    with pytest.raises(InputError, match=r"vocab\.json has \d+ words .* does not belong"):
        gc.load(str(saved))
    (saved / "vocab.json").write_text("not json")
    with pytest.raises(InputError, match="not a groundcam vocabulary file"):
        gc.load(str(saved))


# --------------------------------------------------------------------------- the adapter


def test_explain_generation_equals_one_forward_per_word(saved: Path) -> None:
    """Per-word maps from one teacher-forced forward and a batched backward equal a naive
    recipe: per word, its own forward, its own backward, Grad-CAM by hand; the attention rows
    read step by step from the decoder."""
    explainer = gc.load(str(saved))
    model = explainer.model
    image = generate_scene("test", 2, image_size=64).image
    text = "a large blue star and a small red circle"
    cam = explainer.explain_generation(image, method="gradcam", text=text)
    att = explainer.explain_generation(image, method="attention", text=text)
    ids = model.vocab.encode(text)
    assert cam.tokens == att.tokens == tokenize(text) and cam.positions == list(range(1, 10))
    pixels = model.preprocess([image])
    compared = 0
    for k in range(1, len(ids) - 1):
        feats, (h, w) = model.encoder(pixels)
        feats = feats.detach().requires_grad_(True)
        logits, alphas = model.decoder(feats, torch.tensor([ids]))
        logp = logits[0, k - 1].log_softmax(-1)[ids[k]]
        (grad,) = torch.autograd.grad(logp, feats)
        weights = grad[0].mean(0)
        naive = (feats[0] * weights).sum(-1).clamp(min=0).reshape(h, w)
        if naive.abs().max() > 0:  # relu leaves some words of a random model with no map
            assert_close(cam.raw_maps[k - 1], naive, 1e-5)
            compared += 1
        else:
            assert float(cam.raw_maps[k - 1].abs().max()) < 1e-7
        assert_close(att.raw_maps[k - 1], alphas[0, k - 1].reshape(h, w), 1e-6)
        assert_close(cam.scores[k - 1], logp.exp(), 1e-5)
    assert compared >= 4


def test_generated_caption_and_explain_of_a_phrase(saved: Path) -> None:
    explainer = gc.load(str(saved))
    image = images(1)[0]
    gen = explainer.explain_generation(image, max_new_tokens=5)
    assert gen.method == "attention" and len(gen.tokens) == gen.maps.shape[0] <= 5
    assert gen.text == " ".join(gen.tokens)
    ex = explainer.explain(image, ["a red circle", "the blue star"])
    assert ex.tokens == [["a", "red", "circle"], ["the", "blue", "star"]]
    assert ex.maps.shape == (2, 8, 8) and ex.token_maps[1].shape == (3, 8, 8)
    # the phrase map is the mean of its words' attention rows
    g = explainer.explain_generation(image, method="attention", text="a red circle")
    assert_close(ex.raw_maps[0], g.raw_maps.mean(0) * 3 / 4, 1e-6)  # 4 rows, <SOS>'s is zero
    ids = explainer.model.vocab.encode("a red circle")
    out = explainer.model(explainer.prepare_images([image]), torch.tensor([ids[:-1]]))
    logp = out.logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:-1])[:, None])
    assert_close(ex.scores[0], logp.mean().exp(), 1e-5)


def test_methods_and_refusals(saved: Path) -> None:
    explainer = gc.load(str(saved))
    assert gc.families()["captioner"] == ["attention", "gradcam"]
    image = images(1)[0]
    with pytest.raises(ValueError, match="gradients of a word's score do not reach them"):
        explainer.explain(image, ["a red circle"], method="attn-gradcam")
    with pytest.raises(ValueError, match="not defined for the captioner family"):
        explainer.explain_generation(image, method="rollout")
    with pytest.raises(InputError, match="no words the captioner can read"):
        explainer.explain(image, ["?!"])
    with pytest.warns(GroundcamWarning, match="2 of its 2 words are not in the captioner"):
        explainer.explain(image, ["pink elephant"])
    with pytest.raises(InputError, match="beam must be a positive integer"):
        explainer.explain_generation(image, beam=0)


# --------------------------------------------------------------------------- word evaluation


def test_word_pointing_records_on_shapes(saved: Path) -> None:
    explainer = gc.load(str(saved))
    records = list(caption_records(explainer, shapes_samples("test", 3, seed=4, image_size=64)))
    ref_words = [h for r in records for h in r["reference"]]
    scene = generate_scene("test", 0, 4, 64)
    names = {o["colour"] for o in scene.meta["objects"]} | {
        o["shape"] for o in scene.meta["objects"]
    }
    assert {h["word"] for h in records[0]["reference"]} == names
    assert len(ref_words) == sum(
        2 * len(generate_scene("test", i, 4, 64).meta["objects"]) for i in range(3)
    )
    summary = summarize_captions(records)
    block = summary["reference_word_pointing"]
    assert block["n"] == len(ref_words) and block["hits"] == sum(h["hit"] for h in ref_words)
    assert 0 < block["chance"] < 0.2 and set(summary["captions"]) == {
        "bleu1",
        "bleu2",
        "bleu3",
        "bleu4",
        "cider_d",
    }
