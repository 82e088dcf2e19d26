"""Readable reports: sweep-layers names a best layer only when its interval separates from the
next one's, the report's configuration shows only the options that were set, the demo and the
report draw their maps with the paper figures, and `eval captions --report` writes the page."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import groundcam as gc
import groundcam.eval.caption_report as caption_report
from groundcam.cli import main
from groundcam.eval.caption_pointing import caption_records, shapes_samples, summarize_captions
from groundcam.eval.caption_report import word_records, write_caption_report
from groundcam.eval.pointing import PointingResult, pointing_game
from groundcam.eval.runner import option_defaults
from groundcam.eval.summary import accuracy_block
from groundcam.eval.sweep import best_layer, layer_mark
from groundcam.explanation import GRID_DPI
from groundcam.viz import figures
from groundcam.viz.figures import Panel, compare_figure, figure_png, word_grid_figure
from groundcam.viz.report import card_figure, format_accuracy, render_eval_report


def row(layer: int, hits: int, n: int) -> dict:
    return {"layer": layer} | accuracy_block(hits, n)


# ----------------------------------------------------------------------------- sweep-layers


def test_a_layer_whose_interval_lies_above_the_next_is_the_best():
    rows = [row(1, 20, 100), row(2, 90, 100), row(3, 60, 100)]
    assert rows[1]["ci95"][0] > rows[2]["ci95"][1]  # 90/100 separates from 60/100
    best, tied = best_layer(rows)
    assert (best, tied) == (2, [])
    table = {"best_layer": best, "tied": tied}
    assert [layer_mark(table, r["layer"]) for r in rows] == ["", "<- best", ""]


def test_overlapping_intervals_are_tied_and_no_layer_is_best():
    rows = [row(1, 20, 100), row(2, 62, 100), row(3, 60, 100), row(4, 55, 100)]
    low = rows[1]["ci95"][0]
    assert rows[2]["ci95"][1] >= low and rows[3]["ci95"][1] >= low > rows[0]["ci95"][1]
    best, tied = best_layer(rows)
    assert (best, tied) == (None, [2, 3, 4])  # from the most accurate; layer 1 is apart
    table = {"best_layer": best, "tied": tied}
    assert [layer_mark(table, r["layer"]) for r in rows] == ["", "tied", "tied", "tied"]


def test_equal_accuracy_is_a_tie_and_the_same_rows_separate_with_more_data():
    assert best_layer([row(3, 7, 10), row(1, 7, 10)]) == (None, [1, 3])
    assert best_layer([row(1, 6, 10), row(2, 8, 10)]) == (None, [2, 1])
    assert best_layer([row(1, 600, 1000), row(2, 800, 1000)]) == (2, [])


def test_one_layer_or_none_scored():
    assert best_layer([row(5, 3, 4)]) == (5, [])
    assert best_layer([row(5, 0, 0)]) == (None, [])
    assert best_layer([]) == (None, [])


@pytest.mark.parametrize("n", [0, 1])
def test_unscored_layers_are_never_marked(n):
    rows = [row(1, 0, 0), row(2, n, n)]
    best, tied = best_layer(rows)
    assert 1 not in tied and best in (2, None)


# ----------------------------------------------------------------------------- the report's options


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def config_keys(html: str) -> list[str]:
    table = re.search(r'<table class="summary config">(.*?)</table>', html).group(1)
    return re.findall(r"<tr><th>(.*?)</th>", table)


def test_the_report_lists_what_was_run_and_only_the_options_that_were_set():
    config = {
        "dataset": "shapes",
        "splits": ["val"],
        "model": "m",
        "method": "attn-gradcam",
        "layer": 1,
        "target": "itm",
        "protocol": "amc",
        "metrics": ["pointing"],
        "steps": 16,
        "precision": "fp32",
        "seed": 3,
        "dets": None,
        "batch_images": 8,
    }
    defaults = option_defaults(SimpleNamespace(batch_images=8))
    html = render_eval_report({"config": config}, [], [], defaults=defaults)
    head = ["dataset", "splits", "model", "method", "layer", "target", "protocol"]
    assert config_keys(html) == [*head, "seed"]  # seed 3 was set; the rest are defaults
    html = render_eval_report({"config": config | {"steps": 4, "batch_images": 2}}, [], [],
                              defaults=defaults)  # fmt: skip
    assert config_keys(html) == [*head, "steps", "seed", "batch_images"]
    assert config_keys(render_eval_report({"config": config}, [], [])) == list(config)


def test_eval_report_of_a_run_shows_the_options_given_on_the_command_line(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = run("eval", "shapes", "--scenes", "2", "--seed", "5", "--model", tiny_model_dir,
            "--report", "--examples", "1", "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    keys = config_keys((out / "report.html").read_text())
    assert "seed" in keys and "dataset_units" in keys and "score" in keys
    assert not {"steps", "precision", "metrics", "dets", "batch_images"} & set(keys)
    assert keys[:7] == ["dataset", "splits", "model", "method", "layer", "target", "protocol"]


# ----------------------------------------------------------------------------- eval captions


def test_eval_captions_report_shows_best_and_worst_words(one_thread, tmp_path):
    out = tmp_path / "cap"
    r = run("eval", "captions", "--model", "captioner-tiny-shapes", "--scenes", "3",
            "--seed", "2", "--report", "--examples", "2", "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"wrote {out / 'report.html'}" in r.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert all(h["ref"] == 0 for rec in records for h in rec["reference"])  # one reference
    words = word_records(records)
    n_ref = summary["reference_word_pointing"]["n"]
    n_gen = summary["generated_word_pointing"]["n"]
    assert len(words) == n_ref + n_gen > 0
    hits = sum(w["hit"] for w in words)
    html = (out / "report.html").read_text()
    assert html.count("<img") == min(2, hits) + min(2, len(words) - hits)
    assert f"Best hits ({min(2, hits)})" in html
    # the headline is the reference words' pointing; BLEU-4 beside it
    assert format_accuracy(summary["reference_word_pointing"]) in html
    assert f"{summary['captions']['bleu4']:.3f}" in html and "By reference word" in html
    keys = config_keys(html)
    assert keys[:5] == ["dataset", "split", "model", "method", "layer"]
    assert "scenes" in keys and "seed" in keys  # set on the command line
    assert not {"beam", "image_size", "max_new_tokens", "captions_file"} & set(keys)


def test_caption_report_cards_are_titled_with_the_word_and_its_probability(
    one_thread, tmp_path, monkeypatch
):
    explainer = gc.load("captioner-tiny-shapes")
    samples = list(shapes_samples("test", 2, seed=2))
    records = list(caption_records(explainer, samples, method="attention"))
    summary = summarize_captions(records) | {
        "model": "captioner-tiny-shapes",
        "method": "attention",
    }
    captured = {}
    real = caption_report.write_eval_report

    def spy(path, shown, best, worst, title, **options):
        captured.update(best=best, worst=worst, shown=shown)
        return real(path, shown, best, worst, title, **options)

    monkeypatch.setattr(caption_report, "write_eval_report", spy)
    write_caption_report(tmp_path, summary, records, explainer, samples, k=3)
    chosen = captured["best"] + captured["worst"]
    assert chosen and captured["shown"]["config"]["score"] == "p"
    for example in chosen:
        rec = example.record
        image_id = rec["image_id"]
        sample = next(s for s in samples if s.image_id == image_id)
        assert example.image.size == sample.load_image().size
        # the word's map is the one it was scored with: its first maximum is the recorded point
        r = pointing_game(example.heatmap, rec["boxes"], image_size=example.image.size[::-1])
        assert list(r.point) == rec["point"] and r.hit == rec["hit"]
        assert 0 < rec["score"] <= 1 and rec["phrase"] in rec["text"].split()
        fig = card_figure(example, "p")
        assert fig.axes[0].get_title() == f"{rec['phrase']}  (p {rec['score']:.3f})"


# ----------------------------------------------------------------------------- the demo's figures


def _render(fig) -> np.ndarray:
    """The figure as PNG pixels at its own dpi, laid out as saved."""
    return np.asarray(Image.open(io.BytesIO(figure_png(fig, int(fig.dpi)))).convert("RGB"))


def _pixel(fig, ax, x: float, y: float) -> tuple[int, int]:
    """Data (x, y) on `ax` -> (row, column) of `_render(fig)`."""
    px, py = ax.transData.transform((x, y))
    return int(fig.bbox.height - py), int(px)


def _outlined(pixels: np.ndarray, row: int, column: int) -> bool:
    """White at (row, column) with black within 3 px above or below: an outlined line."""
    line = pixels[row - 3 : row + 4, column].astype(int)
    return line.min(axis=1).max() >= 240 and line.max(axis=1).min() <= 40


def test_each_row_of_a_comparison_draws_its_own_boxes():
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    heat = torch.zeros(2, 6, 8)
    results = [PointingResult(True, (30, 20), "amc"), PointingResult(False, (70, 50), "amc")]
    panel = Panel("gradcam", list(heat), results=results)
    boxes = [[[10, 10, 50, 30]], [[40, 35, 75, 55]]]
    fig = compare_figure(image, ["first", "second"], [panel], row_boxes=boxes)
    pixels = _render(fig)
    axes = np.array(fig.axes[:4]).reshape(2, 2)
    for r, other in ((0, 1), (1, 0)):
        (x0, y0, x1, _), (ox0, oy0, ox1, _) = boxes[r][0], boxes[other][0]
        for ax in axes[r]:
            assert _outlined(pixels, *_pixel(fig, ax, (x0 + x1) / 2, y0))  # its own box
            row, column = _pixel(fig, ax, (ox0 + ox1) / 2, oy0)
            assert tuple(pixels[row, column]) == (200, 30, 30)  # not the other row's
    row, column = _pixel(fig, axes[1, 1], 70, 50)
    miss = np.array(Image.new("RGB", (1, 1), figures.MISS_COLOUR).getpixel((0, 0)))
    assert np.abs(pixels[row, column] - miss).max() <= 3


def test_word_grid_marks_each_panel_with_its_own_box_and_point():
    image = Image.new("RGB", (128, 32), (240, 240, 240))
    maps = torch.zeros(2, 2, 8)
    marks = [([[4, 4, 30, 28]], (16, 16), True), (None, None, None)]
    fig = word_grid_figure(image, maps, ["'s' hit", "'x' -"], [0.9, 0.5], marks=marks)
    pixels = _render(fig)
    first, second = fig.axes[:2]
    assert [first.get_title(), second.get_title()] == ["'s' hit  p=0.90", "'x' -  p=0.50"]
    hit = np.array(Image.new("RGB", (1, 1), figures.HIT_COLOUR).getpixel((0, 0)))
    assert np.abs(pixels[_pixel(fig, first, 16, 16)] - hit).max() <= 3
    assert tuple(pixels[_pixel(fig, second, 16, 16)]) == (240, 240, 240)  # nothing drawn


def test_caption_tokens_png_is_the_per_token_figure(one_thread, tmp_path):
    line = Image.new("RGB", (128, 32), "white")
    line.save(tmp_path / "line.png")
    out = tmp_path / "out"
    r = run("caption", tmp_path / "line.png", "--model", "trocr-tiny-glyphs", "--text", "ab3",
            "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    gen = gc.load("trocr-tiny-glyphs").explain_generation(line, text="ab3")
    fig = gen.figure(tokens=True)
    width, height = fig.get_size_inches()
    with Image.open(out / "tokens.png") as png:
        assert png.size == pytest.approx((width * GRID_DPI, height * GRID_DPI), abs=1)
        assert png.width >= 600  # not the 160 px cells of the old sheet: labels at print size
    # the generated text, model and method above; each token titled with its probability
    assert fig.get_suptitle().splitlines() == ["“ab3”", "trocr-tiny-glyphs · attention · layer 1"]
    titles = [ax.get_title() for ax in fig.axes[: len(gen)]]
    assert titles == [
        f"{t}  p={p:.2f}" for t, p in zip(gen.tokens, gen.scores.tolist(), strict=True)
    ]


def test_an_image_that_cannot_be_read_again_loses_its_cards_not_the_report(one_thread, tmp_path):
    explainer = gc.load("captioner-tiny-shapes")
    samples = list(shapes_samples("test", 2, seed=2))
    records = list(caption_records(explainer, samples, method="attention"))
    summary = summarize_captions(records) | {
        "model": "captioner-tiny-shapes",
        "method": "attention",
    }

    def gone():
        raise OSError("scene.png: no such file")

    broken = [replace(samples[0], load_image=gone), samples[1]]
    words = word_records(records)
    kept = [w for w in words if w["image_id"] == samples[1].image_id]
    assert kept and len(kept) < len(words)
    path = write_caption_report(tmp_path, summary, records, explainer, broken, k=len(words))
    html = path.read_text()
    assert html.count("<img") == len(kept)  # every word of the readable image, none of the other
    assert samples[0].image_id not in html.split("Best hits")[1]
