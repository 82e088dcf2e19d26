"""The `groundcam eval --report` page: one self-contained HTML file for a finished evaluation.

The page holds the run's configuration, the overall pointing accuracy (with its 95% interval and
the faithfulness AUCs when they were measured), accuracy per split and per phrase type, and two
galleries -- the best hits and the worst misses -- each card a paper figure
(`groundcam.viz.figures.map_figure`): the map over the image titled with the phrase and its
score, the ground-truth boxes and the pointed pixel outlined, a colour bar. Only the options that
were set are listed (with `defaults`, a value equal to its default is left out). Images are
inlined as PNG data URIs, the CSS is inline, and there is no script: the file opens anywhere,
offline.

Inputs follow the eval record contract: one dict per phrase as written to ``results.jsonl``
(``uid``, ``phrase``, ``image_id``, ``boxes``, ``image_size``, ``point``, ``hit``, ``score``,
``in_box`` ...) and the runner's ``summary.json`` dict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from groundcam.viz.figures import PAGE_ALPHA, PAGE_STYLE, figure_png, map_figure
from groundcam.viz.html import CSS, image_data_uri

DEFAULT_TITLE = "groundcam evaluation report"
CARD_DPI = 110  # a card's figure (3.2 in wide) is 352 px: labels readable at the page's size

# Config keys shown first, in this order, set or not (they say what the numbers are); any other
# key follows in the summary's order, unless it holds its default.
_CONFIG_ORDER = ("dataset", "split", "splits", "model", "method", "layer", "target", "protocol")

_MISSING = "\u2014"  # em dash for a value that is absent or not a number
_EN_DASH = "\u2013"

_REPORT_CSS = """
table.summary td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
p.none { color: #777; font-style: italic; margin: 4px 0; }
p.legend { font-size: 13px; color: #444; margin: 0 0 8px; }
.tables { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.tables h3 { font-size: 15px; margin: 0 0 6px; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
.card { width: 360px; font-size: 13px; }
.card img { display: block; max-width: 356px; height: auto; }
.card .phrase { display: block; margin: 6px 0 3px; word-wrap: break-word; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: 1px 8px; margin: 0; }
.card dt { color: #666; }
.card dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace;
           word-break: break-all; }
"""


@dataclass
class Example:
    """One gallery card: a phrase's eval record, its image and its patch-grid map.

    ``heatmap`` is the [h, w] map in [0, 1] (torch tensor or numpy array) that the record was
    scored with; ``None`` shows the image with its boxes and point but no map. Box and point
    coordinates in the record are pixels of ``record["image_size"]`` (the original image); when
    that key is absent they are taken to be pixels of ``image``.
    """

    record: dict
    image: Image.Image
    heatmap: torch.Tensor | np.ndarray | None
    resample: str = "bicubic"


# ----------------------------------------------------------------------------- example selection


def _number(value: Any) -> float | None:
    """A finite float, or None for anything missing, non-numeric or NaN/inf."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _is_scored(record: Mapping[str, Any]) -> bool:
    """A phrase that was scored: has a hit/miss and no error."""
    return record.get("hit") is not None and not record.get("error")


def _best_key(record: Mapping[str, Any]) -> tuple:
    """in_box descending, then score descending, then uid; missing numbers sort last."""
    in_box, score = _number(record.get("in_box")), _number(record.get("score"))
    return (
        in_box is None,
        -(in_box or 0.0),
        score is None,
        -(score or 0.0),
        str(record.get("uid", "")),
    )


def _worst_key(record: Mapping[str, Any]) -> tuple:
    """in_box ascending, then score descending, then uid; missing numbers sort last."""
    in_box, score = _number(record.get("in_box")), _number(record.get("score"))
    return (
        in_box is None,
        in_box or 0.0,
        score is None,
        -(score or 0.0),
        str(record.get("uid", "")),
    )


def select_examples(records: list[dict], k: int = 8) -> tuple[list[dict], list[dict]]:
    """Pick the ``k`` best hits and the ``k`` worst misses of an evaluation, deterministically.

    Best: scored hits (``hit`` true, no ``error``) by ``in_box`` descending, then ``score``
    descending, then ``uid``. Worst: misses (``hit`` false, no ``error``) by ``in_box``
    ascending, then ``score`` descending, then ``uid``. Records with ``hit`` None (skipped by
    the protocol or errored) are never examples; missing ``in_box``/``score`` values sort last.
    """
    if k <= 0:
        return [], []
    scored = [record for record in records if _is_scored(record)]
    hits = [record for record in scored if bool(record["hit"])]
    misses = [record for record in scored if not bool(record["hit"])]
    return sorted(hits, key=_best_key)[:k], sorted(misses, key=_worst_key)[:k]


# ----------------------------------------------------------------------------- formatting


def _text(value: Any) -> str:
    """Escaped text for any value (containers as compact JSON)."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, Mapping | list | tuple):
        try:
            return escape(json.dumps(value, ensure_ascii=False, default=str))
        except (TypeError, ValueError):
            pass
    return escape(str(value))


def _percent(value: Any) -> str:
    """0.7834 -> '78.3' (no sign); missing -> em dash."""
    number = _number(value)
    return _MISSING if number is None else f"{100.0 * number:.1f}"


def format_accuracy(stats: Mapping[str, Any]) -> str:
    """'xx.x% [lo–hi]' from a summary block with ``accuracy`` and ``ci95`` (fractions in [0, 1]).

    Falls back to ``hits / n`` when ``accuracy`` is absent and drops the interval when
    ``ci95`` is absent; an empty block gives an em dash.
    """
    accuracy = _number(stats.get("accuracy"))
    if accuracy is None:
        hits, n = _number(stats.get("hits")), _number(stats.get("n"))
        if hits is not None and n:
            accuracy = hits / n
    if accuracy is None:
        return _MISSING
    text = f"{_percent(accuracy)}%"
    ci = stats.get("ci95")
    if isinstance(ci, Sequence) and not isinstance(ci, str) and len(ci) == 2:
        lo, hi = (_number(v) for v in ci)
        if lo is not None and hi is not None:
            text += f" [{_percent(lo)}{_EN_DASH}{_percent(hi)}]"
    return text


def _count(value: Any) -> str:
    """An integer count, or an em dash."""
    number = _number(value)
    return _MISSING if number is None else str(int(number))


def _decimal(value: Any, digits: int = 3) -> str:
    """A float with fixed digits, or an em dash."""
    number = _number(value)
    return _MISSING if number is None else f"{number:.{digits}f}"


# ----------------------------------------------------------------------------- tables


def _render_config(config: Any, defaults: Mapping[str, Any] | None = None) -> str:
    """Key/value table of the run's configuration: the keys that say what was run first, then
    the options that were set (a value equal to its entry in `defaults` is left out)."""
    if not isinstance(config, Mapping) or not config:
        return '<p class="none">no configuration recorded</p>'
    defaults = defaults or {}
    keys = [key for key in _CONFIG_ORDER if key in config]
    keys += [
        key
        for key in config
        if key not in keys and not (key in defaults and config[key] == defaults[key])
    ]
    rows = "".join(f"<tr><th>{_text(key)}</th><td>{_text(config[key])}</td></tr>" for key in keys)
    return f'<table class="summary config">{rows}</table>'


_OVERALL_COLUMNS = (
    ("accuracy [95% CI]", None),
    ("n", "n"),
    ("hits", "hits"),
    ("skipped", "skipped"),
    ("errors", "errors"),
)


# Headline numbers shown when the run measured them.
_EXTRA_COLUMNS = (
    ("deletion_auc", "deletion AUC"),
    ("insertion_auc", "insertion AUC"),
    ("bleu4", "BLEU-4"),
    ("cider_d", "CIDEr-D"),
)


def _render_overall(summary: Mapping[str, Any]) -> str:
    """One-row table of the headline numbers (AUC columns only when measured)."""
    heads = [label for label, _ in _OVERALL_COLUMNS]
    cells = [escape(format_accuracy(summary))]
    cells += [escape(_count(summary.get(key))) for _, key in _OVERALL_COLUMNS[1:]]
    for key, label in _EXTRA_COLUMNS:
        if key in summary:
            heads.append(label)
            cells.append(escape(_decimal(summary.get(key))))
    head = "".join(f"<th>{escape(label)}</th>" for label in heads)
    body = "".join(f'<td class="num">{cell}</td>' for cell in cells)
    return f'<table class="summary overall"><tr>{head}</tr><tr>{body}</tr></table>'


def _group_rows(groups: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, stats) pairs sorted by n descending, then name."""
    if not isinstance(groups, Mapping):
        return []
    rows = [(str(name), stats) for name, stats in groups.items() if isinstance(stats, Mapping)]
    return sorted(rows, key=lambda row: (-(_number(row[1].get("n")) or 0.0), row[0]))


def _render_groups(title: str, label: str, groups: Any) -> str:
    """Accuracy per group (split or phrase type) with n, hits and the 95% interval."""
    rows = _group_rows(groups)
    if not rows:
        return f'<div><h3>{escape(title)}</h3><p class="none">none</p></div>'
    body = "".join(
        f"<tr><th>{escape(name)}</th>"
        f'<td class="num">{escape(format_accuracy(stats))}</td>'
        f'<td class="num">{escape(_count(stats.get("hits")))}</td>'
        f'<td class="num">{escape(_count(stats.get("n")))}</td></tr>'
        for name, stats in rows
    )
    head = f"<tr><th>{escape(label)}</th><th>accuracy [95% CI]</th><th>hits</th><th>n</th></tr>"
    return f'<div><h3>{escape(title)}</h3><table class="summary">{head}{body}</table></div>'


# ----------------------------------------------------------------------------- gallery


def _source_size(example: Example) -> tuple[int, int]:
    """(W, H) of the pixel space the record's boxes and point live in."""
    size = example.record.get("image_size")
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        width, height = (_number(v) for v in size)
        if width and height and width > 0 and height > 0:
            return int(width), int(height)
    return example.image.size


def card_marks(example: Example) -> tuple[list[list[float]], tuple[float, float] | None]:
    """The record's boxes and pointed pixel moved from its `image_size` to the pixels of
    `example.image` (pixel centres to pixel centres); malformed values are left out."""
    record = example.record
    src_w, src_h = _source_size(example)
    sx, sy = example.image.width / src_w, example.image.height / src_h
    boxes = []
    for box in record.get("boxes") or []:
        values = [_number(v) for v in box] if isinstance(box, Sequence) else []
        if len(values) == 4 and all(v is not None for v in values):
            x1, y1, x2, y2 = values
            boxes.append([x1 * sx, y1 * sy, x2 * sx, y2 * sy])
    point = None
    raw_point = record.get("point")
    if isinstance(raw_point, Sequence) and not isinstance(raw_point, str) and len(raw_point) == 2:
        px, py = (_number(v) for v in raw_point)
        if px is not None and py is not None:
            point = ((px + 0.5) * sx - 0.5, (py + 0.5) * sy - 0.5)
    return boxes, point


def card_figure(example: Example, score_name: str = "score"):
    """The example as a paper figure: its map over its image titled with the phrase and its
    score, the boxes and the pointed pixel outlined (green for a hit, red for a miss)."""
    record = example.record
    boxes, point = card_marks(example)
    phrase = str(record.get("phrase", record.get("text", "")))
    score = _number(record.get("score"))
    title = phrase if score is None else f"{phrase}  ({score_name} {score:.3f})"
    heatmap, alpha, style = example.heatmap, PAGE_ALPHA, PAGE_STYLE
    if heatmap is None:  # the photo as it is
        heatmap, alpha, style = np.zeros((1, 1), dtype=np.float32), 0.0, "heat"
    hit = record.get("hit")
    return map_figure(
        example.image,
        torch.as_tensor(heatmap, dtype=torch.float32),
        title,
        boxes=boxes or None,
        point=point,
        hit=None if hit is None else bool(hit),
        alpha=alpha,
        resample=example.resample,
        style=style,
    )


def _render_card(example: Example, score_name: str = "score") -> str:
    """One gallery card: overlay, phrase, badge and the record's identifying numbers."""
    record = example.record
    phrase = str(record.get("phrase", record.get("text", "")))
    hit = record.get("hit")
    badge = ""
    if hit is not None:
        kind = "hit" if hit else "miss"
        badge = f' <span class="badge {kind}">{kind}</span>'
    fields = [
        ("image", record.get("image_id", _MISSING)),
        ("score", _decimal(record.get("score"))),
        ("in_box", _decimal(record.get("in_box"))),
    ]
    text = record.get("text")
    if text is not None and str(text) != phrase:
        fields.append(("text", text))
    if record.get("kind") is not None:
        fields.append(("type", record.get("kind")))
    if record.get("uid") is not None:
        fields.append(("uid", record.get("uid")))
    details = "".join(f"<dt>{_text(name)}</dt><dd>{_text(value)}</dd>" for name, value in fields)
    png = figure_png(card_figure(example, score_name), dpi=CARD_DPI, palette=True)
    return (
        '<figure class="card">'
        f'<img src="{image_data_uri(png)}" alt="{escape(phrase)}">'
        f'<span class="phrase">{escape(phrase)}{badge}</span>'
        f"<dl>{details}</dl></figure>"
    )


def _render_gallery(title: str, examples: Sequence[Example], score_name: str = "score") -> str:
    """A titled section of cards, or a 'none' line."""
    if not examples:
        body = '<p class="none">none</p>'
    else:
        cards = "".join(_render_card(ex, score_name) for ex in examples)
        body = f'<div class="gallery">{cards}</div>'
    return f"<section><h2>{escape(title)} ({len(examples)})</h2>{body}</section>"


# ----------------------------------------------------------------------------- page


def render_eval_report(
    summary: dict,
    examples_best: list[Example],
    examples_worst: list[Example],
    title: str = DEFAULT_TITLE,
    *,
    defaults: Mapping[str, Any] | None = None,
    groups: Sequence[tuple[str, str, Any]] | None = None,
) -> str:
    """Build the self-contained HTML page of one evaluation run. `defaults`: the options'
    default values, left out of the configuration table; `groups`: the accuracy tables as
    (title, column label, {name: accuracy block}) (default: by split and by phrase type)."""
    summary = summary if isinstance(summary, Mapping) else {}
    config = summary.get("config")
    if groups is None:
        groups = [
            ("By split", "split", summary.get("by_split")),
            ("By phrase type", "type", summary.get("by_type")),
        ]
    tables = "".join(_render_groups(*group) for group in groups)
    *parts, last = [t.removeprefix("By ") for t, _, _ in groups] or ["group"]
    heading = "Accuracy by " + " and ".join(filter(None, [", ".join(parts), last]))
    score_name = str(config.get("score") or "score") if isinstance(config, Mapping) else "score"
    legend = (
        '<p class="legend">White boxes with a black edge: ground truth. Marker: the pointed '
        "pixel (the map&#x27;s maximum), a green dot for a hit, a red cross for a miss. in_box: "
        "fraction of the map&#x27;s mass inside the boxes.</p>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}{_REPORT_CSS}</style></head>"
        f"<body><header><h1>{escape(title)}</h1></header>"
        f"<section><h2>Configuration</h2>{_render_config(config, defaults)}</section>"
        f"<section><h2>Overall</h2>{_render_overall(summary)}</section>"
        f'<section><h2>{escape(heading)}</h2><div class="tables">{tables}</div></section>'
        f"{legend}"
        f"{_render_gallery('Best hits', examples_best, score_name)}"
        f"{_render_gallery('Worst misses', examples_worst, score_name)}"
        "</body></html>\n"
    )


def write_eval_report(
    path: str | Path,
    summary: dict,
    best: list[Example],
    worst: list[Example],
    title: str = DEFAULT_TITLE,
    **options: Any,
) -> Path:
    """Write the report as UTF-8 (creating parent folders) and return its path; `options` go
    to `render_eval_report` (defaults, groups)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_eval_report(summary, best, worst, title, **options), encoding="utf-8")
    return out
