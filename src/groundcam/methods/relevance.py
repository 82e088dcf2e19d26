"""Relevance propagation (Chefer et al., ICCV 2021, "Generic Attention-model Explainability"):
each attention contributes Ā = mean_heads(relu(∇A ⊙ A)); relevance matrices between streams start
as identities and grow by the self-attention and co-attention rules, in forward order."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from groundcam.methods.base import (
    ATTENTION_GRAPH,
    AttentionGraph,
    Method,
    MethodOutput,
    masked_token_maps,
)


def head_mean(probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Ā: gradient-weighted attention, clamped per head, then averaged over heads."""
    return (grad * probs).clamp(min=0).mean(1)


def without_residual(r: torch.Tensor) -> torch.Tensor:
    """R̄ = (R - I) row-normalised, plus I: the self-relevance with the identity's share removed
    (rows that only hold the identity stay the identity)."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    off = r - eye
    total = off.sum(-1, keepdim=True)
    off = torch.where(total != 0, off / torch.where(total != 0, total, 1), 0)
    return off + eye


def propagate(
    graph: AttentionGraph, recorded: list[torch.Tensor], grads: list[torch.Tensor]
) -> torch.Tensor:
    """The relevance of every token of `graph.readout` to every token of `graph.image`: [B, n, m]."""
    if len(graph.steps) != len(recorded):
        raise ValueError(f"{len(graph.steps)} attention steps but {len(recorded)} recorded tensors")
    dtype = recorded[0].dtype
    bars = (head_mean(p.to(dtype), g.to(dtype)) for p, g in zip(recorded, grads, strict=True))
    return propagate_bars(graph, bars)


def propagate_bars(graph: AttentionGraph, bars: Iterable[torch.Tensor]) -> torch.Tensor:
    """`propagate` from the steps' Ā [B, n, m] (head means already taken), in forward order."""
    rel: dict[tuple[str, str], torch.Tensor] = {}
    size: dict[str, int] = {}
    batch, dtype, device = 0, None, None

    def get(a: str, b: str) -> torch.Tensor:
        if (a, b) not in rel:
            if a == b:
                eye = torch.eye(size[a], dtype=dtype, device=device)
                rel[a, b] = eye.expand(batch, -1, -1).clone()
            else:
                rel[a, b] = torch.zeros(batch, size[a], size[b], dtype=dtype, device=device)
        return rel[a, b]

    for step, a in zip(graph.steps, bars, strict=True):
        if dtype is None:
            batch, dtype, device = a.shape[0], a.dtype, a.device
        q, k = step.query, step.key
        size.setdefault(q, a.shape[-2])
        size.setdefault(k, a.shape[-1])
        if q == k:  # R_qq += Ā R_qq, and every R_qx += Ā R_qx
            for other in [k] + sorted({y for x, y in rel if x == q and y != q}):
                rel[q, other] = get(q, other) + a @ get(q, other)
        else:  # co-attention: R_qk += R̄_qq^T Ā R̄_kk ; R_qq += Ā R_kq
            r_qq, r_kk, r_kq = get(q, q), get(k, k), get(k, q)
            rel[q, k] = get(q, k) + without_residual(r_qq).transpose(-1, -2) @ a @ without_residual(
                r_kk
            )
            rel[q, q] = r_qq + a @ r_kq
    if graph.readout not in size or graph.image not in size:
        raise ValueError(
            f"relevance: streams {graph.readout!r}/{graph.image!r} never appear in the recorded steps"
        )
    return get(graph.readout, graph.image)


class Relevance(Method):
    name = "relevance"
    sources = (ATTENTION_GRAPH,)
    all_layers = True
    needs_grad = True

    def compute(self, source, recorded, grads, geometry, text_mask, graph=None):
        if graph is None:
            raise ValueError("relevance needs the model's attention graph from its adapter")
        rel = propagate(graph, recorded, grads)
        maps = geometry.patches(rel)  # [B, n_readout, h, w]
        token_maps = None
        if graph.readout != graph.image and text_mask is not None:
            if text_mask.shape[-1] == maps.shape[1]:
                token_maps = masked_token_maps(maps, text_mask)
        return MethodOutput(maps[:, graph.readout_row], token_maps)
