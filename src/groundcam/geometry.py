"""Where the image patches sit in a model's token sequence; read from the model, never assumed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Geometry:
    """A patch grid of `grid_h` x `grid_w` tokens stored row-major after `prefix` tokens (CLS,
    registers, ...)."""

    grid_h: int
    grid_w: int
    prefix: int = 1

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch slice of the last axis' token positions, shaped [..., grid_h, grid_w]."""
        cut = tokens[..., self.prefix : self.prefix + self.num_patches]
        return cut.reshape(*cut.shape[:-1], self.grid_h, self.grid_w)
