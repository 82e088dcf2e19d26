"""`train captioner --randomise-labels`: the data-randomisation control of the sanity checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from groundcam.cli import main
from groundcam.data.shapes_captions import DATASET_FILE, write_dataset
from groundcam.train.captioner import TrainConfig, load_data


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, {"train": 12, "val": 2}, seed=0, image_size=64)
    return root


def config(shapes: Path, encoder: Path, **kw) -> TrainConfig:
    base = dict(
        captions=str(shapes / DATASET_FILE),
        images=str(shapes / "images"),
        out=str(shapes / "unused"),
        encoder=str(encoder),
        min_word_count=1,
        ground="attention",
    )
    return TrainConfig(**(base | kw))


def _pairs(data) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(ids), repr(g)) for (_, ids), g in zip(data.train, data.grounding, strict=True)]


def test_captions_are_permuted_deterministically_over_the_same_images(shapes, encoder_dir):
    plain = load_data(config(shapes, encoder_dir))
    mixed = load_data(config(shapes, encoder_dir, randomise_labels=True))
    again = load_data(config(shapes, encoder_dir, randomise_labels=True))
    other = load_data(config(shapes, encoder_dir, randomise_labels=True, seed=1))
    # the same images in the same order, the same validation references and vocabulary
    assert [p for p, _ in mixed.train] == [p for p, _ in plain.train]
    assert mixed.val == plain.val and mixed.vocab.words == plain.vocab.words
    # each caption travels with its grounded words; none is lost or duplicated
    assert sorted(_pairs(mixed)) == sorted(_pairs(plain))
    moved = sum(a != b for a, b in zip(_pairs(mixed), _pairs(plain), strict=True))
    assert moved >= len(plain.train) - 2  # 12 distinct captions: a permutation fixes few
    assert _pairs(again) == _pairs(mixed)  # fixed by the seed
    assert _pairs(other) != _pairs(mixed)


def test_a_short_randomised_run_trains_and_records_the_option(shapes, encoder_dir, tmp_path):
    args = [
        "train", "captioner", "--captions", shapes / DATASET_FILE, "--images", shapes / "images",
        "--encoder", encoder_dir, "--finetune-encoder", "--image-size", 64, "--embed-dim", 8,
        "--attention-dim", 8, "--decoder-dim", 12, "--dropout", 0, "--min-word-count", 1,
        "--epochs", 1, "--batch-size", 4, "--val-images", 2, "--sample-every", 0,
        "--threads", 1, "--ground", "attention", "--out", tmp_path / "r",
    ]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--randomise-labels"]])
    assert result.exit_code == 0, result.output
    assert "captions permuted across the training images (seed 0)" in result.output
    saved = json.loads((tmp_path / "r" / "model" / "train_config.json").read_text())
    assert saved["randomise_labels"] is True
    log = [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert any("cross_entropy" in r for r in log)
    # the same run directory without the option is another configuration: refused, not mixed
    again = CliRunner().invoke(main, [str(a) for a in args])
    assert again.exit_code == 2 and "randomise_labels" in again.output, again.output
