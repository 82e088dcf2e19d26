"""Relative attention (Zhang et al., ICLR 2025, "MLLMs know where to look"): a token's
attention row over the image tokens divided, column by column, by the same model's attention
row of the last prompt token for the generic prompt `GENERIC_PROMPT` in the same template and
on the same images (`generation.explain_vlm` runs both forwards). The first generated token's
row is the prompt's last token, their `rel_attention_llava`; later tokens use row k-1. Where the
generic row is 0 the ratio is 0."""

from __future__ import annotations

import torch

from groundcam.methods.attention import Attention
from groundcam.methods.base import TEXT_TO_IMAGE

GENERIC_PROMPT = "Write a general description of the image."


def relative(values: torch.Tensor, generic: torch.Tensor) -> torch.Tensor:
    """`values` [K, N] divided by the generic row `generic` [N] (0 where it is 0)."""
    return torch.where(generic > 0, values / torch.where(generic > 0, generic, 1), 0)


class RelativeAttention(Attention):
    name = "relative-attention"
    sources = (TEXT_TO_IMAGE,)
    relative = True
    vlm_only = True  # the generic prompt needs a model that reads a prompt
