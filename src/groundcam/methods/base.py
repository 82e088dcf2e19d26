"""What every explanation method is: the tensors it needs, and the math that turns them into maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from groundcam.contract import (
    ATTENTION_GRAPH,
    LM_TOKENS,
    TEXT_TO_IMAGE,
    TOKEN_LOGITS,
    VISION_ATTENTION,
    VISION_TOKENS,
    AttentionGraph,
    AttentionStep,
)
from groundcam.geometry import Geometry

__all__ = [
    "ATTENTION_GRAPH",
    "AttentionGraph",
    "AttentionStep",
    "CROSS_ATTENTION",
    "LM_TOKENS",
    "TOKEN_LOGITS",
    "Method",
    "MethodOutput",
    "SELF_ATTENTION",
    "TEXT_TO_IMAGE",
    "TOKENS",
    "VISION_ATTENTION",
    "VISION_TOKENS",
    "masked_token_maps",
]

# Old names of the source kinds, kept for code written against them.
CROSS_ATTENTION = TEXT_TO_IMAGE
SELF_ATTENTION = VISION_ATTENTION
TOKENS = VISION_TOKENS


@dataclass
class MethodOutput:
    raw_maps: torch.Tensor  # [B, h, w]
    raw_token_maps: torch.Tensor | None = None  # [B, T, h, w] where the method has them
    text_conditioned: bool = True


class Method:
    """A method declares the sources it can read (in order of preference), whether it needs every
    layer of that source or one, and whether it needs gradients; `compute` is pure math."""

    name: str = ""
    sources: tuple[str, ...] = ()
    all_layers: bool = False
    needs_grad: bool = False

    def compute(
        self,
        source: str,
        recorded: list[torch.Tensor],
        grads: list[torch.Tensor] | None,
        geometry: Geometry,
        text_mask: torch.Tensor | None,
        graph: AttentionGraph | None = None,
    ) -> MethodOutput:
        raise NotImplementedError


def masked_token_maps(per_token: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the maps of padded text positions ([B, T, h, w] times the [B, T] mask)."""
    if text_mask is None:
        return per_token
    return per_token * text_mask[:, :, None, None].to(per_token.dtype)
