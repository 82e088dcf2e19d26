"""The folder format of groundcam's own models (the captioner, SCAN): `config.json`,
`vocab.json` and `model.safetensors`, checked against each other and against memory before
anything is built, so a folder that does not fit is one line naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from groundcam.data.caption_text import Vocabulary
from groundcam.errors import InputError
from groundcam.model_files import check_model_size, check_safetensors, read_json


def read_saved(
    directory: str | Path, from_dict: Callable[[dict, str], Any], what: str
) -> tuple[Any, Vocabulary, Path, Path]:
    """The config (`from_dict(data, where)`, whose `parameters()` is checked against memory),
    vocabulary, config file and weights file of a saved model folder; `what` names the kind of
    model in the message for a folder that lacks one of its files."""
    directory = Path(directory)
    cfg_file, vocab_file = directory / "config.json", directory / "vocab.json"
    weights = directory / "model.safetensors"
    for f in (cfg_file, vocab_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{directory}: no {f.name}; not a saved {what}")
    cfg = from_dict(read_json(cfg_file), str(cfg_file))
    vocab = Vocabulary.load(vocab_file)
    if len(vocab) != cfg.vocab_size:
        raise ValueError(
            f"{vocab_file} has {len(vocab)} words but {cfg_file} says vocab_size "
            f"{cfg.vocab_size}: the vocabulary does not belong to this checkpoint"
        )
    check_model_size(cfg.parameters(), cfg_file)
    check_safetensors(weights)
    return cfg, vocab, cfg_file, weights


def load_saved(read: Callable[[str | Path], nn.Module], source: str | Path) -> nn.Module:
    """`read(source)` (a model class's `from_pretrained`), a folder that does not fit being an
    `InputError` (one line naming the file)."""
    try:
        return read(source)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None


def write_saved(model: nn.Module, directory: str | Path) -> None:
    """Write `model` (with `config.to_dict()` and `vocab`) as the folder `read_saved` reads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    model.vocab.save(directory / "vocab.json")
    state = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checked `model.safetensors`."""
    from safetensors.torch import load_file

    return load_file(str(weights))


def load_weights(model: nn.Module, state: dict, weights: Path, cfg_file: Path) -> nn.Module:
    """`model` with `state` loaded, in eval mode; tensors that do not fit the config are one
    line naming both files."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"{weights} does not fit {cfg_file}: {first}") from None
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit {cfg_file}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()
