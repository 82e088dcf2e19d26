"""Explanation methods: pure functions of recorded tensors and the patch geometry."""

from __future__ import annotations

from groundcam.methods.attention import Attention
from groundcam.methods.attn_gradcam import AttnGradCAM
from groundcam.methods.base import (
    ATTENTION_GRAPH,
    CROSS_ATTENTION,
    SELF_ATTENTION,
    TEXT_TO_IMAGE,
    TOKENS,
    VISION_ATTENTION,
    VISION_TOKENS,
    AttentionGraph,
    AttentionStep,
    Method,
    MethodOutput,
)
from groundcam.methods.gradcam import GradCAM
from groundcam.methods.logit_lens import LogitLens
from groundcam.methods.relative_attention import RelativeAttention
from groundcam.methods.relevance import Relevance
from groundcam.methods.rollout import Rollout
from groundcam.methods.tam import Tam

METHODS: dict[str, Method] = {
    m.name: m
    for m in (Attention(), Rollout(), GradCAM(), AttnGradCAM(), Relevance(), LogitLens())
    + (Tam(), RelativeAttention())
}


def get_method(name: str) -> Method:
    """The method called `name`, or a ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods are {sorted(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "Method",
    "MethodOutput",
    "get_method",
    "TEXT_TO_IMAGE",
    "VISION_ATTENTION",
    "VISION_TOKENS",
    "CROSS_ATTENTION",
    "SELF_ATTENTION",
    "TOKENS",
    "ATTENTION_GRAPH",
    "AttentionGraph",
    "AttentionStep",
]
