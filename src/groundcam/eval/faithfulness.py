"""Faithfulness of a map with the text held fixed: deletion and insertion curves.

The image is cut into the model's own patch grid. Cells are removed (deletion) or added
(insertion) in the order of the map, highest value first, and the target score of the unchanged
phrase is read after every step. A faithful map names the cells the score depends on, so its
deletion curve falls early (a small area under it) and its insertion curve rises early (a large
area under it).

The baseline a removed cell takes is the value 0 in the model's normalised pixel space, which is
the processor's mean colour (`(x - mean) / std == 0` exactly when `x == mean`). It is the choice
that does not depend on the family: every processor maps its own mean to 0, whatever its mean and
std; it is the one flat colour that sits at the centre of the inputs the model was trained on,
rather than at an extreme such as black (about -1.8 after CLIP/ALBEF normalisation) that the
model may read as an object of its own; and a flat cell carries no edges or texture the map could
be rewarded for. Another flat value can be passed as `baseline` (in the same normalised space).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from groundcam.targets import check_target

METRICS = ("deletion", "insertion")


@dataclass
class Curves:
    """One phrase's curves: the score after each step (step 0 first, `steps + 1` values) and the
    area under each; a metric that was not asked for is None."""

    deletion: list[float] | None = None
    insertion: list[float] | None = None
    deletion_auc: float | None = None
    insertion_auc: float | None = None

    def to_record(self) -> dict:
        """The fields that were computed, under the keys of the eval JSONL records."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def patch_order(grid_map: torch.Tensor) -> torch.Tensor:
    """Row-major cell indices of a [h, w] map sorted by descending value; equal values keep
    row-major order (the lower index first)."""
    if grid_map.dim() != 2:
        raise ValueError(f"grid_map must be [h, w], got shape {tuple(grid_map.shape)}")
    flat = grid_map.detach().reshape(-1).float().cpu()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("grid_map holds NaN or infinite values: cannot order its cells")
    return torch.sort(flat, descending=True, stable=True).indices


def step_counts(num_cells: int, steps: int) -> list[int]:
    """Cells removed (or added) after each of `steps` steps, `steps + 1` counts from 0 to
    `num_cells`, evenly spaced: round(k * num_cells / steps), halves rounded up. Counts never
    decrease; they repeat when there are more steps than cells."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if num_cells < 0:
        raise ValueError(f"num_cells must be non-negative, got {num_cells}")
    # floor(k * n / s + 1/2) in integers, so the endpoints are exact and nothing depends on floats
    return [(2 * k * num_cells + steps) // (2 * steps) for k in range(steps + 1)]


def cell_bounds(size: int, cells: int) -> list[int]:
    """Pixel boundaries of `cells` cells over `size` pixels: round(i * size / cells), halves up."""
    return [(2 * i * size + cells) // (2 * cells) for i in range(cells + 1)]


def cell_index(height: int, width: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[H, W] long: the row-major grid cell each pixel belongs to. Cell (r, c) covers rows
    `round(r*H/grid_h) : round((r+1)*H/grid_h)` and the same for columns, so the grid need not be
    square and H need not be a multiple of grid_h."""
    rows = torch.empty(height, dtype=torch.long)
    cols = torch.empty(width, dtype=torch.long)
    for r, (a, b) in enumerate(pairwise(cell_bounds(height, grid_h))):
        rows[a:b] = r
    for c, (a, b) in enumerate(pairwise(cell_bounds(width, grid_w))):
        cols[a:b] = c
    return rows[:, None] * grid_w + cols[None, :]


def pairwise(xs: list[int]) -> list[tuple[int, int]]:
    return list(zip(xs[:-1], xs[1:], strict=True))


def masked_images(
    pixel_values: torch.Tensor,
    order: torch.Tensor,
    grid_h: int,
    grid_w: int,
    counts: Sequence[int],
    mode: str,
    baseline: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """[len(counts), C, H, W] copies of one image [1, C, H, W]. Deletion: image k has the first
    `counts[k]` cells of `order` set to `baseline`; insertion: image k is `baseline` except for
    the first `counts[k]` cells of `order`, copied from the image. `baseline` is a value in the
    model's normalised pixel space (0 = the processor's mean colour; see the module docstring),
    a float or a tensor that broadcasts to [C, H, W]."""
    if mode not in METRICS:
        raise ValueError(f"unknown mode {mode!r}; modes are {list(METRICS)}")
    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise ValueError(
            f"pixel_values must be one image [1, C, H, W], got {tuple(pixel_values.shape)}"
        )
    num_cells = grid_h * grid_w
    order = torch.as_tensor(order).reshape(-1).long().cpu()
    if order.numel() != num_cells or not torch.equal(order.sort().values, torch.arange(num_cells)):
        raise ValueError(f"order must be a permutation of the {grid_h}x{grid_w} grid's cells")
    counts_t = torch.as_tensor(list(counts), dtype=torch.long)
    if counts_t.numel() and (int(counts_t.min()) < 0 or int(counts_t.max()) > num_cells):
        raise ValueError(f"counts must lie in 0..{num_cells}, got {list(counts)}")
    image = pixel_values[0]
    height, width = image.shape[-2:]
    rank = torch.empty(num_cells, dtype=torch.long)
    rank[order] = torch.arange(num_cells)  # rank[cell] = the step at which the cell goes
    pixel_rank = rank[cell_index(height, width, grid_h, grid_w)].to(image.device)
    chosen = pixel_rank[None] < counts_t.to(image.device)[:, None, None]  # [K, H, W]
    chosen = chosen[:, None]  # broadcast over channels
    base = torch.as_tensor(baseline, dtype=image.dtype, device=image.device).expand_as(image)
    if mode == "deletion":
        return torch.where(chosen, base[None], image[None])
    return torch.where(chosen, image[None], base[None])


def checked_metrics(metrics: str | Sequence[str], steps: int) -> list[str]:
    """`metrics` in `METRICS`' order, no repeats; unknown metrics or a bad `steps` are one line."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError(f"no metrics given; metrics are {list(METRICS)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; metrics are {list(METRICS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer of at least 1, got {steps!r}")
    return [m for m in METRICS if m in metrics]


def mean_fill(explainer, baseline: float) -> torch.Tensor:
    """The colour removed cells take on a generative VLM's original image: the processor's
    mean plus `baseline` standard deviations, in 0-255, [3, 1, 1]."""
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in explainer.pixel_mean_std())
    return ((mean + baseline * std) * 255).clamp(0, 255)[:, None, None]


def image_pixels(image: Image.Image) -> torch.Tensor:
    """`image` as float RGB pixels [1, 3, H, W] in 0-255 (a copy: PIL's array is read-only)."""
    return torch.from_numpy(np.array(image.convert("RGB"))).float().permute(2, 0, 1)[None]


def auc(curve: Sequence[float]) -> float:
    """Trapezoid area under `curve` over the fractions 0..1, evenly spaced (S + 1 values)."""
    values = [float(v) for v in curve]
    if len(values) < 2:
        raise ValueError(f"a curve needs at least 2 values to have an area, got {len(values)}")
    steps = len(values) - 1
    return sum((a + b) / 2 for a, b in zip(values[:-1], values[1:], strict=True)) / steps


def faithfulness(
    explainer,
    image: Image.Image,
    phrases: str | Sequence[str],
    maps: torch.Tensor,
    metrics: str | Sequence[str] = METRICS,
    steps: int = 16,
    target: str | None = None,
    batch_size: int = 64,
    baseline: float = 0.0,
) -> list[Curves]:
    """Deletion / insertion curves of `maps[p]` (the patch-grid maps of an explanation,
    [P, h, w]) for `phrases[p]` over `image`, one `Curves` per phrase. The image and the phrases
    are prepared once; every masked image is scored with its phrase's text in forward-only
    batches of `batch_size` rows."""
    phrases = [phrases] if isinstance(phrases, str) else list(phrases)
    metrics = checked_metrics(metrics, steps)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(maps)
    if maps.dim() != 3:
        raise ValueError(f"maps must be [P, h, w] (one map per phrase), got {tuple(maps.shape)}")
    if maps.shape[0] != len(phrases):
        raise ValueError(f"{maps.shape[0]} maps but {len(phrases)} phrases: give one map each")

    if getattr(explainer.adapter, "vlm", False):
        return vlm_curves(explainer, image, phrases, maps, metrics, steps, baseline)
    target = check_target(target or explainer.default_target, list(explainer.targets))
    pixel_values, input_ids, mask = explainer.prepare([image], phrases)
    gh, gw = explainer.grid(pixel_values)
    if tuple(maps.shape[1:]) != (gh, gw):
        raise ValueError(
            f"maps are on a {maps.shape[1]}x{maps.shape[2]} grid but the model's patch grid "
            f"is {gh}x{gw}: pass the explanation's maps (Explanation.maps), not resized ones"
        )
    orders = [patch_order(m) for m in maps]
    counts = step_counts(gh * gw, steps)

    # One row per (phrase, metric, step), scored in chunks that may span phrases and metrics.
    rows = [(p, m, k) for p in range(len(phrases)) for m in metrics for k in range(steps + 1)]
    values: dict[tuple[int, str], list[float]] = {
        (p, m): [] for p in range(len(phrases)) for m in metrics
    }
    device = pixel_values.device
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images, groups = [], []
            for p, m, k in chunk:  # consecutive rows of one (phrase, metric) share one call
                if groups and groups[-1][0] == (p, m):
                    groups[-1][1].append(counts[k])
                else:
                    groups.append(((p, m), [counts[k]]))
            for (p, m), cs in groups:
                images.append(masked_images(pixel_values, orders[p], gh, gw, cs, m, baseline))
            batch = torch.cat(images)
            who = torch.tensor([p for p, _, _ in chunk], device=input_ids.device)
            n = batch.shape[0]
            scores = explainer.score_tensors(
                batch,
                input_ids.index_select(0, who),
                mask.index_select(0, who),
                torch.arange(n, device=device),
                target,
            ).reported
            for (p, m, _), v in zip(chunk, scores.float().cpu().tolist(), strict=True):
                values[(p, m)].append(v)

    out = []
    for p in range(len(phrases)):
        c = Curves()
        for m in metrics:
            setattr(c, m, values[(p, m)])
            setattr(c, f"{m}_auc", auc(values[(p, m)]))
        out.append(c)
    return out


def vlm_curves(
    explainer,
    image: Image.Image,
    phrases: list[str],
    maps: torch.Tensor,
    metrics: list[str],
    steps: int,
    baseline: float = 0.0,
) -> list[Curves]:
    """`faithfulness` on a generative VLM: the cells of each map's grid are laid over the whole
    original image (the grid of `Explanation.maps`, placed on the image), removed cells take the
    processor's mean colour plus `baseline` standard deviations (0: its mean, as on the other
    families), and every masked image is scored by the phrase's log-likelihood after the
    default prompt (`Explainer.phrase_log_likelihood`), one forward each."""
    fill, pixels = mean_fill(explainer, baseline), image_pixels(image)
    out = []
    for p, phrase in enumerate(phrases):
        gh, gw = maps.shape[1:]
        counts = step_counts(gh * gw, steps)
        c = Curves()
        for m in metrics:
            masked = masked_images(pixels, patch_order(maps[p]), gh, gw, counts, m, fill)
            values = [
                explainer.phrase_log_likelihood(
                    Image.fromarray(x.round().byte().permute(1, 2, 0).numpy()), phrase
                )
                for x in masked
            ]
            setattr(c, m, values)
            setattr(c, f"{m}_auc", auc(values))
        out.append(c)
    return out


def token_curves(
    explainer,
    image: Image.Image,
    gen,
    rows: Sequence[int],
    metrics: str | Sequence[str] = METRICS,
    steps: int = 16,
    prompt: str | None = None,
    batch_size: int = 64,
    baseline: float = 0.0,
) -> list[Curves]:
    """Deletion / insertion curves of generated tokens: for each `rows[i]` of a generation
    explanation `gen`, the cells of its map are removed from (or added to) `image` in the
    map's order and the token's probability is read again, teacher-forced after the same
    prefix (the text generated before it). Removed cells take the processor's mean colour, as
    in `faithfulness`; on generative VLMs the grid is laid over the whole image (`vlm_curves`).
    Generation families only; the maps are `gen.raw_maps` (the patch grid)."""
    metrics = checked_metrics(metrics, steps)
    a = explainer.adapter
    if "token" not in a.targets:
        raise ValueError(f"the {a.family} family does not generate text: no token curves")
    rows = list(rows)
    if not rows:
        return []
    vlm = getattr(a, "vlm", False)
    gh, gw = gen.raw_maps.shape[1:]
    counts = step_counts(gh * gw, steps)
    with explainer.lock, torch.no_grad():
        if vlm:  # the prompt's ids, image tokens expanded, as the explanation read them
            prefix = a.inputs([image], prompt)["input_ids"]
        else:
            teacher, start = a.teacher_ids(gen.text)
            prefix = teacher[:, :start]
        first = prefix.shape[1]
        if list(gen.positions) != list(range(first, first + len(gen.positions))):
            raise ValueError("token_curves: the explained tokens are not one run after the prompt")
        body = torch.tensor([gen.token_ids], dtype=prefix.dtype, device=prefix.device)
        ids = torch.cat([prefix, body], 1)
        if vlm:
            pixels, base = image_pixels(image), mean_fill(explainer, baseline)
        else:
            pixels = explainer.prepare_images([image])
            if explainer.grid(pixels) != (gh, gw):
                raise ValueError(
                    f"gen's maps are {gh}x{gw}, the model's grid {explainer.grid(pixels)}"
                )
            base = baseline
        values: dict[tuple[int, str], list[float]] = {}
        for r, m in [(r, m) for r in rows for m in metrics]:
            masked = masked_images(pixels, patch_order(gen.raw_maps[r]), gh, gw, counts, m, base)
            pos = first + r  # the token's position; the logits at pos - 1 scored it
            token = int(ids[0, pos])
            probs: list[float] = []
            if vlm:
                for x in masked:
                    im = Image.fromarray(x.round().byte().permute(1, 2, 0).numpy())
                    full = a.teacher_inputs(a.inputs([im], prompt), ids[:, : pos + 1])
                    logits = a.model(**full, use_cache=False).logits[0, pos - 1]
                    probs.append(float(logits.float().softmax(-1)[token]))
            else:
                for start in range(0, len(masked), batch_size):
                    chunk = masked[start : start + batch_size]
                    prefix_ids = ids[:, : pos + 1].expand(len(chunk), -1)
                    logits = a.decoder_logits(chunk, prefix_ids)[:, pos - 1]
                    probs += logits.float().softmax(-1)[:, token].cpu().tolist()
            values[r, m] = probs
    out = []
    for r in rows:
        c = Curves()
        for m in metrics:
            setattr(c, m, values[r, m])
            setattr(c, f"{m}_auc", auc(values[r, m]))
        out.append(c)
    return out
