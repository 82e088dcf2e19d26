"""`groundcam train captioner` and `groundcam eval captions`: data problems, resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import groundcam as gc
from groundcam.cli import main
from groundcam.data.shapes import generate_scene
from groundcam.data.shapes_captions import (
    DATASET_FILE,
    ground_generated,
    left_to_right,
    write_dataset,
)
from groundcam.models import captioner as model_module
from groundcam.train.captioner import TrainConfig, load_data, train


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, {"train": 16, "val": 4, "test": 3}, seed=0, image_size=64)
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
        val_images=4,
        sample_every=0,
    )
    return TrainConfig(**(base | kw))


def test_shapes_captions_are_grounded_left_to_right() -> None:
    scene = generate_scene("test", 7, 0, 128)
    g = left_to_right(scene)
    objects = sorted(scene.meta["objects"], key=lambda o: o["box"][0] + o["box"][2])
    assert g.tokens.count("a") == len(objects) and g.tokens[-4:][0] == "a"
    grounded = [(w, b[0]) for w, b in zip(g.tokens, g.boxes, strict=True) if b]
    expected = [(w, tuple(o["box"])) for o in objects for w in (o["colour"], o["shape"])]
    assert grounded == expected
    assert ground_generated(scene, g.tokens) == [b if b else None for b in g.boxes]
    # a chunk naming no object grounds nothing; its colour and shape words are ungrounded
    fake = ["a", "small", "pink", "cube"] if False else ["a", "large", "red", "star"]
    if not any(o["colour"] == "red" and o["shape"] == "star" for o in objects):
        assert ground_generated(scene, fake) == [None, None, [], []]


def test_train_writes_a_model_that_explains(shapes: Path, encoder_dir: Path, tmp_path) -> None:
    result = run(
        "train", "captioner",
        "--captions", shapes / DATASET_FILE, "--images", shapes / "images",
        "--out", tmp_path / "run", "--encoder", encoder_dir, "--finetune-encoder",
        "--image-size", 64, "--embed-dim", 8, "--attention-dim", 8, "--decoder-dim", 12,
        "--min-word-count", 1, "--epochs", 2, "--batch-size", 4, "--val-images", 4,
        "--sample-every", 2, "--threads", 1,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "16 training captions, 4 validation images" in result.output
    assert "step 2: shapes-val-0-0.png: '" in result.output
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    vals = [r["val"] for r in log if "val" in r]
    assert len(vals) == 2 and set(vals[0]) == {
        "bleu1",
        "bleu2",
        "bleu3",
        "bleu4",
        "cider_d",
        "images",
    }
    explainer = gc.load(str(tmp_path / "run" / "model"))
    assert explainer.family == "captioner"
    assert not explainer.model.config.freeze_encoder
    gen = explainer.explain_generation(generate_scene("test", 0, 0, 64).image, method="gradcam")
    assert gen.maps.shape[1:] == (8, 8)


def test_pretrained_encoder_is_frozen_by_default(shapes, encoder_dir, tmp_path) -> None:
    cfg = config(shapes, encoder_dir, tmp_path / "f", freeze_encoder=None, epochs=1)
    final = train(cfg, threads=1)
    model = gc.load(str(final)).model
    assert model.config.freeze_encoder
    before = load_file(str(encoder_dir / "model.safetensors"))
    after = load_file(str(final / "model.safetensors"))
    for k, t in before.items():
        assert torch.equal(after["encoder.resnet." + k], t), k


def test_a_crashed_run_resumes_to_identical_weights(shapes, encoder_dir, tmp_path, monkeypatch):
    straight = train(config(shapes, encoder_dir, tmp_path / "a"), threads=1)
    real, calls = model_module.ShowAttendTell.forward, {"n": 0}

    def crash_on_sixth(self, *args, **kwargs):
        if kwargs.get("labels"):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(model_module.ShowAttendTell, "forward", crash_on_sixth)
    with pytest.raises(KeyboardInterrupt):
        train(config(shapes, encoder_dir, tmp_path / "b"), threads=1)
    monkeypatch.setattr(model_module.ShowAttendTell, "forward", real)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4
    resumed = train(config(shapes, encoder_dir, tmp_path / "b"), threads=1)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [4, 8]


def test_bad_rows_missing_images_and_unreadable_captions(shapes, encoder_dir, tmp_path) -> None:
    names = sorted(p.name for p in (shapes / "images").glob("shapes-train-*"))[:6]
    lines = ["image,caption"]
    lines += [f"{n},a small red circle and a large blue star" for n in names[:4]]
    lines += [
        f"{names[4]}",
        f"{names[4]},?!",
        f"{names[5]},zebra giraffe",
        "missing.png,a red star",
    ]
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"captions\.txt:6: expected 2 fields"):
        data = load_data(
            TrainConfig(
                str(path),
                str(shapes / "images"),
                str(tmp_path / "o"),
                min_word_count=2,
                val_fraction=0.0,
            )  # fmt: skip
        )
    assert len(data.train) == 4 and data.report.skipped_rows >= 1
    assert data.unreadable == 2  # "?!" has no words; "zebra giraffe" is all <UNK> at count 2
    assert data.report.missing_images == ["missing.png"]
    result = run(
        "train", "captioner", "--captions", path, "--images", tmp_path,
        "--out", tmp_path / "o2", "--epochs", 1,
    )  # fmt: skip
    assert result.exit_code == 2
    assert "no training captions with an image under" in result.output
    assert "Traceback" not in result.output


def test_an_encoder_that_cannot_be_loaded_is_one_line(shapes, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run(
        "train", "captioner", "--captions", shapes / DATASET_FILE, "--images", shapes / "images",
        "--out", tmp_path / "o", "--encoder", "nobody/no-such-resnet", "--epochs", 1,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--encoder 'nobody/no-such-resnet' cannot be loaded" in result.output
    assert len(result.output.strip().splitlines()) == 1 or "Traceback" not in result.output


def test_eval_captions_on_files_and_resume(shapes, encoder_dir, tmp_path) -> None:
    final = train(config(shapes, encoder_dir, tmp_path / "m", epochs=1), threads=1)
    args = ["eval", "captions", "--model", final, "--dataset", "file",
            "--captions", shapes / DATASET_FILE, "--images", shapes / "images",
            "--split", "test", "--out", tmp_path / "ev"]  # fmt: skip
    result = run(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["images"] == 3 and summary["reference_word_pointing"]["n"] > 0
    first = (tmp_path / "ev" / "results.jsonl").read_text().splitlines()
    # a kill after the first image: the rerun keeps it and scores only the other two
    (tmp_path / "ev" / "results.jsonl").write_text(first[0] + "\n" + first[1][:20])
    again = run(*args)
    assert again.exit_code == 0, again.output
    rerun = (tmp_path / "ev" / "results.jsonl").read_text().splitlines()
    assert rerun[0] == first[0] and len(rerun) == 3
    assert json.loads((tmp_path / "ev" / "summary.json").read_text()) == summary
    other = run(*args[:-2], "--method", "gradcam", "--out", tmp_path / "ev")
    assert other.exit_code == 2 and "holds another evaluation" in other.output
    (shapes / "images" / "shapes-test-0-1.png").rename(tmp_path / "gone.png")
    try:
        gone = run(*args[:-1], tmp_path / "ev2")
        assert (
            gone.exit_code == 0
            and json.loads((tmp_path / "ev2" / "summary.json").read_text())["images"] == 2
        )
    finally:
        (tmp_path / "gone.png").rename(shapes / "images" / "shapes-test-0-1.png")


def test_word_pointing_runs_on_blip_captioning_and_an_encoder_decoder(tokenizer) -> None:
    """The same evaluation on other captioning families: every grounded reference word is found
    among the model's tokens (subwords or characters) and scored."""
    from PIL import Image
    from test_blip import blip_config, make_processor
    from test_blip import tiny as tiny_blip
    from test_vision_encoder_decoder import tiny_ved
    from transformers import BlipForConditionalGeneration

    from groundcam.eval.caption_pointing import caption_records, shapes_samples, word_starts
    from groundcam.train.trocr_glyphs import char_tokenizer

    long_text = tiny_blip(BlipForConditionalGeneration, tokenizer, seed=1)
    short = gc.load(long_text, processor=make_processor(tokenizer))
    with pytest.raises(gc.errors.InputError, match="this model reads at most 16"):
        short.explain_generation(Image.new("RGB", (64, 64)), text=" ".join(["red"] * 20))
    cfg = blip_config(tokenizer)
    cfg.text_config.max_position_embeddings = 48
    torch.manual_seed(1)
    model = BlipForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    blip = gc.load(model, processor=make_processor(tokenizer))
    with pytest.warns(gc.errors.GroundcamWarning, match="no processor given"):
        ved = gc.load(tiny_ved(len(tokenizer), decoder="bert"), tokenizer=tokenizer)
    for explainer in (blip, ved):
        samples = list(shapes_samples("test", 2, seed=1, image_size=64))
        records = list(caption_records(explainer, samples, method="gradcam", max_new_tokens=4))
        grounded = sum(sum(b is not None for b in s.grounded[0][1]) for s in samples)
        words = [h for r in records for h in r["reference"]]
        assert len(words) == grounded and not any(h.get("missing") for h in words), explainer.family
        assert all(len(h["point"]) == 2 for h in words)
    # subword pieces continue their word, punctuation starts none
    pieces = {1: "a", 2: " re", 3: "d", 4: ",", 5: " st", 6: "ar"}

    class Pieces:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids)

    assert word_starts(Pieces(), [1, 2, 3, 4, 5, 6]) == [0, 1, None, None, 2, None]
    # a tokenizer that cannot write the caption's spaces (a character OCR vocabulary) loses
    # words: they are counted as missing, never scored against another word's map
    chars = char_tokenizer()
    ocr = gc.load(tiny_ved(len(chars)), tokenizer=chars, processor=ved.adapter.processor)
    records = list(caption_records(ocr, samples[:1], method="attention", max_new_tokens=3))
    assert any(h.get("missing") for h in records[0]["reference"])
