"""Tiny models built offline from config classes, and the helpers the tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from groundcam.models.albef import AlbefConfig, AlbefModel

# The size of every tiny transformer tower: hidden 32, 2 layers, 4 heads, MLP 64.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
VISION = dict(SMALL, image_size=64, patch_size=16)  # 64 px images, 16 px patches: a 4 x 4 grid
# A text tower on the word tokenizer (its [CLS] / [SEP] / [PAD] ids), 16 positions.
WORD_TEXT = dict(SMALL, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Same shape, and equal to within `rel` times the expected tensor's scale (its largest
    magnitude: raw maps of tiny models are small). A reference of all zeros compares nothing,
    so it fails."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > 0, "the reference is all zeros: nothing is compared"
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max difference {err:.3g} > {rel:g} x scale {scale:.3g}"


def noise_images(n: int, height: int, width: int, seed: int = 0) -> list[Image.Image]:
    """`n` RGB images of uniform random pixels, drawn one after another from one generator."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(n)
    ]


def saved(path: Path, *parts) -> Path:
    """`path` after `save_pretrained(path)` of each part (model, processor, tokenizer)."""
    for part in parts:
        part.save_pretrained(path)
    return path


def cannot_switch_to_eager(monkeypatch, model) -> None:
    """Make `model` refuse eager attention, as a model with only sdpa kernels does."""

    def refuse(*args, **kwargs):
        raise RuntimeError("this model only runs sdpa")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)


def tiny_albef(vocab_size: int, seed: int = 0, **overrides) -> AlbefModel:
    """hidden 32, 2 vision blocks, 1 text + 2 fusion layers, 64 px images, patch 16."""
    torch.manual_seed(seed)
    cfg = AlbefConfig(
        image_size=64,
        patch_size=16,
        vision_width=32,
        vision_depth=2,
        vision_heads=4,
        vision_mlp=64,
        vocab_size=vocab_size,
        hidden_size=32,
        text_layers=3,
        fusion_layer=1,
        text_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        embed_dim=16,
        dropout=0.0,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AlbefModel(cfg).eval()
