"""Per-column values of a recorded sequence placed back on each image, through the family's
`TokenLayout` (which image, tile and cell every image token is).

Rule (`place`): the output of image i is an (H, W) grid over the whole original image; pixel
(y, x) samples, at its centre ``((y + 0.5) / H, (x + 0.5) / W)``, the cell of every tile whose box
holds that point (half-open: ``x0 <= u < x1``); the value is the **mean over the tiles that cover
the pixel** (a base image plus hi-res tiles: their mean), or with ``overlap="max"`` their maximum,
and 0 where no tile does (the sides a centre crop drops). Newline and separator columns have no
cell and are never read.

Regions (detector boxes, `region_layout`): each region is a tile with a 1x1 grid whose box is the
region's box, so a map over regions paints each box with its weight; region models combine
overlapping boxes with ``overlap="max"`` (a pixel shows its strongest region, so a small box
inside a large background box keeps its own weight).

Size: the image's `(H, W)` as given (e.g. `layout.sizes`, the original pixel grid), else the
working resolution: per axis, the finest tile's cells spread over the whole image,
``ceil(grid / box span)`` (one image, one tile covering it: exactly its grid, so the maps equal
the patch-grid maps of today's families).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from groundcam.contract import Tile, TokenLayout


def working_size(layout: TokenLayout, image: int) -> tuple[int, int]:
    """The (H, W) at which image `image`'s finest tile keeps one output pixel per cell."""
    tiles = [t for t in layout.tiles if t.image == image]
    h = max(math.ceil(t.grid_h / (t.box[3] - t.box[1]) - 1e-6) for t in tiles)
    w = max(math.ceil(t.grid_w / (t.box[2] - t.box[0]) - 1e-6) for t in tiles)
    return h, w


def _cells(centres: torch.Tensor, lo: float, hi: float, n: int) -> torch.Tensor:
    """Per pixel centre, the cell index in [0, n) of a span [lo, hi), or -1 outside it."""
    inside = (centres >= lo) & (centres < hi)
    cell = ((centres - lo) / (hi - lo) * n).floor().long().clamp(0, n - 1)
    return torch.where(inside, cell, -1)


def _tile_index(layout: TokenLayout, k: int, tile: Tile, size: tuple[int, int]) -> torch.Tensor:
    """Per output pixel, the sequence column tile `k` paints there, or -1."""
    table = torch.full((tile.grid_h, tile.grid_w), -1, dtype=torch.long)
    mine = (layout.tile == k) & layout.has_cell
    table[layout.row[mine], layout.col[mine]] = layout.positions[mine]
    h, w = size
    x0, y0, x1, y1 = tile.box
    ys = _cells((torch.arange(h, dtype=torch.float64) + 0.5) / h, y0, y1, tile.grid_h)
    xs = _cells((torch.arange(w, dtype=torch.float64) + 0.5) / w, x0, x1, tile.grid_w)
    index = table[ys.clamp(min=0)][:, xs.clamp(min=0)]
    return torch.where((ys[:, None] >= 0) & (xs[None, :] >= 0), index, -1)


def region_layout(boxes: torch.Tensor | Sequence[Sequence[float]], start: int = 0) -> TokenLayout:
    """One image whose tokens from column `start` are regions: box k (x0, y0, x1, y1 in
    fractions of the image) is a 1x1 tile (module docstring)."""
    tiles = [Tile(0, k, 1, 1, tuple(float(v) for v in box)) for k, box in enumerate(boxes)]
    return TokenLayout.from_tiles(torch.arange(start, start + len(tiles)), tiles)


def place(
    values: torch.Tensor,
    layout: TokenLayout,
    sizes: Sequence[tuple[int, int]] | None = None,
    overlap: str = "mean",
) -> list[torch.Tensor]:
    """One map `[..., H_i, W_i]` per image from per-column values `[..., N]` (N covers every
    position of the layout): each tile's cells painted over its box, the mean (or with
    `overlap="max"` the maximum) where tiles overlap, 0 where none covers (module docstring).
    Differentiable in `values`."""
    if overlap not in ("mean", "max"):
        raise ValueError(f"overlap must be 'mean' or 'max', got {overlap!r}")
    if layout.images and values.shape[-1] <= int(layout.positions.max()):
        raise ValueError(
            f"values have {values.shape[-1]} columns; the layout reads column "
            f"{int(layout.positions.max())}"
        )
    if sizes is not None and len(sizes) != layout.images:
        raise ValueError(f"{len(sizes)} sizes for {layout.images} images")
    out = []
    for i in range(layout.images):
        size = tuple(sizes[i]) if sizes is not None else working_size(layout, i)
        total = values.new_zeros(*values.shape[:-1], *size)
        count = torch.zeros(size, dtype=values.dtype, device=values.device)
        top = values.new_full((*values.shape[:-1], *size), float("-inf"))
        for k, tile in enumerate(layout.tiles):
            if tile.image != i:
                continue
            index = _tile_index(layout, k, tile, size).to(values.device)
            covered = index >= 0
            painted = values[..., index.clamp(min=0).flatten()].reshape(*values.shape[:-1], *size)
            total = total + torch.where(covered, painted, 0)
            count = count + covered.to(values.dtype)
            if overlap == "max":
                top = torch.where(covered, torch.maximum(top, painted), top)
        if overlap == "max":
            out.append(torch.where(count > 0, top, 0))
        else:
            out.append(total / count.clamp(min=1))
    return out
