"""`relevance` on a generative VLM: Chefer's self-attention rule (Chefer et al., ICCV 2021)
through every decoder layer of the language model, read at row k-1 over the image tokens.

Rule: `R_0 = I`, `R_l = R_{l-1} + Ā_l R_{l-1}` with `Ā_l = mean_heads relu(∂ log p_k / ∂A_l ⊙ A_l)`,
so row k-1 of `R_L` is `e_{k-1}ᵀ (I + Ā_L) ... (I + Ā_1)`. That row product is taken from the
left during the backward pass, which reaches the layers last to first: each layer's Ā is used
the moment its gradient arrives and dropped, so besides what autograd itself keeps for the
backward (the eager attention probabilities of the forward) the method holds one [T, T] gradient
and one [T] row per token, never every layer's gradient at once. One backward per explained
token (the rule needs each token's own gradients); one forward for all of them. Every decoder
layer runs eager attention while recording (`vlm.eager_only`), restored afterwards.

Attention under the language model (`below`: BLIP-2's Q-Former and ViT, `adapters/blip2.py`) is
recorded in the same forward; per token its Ā (`relevance.head_mean` of the same token's
gradient, taken in the same backward, where those gradients come back together: the Q-Former's
maps are small, the ViT's as large as its saved attention) go to `compose`, which carries the
row from the image columns down to the image's cells."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from groundcam.capture import trainable
from groundcam.contract import HookPoint, RecordSpec
from groundcam.gradients import HeadRows
from groundcam.methods.relevance import head_mean


def _step(state: dict, layer: int, a: torch.Tensor):
    """The backward hook of layer `layer`'s attention `a`: row <- row (I + Ā)."""

    def hook(grad: torch.Tensor) -> None:
        if layer != state["next"]:
            raise RuntimeError("relevance: the backward reached the layers out of order")
        bar = (grad[0].float() * a[0].detach().float()).clamp(min=0).mean(0)
        state["row"] = state["row"] + state["row"] @ bar
        state["next"] = layer - 1

    return hook


def lm_relevance(
    adapter,
    inputs: dict,
    image: torch.Tensor,
    pos: torch.Tensor,
    token_ids: torch.Tensor,
    below: Sequence[nn.Module] = (),
    compose: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per token at `pos` (ids `token_ids`), its relevance row over the image positions
    `image`: values [K, N], the tokens' log-probabilities [K] and the note of what ran eager.
    With `below` (attention modules under the LM, forward order, already running eager) each
    row is `compose(row, Ā of below)` instead: values [K, cells]."""
    probs: list[torch.Tensor | None] = [None] * len(adapter.attn)
    under: list[torch.Tensor | None] = [None] * len(below)

    def grab(kept: list, i: int):
        def hook(module, args, output):
            kept[i] = output[1]

        return hook

    spec = RecordSpec([HookPoint(f"lm.{i}.attn", m, 1) for i, m in enumerate(adapter.attn)], None)
    picked = HeadRows(adapter.output_head(), pos - 1)
    handles = [m.register_forward_hook(grab(probs, i)) for i, m in enumerate(adapter.attn)]
    handles += [m.register_forward_hook(grab(under, i)) for i, m in enumerate(below)]
    try:
        with torch.enable_grad(), trainable(adapter.model), picked, adapter.recording(spec) as note:
            logits = adapter.model(**inputs, use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    if any(p is None or not p.requires_grad for p in probs):
        raise ValueError("relevance: a decoder layer returned no attention weights to propagate")
    missing = [type(m).__name__ for m, p in zip(below, under, strict=True) if p is None]
    if missing or any(not p.requires_grad for p in under):
        raise ValueError(
            f"relevance: {missing[0] if missing else 'an attention under the language model'} "
            "returned no attention weights (with a gradient) to propagate"
        )
    logp = logits.float().log_softmax(-1).gather(-1, token_ids[:, None])[:, 0]
    rows = []
    for k in range(len(pos)):
        row = torch.zeros(probs[0].shape[-1], dtype=torch.float32, device=logp.device)
        row[pos[k] - 1] = 1
        state = {"row": row, "next": len(probs) - 1}
        hooks = [a.register_hook(_step(state, i, a)) for i, a in enumerate(probs)]
        try:
            grads = torch.autograd.grad(
                logp[k], [probs[0], *under], retain_graph=k < len(pos) - 1, allow_unused=True
            )
        finally:
            for h in hooks:
                h.remove()
        out = state["row"][image.to(row.device)]
        if below:
            bars = [
                head_mean(a.detach().float(), g.float())[0]
                if g is not None
                else a.new_zeros(a.shape[-2:], dtype=torch.float32)
                for a, g in zip(under, grads[1:], strict=True)
            ]
            out = compose(out, bars)
        rows.append(out.detach().cpu())
    return torch.stack(rows), logp.detach().cpu(), note
