"""`groundcam train vlm`: a tiny LLaVA trained on shapes captions and referring questions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

import groundcam as gc
from groundcam.cli import main
from groundcam.data.shapes import COLOURS, SHAPES, SIZES, generate_scene
from groundcam.data.shapes_captions import left_to_right
from groundcam.train import vlm_shapes
from groundcam.train.vlm_shapes import (
    IGNORE,
    TrainConfig,
    answer_loss,
    build_model,
    encode,
    questions,
    row,
    train,
)

TINY = dict(
    steps=8,
    batch_size=4,
    pool=6,
    scene_size=64,
    image_size=32,
    patch_size=8,
    vision_hidden=16,
    vision_layers=1,
    hidden=16,
    layers=1,
    heads=2,
    warmup=2,
    val_scenes=2,
    eval_every=4,
    save_every=4,
)


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_questions_name_one_object_and_answer_it() -> None:
    for i in range(20):
        sample = generate_scene("train", i, 0, 128)
        objects = sample.meta["objects"]
        for prompt, answer in questions(sample):
            words = prompt.rstrip("?").split()
            named = [o for o in objects if all(w not in words for w in _other_attrs(o))]
            named = [o for o in named if any(w in words for w in (o["colour"], o["shape"]))]
            if prompt.startswith("Where"):
                (o,) = [p for p in objects if f"{p['colour']} {p['shape']}" in prompt]
                x = (o["box"][0] + o["box"][2]) / 2 / 128
                assert answer == ("left" if x < 1 / 3 else "right" if x > 2 / 3 else "middle")
            else:
                assert answer in (*COLOURS, *SHAPES, *SIZES)
                assert any(answer in (o["colour"], o["shape"], o["size"]) for o in named)


def _other_attrs(o: dict) -> list[str]:
    return [c for c in COLOURS if c != o["colour"]] + [s for s in SHAPES if s != o["shape"]]


def test_labels_are_the_answer_words_and_eos_only() -> None:
    cfg = TrainConfig(out="unused", **TINY)
    model, processor = build_model(cfg)
    samples = [generate_scene("train", i, 0, 64) for i in range(3)]
    rows = [("Describe the image.", left_to_right(samples[0]).caption), *questions(samples[1])[:1]]
    rows.append(("What colour is the star?", "red"))
    batch = encode(processor, [s.image for s in samples], rows)
    tok = processor.tokenizer
    for i, (_, answer) in enumerate(rows):
        kept = tok.convert_ids_to_tokens(batch["input_ids"][i][batch["labels"][i] != IGNORE])
        assert kept == [*tok.tokenize(answer), "</s>"]
    assert "<unk>" not in tok.tokenize(left_to_right(samples[0]).caption + " what ? where")
    # the image tokens are one grid of (32/8)^2 (+ CLS under the "default" strategy: dropped)
    image_id = model.config.image_token_index
    assert int((batch["input_ids"][0] == image_id).sum()) == 16


def test_rows_mix_captions_and_questions_by_share() -> None:
    rng = np.random.default_rng(0)
    sample = generate_scene("train", 3, 0, 128)
    prompts = [row(sample, rng, 0.25)[0] for _ in range(400)]
    share = prompts.count("Describe the image.") / len(prompts)
    assert 0.18 < share < 0.33


def test_loss_falls_on_a_fixed_batch() -> None:
    cfg = TrainConfig(out="unused", **TINY)
    model, processor = build_model(cfg)
    samples = [generate_scene("train", i, 0, 64) for i in range(4)]
    rng = np.random.default_rng(0)
    batch = encode(processor, [s.image for s in samples], [row(s, rng, 0.5) for s in samples])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = answer_loss(model, batch)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.25 * losses[0], losses


def test_train_saves_a_model_that_loads_and_explains(tmp_path) -> None:
    result = run(
        "train", "vlm", "--out", tmp_path / "run", "--threads", 1,
        *[x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", v)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "model"
    assert (final / "model.safetensors").is_file()
    assert (final / "model.safetensors").stat().st_size < 10 * 2**20
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [4, 8]
    assert {"loss", "answer_cross_entropy"} <= log[0].keys()
    assert {"bleu4", "cider_d", "answers"} <= log[-1]["val"].keys()
    explainer = gc.load(str(final))
    assert explainer.family == "llava"
    scene = generate_scene("test", 0, 0, 64)
    out = explainer.explain_generation(scene.image, max_new_tokens=4)
    assert out.maps.shape[0] == len(out.tokens) > 0
    assert torch.isfinite(out.maps).all()
    loaded = LlavaForConditionalGeneration.from_pretrained(final, trust_remote_code=False)
    assert loaded.config.vision_config.image_size == 32
    # saved as the default length, so a caption is not cut at transformers' 20 tokens
    assert loaded.generation_config.max_new_tokens == vlm_shapes.MAX_ANSWER


def test_a_killed_run_resumes_to_identical_weights(tmp_path, monkeypatch) -> None:
    straight = train(TrainConfig(out=str(tmp_path / "a"), **TINY), threads=1)
    real, calls = vlm_shapes.answer_loss, {"n": 0}

    def crash_on_sixth(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(vlm_shapes, "answer_loss", crash_on_sixth)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "b"), **TINY), threads=1)
    monkeypatch.setattr(vlm_shapes, "answer_loss", real)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4
    resumed = train(TrainConfig(out=str(tmp_path / "b"), **TINY), threads=1)
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--image-size", 60], "--image-size 60 is not a multiple of --patch-size 8"),
        (["--hidden", 30], "--hidden 30 is not a multiple of --heads 4"),
        (["--batch-size", 5, "--grad-accum", 2], "--batch-size 5 is not a multiple"),
        (["--caption-share", 2], "--caption-share"),
        (["--scene-size", 20], "--scene-size"),
    ],
)
def test_bad_options_are_one_line(tmp_path, args, expected) -> None:
    result = run("train", "vlm", "--out", tmp_path / "run", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_builtin_vlm_is_small_and_describes_fresh_scenes() -> None:
    """Recomputed on 16 fresh val scenes (seed 5; the card's figures are on `test`): BLEU-4 far
    above the best constant caption (about 0.23), through the library's own caption evaluation."""
    from groundcam.eval.caption_pointing import caption_records, shapes_samples, summarize_captions
    from groundcam.zoo import ZOO

    folder = ZOO / "vlm-tiny-shapes"
    assert (folder / "model.safetensors").stat().st_size < 10 * 2**20
    assert "groundcam train vlm --out runs/vlm-tiny-shapes" in (folder / "README.md").read_text()
    model = gc.load("vlm-tiny-shapes")
    records = list(caption_records(model, shapes_samples("val", 16, seed=5), method="attention"))
    assert summarize_captions(records)["captions"]["bleu4"] > 0.35


def test_out_that_is_a_file_and_a_changed_configuration_are_one_line(tmp_path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    result = run("train", "vlm", "--out", a_file)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"--out {a_file} exists and is not a directory" in result.output
    tiny = [x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", v)]
    out = tmp_path / "run"
    assert run("train", "vlm", "--out", out, "--threads", 1, *tiny).exit_code == 0
    result = run("train", "vlm", "--out", out, "--threads", 1, *tiny, "--lr", 0.5)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    (error,) = [x for x in result.output.splitlines() if "error" in x]
    assert "written with another configuration" in error and "lr was 0.001, now 0.5" in error
