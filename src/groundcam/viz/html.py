"""Self-contained HTML reports: images inlined as PNG data URIs, inline CSS, no external assets."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 12px; }
h2 { font-size: 17px; margin: 0 0 10px; }
table.summary { border-collapse: collapse; margin-bottom: 20px; font-size: 14px; }
table.summary th, table.summary td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; }
table.summary th { background: #f0f0f0; font-weight: 600; }
section { background: #fff; border: 1px solid #e2e2e2; border-radius: 6px;
          padding: 14px; margin-bottom: 18px; }
.section-body { display: flex; gap: 18px; align-items: flex-start; }
.plain img, .cell img { height: var(--image-height, 160px); width: auto; display: block;
                         border: 1px solid #ccc; }
.rows { display: flex; flex-direction: column; gap: 12px; }
.row-head { font-size: 14px; margin-bottom: 6px; display: flex; gap: 10px; align-items: center; }
.phrase { font-weight: 600; }
.score { font-family: ui-monospace, Menlo, Consolas, monospace; color: #555; }
.badge { font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 10px; color: #fff; }
.badge.hit { background: #1e8e3e; }
.badge.miss { background: #d93025; }
.cells { display: flex; flex-wrap: wrap; gap: 10px; }
.cell figcaption { font-size: 12px; color: #444; text-align: center; margin-top: 3px;
                   width: 0; min-width: 100%; }
.cell.wide { flex: 1 1 100%; min-width: 0; }
.cell.wide img { height: auto; max-width: 100%; }
figure { margin: 0; }
.intro { font-size: 14px; max-width: 900px; margin: 0 0 12px; }
.group { margin-bottom: 8px; }
.group-head { font-size: 13px; margin-bottom: 4px; display: flex; gap: 10px; align-items: center; }
.model { font-weight: 600; color: #333; }
"""


def png_bytes(img: Image.Image) -> bytes:
    """The image encoded as PNG (encode once to both save a file and inline it)."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def image_data_uri(img: Image.Image | bytes) -> str:
    """Encode an image (or PNG bytes) as a base64 PNG data URI so the report needs no side
    files."""
    data = img if isinstance(img, bytes) else png_bytes(img)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img_tag(img: Image.Image | bytes, alt: str) -> str:
    """An <img> element carrying the image inline."""
    return f'<img src="{image_data_uri(img)}" alt="{escape(alt)}">'


def _render_summary(summary: dict[str, str]) -> str:
    """Key/value table for the run's headline numbers."""
    if not summary:
        return ""
    rows = "".join(
        f"<tr><th>{escape(str(key))}</th><td>{escape(str(value))}</td></tr>"
        for key, value in summary.items()
    )
    return f'<table class="summary">{rows}</table>'


def _render_cell(cell: dict[str, Any], phrase: str) -> str:
    """One labelled overlay; a `wide` cell (a figure of many maps) is shown at its own size, up
    to the page's width."""
    label = str(cell.get("label", ""))
    kind = "cell wide" if cell.get("wide") else "cell"
    return (
        f'<figure class="{kind}">{_img_tag(cell["image"], f"{phrase} - {label}")}'
        f"<figcaption>{escape(label)}</figcaption></figure>"
    )


def _render_head(name: str, item: dict[str, Any], kind: str) -> str:
    """A name (phrase or model) with its item's score and hit/miss badge, when it has them."""
    head = [f'<span class="{kind}">{escape(name)}</span>']
    score = item.get("score")
    if score is not None:
        head.append(f'<span class="score">{escape(f"{float(score):.3f}")}</span>')
    hit = item.get("hit")
    if hit is not None:
        verdict = "hit" if hit else "miss"
        head.append(f'<span class="badge {verdict}">{verdict}</span>')
    return "".join(head)


def _render_row(row: dict[str, Any]) -> str:
    """One phrase: its score, hit/miss badge and the labelled overlays side by side; a row with
    `groups` (one per model: label, score, hit, cells) gives each model a line of its own."""
    phrase = str(row.get("phrase", ""))
    cells = "".join(_render_cell(cell, phrase) for cell in row.get("cells", []))
    body = f'<div class="cells">{cells}</div>'
    for group in row.get("groups", []):
        name = str(group.get("label", ""))
        cells = "".join(_render_cell(c, f"{phrase} - {name}") for c in group.get("cells", []))
        body += (
            f'<div class="group"><div class="group-head">{_render_head(name, group, "model")}'
            f'</div><div class="cells">{cells}</div></div>'
        )
    return (
        f'<div class="row"><div class="row-head">{_render_head(phrase, row, "phrase")}</div>'
        f"{body}</div>"
    )


def _render_section(section: dict[str, Any]) -> str:
    """A block for one image: the plain image beside one row per phrase (its images shown
    `image_height` px high, default 160)."""
    title = str(section.get("title", ""))
    image = section.get("image")
    plain = f'<figure class="plain">{_img_tag(image, title)}</figure>' if image is not None else ""
    rows = "".join(_render_row(row) for row in section.get("rows", []))
    height = section.get("image_height")
    style = f' style="--image-height: {int(height)}px"' if height else ""
    return (
        f"<section{style}><h2>{escape(title)}</h2>"
        f'<div class="section-body">{plain}<div class="rows">{rows}</div></div></section>'
    )


def _render_table(table: Sequence[Sequence[str]] | None) -> str:
    """A grid of text whose first row is the header (e.g. methods x models)."""
    if not table:
        return ""
    header, *rows = table
    head = "".join(f"<th>{escape(str(v))}</th>" for v in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f'<table class="summary"><tr>{head}</tr>{body}</table>'


def render_report(
    title: str,
    summary: dict[str, str],
    sections: list[dict[str, Any]],
    intro: str = "",
    table: Sequence[Sequence[str]] | None = None,
) -> str:
    """Build one self-contained HTML page showing the maps for every image and phrase; `intro`
    (a paragraph) and `table` (first row the header) come between the title and the summary."""
    body = "".join(_render_section(section) for section in sections)
    intro = f'<p class="intro">{escape(intro)}</p>' if intro else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><header><h1>{escape(title)}</h1>{intro}{_render_table(table)}"
        f"{_render_summary(summary)}</header>{body}</body></html>\n"
    )


def write_report(
    path: str | Path,
    title: str,
    summary: dict[str, str],
    sections: list[dict[str, Any]],
    intro: str = "",
    table: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Write the report as UTF-8 (creating parent folders) and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(title, summary, sections, intro, table), encoding="utf-8")
    return out
