"""Shared test fixtures: the official ALBEF reference files and tiny models built offline."""

from __future__ import annotations

import os

# Tests never reach the hub: a hub id that is not cached fails at once instead of retrying.
# (Set before anything imports huggingface_hub, which reads it once.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest
import torch
from tiny import tiny_albef

from groundcam.data.shapes import vocabulary
from groundcam.train.tokenizer import word_tokenizer

# Tiny models run fastest on one thread; on 2 shared cores, more threads only fight.
torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(vocabulary())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny ALBEF saved the way the zoo stores models (config, safetensors, tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-albef")
    tiny_albef(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
