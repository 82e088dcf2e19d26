"""Grounding supervision for the show-attend-tell captioner (DESIGN §16): words of a
Karpathy-layout file whose sentences carry `grounding` (token index + boxes, and masks where
present) are pushed to look at their objects while they are written.

- `attention`: attention correctness (Liu et al., AAAI 2017) on the decoder's own weights,
  `sum over aligned words t of -log(sum_i R_ti alpha_ti)` per caption, averaged over captions, with
  `R_ti` the share of attention cell i covered by word t's mask (or box).
- `amc`: the AMC loss (`amc_loss.AMCLoss`) on each aligned word's Grad-CAM map over the encoder
  grid (gradient of the word's log-probability at the region features, kept differentiable), with
  the cell shares as a soft mask.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from groundcam.data.caption_text import tokenize
from groundcam.data.sample import ReadReport
from groundcam.model_files import read_json

GROUND_CHOICES = ("none", "attention", "amc")


def _overlaps(start: float, end: float, cells: int, extent: float) -> np.ndarray:
    """Per cell of `cells` equal cells over [0, extent], the share of it inside [start, end]."""
    edges = np.linspace(0.0, extent, cells + 1)
    inside = np.clip(np.minimum(edges[1:], end) - np.maximum(edges[:-1], start), 0.0, None)
    return inside / (extent / cells)


def box_coverage(
    boxes: Sequence[Sequence[float]], width: float, height: float, grid: tuple[int, int]
) -> np.ndarray:
    """`[h*w]` share of each grid cell (row-major) covered by the boxes `[x0, y0, x1, y1]` of an
    image `width` x `height`; overlapping boxes count once where they overlap most (the max)."""
    cover = np.zeros(grid[0] * grid[1])
    for x0, y0, x1, y1 in boxes:
        rows = _overlaps(y0, y1, grid[0], height)
        cols = _overlaps(x0, x1, grid[1], width)
        cover = np.maximum(cover, np.outer(rows, cols).ravel())
    return cover


@functools.lru_cache(maxsize=16)
def _pixel_shares(pixels: int, cells: int) -> np.ndarray:
    """`[cells, pixels]`: the share of each cell covered by each unit pixel."""
    return np.stack([_overlaps(p, p + 1, cells, pixels) for p in range(pixels)], 1)


def mask_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """`[h*w]` share of each grid cell (row-major) covered by a boolean `[H, W]` mask, each
    pixel a unit square (exact for cells that split pixels)."""
    rows, cols = _pixel_shares(mask.shape[0], grid[0]), _pixel_shares(mask.shape[1], grid[1])
    share = rows @ mask.astype(np.float64) @ cols.T
    return np.clip(share, 0.0, 1.0).ravel()


def read_grounding(path: str | Path, report: ReadReport) -> dict[tuple[str, str], list[tuple]]:
    """Per `(file name, tokens joined by spaces)` of a Karpathy-layout file, the grounded words as
    `(token index, boxes, masks or None)`; a malformed item is skipped and reported with its file
    and place."""
    from groundcam.eval.caption_pointing import _grounding_item

    out: dict[tuple[str, str], list[tuple]] = {}
    data = read_json(Path(path))
    entries = data.get("images") if isinstance(data, dict) else None
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            continue  # read_captions has reported it
        sentences = entry.get("sentences")
        for j, sent in enumerate(sentences if isinstance(sentences, list) else []):
            if not isinstance(sent, dict) or not sent.get("grounding"):
                continue
            tokens, items = sent.get("tokens"), sent["grounding"]
            where = f"{path}:images[{i}].sentences[{j}] ({entry['filename']})"
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                report.skipped_rows += 1
                report.error(where, "'tokens' is not a list of strings; grounding skipped")
                continue
            words = []
            for m, item in enumerate(items if isinstance(items, list) else [items]):
                try:
                    token, boxes = _grounding_item(item, len(tokens))
                except ValueError as e:
                    report.skipped_rows += 1
                    report.error(f"{where}.grounding[{m}]", f"{e}; skipped")
                    continue
                masks = item.get("masks")
                words.append((token, boxes, masks if isinstance(masks, list) and masks else None))
            out[(entry["filename"], " ".join(tokenize(" ".join(tokens))))] = words
    return out


def word_regions(
    words: list[tuple], image: Path, grid: tuple[int, int], max_words: int, report: ReadReport
) -> list[tuple[int, np.ndarray]]:
    """`(alpha row, cell shares)` per grounded word of one caption: token k is written at row k
    (the row that reads `<SOS> w1 .. wk` and predicts w(k+1) is row k); words cut by `max_words`
    and words whose region covers no cell are left out, as are all words of an unreadable image.
    Masks win over boxes when present."""
    from PIL import Image

    from groundcam.data.masks import decode_mask
    from groundcam.errors import InputError

    try:
        with Image.open(image) as im:
            width, height = im.size
    except OSError:  # an unreadable image: its rows never reach a batch (counted there)
        return []
    out = []
    for token, boxes, masks in words:
        if token >= max_words:
            continue
        cover = None
        if masks:
            try:
                decoded = [
                    decode_mask(s, height, width, f"{image.name} token {token}") for s in masks
                ]
                cover = mask_coverage(np.logical_or.reduce(decoded), grid)
            except InputError as e:
                report.error(str(image), f"{e}; its box is used instead")
        if cover is None:
            cover = box_coverage(boxes, width, height, grid)
        if cover.sum() > 0:
            out.append((token, cover.astype(np.float32)))
    return out


def attention_correctness_loss(alphas: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Liu et al.'s strong supervision: per caption `sum_t -log(sum_i R_ti alpha_ti)` over the
    aligned words (rows whose `regions` [B, T, R] are not all zero), averaged over the captions of
    the batch; 0 (still connected to `alphas`) when no word is aligned."""
    aligned = regions.sum(-1) > 0
    if not aligned.any():
        return alphas.sum() * 0.0
    mass = (alphas * regions).sum(-1)
    nll = -torch.log(mass.clamp_min(1e-12)) * aligned
    return nll.sum() / len(alphas)


def gradcam_amc_loss(
    model, pixels: torch.Tensor, ids: torch.Tensor, regions: torch.Tensor
) -> tuple[torch.Tensor, object]:
    """(the AMC loss of the aligned words' Grad-CAM maps, the teacher-forced `CaptionOutput`):
    each map is `sum_c mean_i(d log p(word) / d f_ic) f_ic` over the encoder grid, built with
    `create_graph=True` so that the loss trains through it; the mask is the word's cell shares."""
    from groundcam.train.amc_loss import AMCLoss

    captured = {}
    handle = model.encoder.regions.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("f", out)
    )
    try:
        out = model(pixels, ids, labels=True)
    finally:
        handle.remove()
    features = captured["f"]  # [B, R, C]
    h, w = out.grid
    logp = out.logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, T]
    aligned = regions.sum(-1) > 0
    maps, masks = [], []
    for t in aligned.any(0).nonzero().flatten().tolist():
        rows = aligned[:, t]
        (grad,) = torch.autograd.grad((logp[:, t] * rows).sum(), features, create_graph=True)
        cam = (grad.mean(1, keepdim=True) * features).sum(-1)  # [B, R]
        maps.append(cam[rows].reshape(-1, h, w))
        masks.append(regions[rows, t].reshape(-1, h, w))
    if not maps:
        return out.loss * 0.0, out
    return AMCLoss()(torch.cat(maps), torch.cat(masks)).loss, out
