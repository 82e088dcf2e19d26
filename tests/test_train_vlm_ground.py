"""`groundcam train vlm --init --ground attention`: attention correctness on a tiny LLaVA's
object words, fine-tuned from a saved model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_train_vlm import TINY
from transformers import LlavaForConditionalGeneration

from groundcam.cli import main
from groundcam.data.masks import decode_mask
from groundcam.data.shapes import generate_scene
from groundcam.data.shapes_captions import left_to_right
from groundcam.train import vlm_shapes
from groundcam.train.vlm_shapes import (
    DEFAULT_PROMPT,
    TrainConfig,
    build_model,
    encode,
    grounded_loss,
    named_objects,
    object_cells,
    questions,
    train,
)

GROUNDED = dict(TINY, ground="attention", ground_weight=0.5)


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny_args(**extra) -> list:
    opts = {**TINY, **extra}
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", v)]


def weights(model) -> dict[str, torch.Tensor]:
    """The LM head and the projector's first layer of a model or a saved model folder."""
    if not isinstance(model, torch.nn.Module):
        model = LlavaForConditionalGeneration.from_pretrained(model, trust_remote_code=False)
    return {
        "head": model.get_output_embeddings().weight.detach(),
        "projector": model.model.multi_modal_projector.linear_1.weight.detach(),
    }


class FixedAttention(torch.nn.Module):
    """Returns the given loss and attentions whatever the batch (to score the term by hand)."""

    def __init__(self, attentions, image_id: int):
        super().__init__()
        self.attentions = attentions
        self.config = SimpleNamespace(image_token_id=image_id)

    def forward(self, input_ids, output_attentions=False, **_):
        assert output_attentions
        return SimpleNamespace(loss=torch.tensor(0.25), attentions=self.attentions)


def test_the_term_on_a_constructed_attention_has_its_known_value() -> None:
    # one row, 6 positions: 0 text, 1-3 image (id 9), 4-5 text; 2 heads, 2 layers
    ids = torch.tensor([[5, 9, 9, 9, 6, 7]])
    layer0 = torch.zeros(1, 2, 6, 6)
    layer0[0, 0, 4, :4] = torch.tensor([0.2, 0.4, 0.2, 0.2])  # head 0: image 0.4, 0.2, 0.2
    layer0[0, 1, 4, :4] = torch.tensor([0.0, 0.1, 0.1, 0.8])  # head 1: image 0.1, 0.1, 0.8
    layer1 = torch.full((1, 2, 6, 6), 1 / 6)  # uniform: never read with layers=[0]
    regions = torch.zeros(1, 6, 3)
    regions[0, 4] = torch.tensor([1.0, 0.5, 0.0])  # the word written at row 4 covers cells 0, 1
    model = FixedAttention((layer0, layer1), 9)
    batch = {"input_ids": ids, "ground_regions": regions}
    ce, term = grounded_loss(model, batch, [0])
    # head mean over the image: 0.25, 0.15, 0.5 (sum 0.9); mass on the object 0.25 + 0.075
    assert float(ce) == 0.25
    assert float(term) == pytest.approx(-math.log(0.325 / 0.9), rel=1e-6)
    # both layers: the mean of the two layers' head means, then the share
    _, both = grounded_loss(model, batch, [0, 1])
    image = (torch.tensor([0.25, 0.15, 0.5]) + 1 / 6) / 2
    expected = -math.log(float((image[0] + 0.5 * image[1]) / image.sum()))
    assert float(both) == pytest.approx(expected, rel=1e-6)
    # a row without a grounded word adds nothing; two words of one row add up
    regions[0, 5] = torch.tensor([0.0, 0.0, 1.0])
    layer0[0, :, 5, 1:4] = torch.tensor([0.5, 0.25, 0.25])
    _, two = grounded_loss(model, batch, [0])
    assert float(two) == pytest.approx(-math.log(0.325 / 0.9) - math.log(0.25), rel=1e-6)


def test_object_words_name_their_objects_in_captions_and_answers() -> None:
    _, processor = build_model(TrainConfig(out="unused", **TINY))
    tok = processor.tokenizer
    for i in range(10):
        sample = generate_scene("train", i, 0, 128)
        objects = sample.meta["objects"]
        caption = left_to_right(sample).caption
        words = tok.tokenize(caption)
        named = named_objects(sample, DEFAULT_PROMPT, caption, words)
        assert len(named) == len(words)
        for word, k in zip(words, named, strict=True):
            if word in ("a", "and", ",") or k is None:
                assert word not in [o["colour"] for o in objects] + [o["shape"] for o in objects]
            else:
                assert word in (objects[k]["colour"], objects[k]["shape"])
        assert sum(k is not None for k in named) == 2 * len(objects)
        for prompt, answer in questions(sample):
            (k,) = named_objects(sample, prompt, answer, [answer])
            if prompt.startswith(("What colour", "What shape")):
                assert answer in (objects[k]["colour"], objects[k]["shape"])
                assert (objects[k]["shape"] in prompt) or (objects[k]["colour"] in prompt)
            else:  # sizes and places name no object
                assert k is None


def test_regions_sit_at_the_rows_that_write_the_object_words() -> None:
    cfg = TrainConfig(out="unused", **TINY)
    _, processor = build_model(cfg)
    tok = processor.tokenizer
    sample = generate_scene("train", 4, 0, 64)
    rows = [(DEFAULT_PROMPT, left_to_right(sample).caption), questions(sample)[0]]
    batch = encode(processor, [sample.image] * 2, rows, [sample, sample], 4)
    regions = batch["ground_regions"]
    assert regions.shape == (*batch["input_ids"].shape, 16)
    objects = sample.meta["objects"]
    ordered = sorted(range(len(objects)), key=lambda k: objects[k]["box"][0] + objects[k]["box"][2])
    (asked,) = [k for k in range(len(objects)) if rows[1][1] in objects[k].values()][:1]
    for b, named in ((0, [k for k in ordered for _ in "cs"]), (1, [asked])):
        at = (regions[b].sum(-1) > 0).nonzero()[:, 0]
        written = tok.convert_ids_to_tokens(batch["input_ids"][b, at + 1])
        assert len(written) == len(named)
        for row, word, k in zip(at.tolist(), written, named, strict=True):
            assert word in (objects[k]["colour"], objects[k]["shape"])
            assert torch.equal(regions[b, row], object_cells(sample, k, 4))
    # the cell shares add up to the mask's area in cells (64 px scene, 16 px cells)
    mask = decode_mask(objects[0]["mask"], 64, 64, "test")
    cells = object_cells(sample, 0, 4)
    assert float(cells.sum()) == pytest.approx(mask.sum() / 256, rel=1e-5)
    assert float(cells.max()) <= 1.0
    assert "ground_regions" not in encode(processor, [sample.image], rows[:1])


def test_the_term_falls_when_trained_on_a_fixed_batch() -> None:
    cfg = TrainConfig(out="unused", **TINY)
    model, processor = build_model(cfg)
    samples = [generate_scene("train", i, 0, 64) for i in range(4)]
    rows = [(DEFAULT_PROMPT, left_to_right(s).caption) for s in samples]
    batch = encode(processor, [s.image for s in samples], rows, samples, 4)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    terms = []
    for _ in range(60):
        ce, term = grounded_loss(model, batch, [0])
        terms.append(float(term.detach()))
        (ce + term).backward()
        opt.step()
        opt.zero_grad()
    assert terms[-1] < 0.5 * terms[0], terms


def test_a_grounded_fine_tune_from_a_saved_model_runs_and_logs_every_term(tmp_path) -> None:
    first = run("train", "vlm", "--out", tmp_path / "a", "--threads", 1, *tiny_args())
    assert first.exit_code == 0, first.output
    result = run(
        "train", "vlm", "--out", tmp_path / "b", "--threads", 1, "--init", tmp_path / "a" / "model",
        "--ground", "attention", "--ground-weight", 0.5, "--ground-layers", "0",
        *tiny_args(steps=4, lr=1e-4),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "grounding (attention, weight 0.5, layers [0])" in result.output
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "answer_cross_entropy", "grounding_attention"} <= log[-1].keys()
    for e in log:
        total = e["answer_cross_entropy"] + 0.5 * e["grounding_attention"]
        assert e["loss"] == pytest.approx(total, rel=1e-5)
        assert e["grounding_attention"] > 0
    start, tuned = (weights(tmp_path / d / "model") for d in "ab")
    fresh, _ = build_model(TrainConfig(out="unused", **TINY))
    # 4 Adam steps at lr <= 1e-4 move each weight by at most 4e-4 from the saved model; the
    # fresh model (8 steps at 1e-3 before the saved one) lies further away
    for name, w in weights(fresh).items():
        near = float((tuned[name] - start[name]).abs().max())
        assert 0 < near < 4e-4 and float((tuned[name] - w).abs().max()) > 3 * near, name
    saved = json.loads((tmp_path / "b" / "model" / "train_config.json").read_text())
    assert saved["ground"] == "attention" and saved["ground_layers"] == [0]


def test_a_killed_grounded_run_resumes_to_identical_weights(tmp_path, monkeypatch) -> None:
    straight = train(TrainConfig(out=str(tmp_path / "a"), **GROUNDED), threads=1)
    real, calls = vlm_shapes.grounded_loss, {"n": 0}

    def crash_on_sixth(model, batch, layers):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(model, batch, layers)

    monkeypatch.setattr(vlm_shapes, "grounded_loss", crash_on_sixth)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "b"), **GROUNDED), threads=1)
    monkeypatch.setattr(vlm_shapes, "grounded_loss", real)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4
    resumed = train(TrainConfig(out=str(tmp_path / "b"), **GROUNDED), threads=1)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [(tmp_path / d / "train_log.jsonl").read_text() for d in "ab"]
    strip = [
        [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in t.splitlines()]
        for t in logs
    ]
    assert strip[0] == strip[1]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--ground", "attention", "--ground-layers", "5"], "--ground-layers [5]: expected"),
        (["--ground", "attention", "--ground-layers", "x"], "--ground-layers 'x': expected"),
        (["--init", "no/such/folder"], "--init no/such/folder: expected a built-in name"),
        (["--ground", "amc"], "--ground"),
    ],
)
def test_bad_grounding_options_are_one_line(tmp_path, args, expected) -> None:
    result = run("train", "vlm", "--out", tmp_path / "run", "--threads", 1, *args, *tiny_args())
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cells_are_fractions_of_each_patch_inside_the_mask() -> None:
    sample = generate_scene("test", 2, 0, 64)
    for k, o in enumerate(sample.meta["objects"]):
        mask = decode_mask(o["mask"], 64, 64, "test")
        cells = object_cells(sample, k, 8).reshape(8, 8).numpy()
        expected = mask.reshape(8, 8, 8, 8).mean((1, 3))
        assert np.allclose(cells, expected, atol=1e-6)
