"""The `groundcam eval --report` page: one self-contained HTML file for a finished evaluation.

The page holds the run's configuration, the overall pointing accuracy (with its 95% interval and
the faithfulness AUCs when they were measured), accuracy per split and per phrase type, and two
galleries -- the best hits and the worst misses -- each card showing the map over the image with
the ground-truth boxes and the pointed pixel. Images are inlined as PNG data URIs, the CSS is
inline, and there is no script: the file opens anywhere, offline.

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

from groundcam.viz.html import CSS, image_data_uri
from groundcam.viz.overlay import overlay

DEFAULT_TITLE = "groundcam evaluation report"
THUMBNAIL_SIZE = 256  # longest side of a gallery overlay, in pixels
OVERLAY_ALPHA = 0.5

# Config keys shown first, in this order; any other config key follows in the summary's order.
_CONFIG_ORDER = ("dataset", "split", "model", "method", "layer", "target", "protocol")

_MISSING = "\u2014"  # em dash for a value that is absent or not a number
_EN_DASH = "\u2013"

_REPORT_CSS = """
table.summary td.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
p.none { color: #777; font-style: italic; margin: 4px 0; }
p.legend { font-size: 13px; color: #444; margin: 0 0 8px; }
.tables { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.tables h3 { font-size: 15px; margin: 0 0 6px; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
.card { width: 260px; font-size: 13px; }
.card img { display: block; max-width: 256px; max-height: 256px; border: 1px solid #ccc; }
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


def _render_config(config: Any) -> str:
    """Key/value table of the run's configuration (known keys first)."""
    if not isinstance(config, Mapping) or not config:
        return '<p class="none">no configuration recorded</p>'
    keys = [key for key in _CONFIG_ORDER if key in config]
    keys += [key for key in config if key not in keys]
    rows = "".join(f"<tr><th>{_text(key)}</th><td>{_text(config[key])}</td></tr>" for key in keys)
    return f'<table class="summary config">{rows}</table>'


_OVERALL_COLUMNS = (
    ("accuracy [95% CI]", None),
    ("n", "n"),
    ("hits", "hits"),
    ("skipped", "skipped"),
    ("errors", "errors"),
)


def _render_overall(summary: Mapping[str, Any]) -> str:
    """One-row table of the headline numbers (AUC columns only when measured)."""
    heads = [label for label, _ in _OVERALL_COLUMNS]
    cells = [escape(format_accuracy(summary))]
    cells += [escape(_count(summary.get(key))) for _, key in _OVERALL_COLUMNS[1:]]
    for key, label in (("deletion_auc", "deletion AUC"), ("insertion_auc", "insertion AUC")):
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


def thumbnail_overlay(example: Example, max_side: int = THUMBNAIL_SIZE) -> Image.Image:
    """The example's map over its image, at most ``max_side`` px on the long side (never upscaled),
    with the record's boxes and pointed pixel (hit colour) drawn at the thumbnail's scale."""
    record = example.record
    image = example.image.convert("RGB")
    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    thumb_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if thumb_size != image.size:
        image = image.resize(thumb_size, Image.Resampling.LANCZOS)
    src_w, src_h = _source_size(example)
    sx, sy = thumb_size[0] / src_w, thumb_size[1] / src_h

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
            # pixel centres map to pixel centres: (x + 0.5) * s - 0.5
            x = min(max(round((px + 0.5) * sx - 0.5), 0), thumb_size[0] - 1)
            y = min(max(round((py + 0.5) * sy - 0.5), 0), thumb_size[1] - 1)
            point = (int(x), int(y))

    hit = record.get("hit")
    heatmap, alpha = example.heatmap, OVERLAY_ALPHA
    if heatmap is None:
        heatmap, alpha = np.zeros((1, 1), dtype=np.float32), 0.0
    return overlay(
        image,
        heatmap,
        alpha=alpha,
        boxes=boxes or None,
        point=point,
        resample=example.resample,
        hit=None if hit is None else bool(hit),
    )


def _render_card(example: Example) -> str:
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
    img = thumbnail_overlay(example)
    return (
        '<figure class="card">'
        f'<img src="{image_data_uri(img)}" alt="{escape(phrase)}"'
        f' width="{img.width}" height="{img.height}">'
        f'<span class="phrase">{escape(phrase)}{badge}</span>'
        f"<dl>{details}</dl></figure>"
    )


def _render_gallery(title: str, examples: Sequence[Example]) -> str:
    """A titled section of cards, or a 'none' line."""
    if not examples:
        body = '<p class="none">none</p>'
    else:
        body = f'<div class="gallery">{"".join(_render_card(ex) for ex in examples)}</div>'
    return f"<section><h2>{escape(title)} ({len(examples)})</h2>{body}</section>"


# ----------------------------------------------------------------------------- page


def render_eval_report(
    summary: dict,
    examples_best: list[Example],
    examples_worst: list[Example],
    title: str = DEFAULT_TITLE,
) -> str:
    """Build the self-contained HTML page of one evaluation run."""
    summary = summary if isinstance(summary, Mapping) else {}
    tables = (
        '<div class="tables">'
        f"{_render_groups('By split', 'split', summary.get('by_split'))}"
        f"{_render_groups('By phrase type', 'type', summary.get('by_type'))}"
        "</div>"
    )
    legend = (
        '<p class="legend">Green boxes: ground truth. Dot: the pointed pixel (the map&#x27;s '
        "maximum), green for a hit, red for a miss. in_box: fraction of the map&#x27;s mass "
        "inside the boxes.</p>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}{_REPORT_CSS}</style></head>"
        f"<body><header><h1>{escape(title)}</h1></header>"
        f"<section><h2>Configuration</h2>{_render_config(summary.get('config'))}</section>"
        f"<section><h2>Overall</h2>{_render_overall(summary)}</section>"
        f"<section><h2>Accuracy by split and phrase type</h2>{tables}</section>"
        f"{legend}"
        f"{_render_gallery('Best hits', examples_best)}"
        f"{_render_gallery('Worst misses', examples_worst)}"
        "</body></html>\n"
    )


def write_eval_report(
    path: str | Path,
    summary: dict,
    best: list[Example],
    worst: list[Example],
    title: str = DEFAULT_TITLE,
) -> Path:
    """Write the report as UTF-8 (creating parent folders) and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_eval_report(summary, best, worst, title=title), encoding="utf-8")
    return out
