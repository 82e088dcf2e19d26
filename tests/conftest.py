"""Shared test fixtures: the official ALBEF reference files and tiny models built offline."""

from __future__ import annotations

import os

# Tests never reach the hub: a hub id that is not cached fails at once instead of retrying.
# (Set before anything imports huggingface_hub, which reads it once.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest
import torch
from tiny import saved, tiny_albef

from groundcam.data.shapes import vocabulary
from groundcam.train.tokenizer import word_tokenizer

# Tiny models run fastest on one thread; on 2 shared cores, more threads only fight.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
# The reference files travel with the project (tests/fixtures/, copied from the shared folder the
# datasets' formats were written in); GROUNDCAM_FIXTURES names another copy.
DEFAULT_FIXTURES = ROOT / "tests" / "fixtures"
ALLOW_MISSING = "GROUNDCAM_ALLOW_MISSING_FIXTURES"


def fixtures_path() -> Path:
    """GROUNDCAM_FIXTURES when set (relative to the working directory), else the project's
    `tests/fixtures`."""
    named = os.environ.get("GROUNDCAM_FIXTURES")
    return Path(named).resolve() if named else DEFAULT_FIXTURES


def missing_fixtures(path: Path) -> str:
    return (
        f"reference fixtures not found at {path}: they come with the project "
        f"({DEFAULT_FIXTURES}); point "
        f"GROUNDCAM_FIXTURES at a copy of that folder, or set {ALLOW_MISSING}=1 to skip the "
        "reference tests"
    )


def require_fixtures(path: Path) -> Path:
    """`path` when it is a folder; else the test fails (as in CI), or is skipped when
    GROUNDCAM_ALLOW_MISSING_FIXTURES=1."""
    if path.is_dir():
        return path
    if os.environ.get(ALLOW_MISSING) == "1":
        pytest.skip(missing_fixtures(path))
    pytest.fail(missing_fixtures(path), pytrace=False)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The reference files (see `fixtures_path`, `require_fixtures`)."""
    return require_fixtures(fixtures_path())


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests, whatever ran before (the CLI's `--threads`, a
    trainer): tiny matrices run ~10x faster than on several threads fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(vocabulary())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny ALBEF saved the way the zoo stores models (config, safetensors, tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-albef")
    return saved(path, tiny_albef(len(tokenizer)), tokenizer)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A saved micro ResNet (random, seed 0): the captioner tests' image encoder."""
    from test_captioner import RESNET_MICRO
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "micro"
    ResNetModel(ResNetConfig(**RESNET_MICRO)).save_pretrained(path)
    return path
