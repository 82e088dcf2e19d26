"""Where the image patches sit in a model's token sequence; read from the model, never assumed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Geometry:
    """A patch grid of `grid_h` x `grid_w` cells. Image tokens follow `prefix` tokens (CLS,
    registers, or a whole text segment in single-stream models). They are stored row-major,
    unless `cells` [B, M] names the grid cell (`row * grid_w + col`) of each of the M image
    tokens of sample b (ViLT shuffles and may subsample its patches); cells with no token stay 0.
    `columns` [N]: the image tokens are these sequence positions, in this order (a generative
    VLM's image tokens, placed afterwards through its `TokenLayout`); the grid is then 1 x N.
    """

    grid_h: int
    grid_w: int
    prefix: int = 1
    cells: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image-token slice of the last axis, placed on the grid: [..., grid_h, grid_w]."""
        if self.columns is not None:
            cut = tokens.index_select(-1, self.columns.to(tokens.device))
            return cut.reshape(*cut.shape[:-1], self.grid_h, self.grid_w)
        if self.cells is None:
            cut = tokens[..., self.prefix : self.prefix + self.num_patches]
            return cut.reshape(*cut.shape[:-1], self.grid_h, self.grid_w)
        m = self.cells.shape[-1]
        cut = tokens[..., self.prefix : self.prefix + m]
        index = self.cells.to(cut.device).view(-1, *([1] * (cut.dim() - 2)), m).expand(cut.shape)
        grid = cut.new_zeros(*cut.shape[:-1], self.num_patches).scatter(-1, index, cut)
        return grid.reshape(*cut.shape[:-1], self.grid_h, self.grid_w)

    def token_mean(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mean of per-token values `[..., N]` over the image (Grad-CAM's channel weights)."""
        return self.patches(tokens).mean(dim=(-2, -1))

    def select(self, rows: torch.Tensor) -> Geometry:
        """The geometry of samples `rows` (per-sample cells follow their samples)."""
        if self.cells is None:
            return self
        return Geometry(
            self.grid_h, self.grid_w, self.prefix, self.cells[rows.to(self.cells.device)]
        )


@dataclass(frozen=True, eq=False)
class RegionGeometry(Geometry):
    """Image tokens that are detector regions: `boxes` [B, K, 4] (x0, y0, x1, y1 in fractions of
    the image, one row per sample) after `prefix` tokens. `patches` paints each region's value
    over its box on a `grid_h` x `grid_w` image (`placement.place`, overlapping boxes by
    `overlap`: "max" by default), so every method's map is already at image resolution."""

    boxes: torch.Tensor | None = None
    overlap: str = "max"

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-region values [B, ..., K(+prefix)] -> painted maps [B, ..., grid_h, grid_w]."""
        from groundcam.placement import place, region_layout

        k = self.boxes.shape[1]
        cut = tokens[..., self.prefix : self.prefix + k]
        size = [(self.grid_h, self.grid_w)]
        return torch.stack(
            [
                place(cut[b], region_layout(self.boxes[b].tolist()), size, self.overlap)[0]
                for b in range(cut.shape[0])
            ]
        )

    def token_mean(self, tokens: torch.Tensor) -> torch.Tensor:
        """The mean over the regions (each region counts once, whatever its area)."""
        return tokens[..., self.prefix : self.prefix + self.boxes.shape[1]].mean(-1)

    def select(self, rows: torch.Tensor) -> RegionGeometry:
        boxes = self.boxes[rows.to(self.boxes.device)]
        return RegionGeometry(self.grid_h, self.grid_w, self.prefix, None, boxes, self.overlap)
