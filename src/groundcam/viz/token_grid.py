"""A per-token grid figure: each generated token written above its map over the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from groundcam.io import to_rgb
from groundcam.viz.overlay import (
    DEFAULT_ALPHA,
    DEFAULT_CMAP,
    Cmap,
    add_colorbar,
    check_alpha,
    colormap,
    overlay,
)

LABEL_HEIGHT = 22
PAD = 6


def token_grid(
    image: Image.Image,
    maps: torch.Tensor,
    tokens: Sequence[str],
    scores: Sequence[float] | None = None,
    columns: int = 6,
    cell_width: int = 192,
    *,
    cmap: Cmap = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    colorbar: bool = False,
) -> Image.Image:
    """One cell per token: its label (and probability) above its overlay, `columns` per row.

    The image is scaled to the cell once and each token's map drawn at that size (`overlay`'s
    `cmap` and `alpha`); ``colorbar=True`` adds one colour bar in a margin at the sheet's right."""
    if len(tokens) != maps.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {maps.shape[0]} maps")
    alpha, cmap = check_alpha(alpha), colormap(cmap)
    scale = cell_width / image.width
    cell_h = max(1, round(image.height * scale))
    columns = max(1, min(columns, len(tokens)))
    rows = (len(tokens) + columns - 1) // columns
    width = columns * (cell_width + PAD) + PAD
    height = rows * (cell_h + LABEL_HEIGHT + PAD) + PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    base = to_rgb(image)
    if base.size != (cell_width, cell_h):
        base = base.resize((cell_width, cell_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    for k, token in enumerate(tokens):
        r, c = divmod(k, columns)
        x, y = PAD + c * (cell_width + PAD), PAD + r * (cell_h + LABEL_HEIGHT + PAD)
        label = repr(token)[1:-1] or "␣"
        if scores is not None:
            label += f"  p={float(scores[k]):.2f}"
        draw.text((x, y + 4), label, fill="black", font=font)
        sheet.paste(overlay(base, maps[k], alpha=alpha, cmap=cmap), (x, y + LABEL_HEIGHT))
    return add_colorbar(sheet, cmap, inset=False) if colorbar else sheet
