"""The `groundcam eval --report` page: example selection and the self-contained HTML."""

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from groundcam.viz import figures
from groundcam.viz.report import (
    CARD_DPI,
    Example,
    card_figure,
    card_marks,
    format_accuracy,
    render_eval_report,
    select_examples,
    write_eval_report,
)

NASTY = '<script>alert(1)</script> & "x"'
IMG_SRC = re.compile(r'<img\b[^>]*\bsrc="([^"]*)"')


def record(uid, hit, in_box=0.5, score=0.5, **extra):
    """A minimal eval record (see notes/eval_records.md)."""
    split, image_id, phrase_id = uid.split("/")
    rec = {
        "uid": uid,
        "unit": 0,
        "index": 0,
        "split": split,
        "image_id": image_id,
        "phrase_id": phrase_id,
        "phrase": f"phrase {uid}",
        "text": f"phrase {uid}",
        "kind": "people",
        "types": ["people"],
        "boxes": [[10, 10, 50, 40]],
        "image_size": [80, 60],
        "point": [30, 25] if hit is not None else None,
        "hit": hit,
        "skipped": hit is None,
        "score": score,
        "in_box": in_box,
    }
    rec.update(extra)
    return rec


def summary_dict(**extra):
    """A summary.json-like dict with splits, types and AUCs."""
    summary = {
        "accuracy": 0.7834,
        "n": 600,
        "hits": 470,
        "ci95": [0.7481, 0.8150],
        "skipped": 3,
        "errors": 2,
        "by_split": {"test": {"accuracy": 0.7834, "n": 600, "hits": 470, "ci95": [0.7481, 0.815]}},
        "by_type": {
            "clothing": {"accuracy": 0.5, "n": 40, "hits": 20, "ci95": [0.35, 0.65]},
            "people": {"accuracy": 0.9, "n": 300, "hits": 270, "ci95": [0.862, 0.928]},
            "animals": {"accuracy": 0.75, "n": 40, "hits": 30, "ci95": [0.598, 0.858]},
            NASTY: {"accuracy": 1.0, "n": 1, "hits": 1, "ci95": [0.207, 1.0]},
        },
        "deletion_auc": 0.12345,
        "insertion_auc": 0.6789,
        "config": {
            "protocol": "amc",
            "dataset": "flickr30k",
            "split": "test",
            "model": "albef-tiny-shapes",
            "method": "attn-gradcam",
            "layer": 8,
            "note": NASTY,
        },
    }
    summary.update(extra)
    return summary


def picture(width=80, height=60, colour=(90, 90, 90)):
    """A flat grey RGB image."""
    return Image.new("RGB", (width, height), colour)


def decode_images(html):
    """Every <img> in the page, decoded from its data URI."""
    images = []
    for src in IMG_SRC.findall(html):
        assert src.startswith("data:image/png;base64,"), src[:40]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return images


# ----------------------------------------------------------------------------- select_examples


def test_select_examples_orders_and_breaks_ties():
    records = [
        record("test/1/0", True, in_box=0.5, score=0.9),
        record("test/1/1", True, in_box=0.9, score=0.1),
        record("test/2/0", True, in_box=0.5, score=0.95),
        record("test/2/2", True, in_box=0.5, score=0.9),  # ties test/1/0 -> uid decides
        record("test/3/0", False, in_box=0.1, score=0.2),
        record("test/3/1", False, in_box=0.0, score=0.3),
        record("test/3/2", False, in_box=0.1, score=0.8),
        record("test/4/0", False, in_box=0.1, score=0.2),  # ties test/3/0 -> uid decides
        record("test/5/0", None),  # skipped
        record("test/5/1", None, error="image not found: /x.jpg", score=None, in_box=None),
        record("test/5/2", True, in_box=1.0, score=1.0, error="boom"),  # errored: never shown
    ]
    best, worst = select_examples(records)
    assert [r["uid"] for r in best] == ["test/1/1", "test/2/0", "test/1/0", "test/2/2"]
    assert [r["uid"] for r in worst] == ["test/3/1", "test/3/2", "test/3/0", "test/4/0"]

    # deterministic whatever the input order
    shuffled = list(reversed(records))
    assert select_examples(shuffled) == (best, worst)


def test_select_examples_limits_k_and_puts_missing_numbers_last():
    records = [record(f"val/{i}/0", True, in_box=i / 10, score=0.5) for i in range(10)]
    records.append(record("val/x/0", True, in_box=None, score=0.99))
    records.append(record("val/y/0", False, in_box=None, score=None))
    records.append(record("val/z/0", False, in_box=0.3, score=None))
    records.append(record("val/w/0", False, in_box=0.3, score=0.1))
    best, worst = select_examples(records, k=3)
    assert [r["uid"] for r in best] == ["val/9/0", "val/8/0", "val/7/0"]
    assert [r["uid"] for r in worst] == ["val/w/0", "val/z/0", "val/y/0"]
    best_all, _ = select_examples(records, k=100)
    assert best_all[-1]["uid"] == "val/x/0"
    assert select_examples(records, k=0) == ([], [])
    assert select_examples([]) == ([], [])
    assert select_examples([record("val/s/0", None)]) == ([], [])


# ----------------------------------------------------------------------------- formatting


def test_format_accuracy():
    assert format_accuracy({"accuracy": 0.7834, "ci95": [0.7481, 0.815]}) == "78.3% [74.8–81.5]"
    assert format_accuracy({"accuracy": 1.0, "ci95": [0.5, 1.0]}) == "100.0% [50.0–100.0]"
    assert format_accuracy({"hits": 1, "n": 4}) == "25.0%"
    assert format_accuracy({}) == "—"
    assert format_accuracy({"accuracy": float("nan"), "n": 0}) == "—"


# ----------------------------------------------------------------------------- the page


def make_examples():
    """Two hits and one miss on synthetic images of different sizes."""
    heat = torch.zeros(4, 4)
    heat[1, 1] = 1.0
    big = Example(
        record(
            "test/10/0",
            True,
            in_box=0.8,
            score=0.91,
            boxes=[[100, 80, 300, 240]],
            image_size=[512, 384],
            point=[200, 160],
            phrase=NASTY,
        ),
        picture(512, 384),
        heat,
    )
    small = Example(record("test/11/0", True, in_box=0.6, score=0.5), picture(), heat.numpy())
    miss = Example(
        record("test/12/0", False, in_box=0.05, score=0.7, point=[70, 50]),
        picture(),
        np.random.default_rng(0).random((3, 5)),
        resample="bilinear",
    )
    return [big, small], [miss]


def test_report_is_self_contained_with_tables_and_cards(tmp_path):
    best, worst = make_examples()
    path = write_eval_report(tmp_path / "sub" / "report.html", summary_dict(), best, worst)
    html = path.read_text(encoding="utf-8")
    assert path.name == "report.html"
    assert html.startswith("<!DOCTYPE html>")

    # self-contained: no links out, no scripts, every image inline
    for bad in ("http://", "https://", 'src="/', "<link", "<script", "url("):
        assert bad not in html
    images = decode_images(html)
    assert len(images) == 3
    assert html.count("<img") == 3

    # config block (known keys first) and overall numbers
    assert html.index(">dataset<") < html.index(">protocol<") < html.index(">note<")
    assert "flickr30k" in html and "attn-gradcam" in html and "albef-tiny-shapes" in html
    assert "78.3% [74.8–81.5]" in html
    for number in (">600<", ">470<", ">3<", ">2<", ">0.123<", ">0.679<"):
        assert number in html
    assert "deletion AUC" in html and "insertion AUC" in html

    # per-type table sorted by n descending, then name
    order = [html.index(f">{name}<") for name in ("people", "animals", "clothing")]
    assert order == sorted(order)
    assert "90.0% [86.2–92.8]" in html and "50.0% [35.0–65.0]" in html

    # cards: phrase, image id, score, in_box, badges
    assert ">10<" in html and ">0.910<" in html and ">0.800<" in html
    assert ">0.050<" in html and ">0.700<" in html
    assert html.count('class="badge hit"') == 2 and html.count('class="badge miss"') == 1


def test_report_escapes_text_from_data():
    best, worst = make_examples()
    html = render_eval_report(summary_dict(), best, worst, title="run <1> & co")
    assert NASTY not in html
    assert "<script>" not in html and "alert(1)</script>" not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;x&quot;"
    # config value, by_type name, card phrase and img alt
    assert html.count(escaped) >= 4
    assert "<title>run &lt;1&gt; &amp; co</title>" in html


def _png(fig) -> np.ndarray:
    """The figure as the page shows it (PNG at the card's dpi), as an RGB array."""
    return np.asarray(Image.open(io.BytesIO(figures.figure_png(fig, CARD_DPI))).convert("RGB"))


def _at(fig, x: float, y: float) -> tuple[int, int]:
    """Image (x, y) on the card's picture -> (row, column) of its PNG at the card's dpi."""
    fig.draw_without_rendering()  # the constrained layout places the axes when drawn
    scale = CARD_DPI / fig.dpi
    px, py = fig.axes[0].transData.transform((x, y))
    return int((fig.bbox.height - py) * scale), int(px * scale)


def _colour(name: str) -> np.ndarray:
    return np.array(Image.new("RGB", (1, 1), name).getpixel((0, 0)))


def test_cards_are_readable_figures_with_the_point_in_the_hit_colour():
    best, worst = make_examples()
    html = render_eval_report(summary_dict(), best, worst)
    cards = decode_images(html)
    assert [card.width for card in cards] == [round(3.2 * CARD_DPI)] * 3  # not 256 px thumbnails
    for example, hit in ((best[0], True), (best[1], True), (worst[0], False)):
        fig = card_figure(example)
        pixels = _png(fig)
        row, column = _at(fig, *example.record["point"])  # the images are at record size
        want = _colour(figures.HIT_COLOUR if hit else figures.MISS_COLOUR)
        assert np.abs(pixels[row, column] - want).max() <= 3
    # the title: the phrase and its score, above the picture
    fig = card_figure(best[1], "itm")
    assert fig.axes[0].get_title() == "phrase test/11/0  (itm 0.500)"
    fig.draw_without_rendering()
    assert fig.axes[0].title.get_window_extent().y0 >= fig.axes[0].get_window_extent().y1 - 1


def test_card_marks_move_with_the_image_size_and_skip_bad_values():
    rec = record("test/1/1", False, point=[100, 100], image_size=[160, 120])
    rec["boxes"] = [[20, 10, 60, 50], ["x", 1, 2, 3], [1, 2]]
    boxes, point = card_marks(Example(rec, picture(80, 60), torch.rand(2, 2)))
    assert boxes == [[10.0, 5.0, 30.0, 25.0]]
    assert point == pytest.approx((49.75, 49.75))  # pixel centres: (100 + 0.5) / 2 - 0.5
    fig = card_figure(Example(rec, picture(80, 60), torch.rand(2, 2)))
    row, column = _at(fig, *point)
    assert np.abs(_png(fig)[row, column] - _colour(figures.MISS_COLOUR)).max() <= 3


def test_card_without_map_or_point_is_the_plain_image():
    rec = record("test/1/0", True, point=None, boxes=[], image_size=[160, 120])
    fig = card_figure(Example(rec, picture(80, 60), None))
    row, column = _at(fig, 40, 30)
    assert tuple(_png(fig)[row, column]) == (90, 90, 90)


def test_empty_inputs_do_not_crash(tmp_path):
    html = render_eval_report({}, [], [])
    assert html.count('<p class="none">') >= 4  # config, by split, by type, both galleries
    assert "Best hits (0)" in html and "Worst misses (0)" in html
    assert "<img" not in html
    assert "deletion AUC" not in html

    summary = summary_dict()
    del summary["by_type"]
    summary["by_split"] = {}
    path = write_eval_report(tmp_path / "r.html", summary, [], [])
    html = path.read_text(encoding="utf-8")
    assert 'By phrase type</h3><p class="none">none</p>' in html
    assert "78.3% [74.8–81.5]" in html


@pytest.mark.parametrize("heatmap", [torch.rand(3, 3), np.random.default_rng(1).random((3, 3))])
def test_heatmap_types(heatmap):
    example = Example(record("test/1/0", True), picture(), heatmap)
    assert _png(card_figure(example)).shape[1] == round(3.2 * CARD_DPI)
