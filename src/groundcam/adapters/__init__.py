"""One adapter per model family; the registry resolves a model, a class name or a config to one."""

from __future__ import annotations

import importlib

from groundcam.adapters.base import Adapter

# family -> (module, adapter class, model class names it explains)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "albef": ("groundcam.adapters.albef", "AlbefAdapter", ("AlbefModel",)),
    "clip": ("groundcam.adapters.clip", "ClipAdapter", ("CLIPModel",)),
    "siglip": ("groundcam.adapters.siglip", "SiglipAdapter", ("SiglipModel",)),
    "blip-itm": ("groundcam.adapters.blip", "BlipItmAdapter", ("BlipForImageTextRetrieval",)),
    "blip-caption": (
        "groundcam.adapters.blip",
        "BlipCaptionAdapter",
        ("BlipForConditionalGeneration",),
    ),
    "flava": ("groundcam.adapters.flava", "FlavaAdapter", ("FlavaModel", "FlavaForPreTraining")),
    "vilt": ("groundcam.adapters.vilt", "ViltAdapter", ("ViltForImageAndTextRetrieval",)),
    "vision-encoder-decoder": (
        "groundcam.adapters.vision_encoder_decoder",
        "VisionEncoderDecoderAdapter",
        ("VisionEncoderDecoderModel",),
    ),
}

# config.model_type -> family, for configs that name no architecture
MODEL_TYPES: dict[str, str] = {
    "albef": "albef",
    "clip": "clip",
    "siglip": "siglip",
    "blip": "blip-itm",
    "flava": "flava",
    "vilt": "vilt",
    "vision-encoder-decoder": "vision-encoder-decoder",
}


def adapter_class(family: str) -> type[Adapter]:
    """The adapter class of `family` (imported on first use)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported families: {sorted(FAMILIES)}")
    module, name, _ = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def family_of_class(class_name: str) -> str | None:
    """The family that explains model class `class_name`, if any."""
    for family, (_, _, classes) in FAMILIES.items():
        if class_name in classes:
            return family
    return None


def family_of_config(model_type: str | None, architectures: list[str] | None) -> str | None:
    """The family for a saved config: its architecture first, then its model_type."""
    for arch in architectures or []:
        family = family_of_class(arch)
        if family is not None:
            return family
    return MODEL_TYPES.get(model_type or "")


def supported_classes() -> list[str]:
    return sorted(c for _, _, classes in FAMILIES.values() for c in classes)


__all__ = ["Adapter", "FAMILIES", "adapter_class", "family_of_class", "family_of_config"]
