"""Attention Map Consistency (AMC, Yang et al. CVPR 2023): box masks and the AMC loss (DESIGN §8).

The loss pushes a map's mass and its peak inside the box: on G = the per-sample min-max of
relu(raw map), upsampled to the mask,
    L_mean = relu(mean(G outside) - mean(G inside) + 0.1)  (means pooled over the whole batch)
    L_max  = mean_b relu(max(G_b outside) - max(G_b inside) + 0.5)
    loss   = 0.2 * L_mean + 0.8 * L_max
and only samples with a box take part. The authors' `.squeeze()` bug (a batch with one box
sample loses its batch dimension, so its max runs over rows) is not copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    """An int or (h, w) as (h, w) of positive ints."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"sizes must be positive, got {size}")
    return h, w


@dataclass
class MaskReport:
    """What `box_masks` did with the boxes: how many it clipped and skipped, who has a box."""

    clipped: int  # boxes kept after clipping to the image
    skipped: int  # boxes dropped: inverted, zero-area, thinner than a pixel, outside, non-finite
    has_box: torch.Tensor  # bool [B]: the sample has at least one kept box


def box_mask(boxes, height: int, width: int) -> tuple[torch.Tensor, int, int]:
    """One image's binary [H, W] mask, 1 inside any box, and its (clipped, skipped) counts.

    Rounding as the authors' `mask[int(y1):int(y2), int(x1):int(x2)] = 1`, after clipping the
    float box to [0, W] x [0, H] (so int() is floor and a negative never wraps round): the box
    [2.7, 3.2, 6.9, 8.0] covers columns 2..5 and rows 3..7. A box whose slice is empty is skipped.
    """
    mask = torch.zeros(height, width)
    clipped = skipped = 0
    for x1, y1, x2, y2 in torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).tolist():
        if not all(map(math.isfinite, (x1, y1, x2, y2))):
            skipped += 1
            continue
        cx1, cx2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        cy1, cy2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        c1, c2, r1, r2 = int(cx1), int(cx2), int(cy1), int(cy2)
        if c2 <= c1 or r2 <= r1:
            skipped += 1
            continue
        clipped += (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
        mask[r1:r2, c1:c2] = 1.0
    return mask, clipped, skipped


def box_masks(
    boxes: Sequence,
    image_sizes: Sequence,
    mask_size: Size,
    image_res: Size | None = None,
) -> tuple[torch.Tensor, MaskReport]:
    """Float masks [B, h, w] for AMC from per-sample xyxy boxes in original-image pixels.

    As the authors build them: a binary mask at the original pixels (`box_mask`), resized with the
    image to `image_res` (bilinear, align_corners=False, antialiased like a PIL/torchvision image
    resize; skipped when None), then bilinear align_corners=True to `mask_size`. A sample without
    a kept box gets an all-zero mask and has_box False.
    """
    if len(boxes) != len(image_sizes):
        raise ValueError(f"{len(boxes)} box lists for {len(image_sizes)} image sizes")
    out_size = _pair(mask_size)
    masks, has_box, clipped, skipped = [], [], 0, 0
    for sample_boxes, hw in zip(boxes, image_sizes, strict=True):
        height, width = _pair((int(hw[0]), int(hw[1])))
        mask, c, s = box_mask(sample_boxes, height, width)
        clipped, skipped = clipped + c, skipped + s
        has_box.append(bool(mask.any()))
        mask = mask[None, None]
        if image_res is not None:
            res = _pair(image_res)
            mask = F.interpolate(
                mask, size=res, mode="bilinear", align_corners=False, antialias=True
            )
        mask = F.interpolate(mask, size=out_size, mode="bilinear", align_corners=True)
        masks.append(mask[0, 0])
    stacked = torch.stack(masks) if masks else torch.zeros(0, *out_size)
    return stacked, MaskReport(clipped, skipped, torch.tensor(has_box, dtype=torch.bool))


@dataclass
class AMCTerms:
    """The AMC loss and its two terms, 0-dim tensors (float32, float64 for float64 maps)."""

    loss: torch.Tensor  # mean_weight * mean + max_weight * max
    mean: torch.Tensor  # L_mean, pooled over the batch's box samples
    max: torch.Tensor  # L_max, averaged over the batch's box samples


class AMCLoss(nn.Module):
    """The AMC loss of raw (unnormalised) maps [B, h, w] against box masks [B, H, W]."""

    def __init__(
        self,
        mean_margin: float = 0.1,
        max_margin: float = 0.5,
        mean_weight: float = 0.2,
        max_weight: float = 0.8,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        self.mean_margin, self.max_margin = mean_margin, max_margin
        self.mean_weight, self.max_weight = mean_weight, max_weight
        self.eps = eps

    def forward(
        self, raw_maps: torch.Tensor, masks: torch.Tensor, has_box: torch.Tensor | None = None
    ) -> AMCTerms:
        """The terms over the samples with a box: has_box (default all) and a non-zero mask.

        A sample whose mask is all zero never enters (nothing to be consistent with, e.g. a box
        that vanished in the resize). No such sample: all terms are 0, still connected to
        raw_maps (zero gradients). A full-image box has no outside: its outside max is 0, and a
        batch without any outside pixel takes the outside mean as 0 (no NaN).
        """
        if raw_maps.dim() != 3 or masks.dim() != 3 or len(raw_maps) != len(masks):
            raise ValueError(
                f"raw_maps [B, h, w] and masks [B, H, W] expected, got "
                f"{tuple(raw_maps.shape)} and {tuple(masks.shape)}"
            )
        dtype = torch.float64 if raw_maps.dtype == torch.float64 else torch.float32
        masks = masks.to(raw_maps.device, dtype)
        keep = masks.flatten(1).sum(1) > 0
        if has_box is not None:
            if has_box.shape != keep.shape:
                raise ValueError(f"has_box {tuple(has_box.shape)} for a batch of {len(keep)}")
            keep = keep & has_box.to(keep.device, torch.bool)
        with torch.autocast(raw_maps.device.type, enabled=False):
            if not keep.any():
                zero = raw_maps[:0].to(dtype).sum()  # 0, and backward gives zero grads
                return AMCTerms(zero, zero, zero)
            g = raw_maps[keep].to(dtype).relu()
            g = g - g.amin(dim=(1, 2), keepdim=True)
            g = g / (g.amax(dim=(1, 2), keepdim=True) + self.eps)
            m = masks[keep]
            g = F.interpolate(g[:, None], size=m.shape[-2:], mode="bilinear", align_corners=False)
            g = g[:, 0]  # never squeeze(): a batch of one keeps its batch dimension
            tiny = torch.finfo(dtype).tiny  # x / tiny is 0 where the sum is 0 (its x is 0 too)
            inside = (g * m).sum() / m.sum().clamp_min(tiny)
            outside = (g * (1 - m)).sum() / (1 - m).sum().clamp_min(tiny)
            mean = (outside - inside + self.mean_margin).relu()
            peak_in = (g * m).flatten(1).amax(1)
            peak_out = (g * (1 - m)).flatten(1).amax(1)
            peak = (peak_out - peak_in + self.max_margin).relu().mean()
            loss = self.mean_weight * mean + self.max_weight * peak
        return AMCTerms(loss, mean, peak)
