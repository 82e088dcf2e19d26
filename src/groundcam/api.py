"""`gc.load` and the catalogue functions: resolve a model into its family adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from groundcam.adapters.albef import AlbefAdapter
from groundcam.explainer import Explainer
from groundcam.methods import METHODS
from groundcam.models.albef import AlbefModel
from groundcam.zoo import BUILTIN, builtin_path

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _tokenizer_from(directory: Path):
    """The tokenizer saved beside a model: `tokenizer.json`, or a BERT `vocab.txt`."""
    if (directory / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    if (directory / "vocab.txt").is_file():
        from transformers import BertTokenizer

        # transformers 5 ignores `vocab_file=`; `vocab=` is the argument that reads the file
        return BertTokenizer(vocab=str(directory / "vocab.txt"))
    return None


def load(
    model: str | Path | nn.Module,
    processor=None,
    tokenizer=None,
    num_heads: int = 12,
    text_num_heads: int = 12,
    device: str | torch.device | None = None,
) -> Explainer:
    """A model ready to explain: a built-in name, a local directory, an official ALBEF checkpoint
    file (`num_heads`/`text_num_heads` give its head counts), or a model instance."""
    name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
    if isinstance(model, AlbefModel):
        net = model
    elif isinstance(model, nn.Module):
        raise ValueError(
            f"unsupported model class {type(model).__name__}; supported families: {families()}"
        )
    elif str(model) in BUILTIN:
        path = builtin_path(str(model))
        net, tokenizer = AlbefModel.from_pretrained(path), tokenizer or _tokenizer_from(path)
    else:
        path = Path(model)
        if path.is_dir():
            cfg_file = path / "config.json"
            if not cfg_file.is_file():
                raise FileNotFoundError(f"{path}: no config.json; not a saved model directory")
            model_type = json.loads(cfg_file.read_text()).get("model_type")
            if model_type != "albef":
                raise ValueError(
                    f"{cfg_file}: model_type {model_type!r} is not a supported family; "
                    f"supported families: {families()}"
                )
            net, tokenizer = AlbefModel.from_pretrained(path), tokenizer or _tokenizer_from(path)
        elif path.suffix in CHECKPOINT_SUFFIXES:
            from groundcam.models.albef_checkpoint import load_official

            net = load_official(path, num_heads=num_heads, text_num_heads=text_num_heads)
        else:
            raise ValueError(
                f"unknown model {name!r}: not a built-in model {sorted(BUILTIN)}, "
                f"a local model directory or a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})"
            )
    net.eval()
    if device is not None:
        net.to(device)
    return Explainer(AlbefAdapter(net, tokenizer, name=name))


def methods() -> list[str]:
    """Names of the explanation methods."""
    return sorted(METHODS)


def families() -> dict[str, list[str]]:
    """Supported model families and the methods defined on each."""
    return {AlbefAdapter.family: methods()}


def builtin_models() -> dict[str, dict[str, str]]:
    """Built-in models: name -> family and description."""
    return {k: dict(v) for k, v in BUILTIN.items()}
