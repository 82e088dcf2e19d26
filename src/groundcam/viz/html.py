"""Self-contained HTML reports: images inlined as PNG data URIs, inline CSS, no external assets."""

from __future__ import annotations

import base64
import io
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
.plain img, .cell img { height: 160px; width: auto; display: block; border: 1px solid #ccc; }
.rows { display: flex; flex-direction: column; gap: 12px; }
.row-head { font-size: 14px; margin-bottom: 6px; display: flex; gap: 10px; align-items: center; }
.phrase { font-weight: 600; }
.score { font-family: ui-monospace, Menlo, Consolas, monospace; color: #555; }
.badge { font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 10px; color: #fff; }
.badge.hit { background: #1e8e3e; }
.badge.miss { background: #d93025; }
.cells { display: flex; flex-wrap: wrap; gap: 10px; }
.cell figcaption { font-size: 12px; color: #444; text-align: center; margin-top: 3px; }
figure { margin: 0; }
"""


def image_data_uri(img: Image.Image) -> str:
    """Encode an image as a base64 PNG data URI so the report needs no side files."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img_tag(img: Image.Image, alt: str) -> str:
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
    """One labelled overlay."""
    label = str(cell.get("label", ""))
    return (
        f'<figure class="cell">{_img_tag(cell["image"], f"{phrase} - {label}")}'
        f"<figcaption>{escape(label)}</figcaption></figure>"
    )


def _render_row(row: dict[str, Any]) -> str:
    """One phrase: its score, hit/miss badge and the labelled overlays side by side."""
    phrase = str(row.get("phrase", ""))
    head = [f'<span class="phrase">{escape(phrase)}</span>']
    score = row.get("score")
    if score is not None:
        head.append(f'<span class="score">{escape(f"{float(score):.3f}")}</span>')
    hit = row.get("hit")
    if hit is not None:
        kind = "hit" if hit else "miss"
        head.append(f'<span class="badge {kind}">{kind}</span>')
    cells = "".join(_render_cell(cell, phrase) for cell in row.get("cells", []))
    return (
        f'<div class="row"><div class="row-head">{"".join(head)}</div>'
        f'<div class="cells">{cells}</div></div>'
    )


def _render_section(section: dict[str, Any]) -> str:
    """A block for one image: the plain image beside one row per phrase."""
    title = str(section.get("title", ""))
    image = section.get("image")
    plain = f'<figure class="plain">{_img_tag(image, title)}</figure>' if image is not None else ""
    rows = "".join(_render_row(row) for row in section.get("rows", []))
    return (
        f"<section><h2>{escape(title)}</h2>"
        f'<div class="section-body">{plain}<div class="rows">{rows}</div></div></section>'
    )


def render_report(title: str, summary: dict[str, str], sections: list[dict[str, Any]]) -> str:
    """Build one self-contained HTML page showing the maps for every image and phrase."""
    body = "".join(_render_section(section) for section in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><header><h1>{escape(title)}</h1>{_render_summary(summary)}</header>"
        f"{body}</body></html>\n"
    )


def write_report(
    path: str | Path, title: str, summary: dict[str, str], sections: list[dict[str, Any]]
) -> Path:
    """Write the report as UTF-8 (creating parent folders) and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(title, summary, sections), encoding="utf-8")
    return out
