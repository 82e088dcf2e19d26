"""The command line's inputs: bad ones are one line (exit 2) naming what was wrong; --out, --json,
--device, --cmap/--alpha, folders and globs of images, per-dataset eval options and help."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flickr_like import write_flickr_like
from PIL import Image

from groundcam.cli import main
from groundcam.eval.datasets import DATASETS
from groundcam.explanation import Explanation, GenerationExplanation


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r, *needles, stdout=""):
    """Exit 2, stderr exactly one `groundcam: error:` line holding every needle, no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("groundcam: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in r.output
    if stdout is not None:
        assert r.stdout == stdout
    return lines[0]


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("a file, not a directory")
    return path


def bomb_png(path, side=100_000):
    """A valid 8x8 PNG whose IHDR claims side x side pixels (CRC fixed): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def glyph_image(path):
    from groundcam.data.glyphs import render_line

    render_line("test", 0).image.save(path)
    return path


# ----------------------------------------------------------------------------- --out is a file


@pytest.mark.parametrize(
    "command",
    [
        ["explain", "{image}", "a dog"],
        ["caption", "{image}", "--model", "trocr-tiny-glyphs"],
        ["demo"],
        ["eval", "shapes"],
        ["eval", "flickr30k-entities", "--root", "{tmp}"],
        ["eval", "glyphs"],
        ["sweep-layers", "shapes"],
        ["train", "albef"],
        ["train", "trocr"],
    ],
)
def test_out_that_is_a_file_is_one_line(command, image_file, a_file, tmp_path):
    args = [a.format(image=image_file, tmp=tmp_path) for a in command]
    r = run(*args, "--out", a_file)
    one_error_line(r, f"--out {a_file} exists and is not a directory")
    assert a_file.read_text() == "a file, not a directory"


# ----------------------------------------------------------------------------- unreadable images


def test_decompression_bomb_is_one_line(tmp_path, tiny_model_dir):
    bomb = bomb_png(tmp_path / "bomb.png")
    r = run("explain", bomb, "a dog", "--model", tiny_model_dir, "--out", tmp_path / "o")
    one_error_line(r, str(bomb))
    r = run("caption", bomb, "--model", "trocr-tiny-glyphs", "--out", tmp_path / "c")
    one_error_line(r, str(bomb))


def test_an_unreadable_image_of_a_folder_is_one_line_after_the_others(
    tmp_path, tiny_model_dir, image_file
):
    folder = tmp_path / "shots"
    folder.mkdir()
    bomb_png(folder / "b_bomb.png")
    Image.open(image_file).save(folder / "a_fine.png")
    (folder / "c_text.png").write_text("not an image")
    out = tmp_path / "o"
    args = ["explain", folder, "a red circle", "--model", tiny_model_dir, "--out", out]
    r = run(*args)
    one_error_line(r, "2 of 3 images could not be read", str(folder / "b_bomb.png"), stdout=None)
    assert f"; 1 written to {out}" in r.stderr
    assert [p.name for p in out.iterdir()] == ["a_fine"]
    assert (out / "a_fine" / "meta.json").is_file()
    r = run(*args, "--json")
    one_error_line(r, "2 of 3 images could not be read", stdout=None)
    doc = json.loads(r.stdout)
    assert [x["image"] for x in doc["results"]] == [str(folder / "a_fine.png")]
    assert [x["image"] for x in doc["errors"]] == [
        str(folder / n) for n in ("b_bomb.png", "c_text.png")
    ]
    assert "cannot read image" in doc["errors"][1]["error"]


def test_decompression_bomb_from_the_real_entry_point(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    p = subprocess.run(
        [sys.executable, "-m", "groundcam", "explain", str(bomb), "a cat", "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groundcam: error: ") and str(bomb) in lines[0]


# ----------------------------------------------------------------------------- empty / zero input


def test_flickr_split_file_without_ids_is_refused(tmp_path):
    root = write_flickr_like(tmp_path / "f30k", 2)
    (root / "test.txt").write_text("\n\n")
    for command in (["eval"], ["sweep-layers"]):
        args = [*command, "flickr30k-entities", "--root", root, "--split", "test"]
        r = run(*args, "--out", tmp_path / "o")
        one_error_line(r, "'test' is empty", str(root / "test.txt"), "no image ids")
    assert not (tmp_path / "o").exists()


def test_flickr_split_whose_images_all_fail_is_refused(tmp_path):
    root = write_flickr_like(tmp_path / "f30k", 2)
    for xml in (root / "Annotations").iterdir():
        xml.unlink()
    r = run("eval", "flickr30k-entities", "--root", root, "--out", tmp_path / "o")
    one_error_line(r, "'test' is empty", "no image to score", "2 reader problem(s)")


def test_flickr_split_without_phrases_is_refused(tmp_path):
    root = write_flickr_like(tmp_path / "f30k", 2)
    for txt in (root / "Sentences").iterdir():
        txt.write_text("A caption that mentions no annotated phrase .\n")
    r = run("eval", "flickr30k-entities", "--root", root, "--out", tmp_path / "o")
    one_error_line(r, "'test' is empty", "2 image(s) but no phrase")


def test_refcoco_split_without_refs_is_refused(tmp_path):
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([], protocol=2))
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": []}')
    r = run("eval", "refcoco+", "--root", tmp_path, "--images", tmp_path, "--out", tmp_path / "o")
    one_error_line(r, "refcoco+ split 'testA' is empty")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["eval", "shapes", "--report", "--examples", "-1"], "--examples"),
        (["eval", "shapes", "--steps", "0"], "--steps"),
        (["eval", "shapes", "--scenes", "0"], "--scenes"),
        (["eval", "flickr30k-entities", "--limit", "0"], "--limit"),
        (["eval", "shapes", "--batch-images", "0"], "--batch-images"),
        (["sweep-layers", "shapes", "--steps", "0"], "--steps"),
        (["train", "albef", "--steps", "0"], "--steps"),
        (["train", "trocr", "--steps", "0"], "--steps"),
        (["train", "albef", "--batch-size", "0"], "--batch-size"),
        (["eval", "glyphs", "--lines", "0"], "--lines"),
        (["eval", "shapes", "--protocol", "nope"], "--protocol"),
        (["eval", "shapes", "--root", "x"], "--root"),  # shapes reads no files
        (["eval", "flickr30k-entities", "--scenes", "3"], "--scenes"),
        (["sweep-layers", "shapes", "--layer", "1"], "--layer"),
    ],
)
def test_out_of_range_and_foreign_options_are_one_line(args, option, tmp_path):
    r = run(*args, "--out", tmp_path / "o")
    line = one_error_line(r, option)
    assert f"'groundcam {' '.join(args[:2])} --help'" in line or args[0] == "train"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text", ["", "   "])
def test_caption_empty_text_is_refused(text, tmp_path):
    image = glyph_image(tmp_path / "line.png")
    r = run("caption", image, "--model", "trocr-tiny-glyphs", "--text", text, "--out", tmp_path)
    one_error_line(r, "--text is empty")


def test_dets_without_albef_boxes_is_refused(tmp_path):
    dets = tmp_path / "dets.json"
    dets.write_text("{}")
    r = run("eval", "shapes", "--dets", dets, "--out", tmp_path / "o")
    one_error_line(r, "--dets is only used by --protocol albef-boxes", "--protocol amc")


# ----------------------------------------------------------------------------- --device


def test_device_cpu_works(tiny_model_dir, image_file, tmp_path):
    out = tmp_path / "o"
    r = run(*r_args(image_file, tiny_model_dir, out), "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (out / "meta.json").is_file()


def r_args(image, model, out):
    return ["explain", image, "a dog", "--model", model, "--out", out]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "command",
    [
        ["explain", "{image}", "a dog"],
        ["caption", "{image}", "--model", "trocr-tiny-glyphs"],
        ["demo"],
        ["eval", "shapes"],
        ["eval", "glyphs"],
        ["sweep-layers", "shapes"],
    ],
)
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_missing_cuda_is_one_line(command, device, image_file, tmp_path):
    args = [a.format(image=image_file) for a in command]
    r = run(*args, "--device", device, "--out", tmp_path / "o")
    one_error_line(r, f"--device {device}: CUDA is not available")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("device", "message"), [("tpu9", "not a device"), ("meta", "unsupported")])
def test_unknown_device_is_one_line(device, message, image_file, tmp_path):
    r = run("explain", image_file, "a dog", "--device", device, "--out", tmp_path / "o")
    one_error_line(r, f"--device {device}", message)


# ----------------------------------------------------------------------------- --cmap / --alpha


def spy_on_save(monkeypatch, cls):
    calls = []
    real = cls.save

    def save(self, directory, **kwargs):
        calls.append(kwargs)
        return real(self, directory, **kwargs)

    monkeypatch.setattr(cls, "save", save)
    return calls


def test_cmap_and_alpha_reach_the_overlays(tiny_model_dir, image_file, tmp_path, monkeypatch):
    calls = spy_on_save(monkeypatch, Explanation)
    plain, styled = tmp_path / "plain", tmp_path / "styled"
    assert run(*r_args(image_file, tiny_model_dir, plain)).exit_code == 0
    r = run(*r_args(image_file, tiny_model_dir, styled), "--cmap", "viridis", "--alpha", "0.25")
    assert r.exit_code == 0, r.output
    assert calls == [{}, {"cmap": "viridis", "alpha": 0.25}]  # the defaults stay the library's
    (a,), (b,) = plain.glob("000_*.png"), styled.glob("000_*.png")
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_caption_takes_cmap_and_alpha(tmp_path, monkeypatch):
    calls = spy_on_save(monkeypatch, GenerationExplanation)
    image = glyph_image(tmp_path / "line.png")
    out = tmp_path / "o"
    args = ["caption", image, "--model", "trocr-tiny-glyphs", "--text", "ab", "--out", out]
    r = run(*args, "--cmap", "magma", "--alpha", "1")
    assert r.exit_code == 0, r.output
    assert calls == [{"cmap": "magma", "alpha": 1.0}]
    assert len(list(out.glob("00[01]_*.png"))) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--cmap", "rainbowz"], "--cmap 'rainbowz'"), (["--alpha", "1.5"], "--alpha")],
)
def test_bad_cmap_or_alpha_is_one_line(args, needle, image_file, tmp_path):
    r = run("explain", image_file, "a dog", *args, "--out", tmp_path / "o")
    one_error_line(r, needle)


# ----------------------------------------------------------------------------- folders and globs


@pytest.fixture()
def shots(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name, size in (("first.png", (40, 56)), ("second.jpg", (64, 48))):
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def count_loads(monkeypatch):
    import groundcam.api

    calls = []
    real = groundcam.api.load

    def load(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(groundcam.api, "load", load)
    return calls


def test_a_folder_of_two_images_gives_two_subfolders(shots, tiny_model_dir, tmp_path, monkeypatch):
    calls = count_loads(monkeypatch)
    out = tmp_path / "o"
    r = run("explain", shots, "the red circle", "a star", "--model", tiny_model_dir, "--out", out)
    assert r.exit_code == 0, r.output
    assert len(calls) == 1  # the model is loaded once for every image
    assert sorted(p.name for p in out.iterdir()) == ["first", "second"]
    for name in ("first", "second"):
        meta = json.loads((out / name / "meta.json").read_text())
        assert meta["phrases"] == ["the red circle", "a star"]
        assert len(list((out / name).glob("*.png"))) == 2
        assert f"to {out / name}" in r.stdout


def test_a_glob_of_images(shots, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    r = run("explain", shots / "*.jpg", "a star", "--model", tiny_model_dir, "--out", out)
    assert r.exit_code == 0, r.output
    assert [p.name for p in out.iterdir()] == ["second"]


def test_caption_on_a_folder(tmp_path, monkeypatch):
    folder = tmp_path / "lines"
    folder.mkdir()
    glyph_image(folder / "one.png")
    glyph_image(folder / "two.png")
    calls = count_loads(monkeypatch)
    out = tmp_path / "o"
    r = run("caption", folder, "--model", "trocr-tiny-glyphs", "--text", "ab", "--out", out)
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]
    assert all((out / n / "tokens.png").is_file() for n in ("one", "two"))


@pytest.mark.parametrize(
    ("image", "needle"),
    [
        ("{empty}", "holds no images"),
        ("{empty}/*.png", "no image file matches"),
        ("{clash}", "share the name 'x'"),
    ],
)
def test_folders_and_globs_without_images_are_one_line(image, needle, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "clash").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "clash" / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "clash" / "x.jpg")
    image = image.format(empty=tmp_path / "empty", clash=tmp_path / "clash")
    r = run("explain", image, "a dog", "--out", tmp_path / "o")
    one_error_line(r, needle)


def test_a_shell_expanded_glob_is_caught(shots, tmp_path):
    r = run("explain", shots / "first.png", shots / "second.jpg", "--out", tmp_path / "o")
    one_error_line(r, "is an image file", "quote a glob")


# ----------------------------------------------------------------------------- --json


def test_explain_json_matches_meta(tiny_model_dir, image_file, tmp_path):
    out = tmp_path / "o"
    r = run(*r_args(image_file, tiny_model_dir, out), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # stdout is the JSON and nothing else
    assert doc["out"] == str(out) and doc["model"] == str(tiny_model_dir)
    (result,) = doc["results"]
    assert result["image"] == str(image_file) and result["out"] == str(out)
    meta = json.loads((out / "meta.json").read_text())
    assert {k: v for k, v in result.items() if k not in ("image", "out", "files")} == meta
    assert result["phrases"] == ["a dog"] and len(result["scores"]) == 1
    on_disk = sorted(str(p) for p in out.iterdir())
    assert sorted(result["files"]) == on_disk and len(on_disk) == 3  # png, npz, json


def test_explain_json_on_a_folder(shots, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    r = run("explain", shots, "a dog", "--model", tiny_model_dir, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [x["out"] for x in doc["results"]] == [str(out / "first"), str(out / "second")]
    for x in doc["results"]:
        assert x["scores"] == json.loads((out / x["out"] / "meta.json").read_text())["scores"]
        assert all(p.startswith(x["out"]) for p in x["files"])


def test_caption_json_matches_meta(tmp_path):
    image = glyph_image(tmp_path / "line.png")
    out = tmp_path / "o"
    args = ["caption", image, "--model", "trocr-tiny-glyphs", "--text", "ab3", "--out", out]
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    (result,) = json.loads(r.stdout)["results"]
    meta = json.loads((out / "meta.json").read_text())
    assert {k: v for k, v in result.items() if k not in ("image", "out", "files")} == meta
    assert result["tokens"] == ["a", "b", "3"] and result["text"] == "ab3"
    assert str(out / "tokens.png") in result["files"] and len(result["files"]) == 6


# ----------------------------------------------------------------------------- warnings


def test_warnings_are_one_line(tiny_model_dir, image_file, tmp_path, monkeypatch):
    import groundcam.io
    from groundcam.errors import GroundcamWarning

    real = groundcam.io.read_image

    def read_image(path):
        warnings.warn(
            "most of phrase 'x' is unknown to the tokenizer", GroundcamWarning, stacklevel=2
        )
        return real(path)

    monkeypatch.setattr(groundcam.io, "read_image", read_image)
    before = warnings.showwarning
    # a phrase the model can read: "a dog" would add the warning naming the unknown "dog"
    r = run(
        "explain", image_file, "a red circle", "--model", tiny_model_dir, "--out", tmp_path / "o"
    )
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [
        "groundcam: warning: most of phrase 'x' is unknown to the tokenizer"
    ]
    assert warnings.showwarning is before  # only the command line formats them so


# ----------------------------------------------------------------------------- help


DATASET_COMMANDS = ["flickr30k-entities", "refcoco", "refcoco+", "refcocog", "shapes"]


@pytest.mark.parametrize("group", ["eval", "sweep-layers"])
@pytest.mark.parametrize("dataset", DATASET_COMMANDS)
def test_dataset_help_describes_the_dataset_and_only_its_options(group, dataset):
    r = run(group, dataset, "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "Splits:" in text and "--dets" in text and "albef-boxes" in text
    for option in ("--model", "--method", "--protocol", "--device", "--out", "--split"):
        assert option in text
    reads_files = ("--root", "--images", "--limit")
    generated = ("--scenes", "--seed")
    if dataset == "shapes":
        assert "no files" in text
        assert all(o not in text for o in reads_files) and all(o in text for o in generated)
    else:
        assert all(o in text for o in reads_files) and all(o not in text for o in generated)
    if dataset == "flickr30k-entities":
        assert "Annotations/" in text and "Sentences/" in text and "test.txt" in text
    if dataset in ("refcoco", "refcoco+"):
        assert "refs(unc).p" in text and "instances.json" in text and "train2014" in text
    if dataset == "refcocog":
        assert "refs(umd).p" in text
    default = "val" if group == "sweep-layers" else DATASETS[dataset].default_split
    assert f"(default {default})" in text
    assert ("--layers" in text) == (group == "sweep-layers")
    assert ("--report" in text) == (group == "eval")


def test_eval_and_sweep_list_every_dataset_with_a_description():
    for group in ("eval", "sweep-layers"):
        r = run(group, "--help")
        assert r.exit_code == 0
        for dataset in DATASET_COMMANDS + (["glyphs"] if group == "eval" else []):
            (line,) = [x for x in r.output.splitlines() if x.strip().startswith(dataset + " ")]
            assert len(line.split()) > 2, line  # a name and a description


def test_protocol_choices_are_the_library_protocols():
    from groundcam.eval.pointing import PROTOCOLS

    r = run("eval", "shapes", "--help")
    assert "[amc|mg|torchray|albef-boxes]" in r.output.replace("\n", "").replace(" ", "")
    assert list(PROTOCOLS) == ["amc", "mg", "torchray", "albef-boxes"]


# ----------------------------------------------------------------------------- demo


def test_demo_runs_every_method_on_the_builtin_model(tmp_path):
    from groundcam.api import families
    from groundcam.demo import CAPTIONERS, DEMO_METHODS

    METHODS = families()["albef"]  # every method of a phrase family (not the VLM-only ones)
    assert sorted(DEMO_METHODS) == sorted(METHODS)
    out = tmp_path / "demo"
    r = run("demo", "--scenes", "1", "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(k for k in summary if k not in CAPTIONERS) == sorted(METHODS)
    assert summary["relevance"]["n"] > 0
    assert (out / "figures" / "scene0.png").is_file()  # every method a column of it
    assert "relevance" in (out / "index.html").read_text()
    assert "pointing accuracy    relevance" in r.stdout


# ----------------------------------------------------------------------------- family defaults


def test_caption_leaves_method_and_length_to_the_library(tmp_path, monkeypatch):
    from groundcam.explainer import Explainer

    calls = []
    real = Explainer.explain_generation

    def explain_generation(self, image, **kwargs):
        calls.append(kwargs)
        return real(self, image, **kwargs)

    monkeypatch.setattr(Explainer, "explain_generation", explain_generation)
    image = glyph_image(tmp_path / "line.png")
    base = ["caption", image, "--model", "trocr-tiny-glyphs", "--out", tmp_path / "o"]
    assert run(*base).exit_code == 0
    r = run(*base, "--method", "gradcam", "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    assert calls == [
        {"layer": None, "text": None},
        {"layer": None, "text": None, "method": "gradcam", "max_new_tokens": 3},
    ]


def test_eval_glyphs_records_the_family_default_method(tmp_path):
    from groundcam.api import load

    out = tmp_path / "o"
    r = run("eval", "glyphs", "--lines", "1", "--out", out)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == load("trocr-tiny-glyphs").default_method("token") == "attention"
