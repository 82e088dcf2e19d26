"""Targets name the scalar an explanation explains; adapters compute it for their family."""

from __future__ import annotations

TARGETS: dict[str, str] = {
    "itm": "the image-text match logit of the model's ITM head (score: match probability)",
    "similarity": "the contrastive logit the model outputs for the pair (score: cosine similarity)",
    "token": "a generated token's log-probability (score: its probability)",
}


def check_target(name: str, supported: list[str]) -> str:
    """`name` if the model supports it, else a ValueError listing what it does support."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; targets are {sorted(TARGETS)}")
    if name not in supported:
        raise ValueError(f"target {name!r} is not available for this model; it has {supported}")
    return name
