"""The command line: outputs where it says, and one clear line (exit 2) on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from groundcam.cli import main
from groundcam.demo import DEMO_METHODS


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_models_lists_builtins_and_families():
    r = run("models")
    assert r.exit_code == 0
    assert "albef-tiny-shapes" in r.output
    assert "attn-gradcam" in r.output and "rollout" in r.output


def test_explain_writes_overlays_maps_and_meta(tiny_model_dir, image_file, tmp_path):
    out = tmp_path / "out"
    r = run(
        "explain",
        image_file,
        "the red circle",
        "the blue star",
        "--model",
        tiny_model_dir,
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    assert f"to {out}" in r.output
    assert len(list(out.glob("*.png"))) == 2
    assert json.loads((out / "meta.json").read_text())["method"] == "attn-gradcam"
    assert np.load(out / "maps.npz")["maps"].shape == (2, 4, 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png", "a dog"], "image not found: missing.png"),
        (["{image}"], "no phrases given"),
        (["{image}", "a dog", "--method", "lime"], "unknown method 'lime'"),
        (["{image}", "a dog", "--layer", "7"], "layer 7 is not a cross-attention layer"),
        (["{image}", "a dog", "--model", "nope/none"], "unknown model 'nope/none'"),
        (["{text}", "a dog"], "cannot read image"),
    ],
)
def test_explain_bad_input_is_one_line(tiny_model_dir, image_file, tmp_path, args, message):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    args = [a.format(image=image_file, text=text) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    r = run("explain", *args, "--out", tmp_path / "o")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groundcam: error: ") and message in lines[0]


def test_bad_input_from_the_real_entry_point_has_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "groundcam.cli", "explain", str(tmp_path / "x.jpg"), "a cat"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip() == f"groundcam: error: image not found: {tmp_path / 'x.jpg'}"


def test_eval_shapes_writes_summary_and_records(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    r = run(
        "eval", "shapes", "--split", "val", "--scenes", "3", "--model", tiny_model_dir, "--out", out
    )
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    records = (out / "results.jsonl").read_text().splitlines()
    assert summary["n"] == len(records) > 0
    config = summary["config"]
    assert config["method"] == "attn-gradcam" and config["layer"] == 1
    assert config["model"] == str(tiny_model_dir) and config["splits"] == ["val"]
    hits = sum(json.loads(r)["hit"] for r in records)
    assert summary["accuracy"] == hits / len(records)
    assert f"(n={len(records)})" in r.output


def test_demo_writes_a_self_contained_page(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--model", tiny_model_dir, "--scenes", "1", "--out", out)
    assert r.exit_code == 0, r.output
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    summary = json.loads((out / "summary.json").read_text())
    n_phrases = summary["attn-gradcam"]["n"]
    # one figure of the scene (a row per phrase, a column per method); each built-in captioning
    # model's section (the captioner, the generative VLM): its per-word figure and the figure of
    # its object words
    heads = html.split("<figcaption>columns: ", 1)[1].split("</figcaption>", 1)[0].split(", ")
    assert n_phrases > 0 and [h.split(" ")[0] for h in heads] == ["image", *DEMO_METHODS]
    n_words = summary["captioner-tiny-shapes"]["attention"]["n"]
    assert n_words == summary["captioner-tiny-shapes"]["gradcam"]["n"] > 0
    n_vlm = summary["vlm-tiny-shapes"]["attn-gradcam"]["n"]
    assert n_vlm == summary["vlm-tiny-shapes"]["attention"]["n"] > 0
    assert html.count("<img") == html.count('class="cell wide"') == 5
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["scene0.png", "scene0_captioner_objects.png", "scene0_captioner_words.png"]
    vlm = sorted(p.name for p in (out / "figures" / "vlm-tiny-shapes").glob("*.png"))
    assert vlm == ["scene0_captioner_objects.png", "scene0_captioner_words.png"]
    assert "pointing accuracy" in r.output and str(out / "index.html") in r.output
    assert "captioner-tiny-shapes word pointing" in r.output and "captioner-tiny-shapes on" in html
    assert "vlm-tiny-shapes word pointing" in r.output and "vlm-tiny-shapes on" in html


def test_train_refuses_to_mix_configurations(tmp_path):
    import torch

    torch.save(
        {"config": {"lr": 1.0}, "model": {}, "optim": {}, "step": 0}, tmp_path / "checkpoint.pt"
    )
    r = run(
        "train",
        "albef",
        "--out",
        tmp_path,
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--pool",
        "8",
        "--threads",
        "1",
    )
    assert r.exit_code == 2
    assert "another configuration" in r.output
