"""`relevance` on BLIP-2 and InstructBLIP: Chefer's rules (Chefer et al., ICCV 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers")
through the language model onto the query tokens, then through the Q-Former onto the ViT's
patches. Every Ā is `mean_heads relu(∂ log p_k / ∂A ⊙ A)` of the explained token k's own gradient.

Streams: the LM's sequence t; the Q-Former's sequence s (the Q queries, then InstructBLIP's
instruction tokens); the ViT's tokens i (CLS, then the patches). Starting from `R_ss = I`,
`R_ii = I`, `R_si = 0`, in forward order:

- ViT self-attention (only with `vision=True`): `R_ii += Ā R_ii` (a gradient-weighted rollout).
- Q-Former self-attention over s: `R_ss += Ā R_ss` and `R_si += Ā R_si` (rules 6 and 7).
- Q-Former cross-attention, queries -> ViT tokens (Ā [Q, 1 + patches], rows of the instruction
  tokens zero: they do not read the image): `R_si += R̄_ssᵀ Ā R̄_ii` (rule 10), where
  `R̄ = (R - I)` row-normalised `+ I` (`relevance.without_residual`); rule 11,
  `R_ss += Ā R_is`, adds nothing since the ViT never reads the queries (`R_is = 0`).

The projector (`language_projection`) maps each query on its own, so query q of the Q-Former is
LM position q: the LM's rule `R_ti += Ā R_ti` from `R_ti = R_si` at the query positions gives
`R_ti = R_tt R_si`, and the map of token k is `R_tt[k-1, queries] @ R_si[:Q, patches]` (the CLS
column dropped, never renormalised) with `R_tt[k-1]` the LM's row (`methods.lm_relevance`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional

from groundcam.contract import AttentionGraph, AttentionStep
from groundcam.methods.relevance import propagate_bars

STEPS = {
    "vision": AttentionStep("image", "image"),
    "self": AttentionStep("query", "query"),
    "cross": AttentionStep("query", "image"),
}


def query_patch_relevance(kinds: Sequence[str], bars: Sequence[torch.Tensor]) -> torch.Tensor:
    """`R_si[:Q]` [Q, 1 + patches] (module docstring) from the Ā of each recorded attention in
    forward order, `kinds[j]` saying which ("vision" [I, I], "self" [S, S], "cross" [Q, I])."""
    if "self" not in kinds or "cross" not in kinds:
        raise ValueError("Q-Former relevance needs its self-attention and cross-attention maps")
    size = next(b.shape[-1] for k, b in zip(kinds, bars, strict=True) if k == "self")
    queries = next(b.shape[-2] for k, b in zip(kinds, bars, strict=True) if k == "cross")
    padded = [
        functional.pad(b, (0, 0, 0, size - b.shape[-2])) if k == "cross" else b
        for k, b in zip(kinds, bars, strict=True)
    ]
    graph = AttentionGraph(tuple(STEPS[k] for k in kinds), readout="query", image="image")
    return propagate_bars(graph, (b[None] for b in padded))[0, :queries]


def compose_to_patches(
    row: torch.Tensor, kinds: Sequence[str], bars: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Token k's map over the patches [P]: its LM row over the queries [Q] times `R_si`, CLS
    column dropped (on the row's device: a dispatched model may hold the ViT elsewhere)."""
    return row @ query_patch_relevance(kinds, [b.to(row) for b in bars])[:, 1:]
