"""Token Activation Map (Li et al., ICCV 2025, "Token Activation Map to Visually Explain
Multimodal LLMs") on a generative VLM, from one teacher-forced forward.

For the token at sequence position k (class y_k), in this order:

1. `s = relu(W_U[y_k] · H^L)` at every position before k (the logit lens over image and text).
2. Estimated causal inference: the context is every text position j < k - 1 (prompt text and
   earlier answer tokens; image tokens and special tokens are not text; row k-1, which predicts
   token k, holds the token's own score and is never context) whose token id differs from y_k.
   Weights `w_j = s_j / (Σ s_j + 1e-8)`; interference `m = Σ_j w_j · map_j`, where `map_j` is
   token j's own raw logit-lens image map `relu(W_U[ids_j] · H^L[I])`; scale
   `a = <map_k, m> / <m, m>` (the least-squares minimiser of `||map_k - a·m||²`, which the
   authors find with `scipy.optimize.minimize_scalar`); `map_k = relu(map_k - a·m)`.
3. Min-max normalisation over the image scores and the text scores at every text position
   j < k - 1 together (repeats included; not the token's own score at row k-1); then the rank
   Gaussian filter (`rank_gaussian_filter`) on each tile's grid, then `× 255` as uint8.

Where the authors' code (`xmed-lab/TAM`, `tam.py`) differs from the paper we follow the paper:
their round 0 ends with a map whose class is the last prompt token (`tokens[P - 1]`, not the
first generated token its comment names), their first prompt token uses the argmax class at its
position, and they pair an answer token's map with the score one row before it (a prompt
token's with the score at its own row). Here every context token j is weighted by `s_j` at its
own position and mapped by its own class `ids_j`, and every answer token k is explained by its
own class. The scores they read are the same set: the text rows before k-1."""

from __future__ import annotations

import torch

from groundcam.contract import TokenLayout
from groundcam.methods.base import TOKEN_LOGITS, Method, MethodOutput


def rank_gaussian_filter(grid: torch.Tensor) -> torch.Tensor:
    """TAM's denoising filter of a 2-D map: per cell, the 3x3 window (reflect padding) sorted
    ascending, weighted by a Gaussian over ranks -4..4 with sigma = std / mean of the window
    (population std); 0 where the window's mean is not positive, the mean where the window is
    constant (sigma 0, where the authors' formula divides by zero)."""
    g = grid.double()
    h, w = g.shape
    padded = torch.nn.functional.pad(g[None, None], (1, 1, 1, 1), mode="reflect")[0, 0]
    windows = padded.unfold(0, 3, 1).unfold(1, 3, 1).reshape(h, w, 9)
    ranked = windows.sort(-1).values
    mean = ranked.mean(-1)
    sigma = ranked.std(-1, correction=0) / torch.where(mean > 0, mean, 1)
    x = torch.arange(-4, 5, dtype=torch.float64)
    safe = torch.where(sigma > 0, sigma, 1)[..., None]
    kernel = torch.exp(-(x**2) / (2 * safe**2))
    value = (ranked * kernel / kernel.sum(-1, keepdim=True)).sum(-1)
    value = torch.where(sigma > 0, value, mean)
    return torch.where(mean > 0, value, 0).to(grid.dtype)


def filtered(values: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """`rank_gaussian_filter` on every tile's grid of the per-column `values` [N] (columns in the
    layout's order); columns without a cell keep their value."""
    out = values.clone()
    for k, tile in enumerate(layout.tiles):
        mine = (layout.tile == k) & layout.has_cell
        if not mine.any():
            continue
        grid = torch.zeros(tile.grid_h, tile.grid_w, dtype=values.dtype)
        rows, cols, at = layout.row[mine], layout.col[mine], layout.positions[mine]
        grid[rows, cols] = values[at]
        out[at] = rank_gaussian_filter(grid)[rows, cols]
    return out


def tam_maps(
    lens: torch.Tensor,
    classes: torch.Tensor,
    ids: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    positions: torch.Tensor,
    layout: TokenLayout,
    compose: torch.Tensor | None = None,
) -> torch.Tensor:
    """TAM of the tokens at `positions` (module docstring): [K, N] values in 0..255 over the
    image columns. `lens` [U, T]: the logit lens of class `classes[u]` at every position; `ids`
    [T] the sequence; `image` [N] the image positions (column order); `text` the text
    positions; `layout` indexes the columns (`positions` = column numbers). `compose` [N, M]:
    image columns that are not cells (BLIP-2's queries) go to the M cells of `layout` after the
    normalisation and before the filter, and the values stay unrounded (see `adapters.blip2`)."""
    row = {int(c): u for u, c in enumerate(classes.tolist())}
    s_all = lens.double().clamp(min=0)
    out = []
    for p in positions.tolist():
        y = int(ids[p])
        s = s_all[row[y]]
        own = s[image]
        ctx = [j for j in text.tolist() if j < p - 1 and int(ids[j]) != y]
        if ctx:
            w = s[ctx] / (s[ctx].sum() + 1e-8)
            maps = s_all[[row[int(ids[j])] for j in ctx]][:, image]
            m = (w[:, None] * maps).sum(0)
            norm = (m * m).sum()
            a = (own * m).sum() / norm if norm > 0 else own.new_zeros(())
            own = (own - a * m).clamp(min=0)
        scores = torch.cat([own, s[[j for j in text.tolist() if j < p - 1]]])
        lo, hi = scores.min(), scores.max()
        own = (own - lo) / (hi - lo) if hi > lo else torch.zeros_like(own)
        if compose is not None:
            out.append((filtered(own @ compose.to(own), layout) * 255).float())
            continue
        out.append((filtered(own, layout) * 255).to(torch.uint8).float())
    width = len(image) if compose is None else compose.shape[1]
    return torch.stack(out) if out else torch.zeros(0, width)


class Tam(Method):
    """Reads the logit lens at every position; `generation.explain_vlm` runs `tam_maps` on the
    whole sequence (compute here gives the plain logit lens, step 1 only)."""

    name = "tam"
    sources = (TOKEN_LOGITS,)
    whole_sequence = True

    def compute(self, source, recorded, grads, geometry, text_mask, graph=None):
        (logits,) = recorded
        return MethodOutput(geometry.patches(logits).clamp(min=0))
