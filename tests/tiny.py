"""Tiny models built offline from config classes, for tests."""

from __future__ import annotations

import torch

from groundcam.models.albef import AlbefConfig, AlbefModel


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
