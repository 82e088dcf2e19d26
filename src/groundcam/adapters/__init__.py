"""One adapter per model family; the registry resolves a model, a class name, a config or a
checkpoint file to one. A new family is one adapter module plus one entry here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from groundcam.adapters.base import Adapter


@dataclass(frozen=True)
class Family:
    """Where a family's adapter lives and what it explains: model class names, the
    `config.model_type`s of saved configs that name no architecture, and the suffixes of single
    checkpoint files it loads (not directories)."""

    module: str
    adapter: str
    classes: tuple[str, ...]
    model_types: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "albef": Family(
        "groundcam.adapters.albef",
        "AlbefAdapter",
        ("AlbefModel",),
        ("albef",),
        files=(".pth", ".pt", ".bin", ".safetensors"),
    ),
    "clip": Family("groundcam.adapters.clip", "ClipAdapter", ("CLIPModel",), ("clip",)),
    "siglip": Family("groundcam.adapters.siglip", "SiglipAdapter", ("SiglipModel",), ("siglip",)),
    "blip-itm": Family(
        "groundcam.adapters.blip", "BlipItmAdapter", ("BlipForImageTextRetrieval",), ("blip",)
    ),
    "blip-caption": Family(
        "groundcam.adapters.blip", "BlipCaptionAdapter", ("BlipForConditionalGeneration",)
    ),
    "flava": Family(
        "groundcam.adapters.flava",
        "FlavaAdapter",
        ("FlavaModel", "FlavaForPreTraining"),
        ("flava",),
    ),
    "vilt": Family(
        "groundcam.adapters.vilt", "ViltAdapter", ("ViltForImageAndTextRetrieval",), ("vilt",)
    ),
    "vision-encoder-decoder": Family(
        "groundcam.adapters.vision_encoder_decoder",
        "VisionEncoderDecoderAdapter",
        ("VisionEncoderDecoderModel",),
        ("vision-encoder-decoder",),
    ),
    "llava": Family(
        "groundcam.adapters.llava", "LlavaAdapter", ("LlavaForConditionalGeneration",), ("llava",)
    ),
    "idefics3": Family(
        "groundcam.adapters.idefics3",
        "Idefics3Adapter",
        ("Idefics3ForConditionalGeneration",),
        ("idefics3",),
    ),
    "smolvlm": Family(
        "groundcam.adapters.idefics3",
        "SmolVlmAdapter",
        ("SmolVLMForConditionalGeneration",),
        ("smolvlm",),
    ),
    "internvl": Family(
        "groundcam.adapters.internvl",
        "InternVLAdapter",
        ("InternVLForConditionalGeneration",),
        ("internvl",),
    ),
    "qwen-vl": Family(
        "groundcam.adapters.qwen_vl",
        "QwenVlAdapter",
        (
            "Qwen2VLForConditionalGeneration",
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen3VLForConditionalGeneration",
        ),
        ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    ),
    "llava-next": Family(
        "groundcam.adapters.llava_next",
        "LlavaNextAdapter",
        ("LlavaNextForConditionalGeneration",),
        ("llava_next",),
    ),
    "llava-onevision": Family(
        "groundcam.adapters.llava_next",
        "LlavaOnevisionAdapter",
        ("LlavaOnevisionForConditionalGeneration",),
        ("llava_onevision",),
    ),
    "blip2": Family(
        "groundcam.adapters.blip2",
        "Blip2Adapter",
        ("Blip2ForConditionalGeneration",),
        ("blip-2",),
    ),
    "instructblip": Family(
        "groundcam.adapters.blip2",
        "InstructBlipAdapter",
        ("InstructBlipForConditionalGeneration",),
        ("instructblip",),
    ),
    "paligemma": Family(
        "groundcam.adapters.paligemma",
        "PaliGemmaAdapter",
        ("PaliGemmaForConditionalGeneration",),
        ("paligemma",),
    ),
    "gemma3": Family(
        "groundcam.adapters.gemma3",
        "Gemma3Adapter",
        ("Gemma3ForConditionalGeneration",),
        ("gemma3",),
    ),
    "captioner": Family(
        "groundcam.adapters.captioner",
        "CaptionerAdapter",
        ("ShowAttendTell",),
        ("groundcam-captioner",),
    ),
    "scan": Family("groundcam.adapters.scan", "ScanAdapter", ("SCAN",), ("groundcam-scan",)),
}


def adapter_class(family: str) -> type[Adapter]:
    """The adapter class of `family` (imported on first use)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported families: {sorted(FAMILIES)}")
    entry = FAMILIES[family]
    return getattr(importlib.import_module(entry.module), entry.adapter)


def family_of_class(class_name: str) -> str | None:
    """The family that explains model class `class_name`, if any."""
    return next((f for f, e in FAMILIES.items() if class_name in e.classes), None)


def family_of_config(model_type: str | None, architectures: list[str] | None) -> str | None:
    """The family for a saved config: its architecture first, then its model_type."""
    for arch in architectures or []:
        family = family_of_class(arch)
        if family is not None:
            return family
    return next((f for f, e in FAMILIES.items() if model_type in e.model_types), None)


def family_of_file(suffix: str) -> str | None:
    """The family that loads single checkpoint files ending in `suffix`, if any."""
    return next((f for f, e in FAMILIES.items() if suffix.lower() in e.files), None)


def checkpoint_suffixes() -> list[str]:
    return sorted({s for e in FAMILIES.values() for s in e.files})


def supported_classes() -> list[str]:
    return sorted(c for e in FAMILIES.values() for c in e.classes)


__all__ = [
    "Adapter",
    "FAMILIES",
    "Family",
    "adapter_class",
    "checkpoint_suffixes",
    "family_of_class",
    "family_of_config",
    "family_of_file",
    "supported_classes",
]
