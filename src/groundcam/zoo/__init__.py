"""Built-in tiny models, trained by groundcam's own commands on its own synthetic data."""

from __future__ import annotations

from pathlib import Path

ZOO = Path(__file__).parent

BUILTIN: dict[str, dict[str, str]] = {
    "albef-tiny-shapes": {
        "family": "albef",
        "description": "1.1M-parameter ALBEF trained from scratch on shapes scenes (ITC + ITM)",
    },
    "albef-tiny-shapes-amc": {
        "family": "albef",
        "description": "albef-tiny-shapes after AMC fine-tuning on the shapes boxes (groundcam train amc)",
    },
    "captioner-tiny-shapes": {
        "family": "captioner",
        "description": "show-attend-tell captioner (resnet-tiny + LSTM with soft attention) on shapes captions",
    },
    "scan-tiny-shapes": {
        "family": "scan",
        "description": "SCAN (stacked cross attention) on shapes scenes: proposals pooled from a small CNN, bi-GRU words",
    },
    "vlm-tiny-shapes": {
        "family": "llava",
        "description": "617k-parameter LLaVA (CLIP tower + projector + Llama, 96 px) that describes shapes scenes and answers questions about them, its attention grounded on the objects it names",
    },
    "trocr-tiny-glyphs": {
        "family": "vision-encoder-decoder",
        "description": "674k-parameter ViT + TrOCR decoder that reads rendered 3-6 character lines",
    },
}


def builtin_path(name: str) -> Path:
    """The folder of built-in model `name` (config, weights, tokenizer, model card)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; built-in models are {sorted(BUILTIN)}")
    path = ZOO / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"built-in model {name!r} is missing its weights under {path}")
    return path
