"""The methods table (issue 19 item 6): the best-only-where-separated rule, token deletion and
insertion curves, and a tiny end-to-end run of the table and the script's merge."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import groundcam as gc
from groundcam.data.shapes import generate_scene
from groundcam.eval.faithfulness import token_curves
from groundcam.eval.methods_table import best_method, markdown, model_table
from groundcam.eval.summary import accuracy_block

ROOT = Path(__file__).resolve().parents[1]


def rows(**blocks: tuple[int, int]) -> dict:
    return {m: {"pointing": accuracy_block(h, n)} for m, (h, n) in blocks.items()}


def test_best_is_named_only_where_its_interval_clears_the_next():
    # 90/100 [82.6, 94.5] against 60/100 [50.2, 69.1]: separated
    assert best_method(rows(a=(60, 100), b=(90, 100))) == {"best": "b", "tied": []}
    # 55/100 [45.2, 64.4] overlaps 60/100: tied, the top first
    assert best_method(rows(a=(60, 100), b=(55, 100), c=(5, 100))) == {
        "best": None,
        "tied": ["a", "b"],
    }


def test_separation_uses_the_intervals_not_the_accuracies():
    # 9/10 against 5/10: 40 points apart, but [59.6, 98.2] and [23.7, 76.3] overlap
    assert best_method(rows(a=(9, 10), b=(5, 10))) == {"best": None, "tied": ["a", "b"]}
    # the same rates on 200 each separate
    assert best_method(rows(a=(180, 200), b=(100, 200))) == {"best": "a", "tied": []}


def test_every_method_overlapping_the_top_is_tied_even_past_a_gap():
    # c overlaps a though b (between them) does too; d does not
    out = best_method(rows(a=(70, 100), b=(65, 100), c=(62, 100), d=(20, 100)))
    assert out == {"best": None, "tied": ["a", "b", "c"]}


def test_one_method_or_empty_methods():
    assert best_method(rows(a=(3, 10))) == {"best": "a", "tied": []}
    assert best_method(rows(a=(0, 0), b=(4, 10))) == {"best": "b", "tied": []}
    assert best_method(rows(a=(0, 0))) == {"best": None, "tied": []}


@pytest.mark.parametrize("name", ["captioner-tiny-shapes", "trocr-tiny-glyphs", "vlm-tiny-shapes"])
def test_token_curves_end_where_the_explanation_scored_the_token(name):
    """Nothing removed (deletion step 0) and everything added back (insertion's last step) is
    the unchanged image: the token's probability there is the explanation's own score."""
    explainer = gc.load(name)
    image = generate_scene("test", 0, 0).image
    if name == "trocr-tiny-glyphs":
        from groundcam.data.glyphs import render_line

        image = render_line("test", 0, 0).image
    gen = explainer.explain_generation(image, method="attention", max_new_tokens=8)
    assert len(gen) >= 2
    curves = token_curves(explainer, image, gen, [0, len(gen) - 1], steps=4)
    for c, k in zip(curves, [0, len(gen) - 1], strict=True):
        assert len(c.deletion) == len(c.insertion) == 5
        assert c.deletion[0] == pytest.approx(float(gen.scores[k]), abs=1e-5)
        assert c.insertion[-1] == pytest.approx(float(gen.scores[k]), abs=1e-5)
        assert 0 <= c.deletion_auc <= 1 and 0 <= c.insertion_auc <= 1
        assert c.deletion[-1] == pytest.approx(c.insertion[0], abs=1e-5)  # both: no image
    assert token_curves(explainer, image, gen, []) == []


def test_token_curves_refuse_a_family_that_writes_nothing():
    explainer = gc.load("albef-tiny-shapes")
    with pytest.raises(ValueError, match="does not generate text"):
        token_curves(explainer, generate_scene("test", 0, 0).image, None, [0])


def test_a_tiny_table_end_to_end():
    explainer = gc.load("captioner-tiny-shapes")
    t = model_table(explainer, scenes=2, faith=1, sanity_scenes=1, steps=4)
    assert t["protocol"] == "word pointing" and t["default"] == "attention"
    assert set(t["methods"]) == {"attention", "gradcam"}
    for r in t["methods"].values():
        p = r["pointing"]
        assert p["n"] > 0 and p["accuracy"] == p["hits"] / p["n"]
        assert p["ci95"][0] <= p["accuracy"] <= p["ci95"][1]
        assert 0 <= r["Obj-IoU"] <= 1 and 0 <= r["Func-IoU"] <= 1
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
        assert 0 < r["faithfulness_n"] <= p["n"]  # the first scene's words only
        assert r["sanity"]["verdict"] in {"passes", "flagged"}
        assert r["seconds_per_map"] > 0
    # the supervised captioner's attention finds its words; its gradcam does not
    a, g = t["methods"]["attention"]["pointing"], t["methods"]["gradcam"]["pointing"]
    assert a["accuracy"] > g["accuracy"]
    assert t == t | best_method(t["methods"])
    text = markdown({"models": {"captioner-tiny-shapes": t}})
    assert text.count("\n") == 4 and "**`attention`** (default)" in text and "| best |" in text


def test_the_script_merges_one_model_into_the_table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "methods_table_script", ROOT / "benchmarks" / "methods_table.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    other = {"protocol": "glyph pointing", "methods": {}, "best": None, "tied": [], "default": "x"}
    out.write_text(json.dumps({"models": {"someone-else": other}}))
    argv = ["m", "--models", "trocr-tiny-glyphs", "--scenes", "1", "--faithfulness-scenes", "1"]
    argv += ["--sanity-scenes", "0", "--steps", "2", "--json", str(out), "--markdown", str(md)]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)
    table = json.loads(out.read_text())
    assert list(table["models"]) == ["trocr-tiny-glyphs", "someone-else"]  # built-ins first
    assert table["models"]["someone-else"] == other
    assert set(table["models"]["trocr-tiny-glyphs"]["methods"]) == {
        "attention",
        "attn-gradcam",
        "gradcam",
        "relevance",
        "rollout",
    }
    assert "`trocr-tiny-glyphs`" in md.read_text()


def test_the_methods_page_shows_the_table_the_benchmark_wrote(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "methods_table_hook", ROOT / "docs" / "hooks" / "methods_table.py"
    )
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = (ROOT / "docs" / "concepts" / "methods.md").read_text()
    assert hook.MARKER in page
    table = tmp_path / "methods_table.md"
    table.write_text("| model | method |\n|---|---|\n| `m` | `attention` |\n")
    monkeypatch.setattr(hook, "TABLE", table)
    shown = hook.on_page_markdown(page)
    assert hook.MARKER not in shown and "| `m` | `attention` |" in shown
    monkeypatch.setattr(hook, "TABLE", tmp_path / "missing.md")
    assert "benchmarks/methods_table.py" in hook.on_page_markdown(hook.MARKER)


def test_the_family_defaults_follow_the_committed_table():
    """Where the table names a best method the built-in's default is that method; where methods
    tie, the default is one of them."""
    table = json.loads((ROOT / "benchmarks" / "results" / "methods_table.json").read_text())
    assert set(table["models"]) == {
        "albef-tiny-shapes-amc",
        "captioner-tiny-shapes",
        "trocr-tiny-glyphs",
        "vlm-tiny-shapes",
    }
    for name, t in table["models"].items():
        explainer = gc.load(name)
        default = explainer.default_method("token" if "token" in explainer.targets else None)
        assert default == t["default"], name
        assert default == t["best"] if t["best"] else default in t["tied"], name
