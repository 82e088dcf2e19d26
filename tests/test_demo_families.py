"""`groundcam demo` adapts to the model's family: phrase models (ALBEF, CLIP, SigLIP) with the
methods they define, the captioner with its words, TrOCR with rendered text lines; the default
page shows albef-tiny-shapes-amc beside albef-tiny-shapes."""

from __future__ import annotations

import json
import re
from html import escape

import pytest
from click.testing import CliRunner
from test_blip import make_processor as blip_processor
from test_blip import tiny as tiny_blip
from test_clip import processor_for as clip_processor
from test_clip import tiny_clip
from test_siglip import processor_for as siglip_processor
from test_siglip import tiny_siglip
from tiny import saved
from transformers import BlipForConditionalGeneration

import groundcam as gc
from groundcam.cli import main
from groundcam.data.shapes import generate_scene
from groundcam.demo import BASELINE, CAPTIONERS, LEAD, demo_methods, run_demo
from groundcam.eval.glyphs import glyph_records, summarize_glyphs
from groundcam.eval.pointing import pointing_game

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = gc.families()["albef"]  # every method of a phrase family (not the VLM-only ones)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def demo(model, out):
    """`groundcam demo --model M --scenes 1`: its output, summary.json and page."""
    r = run("demo", "--model", model, "--scenes", "1", "--out", out)
    assert r.exit_code == 0, r.output
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == html.count("<img") > 0
    return r, json.loads((out / "summary.json").read_text()), html


def overlays(out, pattern):
    """The figure files the demo wrote that match `pattern`."""
    return sorted(p.name for p in (out / "figures").glob(pattern))


def columns(html):
    """The column headings of every figure on the page, from their captions."""
    return re.findall(r"<figcaption>columns: (.*?)</figcaption>", html)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-clip")
    return saved(path, tiny_clip(len(tokenizer), seed=1), clip_processor(tokenizer))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-siglip")
    return saved(path, tiny_siglip(len(tokenizer), seed=1), siglip_processor(tokenizer))


def test_methods_are_the_models_own_with_its_default_first(clip_dir, siglip_dir):
    assert demo_methods(gc.load(clip_dir)) == ["gradcam", "attention", "rollout", "relevance"]
    assert demo_methods(gc.load(siglip_dir)) == ["gradcam", "relevance"]
    trocr = gc.load("trocr-tiny-glyphs")
    assert demo_methods(trocr, "token") == [
        "attention", "attn-gradcam", "gradcam", "rollout", "relevance"
    ]  # fmt: skip
    assert demo_methods(gc.load("captioner-tiny-shapes"), "token") == ["attention", "gradcam"]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_dual_encoder_demo_explains_phrases_with_its_methods(
    family, clip_dir, siglip_dir, tmp_path
):
    model = {"clip": clip_dir, "siglip": siglip_dir}[family]
    out = tmp_path / "demo"
    r, summary, html = demo(model, out)
    methods = gc.families()[family]
    assert sorted(k for k in summary if k not in CAPTIONERS) == methods
    assert "attn-gradcam" not in methods
    # one figure of the scene: a column per method; each (phrase, method) scored once, the
    # numbers the pointing game's
    explainer = gc.load(model)
    assert overlays(out, "scene0.png") == ["scene0.png"]
    heads = columns(html)[0].split(", ")
    assert [h.split(" ")[0] for h in heads] == ["image", *demo_methods(explainer)]
    sample = generate_scene("test", 0, 0)
    texts = [p.text for p in sample.phrases]
    for m in methods:
        assert summary[m]["n"] == len(texts)
        ex = explainer.explain(sample.image, texts, method=m)
        hits = sum(
            pointing_game(ex.maps[k], p.boxes, image_size=sample.image.size[::-1]).hit
            for k, p in enumerate(sample.phrases)
        )
        assert summary[m]["accuracy"] == pytest.approx(hits / len(texts))
        assert f"pointing accuracy {m:>12}: " in r.stdout
    assert (
        "the first column is gradcam" in html and "the model&#x27;s image-text similarity" in html
    )
    assert ("image only" in html) == (family == "clip")  # CLIP's attention is the CLS row
    assert "captioner-tiny-shapes on" in html  # the captioner section, as with ALBEF


def test_captioner_demo_captions_and_maps_its_words(tmp_path):
    out = tmp_path / "demo"
    r, summary, html = demo("captioner-tiny-shapes", out)
    assert sorted(summary) == ["attention", "gradcam"]
    n = summary["attention"]["n"]
    assert n == summary["gradcam"]["n"] > 0
    # the per-word figure, then one figure of the object words: a column per method
    assert overlays(out, "*") == ["scene0_captioner_objects.png", "scene0_captioner_words.png"]
    assert html.count("<img") == html.count('class="cell wide"') == 2
    assert columns(html) == ["image, attention (layer 0), gradcam (layer 0)"]
    assert f"({summary['attention']['accuracy'] * n:.0f}/{n} words)" in r.stdout
    assert html.count("<h2>captioner-tiny-shapes on shapes-test-0-0") == 1  # no second copy


def test_any_captioning_family_captions_the_scenes(tokenizer, tmp_path):
    model = tiny_blip(BlipForConditionalGeneration, tokenizer, seed=1)
    path = saved(tmp_path / "blip", model, blip_processor(tokenizer))
    out = tmp_path / "demo"
    r, summary, html = demo(path, out)
    methods = demo_methods(gc.load(path), "token")
    assert methods[0] == "attn-gradcam" and sorted(summary) == sorted(methods)
    objects = overlays(out, "scene0_captioner_objects.png")
    for m in methods:
        n = summary[m]["n"]
        assert len(objects) == (n > 0)  # the object words' figure, when the caption has any
        assert f"pointing accuracy {m:>12}: " in r.stdout and f"/{n} words)" in r.stdout
    assert "<h2>" + escape(f"{path} on shapes-test-0-0") in html


def test_ocr_demo_reads_text_lines_and_maps_each_character(tmp_path):
    out = tmp_path / "demo"
    r, summary, html = demo("trocr-tiny-glyphs", out)
    explainer = gc.load("trocr-tiny-glyphs")
    methods = demo_methods(explainer, "token")
    assert sorted(k for k in summary if k != "char_accuracy") == sorted(methods)
    for m in methods:  # the same rule and numbers as `groundcam eval glyphs` on the same line
        records = list(glyph_records(explainer, "test", 1, method=m))
        want = summarize_glyphs(records)
        assert summary[m]["n"] == want["n_tokens"] > 0
        assert overlays(out, f"line0_{m}.png") == [f"line0_{m}.png"]  # its per-token figure
        assert summary[m]["accuracy"] == pytest.approx(want["token_pointing"])
        assert summary["char_accuracy"] == pytest.approx(want["char_accuracy"])
        assert f"pointing accuracy {m:>12}: " in r.stdout and "tokens)" in r.stdout
    text = records[0]["text"]
    assert escape(f'the line says "{text}"') in html and "--image-height: 48px" in html
    assert "captioner-tiny-shapes" not in html and overlays(out, "scene*") == []


def test_default_demo_shows_amc_beside_its_baseline(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--scenes", "1", "--out", out)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    html = (out / "index.html").read_text()
    phrases = len(generate_scene("test", 0, 0).phrases)
    # one figure per model of every phrase (rows) and method (columns), one under the other
    assert html.count(f'<span class="phrase">{LEAD}</span>') == 1
    assert html.count(f'<span class="phrase">{BASELINE}</span>') == 1
    assert html.index(f">{LEAD}</span>") < html.index(f">{BASELINE}</span>")
    assert overlays(out, "scene0.png") == ["scene0.png"]
    baseline_files = sorted(p.name for p in (out / "figures" / BASELINE).glob("*.png"))
    assert baseline_files == ["scene0.png"]
    for heads in columns(html)[:2]:
        assert sorted(h.split(" ")[0] for h in heads.split(", ")) == sorted(["image", *METHODS])
    assert all(summary[m]["n"] == phrases for m in METHODS)
    # the numbers beside are the baseline's own demo on the same scene
    alone = run_demo(tmp_path / "alone", model=BASELINE, scenes=1)
    lead = run_demo(tmp_path / "lead", model=LEAD, scenes=1)
    for m in METHODS:
        (h, n), (bh, bn) = lead.accuracy[m], alone.accuracy[m]
        assert summary[m] == {"accuracy": h / n, "n": n, BASELINE: {"accuracy": bh / bn, "n": bn}}
        row = re.search(rf"<tr><td>{m}</td><td>(.*?)</td><td>(.*?)</td></tr>", html)
        assert row.groups() == (f"{h / n:.1%} ({h}/{n})", f"{bh / bn:.1%} ({bh}/{bn})")
        assert (
            f"pointing accuracy {m:>12}: {h / n:6.1%} ({h}/{n} phrases); {BASELINE}: " in r.stdout
        )
    assert f"{LEAD}, beside {BASELINE}" in r.stdout and "AMC fine-tuning" in html
    # image-only maps are marked on their figures, not warned about once per scene
    assert "does not read the text" not in r.stderr and "rollout - image only" in html
    assert summary["captioner-tiny-shapes"]["attention"]["n"] > 0  # the captioner stays


@pytest.mark.parametrize("model", ["no-such-model", "{tmp}/missing-dir", ""])
def test_a_model_that_cannot_load_is_one_line_and_writes_nothing(model, tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--model", model.format(tmp=tmp_path), "--out", out)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("groundcam: error: ") and len(r.stderr.splitlines()) == 1
    assert "Traceback" not in r.output and not out.exists()
