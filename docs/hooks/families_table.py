"""MkDocs hook: the families x methods table of the docs, from `groundcam.families()` at build time."""

from __future__ import annotations

MARKER = "<!-- families-matrix -->"


def render() -> str:
    """A markdown table: one row per family, a check where it supports the method."""
    import groundcam as gc

    methods = gc.methods()
    rows = ["| family | " + " | ".join(f"`{m}`" for m in methods) + " |"]
    rows.append("|---" * (len(methods) + 1) + "|")
    for family, supported in gc.families().items():
        cells = ("✓" if m in supported else "" for m in methods)
        rows.append(f"| `{family}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace the marker on the families page with the table."""
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
