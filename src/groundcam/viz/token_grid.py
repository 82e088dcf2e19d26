"""A per-token grid figure: each generated token written above its map over the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from groundcam.viz.overlay import overlay

LABEL_HEIGHT = 22
PAD = 6


def token_grid(
    image: Image.Image,
    maps: torch.Tensor,
    tokens: Sequence[str],
    scores: Sequence[float] | None = None,
    columns: int = 6,
    cell_width: int = 192,
) -> Image.Image:
    """One cell per token: its label (and probability) above its overlay, `columns` per row."""
    if len(tokens) != maps.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {maps.shape[0]} maps")
    scale = cell_width / image.width
    cell_h = max(1, round(image.height * scale))
    columns = max(1, min(columns, len(tokens)))
    rows = (len(tokens) + columns - 1) // columns
    width = columns * (cell_width + PAD) + PAD
    height = rows * (cell_h + LABEL_HEIGHT + PAD) + PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, token in enumerate(tokens):
        r, c = divmod(k, columns)
        x, y = PAD + c * (cell_width + PAD), PAD + r * (cell_h + LABEL_HEIGHT + PAD)
        label = repr(token)[1:-1] or "␣"
        if scores is not None:
            label += f"  p={float(scores[k]):.2f}"
        draw.text((x, y + 4), label, fill="black", font=font)
        cell = overlay(image, maps[k]).resize((cell_width, cell_h), Image.BILINEAR)
        sheet.paste(cell, (x, y + LABEL_HEIGHT))
    return sheet
