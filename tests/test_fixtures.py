"""Missing reference fixtures fail the tests that read them (CI must not pass by skipping them),
unless GROUNDCAM_ALLOW_MISSING_FIXTURES=1 says to skip; GROUNDCAM_FIXTURES names their folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fixtures_path, require_fixtures

ROOT = Path(__file__).resolve().parents[1]
IN_REPO = ROOT / "tests" / "fixtures"


def test_fixtures_travel_with_the_project_unless_named(monkeypatch, tmp_path):
    monkeypatch.delenv("GROUNDCAM_FIXTURES", raising=False)
    assert fixtures_path() == IN_REPO  # a fresh clone has nothing beside it
    monkeypatch.setenv("GROUNDCAM_FIXTURES", str(tmp_path))
    assert require_fixtures(fixtures_path()) == tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GROUNDCAM_FIXTURES", "copy")  # relative to the working directory
    assert fixtures_path() == tmp_path.resolve() / "copy"


def test_missing_fixtures_skip_only_when_allowed(monkeypatch, tmp_path):
    missing = tmp_path / "no-fixtures"
    monkeypatch.delenv("GROUNDCAM_ALLOW_MISSING_FIXTURES", raising=False)
    with pytest.raises(pytest.fail.Exception, match="reference fixtures not found"):
        require_fixtures(missing)
    monkeypatch.setenv("GROUNDCAM_ALLOW_MISSING_FIXTURES", "1")
    with pytest.raises(pytest.skip.Exception, match="reference fixtures not found"):
        require_fixtures(missing)


def test_missing_fixtures_fail_the_reference_tests_saying_where_and_how(tmp_path):
    """End to end: a run without the fixtures fails (errors, no skips) with the message."""
    missing = tmp_path / "no-fixtures"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDCAM_")}
    test = "tests/test_pointing.py::test_upsample_matches_official_albef_grounding"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=env | {"GROUNDCAM_FIXTURES": str(missing)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout
    assert "3 errors" in r.stdout and "skipped" not in r.stdout
    assert f"reference fixtures not found at {missing}" in r.stdout
    assert str(IN_REPO) in r.stdout
    assert "GROUNDCAM_FIXTURES" in r.stdout and "GROUNDCAM_ALLOW_MISSING_FIXTURES=1" in r.stdout
