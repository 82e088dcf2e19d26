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
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        import cli_reference
    finally:
        sys.path.remove(str(ROOT / "docs" / "hooks"))
    import click

    from groundcam.cli import main

    text = cli_reference.render()
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
