"""`gc.load` and the catalogue functions: resolve a model into its family adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from groundcam.adapters import (
    FAMILIES,
    Adapter,
    adapter_class,
    family_of_class,
    family_of_config,
    supported_classes,
)
from groundcam.adapters.albef import AlbefAdapter
from groundcam.explainer import Explainer
from groundcam.methods import METHODS
from groundcam.models.albef import AlbefModel
from groundcam.zoo import BUILTIN, builtin_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
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
    """A model ready to explain: a built-in name, a hub id, a local directory, an official ALBEF
    checkpoint file (`num_heads`/`text_num_heads` give its head counts), or a model instance
    (with its `processor`/`tokenizer`)."""
    name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
    if isinstance(model, nn.Module):
        adapter = _from_instance(model, processor, tokenizer, name)
    elif str(model) in BUILTIN:
        adapter = _from_directory(builtin_path(str(model)), processor, tokenizer, name)
    else:
        path = Path(model)
        if path.is_dir():
            adapter = _from_directory(path, processor, tokenizer, name)
        elif path.suffix in CHECKPOINT_SUFFIXES:
            from groundcam.models.albef_checkpoint import load_official

            net = load_official(path, num_heads=num_heads, text_num_heads=text_num_heads)
            adapter = AlbefAdapter(net, tokenizer, name=name)
        else:
            adapter = _from_hub(str(model), processor, tokenizer, name)
    adapter.model.eval()
    if device is not None:
        adapter.model.to(device)
    return Explainer(adapter)


def _from_instance(model: nn.Module, processor, tokenizer, name: str) -> Adapter:
    if isinstance(model, AlbefModel):
        return AlbefAdapter(model, tokenizer, name=name)
    family = family_of_class(type(model).__name__)
    if family is None:
        raise ValueError(
            f"unsupported model class {type(model).__name__}; supported classes: "
            f"{', '.join(supported_classes())}"
        )
    return adapter_class(family)(model, tokenizer=tokenizer, processor=processor, name=name)


def _from_directory(path: Path, processor, tokenizer, name: str) -> Adapter:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a saved model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if config.get("model_type") == "albef":
        net = AlbefModel.from_pretrained(path)
        return AlbefAdapter(net, tokenizer or _tokenizer_from(path), name=name)
    family = family_of_config(config.get("model_type"), config.get("architectures"))
    if family is None:
        raise ValueError(
            f"{cfg_file}: model_type {config.get('model_type')!r} is not a supported family "
            f"(architectures: {config.get('architectures')}); "
            f"supported families: {sorted(FAMILIES)}"
        )
    return adapter_class(family).from_pretrained(str(path), processor, tokenizer, name=name)


def _from_hub(model_id: str, processor, tokenizer, name: str) -> Adapter:
    """A hub id: its config names the family; the family's adapter loads the weights."""
    from transformers import AutoConfig

    if not HUB_ID.match(model_id):
        raise ValueError(
            f"unknown model {model_id!r}: no such built-in model {sorted(BUILTIN)}, local "
            "directory or checkpoint file, and not a hub id (owner/name)"
        )
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"unknown model {model_id!r}: not a built-in model {sorted(BUILTIN)}, a local "
            f"directory, a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), or a hub id "
            f"that could be loaded ({first})"
        ) from None
    family = family_of_config(config.model_type, getattr(config, "architectures", None))
    if family is None:
        raise ValueError(
            f"{model_id}: model_type {config.model_type!r} is not a supported family; "
            f"supported families: {sorted(FAMILIES)}"
        )
    return adapter_class(family).from_pretrained(model_id, processor, tokenizer, name=name)


def methods() -> list[str]:
    """Names of the explanation methods."""
    return sorted(METHODS)


def families() -> dict[str, list[str]]:
    """Supported model families and the methods defined on each (the support matrix)."""
    from groundcam.explainer import supported_methods

    out = {}
    for family in FAMILIES:
        try:
            cls = adapter_class(family)
        except ImportError:  # an optional family whose module is unavailable
            continue
        out[family] = supported_methods(cls)
    return out


def builtin_models() -> dict[str, dict[str, str]]:
    """Built-in models: name -> family and description."""
    return {k: dict(v) for k, v in BUILTIN.items()}
