"""Pointing game: does the heatmap's maximum fall inside a ground-truth box."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = torch.Tensor | np.ndarray
HitRule = Callable[[int, int, torch.Tensor], bool]

_RESIZE_MODES = ("bicubic", "bilinear")


def _as_2d_tensor(heatmap: ArrayLike | Sequence) -> torch.Tensor:
    """Turn a torch/numpy map into a tensor and insist on [h, w]."""
    tensor = heatmap if isinstance(heatmap, torch.Tensor) else torch.as_tensor(np.asarray(heatmap))
    if tensor.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [h, w], got shape {tuple(tensor.shape)}")
    return tensor


def upsample(heatmap: ArrayLike, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a patch-grid map to (H, W) exactly as the reference grounding code does."""
    tensor = _as_2d_tensor(heatmap)
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive (H, W), got {tuple(size)}")
    if tuple(tensor.shape) == (height, width):
        return tensor.float()
    if mode not in _RESIZE_MODES:
        raise ValueError(f"unsupported resize mode {mode!r}; valid: {', '.join(_RESIZE_MODES)}")
    # No clamping afterwards: bicubic overshoot is part of the protocol.
    resized = F.interpolate(
        tensor[None, None].float(), size=(height, width), mode=mode, align_corners=False
    )
    return resized[0, 0]


def _inside_strict(x: int, y: int, boxes: torch.Tensor) -> bool:
    """True iff (x, y) lies strictly inside at least one xyxy box."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    inside = (x1 < x) & (x < x2) & (y1 < y) & (y < y2)
    return bool(inside.any())


@dataclass(frozen=True)
class Protocol:
    """How a pointing-game variant resizes the map and decides a hit."""

    resize_mode: str
    hit_rule: HitRule


PROTOCOLS: dict[str, Protocol] = {
    # ALBEF Grounding.py / AMC / SelfEQ: bicubic to image size, first argmax, strict box test.
    "amc": Protocol(resize_mode="bicubic", hit_rule=_inside_strict),
}


@dataclass
class PointingResult:
    """Outcome of one pointing-game trial."""

    hit: bool
    point: tuple[int, int]  # (x, y): pixel column, row
    protocol: str


def _as_boxes(boxes: ArrayLike | Sequence[Sequence[float]]) -> torch.Tensor:
    """Turn a list / array / tensor of xyxy boxes into a float64 [K, 4] tensor."""
    if isinstance(boxes, torch.Tensor):
        tensor = boxes.detach().cpu().to(torch.float64)
    else:
        tensor = torch.as_tensor(np.asarray(boxes, dtype=np.float64))
    if tensor.numel() == 0:
        return tensor.reshape(0, 4)
    if tensor.ndim == 1 and tensor.shape[0] == 4:
        tensor = tensor[None]
    if tensor.ndim != 2 or tensor.shape[1] != 4:
        raise ValueError(f"boxes must be xyxy with shape [K, 4], got {tuple(tensor.shape)}")
    return tensor


def pointing_game(
    heatmap: ArrayLike,
    boxes: ArrayLike | Sequence[Sequence[float]],
    protocol: str = "amc",
    image_size: tuple[int, int] | None = None,
) -> PointingResult:
    """Score one map: hit iff its first maximum lies inside any ground-truth box."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown pointing protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    rule = PROTOCOLS[protocol]
    tensor = _as_2d_tensor(heatmap).detach()
    if torch.isnan(tensor).any():
        raise ValueError("heatmap contains NaN")
    if image_size is not None:
        tensor = upsample(tensor, image_size, mode=rule.resize_mode)
    width = tensor.shape[1]
    # torch.argmax returns the first maximal index, i.e. first in row-major order.
    flat_index = int(torch.argmax(tensor.reshape(-1)))
    x, y = flat_index % width, flat_index // width
    box_tensor = _as_boxes(boxes)
    hit = bool(box_tensor.shape[0]) and rule.hit_rule(x, y, box_tensor)
    return PointingResult(hit=hit, point=(x, y), protocol=protocol)


def pointing_accuracy(results: Iterable[PointingResult]) -> tuple[float, int]:
    """Fraction of hits and the number of trials (NaN accuracy when there are none)."""
    hits = [result.hit for result in results]
    if not hits:
        return float("nan"), 0
    return sum(hits) / len(hits), len(hits)
