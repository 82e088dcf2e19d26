"""Heatmap overlays: colourise a [0, 1] map and blend it over an image with boxes and a point."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw

from groundcam.eval.pointing import upsample

ArrayLike = torch.Tensor | np.ndarray

BOX_COLOUR = (0, 255, 0)
BOX_WIDTH = 2
POINT_RADIUS = 3
POINT_BORDER = (255, 255, 255)
POINT_FILL = {True: (0, 200, 0), False: (230, 0, 0), None: (255, 255, 255)}


def _to_numpy_2d(heatmap: ArrayLike) -> np.ndarray:
    """Return a float32 [H, W] numpy copy of a torch/numpy map."""
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().cpu().float().numpy()
    array = np.asarray(heatmap, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [h, w], got shape {array.shape}")
    return array


def colorize(heatmap: ArrayLike, cmap: str = "jet") -> Image.Image:
    """Map a [0, 1] heatmap to an RGB image with a matplotlib colormap (values clamped)."""
    values = np.clip(np.nan_to_num(_to_numpy_2d(heatmap), nan=0.0), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](values, bytes=True)
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))


def overlay(
    image: Image.Image,
    heatmap: ArrayLike,
    alpha: float = 0.5,
    boxes: Sequence[Sequence[float]] | ArrayLike | None = None,
    point: tuple[int, int] | None = None,
    resample: str = "bicubic",
    hit: bool | None = None,
    cmap: str = "jet",
) -> Image.Image:
    """Blend a colourised heatmap over an image; draw ground-truth boxes and the pointed pixel."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    width, height = base.size
    resized = upsample(_to_numpy_2d(heatmap), (height, width), mode=resample).clamp(0.0, 1.0)
    colours = np.asarray(colorize(resized, cmap=cmap), dtype=np.float32)
    pixels = np.asarray(base, dtype=np.float32)
    blended = (1.0 - alpha) * pixels + alpha * colours
    result = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(result)
    for box in _box_list(boxes):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=BOX_COLOUR, width=BOX_WIDTH)
    if point is not None:
        x, y = point
        r = POINT_RADIUS
        draw.ellipse(
            (x - r, y - r, x + r, y + r),
            fill=POINT_FILL[None if hit is None else bool(hit)],
            outline=POINT_BORDER,
        )
    return result


def _box_list(boxes: Sequence[Sequence[float]] | ArrayLike | None) -> list[Sequence[float]]:
    """Normalise None / list / array / tensor boxes to a list of xyxy rows."""
    if boxes is None:
        return []
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    return [row for row in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)]
