"""MkDocs hook: the methods table (`benchmarks/methods_table.py`'s markdown) on the methods page."""

from __future__ import annotations

from pathlib import Path

MARKER = "<!-- methods-table -->"
TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "methods_table.md"


def render() -> str:
    """The table as the benchmark last wrote it, or a line saying how to make it."""
    if not TABLE.is_file():
        return "*(not measured yet: run `python benchmarks/methods_table.py`)*"
    return TABLE.read_text()


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace the marker on the methods page with the table."""
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
