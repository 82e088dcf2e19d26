"""Shared pieces for adapters over 🤗 transformers models: inputs, processors, loading."""

from __future__ import annotations

import warnings

import torch
from PIL import Image
from torch import nn

from groundcam.adapters.base import ensure_eager


def image_processor_of(processor):
    """The image processor inside a multimodal processor, or the processor itself."""
    return getattr(processor, "image_processor", None) or processor


def tokenizer_of(processor, tokenizer=None):
    """An explicit tokenizer wins; else the processor's."""
    return tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)


def pixel_values(processor, images: list[Image.Image], device: torch.device, **kwargs):
    """The model's image preprocessing (RGB first) as a float tensor on `device`."""
    if processor is None:
        raise ValueError("this model has no image processor: pass processor= to gc.load")
    ip = image_processor_of(processor)
    out = ip(images=[im.convert("RGB") for im in images], return_tensors="pt", **kwargs)
    return out["pixel_values"].to(device)


def text_inputs(
    tokenizer,
    phrases: list[str],
    max_length: int,
    device: torch.device,
    padding: str | bool = "longest",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask; a phrase longer than the text encoder's `max_length` is
    truncated with a warning (it is explained as truncated, never an index error)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass tokenizer= (or processor=) to gc.load")
    full = tokenizer(phrases, padding=False, truncation=False, **kwargs)["input_ids"]
    for phrase, ids in zip(phrases, full, strict=True):
        if len(ids) > max_length:
            warnings.warn(
                f"phrase truncated to the text encoder's {max_length} tokens: {phrase[:60]!r}",
                stacklevel=3,
            )
    enc = tokenizer(
        phrases,
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        **kwargs,
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def token_strings(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Per row, the tokens under the mask as strings."""
    out = []
    for ids, m in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        ids = [i for i, keep in zip(ids, m, strict=True) if keep]
        out.append(tokenizer.convert_ids_to_tokens(ids) if tokenizer else [str(i) for i in ids])
    return out


def load_pretrained(model_class, source: str, processor=None, **kwargs):
    """A transformers model with eager attention (sdpa returns no weights), in eval mode, and
    its processor (AutoProcessor, else AutoImageProcessor) when none is given."""
    model = model_class.from_pretrained(source, attn_implementation="eager", **kwargs)
    model.eval()
    if processor is None:
        processor = auto_processor(source)
    return model, processor


def auto_processor(source: str):
    """The saved processor; when that holds no image processor (AutoProcessor falls back to a
    bare tokenizer for some directories), the saved image processor."""
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        proc = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError):
        proc = None
    if hasattr(proc, "image_processor") or isinstance(proc, ImageProcessingMixin):
        return proc
    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return proc


def prepare_instance(model: nn.Module) -> nn.Module:
    """A caller's model: eager attention (or a clear error), eval mode."""
    ensure_eager(model)
    return model.eval()
