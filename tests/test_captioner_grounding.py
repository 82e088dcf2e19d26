"""Grounding supervision of the captioner: attention correctness, AMC on Grad-CAM, resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from groundcam.cli import main
from groundcam.data.sample import ReadReport
from groundcam.data.shapes_captions import DATASET_FILE, write_dataset
from groundcam.models import captioner as model_module
from groundcam.train import caption_grounding as cg
from groundcam.train.captioner import TrainConfig, load_data, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, {"train": 12, "val": 2}, seed=0, image_size=64)
    return root


def config(shapes: Path, encoder: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        captions=str(shapes / DATASET_FILE),
        images=str(shapes / "images"),
        out=str(out),
        encoder=str(encoder),
        freeze_encoder=False,
        image_size=64,
        embed_dim=8,
        attention_dim=8,
        decoder_dim=12,
        dropout=0.0,
        min_word_count=1,
        epochs=2,
        batch_size=4,
        val_images=2,
        sample_every=0,
        ground="attention",
    )
    return TrainConfig(**(base | kw))


def test_cell_shares_of_a_box_and_a_mask() -> None:
    # a 40 x 20 image on a 2 x 4 grid (cells 10 x 10): box [5, 0, 20, 15] covers half of cell
    # (0, 0), all of (0, 1), a quarter of (1, 0) and half of (1, 1)
    cover = cg.box_coverage([[5, 0, 20, 15]], 40, 20, (2, 4))
    assert np.allclose(cover, [0.5, 1, 0, 0, 0.25, 0.5, 0, 0])
    mask = np.zeros((20, 40), bool)
    mask[0:15, 5:20] = True
    assert np.allclose(cg.mask_coverage(mask, (2, 4)), cover)
    # cells that split pixels: a 3 x 3 image, one pixel set, on a 2 x 2 grid (cells 1.5 px)
    one = np.zeros((3, 3), bool)
    one[1, 1] = True
    assert np.allclose(cg.mask_coverage(one, (2, 2)), [0.25 / 2.25] * 4)


def test_attention_correctness_on_a_constructed_attention() -> None:
    alphas = torch.tensor(
        [
            [[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]],
            [[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]],
        ],
        requires_grad=True,
    )
    regions = torch.zeros(2, 3, 4)
    regions[0, 0] = torch.tensor([1.0, 0.5, 0, 0])  # mass 0.5 + 0.125 = 0.625
    regions[0, 1] = torch.tensor([0, 0, 0, 1.0])  # mass 0.4
    regions[1, 1] = torch.tensor([0, 0, 1.0, 0])  # mass 0.5
    expected = (-math.log(0.625) - math.log(0.4) - math.log(0.5)) / 2
    loss = cg.attention_correctness_loss(alphas, regions)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # only aligned words contribute: changing the unaligned rows changes nothing, not even grads
    loss.backward()
    assert (
        torch.count_nonzero(alphas.grad[0, 2]) == 0 and torch.count_nonzero(alphas.grad[1, 0]) == 0
    )
    assert torch.count_nonzero(alphas.grad[1, 2]) == 0
    assert alphas.grad[0, 1, 3].item() == pytest.approx(-1 / 0.4 / 2)
    other = alphas.detach().clone()
    other[:, 2] = other[:, 2].flip(-1)
    other[1, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert cg.attention_correctness_loss(other, regions).item() == pytest.approx(expected)
    none = cg.attention_correctness_loss(alphas, torch.zeros_like(regions))
    assert none.item() == 0.0 and none.requires_grad


def test_grounded_words_land_on_the_rows_that_write_them(shapes, encoder_dir, tmp_path) -> None:
    cfg = config(shapes, encoder_dir, tmp_path / "d")
    data = load_data(cfg)
    path, ids = data.train[0]
    words = data.grounding[0]
    raw = json.loads((shapes / DATASET_FILE).read_text())
    entry = next(e for e in raw["images"] if e["filename"] == path.name)
    sentence = entry["sentences"][0]
    assert [w[0] for w in words] == [g["token"] for g in sentence["grounding"]]
    regions = cg.word_regions(words, path, (8, 8), cfg.max_words, ReadReport())
    for row, cover in regions:
        # row k reads <SOS> w1..wk and predicts token k: the grounded word itself
        assert data.vocab.decode([ids[row + 1]]) == sentence["tokens"][row]
        assert 0 < cover.max() <= 1 and cover.min() >= 0
    # the mask's shares sit inside the box's shares (an object never fills its whole box)
    token, boxes, masks = words[0]
    box = cg.box_coverage(boxes, 64, 64, (8, 8))
    assert masks and np.all(regions[0][1] <= box + 1e-6) and regions[0][1].sum() < box.sum()


def test_no_grounding_in_the_file_is_one_line(shapes, encoder_dir, tmp_path) -> None:
    raw = json.loads((shapes / DATASET_FILE).read_text())
    for e in raw["images"]:
        for s in e["sentences"]:
            s.pop("grounding")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(raw))
    result = CliRunner().invoke(
        main,
        ["train", "captioner", "--captions", str(bare), "--images", str(shapes / "images"),
         "--out", str(tmp_path / "r"), "--encoder", str(encoder_dir), "--ground", "attention"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--ground attention: no training caption of" in result.output
    assert "Traceback" not in result.output


def test_a_bad_grounding_item_is_that_captions_problem(shapes, encoder_dir, tmp_path) -> None:
    raw = json.loads((shapes / DATASET_FILE).read_text())
    first = next(e for e in raw["images"] if e["split"] == "train")
    first["sentences"][0]["grounding"][0]["token"] = 99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="token 99 is not an index"):
        data = load_data(config(shapes, encoder_dir, tmp_path / "r", captions=str(bad)))
    row = [p.name for p, _ in data.train].index(first["filename"])
    n = len(first["sentences"][0]["grounding"])
    assert len(data.grounding[row]) == n - 1 and data.report.skipped_rows == 1
    assert [len(g) % 2 for g in data.grounding].count(1) == 1  # others: colour + shape each


@pytest.mark.parametrize("ground", ["attention", "amc"])
def test_a_killed_grounded_run_resumes_to_identical_weights(
    shapes, encoder_dir, tmp_path, monkeypatch, ground
) -> None:
    straight = train(config(shapes, encoder_dir, tmp_path / "a", ground=ground), threads=1)
    real, calls = model_module.ShowAttendTell.forward, {"n": 0}

    def crash_on_fourth(self, *args, **kwargs):
        if kwargs.get("labels"):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(model_module.ShowAttendTell, "forward", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        train(config(shapes, encoder_dir, tmp_path / "b", ground=ground), threads=1)
    monkeypatch.setattr(model_module.ShowAttendTell, "forward", real)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 3
    resumed = train(config(shapes, encoder_dir, tmp_path / "b", ground=ground), threads=1)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert all(r[f"grounding_{ground}"] > 0 for r in log if "loss" in r)


def test_cli_grounded_training_logs_its_term_and_lowers_it(shapes, encoder_dir, tmp_path) -> None:
    args = [
        "train", "captioner", "--captions", shapes / DATASET_FILE, "--images", shapes / "images",
        "--encoder", encoder_dir, "--finetune-encoder", "--image-size", 64, "--embed-dim", 8,
        "--attention-dim", 8, "--decoder-dim", 12, "--dropout", 0, "--min-word-count", 1,
        "--epochs", 12, "--batch-size", 4, "--val-images", 2, "--sample-every", 0,
        "--threads", 1, "--lr", 0.01,
    ]  # fmt: skip
    runs = {}
    for ground in ("none", "attention"):
        out = tmp_path / ground
        result = CliRunner().invoke(
            main, [str(a) for a in [*args, "--out", out, "--ground", ground, "--ground-weight", 2]]
        )
        assert result.exit_code == 0, result.output
        runs[ground] = out
    raw = json.loads((shapes / DATASET_FILE).read_text())["images"]
    words = sum(len(e["sentences"][0]["grounding"]) for e in raw if e["split"] == "train")
    assert f"grounding (attention, weight 2.0): {words} grounded words in 12 captions" in (
        result.output
    )
    log = [json.loads(x) for x in (runs["attention"] / "train_log.jsonl").read_text().splitlines()]
    terms = [r["grounding_attention"] for r in log if "grounding_attention" in r]
    assert len(terms) >= 2 and terms[-1] < terms[0]
    assert all("grounding_attention" not in json.loads(x) for x in
               (runs["none"] / "train_log.jsonl").read_text().splitlines())  # fmt: skip
    cfg = json.loads((runs["attention"] / "model" / "train_config.json").read_text())
    assert cfg["ground"] == "attention" and cfg["ground_weight"] == 2.0


def test_an_unreadable_image_grounds_nothing(tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    words = [(1, [(0.0, 0.0, 10.0, 10.0)], None)]
    assert cg.word_regions(words, broken, (4, 4), 30, ReadReport()) == []
