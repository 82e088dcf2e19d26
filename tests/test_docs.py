"""The documentation's tutorials run as written (every python block of a page, in order, in one
namespace, from a scratch folder that sees the repository's test fixtures), and the CLI
reference covers every verb."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    """The page's ```python blocks, in order."""
    return BLOCK.findall(page.read_text())


def test_every_tutorial_has_code():
    names = {p.stem for p in TUTORIALS}
    assert {"albef-words", "trocr-tokens", "captioner-words", "amc", "flava"} <= names
    assert all(python_blocks(p) for p in TUTORIALS)


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(page, tmp_path, monkeypatch, one_thread):
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"tutorial_{page.stem}"}
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "tests" not in p.parts]
    assert written, f"{page.name} wrote nothing"


def test_cli_reference_covers_every_verb():
    import click

    from groundcam.cli import main

    text = hook("cli_reference").render()
    expected = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        expected.append(" ".join(path))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(main, ["groundcam"])
    for verb in ("groundcam explain", "groundcam train amc", "groundcam eval captions"):
        assert verb in expected
    for verb in expected:
        assert f"## `{verb}`" in text, verb
    assert "Usage: groundcam explain" in text


def hook(name: str):
    """A module of docs/hooks, imported by path (the hooks are not a package)."""
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "docs" / "hooks"))


def test_families_table_marks_each_family_s_methods():
    import groundcam as gc

    rows = hook("families_table").render().splitlines()
    methods = gc.methods()
    assert len(rows) == 2 + len(gc.families())
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        family = cells[0].strip("`")
        marked = {m for m, c in zip(methods, cells[1:], strict=True) if c == "✓"}
        assert marked == set(gc.families()[family]), family
    page = "x\n<!-- families-matrix -->\ny"
    assert "| `albef` |" in hook("families_table").on_page_markdown(page)


def test_nav_lists_every_page_and_only_pages_that_exist():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(entries) -> list[str]:
        out = []
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            out += pages(value) if isinstance(value, list) else [value]
        return out

    nav = pages(config["nav"])
    on_disk = sorted(
        str(p.relative_to(ROOT / "docs"))
        for p in (ROOT / "docs").rglob("*.md")
        if "hooks" not in p.parts
    )
    assert sorted(nav) == on_disk
