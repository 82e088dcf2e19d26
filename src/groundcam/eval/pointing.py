"""Pointing game: does the heatmap's maximum fall inside a ground-truth box.

Four protocols (DESIGN §6), all reached through `pointing_game(..., protocol=...)`:

- ``amc`` (default): bicubic to image size, first maximum, strict box test.
- ``mg``: bilinear to image size, first maximum, inclusive box test on the raw 1-based boxes;
  a phrase whose union box covers < 5% of the image is *skipped* (``hit=None, skipped=True``).
- ``torchray``: bilinear to image size, first maximum; hit iff a ground-truth pixel lies at
  Euclidean distance strictly below 15 px from the point.
- ``albef-boxes``: bicubic to image size; detector proposals ``[x, y, w, h]`` are ranked by
  ``map[y:y+h, x:x+w].sum() / sqrt(w*h)``; correct iff the best proposal has inclusive-pixel
  IoU >= 0.5 with the ground truth. Needs ``proposals=``; see `albef_boxes`.

"The point" is always the first maximum in row-major order of the map after resizing.
Accuracy helpers (`pointing_accuracy`, `class_averaged_accuracy`) ignore skipped trials.

A map with no variation (all zero, constant, or flat after the resize; see
`groundcam.maps.is_flat`) has no point: it is a miss under every protocol (``hit=False``,
``flat=True``; `point` is still its first maximum, ``box`` None), so a zero map never "hits"
the box in the image's corner and a constant map never hits through bicubic rounding noise.
`mg`'s skip rule comes first: a skipped phrase stays skipped (``flat`` still says whether its map
was flat). NaN and +-inf are refused with an `InputError` before and after the resize (a finite
map near float32's limit can overflow in the bicubic resize), and so are NaN or infinite boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from groundcam.data.textfile import read_json
from groundcam.errors import InputError
from groundcam.maps import (
    FLAT_RTOL,
    ArrayLike,
    as_2d_tensor,
    check_finite,
    is_flat,
    upsample,
    upsample_many,
)

__all__ = [
    "ALBEF_IOU_THRESHOLD",
    "MG_MIN_UNION_FRACTION",
    "PROTOCOLS",
    "TORCHRAY_TOLERANCE",
    "PointingResult",
    "Protocol",
    "albef_boxes",
    "class_averaged_accuracy",
    "inclusive_iou",
    "pointing_accuracy",
    "pointing_game",
    "pointing_games",
    "proposal_scores",
    "read_dets",
    "union_box",
    "upsample",
    "upsample_many",
]

HitRule = Callable[[int, int, torch.Tensor], bool]
# (xyxy boxes [K, 4], (H, W) of the image the point lives in) -> skip this phrase?
SkipRule = Callable[[torch.Tensor, tuple[int, int]], bool]


MG_MIN_UNION_FRACTION = 0.05
TORCHRAY_TOLERANCE = 15.0
ALBEF_IOU_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- hit / skip rules


def _inside_strict(x: int, y: int, boxes: torch.Tensor) -> bool:
    """True iff (x, y) lies strictly inside at least one xyxy box."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    inside = (x1 < x) & (x < x2) & (y1 < y) & (y < y2)
    return bool(inside.any())


def _inside_inclusive(x: int, y: int, boxes: torch.Tensor) -> bool:
    """True iff (x, y) lies inside or on the edge of at least one xyxy box."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    inside = (x1 <= x) & (x <= x2) & (y1 <= y) & (y <= y2)
    return bool(inside.any())


def _within_tolerance(x: int, y: int, boxes: torch.Tensor) -> bool:
    """True iff some ground-truth pixel is at distance < 15 px from (x, y).

    The ground-truth pixels of an xyxy box are the integer pixels (u, v) with
    ``x1 <= u <= x2`` and ``y1 <= v <= y2`` (the box's edges included); a box holding no integer
    pixel contributes none. The nearest such pixel to (x, y) is (x, y) clamped to the box's
    integer range, so no mask needs to be drawn.
    """
    u_lo, v_lo = torch.ceil(boxes[:, 0]), torch.ceil(boxes[:, 1])
    u_hi, v_hi = torch.floor(boxes[:, 2]), torch.floor(boxes[:, 3])
    has_pixels = (u_lo <= u_hi) & (v_lo <= v_hi)
    nearest_u = torch.minimum(torch.maximum(torch.full_like(u_lo, x), u_lo), u_hi)
    nearest_v = torch.minimum(torch.maximum(torch.full_like(v_lo, y), v_lo), v_hi)
    squared = (nearest_u - x) ** 2 + (nearest_v - y) ** 2  # exact: integers in float64
    return bool((has_pixels & (squared < TORCHRAY_TOLERANCE**2)).any())


def union_box(boxes: ArrayLike | Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """The smallest xyxy box enclosing all `boxes` (the `mg` protocol's "union box")."""
    tensor = _as_boxes(boxes)
    if tensor.shape[0] == 0:
        raise InputError("union_box needs at least one box")
    x1, y1 = tensor[:, 0].min().item(), tensor[:, 1].min().item()
    x2, y2 = tensor[:, 2].max().item(), tensor[:, 3].max().item()
    return (x1, y1, x2, y2)


def _mg_skip(boxes: torch.Tensor, image_size: tuple[int, int]) -> bool:
    """`mg`: skip iff the union box's area (x2 - x1) * (y2 - y1) is < 5% of H * W.

    A phrase with no boxes has nothing to point at and is skipped too.
    """
    if boxes.shape[0] == 0:
        return True
    x1, y1, x2, y2 = union_box(boxes)
    height, width = image_size
    return (x2 - x1) * (y2 - y1) < MG_MIN_UNION_FRACTION * height * width


@dataclass(frozen=True)
class Protocol:
    """How a pointing-game variant resizes the map and decides a hit.

    `hit_rule` decides point protocols; `skip_rule` (optional) drops a phrase before scoring;
    `uses_proposals` marks a protocol scored on detector proposals (`albef-boxes`) instead.
    """

    resize_mode: str
    hit_rule: HitRule | None = None
    skip_rule: SkipRule | None = None
    uses_proposals: bool = False


PROTOCOLS: dict[str, Protocol] = {
    # ALBEF Grounding.py / AMC / SelfEQ: bicubic to image size, first argmax, strict box test.
    "amc": Protocol(resize_mode="bicubic", hit_rule=_inside_strict),
    # MultiGrounding / Grounding-by-Separation / WWbL: bilinear, inclusive test on raw 1-based
    # boxes, phrases whose union box is < 5% of the image skipped.
    "mg": Protocol(resize_mode="bilinear", hit_rule=_inside_inclusive, skip_rule=_mg_skip),
    # Zhang et al. 2016 (TorchRay): bilinear (TorchRay resamples saliency bilinearly,
    # align_corners=False), hit iff a ground-truth pixel is at distance < 15 px.
    "torchray": Protocol(resize_mode="bilinear", hit_rule=_within_tolerance),
    # ALBEF weakly-supervised RefCOCO+: bicubic (as ALBEF's grounding_eval), proposals ranked by
    # sum / sqrt(area), correct iff inclusive-pixel IoU >= 0.5.
    "albef-boxes": Protocol(resize_mode="bicubic", uses_proposals=True),
}


@dataclass
class PointingResult:
    """Outcome of one pointing-game trial.

    `hit` is None exactly when `skipped` is True (the protocol leaves the phrase out, e.g. `mg`'s
    5% rule); accuracy helpers ignore such trials. For `albef-boxes`, `hit` means "the chosen
    proposal has IoU >= 0.5", `box` is that proposal ``(x, y, w, h)`` (None when no proposal
    scored above 0) and `iou` its IoU with the ground truth. `flat` is True when the map had no
    variation (before or after the resize): then `hit` is False (unless skipped), `point` is the
    first maximum all the same, and `box`/`iou` are None.
    """

    hit: bool | None
    point: tuple[int, int]  # (x, y): pixel column, row
    protocol: str
    skipped: bool = False
    box: tuple[float, float, float, float] | None = None
    iou: float | None = None
    flat: bool = False


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
        raise InputError(f"boxes must be xyxy with shape [K, 4], got {tuple(tensor.shape)}")
    finite = torch.isfinite(tensor).all(dim=1)
    if not bool(finite.all()):
        bad = tensor[~finite][0].tolist()
        raise InputError(f"boxes must be finite numbers, got box {bad} (NaN or infinite)")
    return tensor


def _protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise InputError(f"unknown pointing protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def _prepared_map(
    heatmap: ArrayLike, image_size: tuple[int, int] | None, mode: str
) -> tuple[torch.Tensor, bool]:
    """The map at image size and whether it is flat (on the grid or after the resize); NaN and
    inf refused before and after the resize."""
    tensor = as_2d_tensor(heatmap).detach()
    check_finite(tensor)
    flat = bool(is_flat(tensor))
    if image_size is not None:
        tensor = upsample(tensor, image_size, mode=mode)
        height, width = tensor.shape
        check_finite(tensor, when=f" after the resize to {height}x{width} (float32 overflow)")
        flat = flat or bool(is_flat(tensor))
    return tensor, flat


def _first_argmax(tensor: torch.Tensor) -> tuple[int, int]:
    # torch.argmax returns the first maximal index, i.e. first in row-major order.
    width = tensor.shape[1]
    flat_index = int(torch.argmax(tensor.reshape(-1)))
    return flat_index % width, flat_index // width


def pointing_game(
    heatmap: ArrayLike,
    boxes: ArrayLike | Sequence[Sequence[float]],
    protocol: str = "amc",
    image_size: tuple[int, int] | None = None,
    *,
    proposals: ArrayLike | Sequence[Sequence[float]] | None = None,
) -> PointingResult:
    """Score one map under `protocol` against the phrase's xyxy ground-truth `boxes`.

    The map is resized to `image_size` (H, W) with the protocol's interpolation; without
    `image_size` it is taken to be at image size already. For `mg` the boxes must be the raw
    1-based annotation boxes (add 1 to boxes from a parser that subtracted it). For
    `albef-boxes` pass ``proposals=[[x, y, w, h, ...], ...]``; the xyxy `boxes` are turned into
    ``[x1, y1, x2 - x1, y2 - y1]`` and the best IoU over them is used (see `albef_boxes`).
    """
    rule = _protocol(protocol)
    tensor, flat = _prepared_map(heatmap, image_size, rule.resize_mode)
    return _decide(tensor, _first_argmax(tensor), boxes, protocol, proposals, flat)


def pointing_games(
    heatmaps: torch.Tensor,
    boxes: Sequence[ArrayLike | Sequence[Sequence[float]]],
    protocol: str = "amc",
    *,
    proposals: ArrayLike | Sequence[Sequence[float]] | None = None,
) -> list[PointingResult]:
    """`pointing_game` for a stack of maps [P, H, W] already at image size (on any device), one
    argmax for all of them; `boxes[p]` are map p's boxes, `proposals` shared by all.

    Flatness is judged on these maps (a constant grid map resized to image size is flat: its
    rounding noise is below `groundcam.maps.FLAT_RTOL`); NaN and inf are refused."""
    _protocol(protocol)
    if heatmaps.ndim != 3:
        raise InputError(f"heatmaps must be [P, H, W], got shape {tuple(heatmaps.shape)}")
    if len(boxes) != heatmaps.shape[0]:
        raise InputError(f"{heatmaps.shape[0]} maps but {len(boxes)} box lists")
    width = heatmaps.shape[2]
    argmax, flat = _argmax_and_flat(heatmaps)
    return [
        _decide(heatmaps[p], (i % width, i // width), boxes[p], protocol, proposals, flat[p])
        for p, i in enumerate(argmax)
    ]


def _argmax_and_flat(heatmaps: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Per map of [P, H, W]: the first maximum's flat index and whether the map is flat
    (`groundcam.maps.is_flat`), from one reduction pass on the maps' device and one transfer;
    NaN or inf anywhere is refused (`check_finite`)."""
    maps = heatmaps.detach().reshape(heatmaps.shape[0], -1)
    if not maps.dtype.is_floating_point:
        maps = maps.float()
    # torch.argmax returns the first maximal index (first in row-major order) on every device.
    packed = torch.stack(
        [maps.argmax(1).double(), maps.amin(1).double(), maps.amax(1).double()], 1
    ).cpu()
    lo, hi = packed[:, 1], packed[:, 2]
    # min and max are finite exactly when every value is (NaN propagates through both)
    if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
        check_finite(heatmaps)
    flat = (hi - lo) <= FLAT_RTOL * torch.maximum(lo.abs(), hi.abs())
    return packed[:, 0].long().tolist(), flat.tolist()


def _decide(tensor, point, boxes, protocol, proposals, flat: bool = False) -> PointingResult:
    """The protocol's verdict on a map at image size whose first maximum is `point`; a `flat` map
    is a miss (after `mg`'s skip rule, which still skips)."""
    rule = _protocol(protocol)
    x, y = point
    box_tensor = _as_boxes(boxes)
    if rule.uses_proposals:
        if proposals is None:
            raise InputError(f"protocol {protocol!r} needs proposals=[[x, y, w, h], ...]")
        gt_xywh = torch.cat([box_tensor[:, :2], box_tensor[:, 2:] - box_tensor[:, :2]], dim=1)
        return _score_proposals(
            tensor.cpu(), (x, y), proposals, gt_xywh.tolist(), protocol, flat=flat
        )
    if proposals is not None:
        raise InputError(f"proposals are only used by protocol 'albef-boxes', not {protocol!r}")
    assert rule.hit_rule is not None
    if rule.skip_rule is not None and rule.skip_rule(box_tensor, tuple(tensor.shape)):
        return PointingResult(hit=None, point=(x, y), protocol=protocol, skipped=True, flat=flat)
    if flat:
        return PointingResult(hit=False, point=(x, y), protocol=protocol, flat=True)
    hit = bool(box_tensor.shape[0]) and rule.hit_rule(x, y, box_tensor)
    return PointingResult(hit=hit, point=(x, y), protocol=protocol)


# ----------------------------------------------------------------------------- albef-boxes


def _as_proposals(proposals: ArrayLike | Sequence[Sequence[float]]) -> torch.Tensor:
    """Detector rows ``[x, y, w, h, ...]`` -> float64 [K, 4] (extra columns dropped)."""
    if isinstance(proposals, torch.Tensor):
        tensor = proposals.detach().cpu().to(torch.float64)
    elif len(proposals) == 0:
        return torch.zeros(0, 4, dtype=torch.float64)
    else:
        rows = [list(row)[:4] for row in proposals]
        if any(len(row) != 4 for row in rows):
            raise InputError("each proposal must have at least 4 values [x, y, w, h, ...]")
        tensor = torch.tensor(rows, dtype=torch.float64)
    if tensor.numel() == 0:
        return tensor.reshape(0, 4)
    if tensor.ndim != 2 or tensor.shape[1] < 4:
        raise InputError(
            f"proposals must be [K, >=4] rows [x, y, w, h, ...], got {tuple(tensor.shape)}"
        )
    return tensor[:, :4]


def proposal_scores(
    heatmap: ArrayLike, proposals: ArrayLike | Sequence[Sequence[float]]
) -> torch.Tensor:
    """ALBEF's proposal score ``map[int(y):int(y+h), int(x):int(x+w)].sum() / sqrt(w*h)``.

    `heatmap` must already be at image size. Slice bounds are truncated with `int()` as in
    ALBEF's grounding_eval (``int(y + h)``, not ``int(y) + int(h)``); a negative start is clamped
    to 0 (ALBEF would wrap around). Sums are taken in float64. A proposal with ``w * h <= 0``
    or a NaN or infinite value scores NaN (never chosen). Returns a float64 tensor [K].
    """
    tensor = as_2d_tensor(heatmap).detach()
    rows = _as_proposals(proposals).tolist()
    scores = torch.full((len(rows),), float("nan"), dtype=torch.float64)
    for k, (x, y, w, h) in enumerate(rows):
        area = w * h
        if not area > 0 or not math.isfinite(x + y + area):
            continue
        top, left = max(int(y), 0), max(int(x), 0)
        window = tensor[top : max(int(y + h), 0), left : max(int(x + w), 0)]
        scores[k] = window.sum(dtype=torch.float64).item() / math.sqrt(area)
    return scores


def inclusive_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two ``[x, y, w, h]`` boxes counted in whole pixels (ALBEF's computeIoU).

    The intersection runs from ``max(x)`` to ``min(x + w - 1)`` inclusive; as in the reference it
    counts only when ``x1 < x2`` and ``y1 < y2`` strictly (a one-pixel-wide overlap counts 0).
    The union is ``w1*h1 + w2*h2 - inter``.
    """
    ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    ix2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    iy2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def _score_proposals(
    tensor: torch.Tensor,
    point: tuple[int, int],
    proposals: ArrayLike | Sequence[Sequence[float]],
    gt_boxes: Sequence[Sequence[float]],
    protocol: str,
    flat: bool = False,
) -> PointingResult:
    boxes = _as_proposals(proposals)
    if flat:  # every proposal would be ranked by its area alone: no choice, a miss
        return PointingResult(hit=False, point=point, protocol=protocol, flat=True)
    scores = proposal_scores(tensor, boxes)
    # ALBEF: max_score = 0, then `if score > max_score` -> first strictly best positive score.
    best, best_score = None, 0.0
    for k, score in enumerate(scores.tolist()):
        if score > best_score:
            best, best_score = k, score
    if best is None or not gt_boxes:
        return PointingResult(hit=False, point=point, protocol=protocol)
    chosen = tuple(float(v) for v in boxes[best].tolist())
    iou = max(inclusive_iou(gt, chosen) for gt in gt_boxes)
    return PointingResult(
        hit=iou >= ALBEF_IOU_THRESHOLD, point=point, protocol=protocol, box=chosen, iou=iou
    )


def albef_boxes(
    heatmap: ArrayLike,
    proposals: ArrayLike | Sequence[Sequence[float]],
    gt_box: Sequence[float],
    image_size: tuple[int, int] | None = None,
) -> PointingResult:
    """Protocol `albef-boxes` for one referring expression.

    `heatmap` is resized bicubically to `image_size` (H, W) (unless None: already at image size),
    `proposals` are the image's detector rows ``[x, y, w, h, ...]`` (one `read_dets` entry) and
    `gt_box` the COCO ``[x, y, w, h]`` box. The first proposal with the strictly highest
    positive score is chosen; none scoring above 0 is a miss with ``box=None``, and so is a flat
    map (``flat=True``: ranking by a constant map is ranking by area).
    """
    tensor, flat = _prepared_map(heatmap, image_size, PROTOCOLS["albef-boxes"].resize_mode)
    gt = [float(v) for v in gt_box]
    if len(gt) != 4 or not all(math.isfinite(v) for v in gt):
        raise InputError(f"gt_box must be 4 finite numbers [x, y, w, h], got {gt_box!r}")
    return _score_proposals(
        tensor, _first_argmax(tensor), proposals, [gt], "albef-boxes", flat=flat
    )


def read_dets(path: str | Path) -> dict[str, list[list[float]]]:
    """Read a `dets.json` ``{image_id: [[x, y, w, h, ...], ...]}`` -> ``{str(image_id): [[x, y, w, h], ...]}``.

    Keys stay strings (look up with ``dets[str(image_id)]`` as ALBEF does); extra columns
    (scores, classes) are dropped.
    """
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected an object {{image_id: [[x, y, w, h, ...], ...]}}")
    dets: dict[str, list[list[float]]] = {}
    for image_id, rows in raw.items():
        if not isinstance(rows, list):
            raise InputError(f"{path}: detections of image {image_id} must be a list")
        boxes = []
        for row in rows:
            try:
                if not isinstance(row, list) or len(row) < 4:
                    raise TypeError
                boxes.append([float(v) for v in row[:4]])
            except (TypeError, ValueError):
                raise InputError(f"{path}: image {image_id}: bad detection {row!r:.80}") from None
        dets[str(image_id)] = boxes
    return dets


# ----------------------------------------------------------------------------- accuracy


def _scored(results: Iterable[PointingResult]) -> list[PointingResult]:
    return [r for r in results if not r.skipped and r.hit is not None]


def pointing_accuracy(results: Iterable[PointingResult]) -> tuple[float, int]:
    """Fraction of hits and the number of scored trials (skipped ones left out; NaN if none)."""
    hits = [bool(result.hit) for result in _scored(results)]
    if not hits:
        return float("nan"), 0
    return sum(hits) / len(hits), len(hits)


def class_averaged_accuracy(
    results: Iterable[PointingResult], classes: Iterable[Hashable]
) -> tuple[float, dict[Hashable, tuple[float, int]]]:
    """TorchRay-style accuracy: the mean over classes of each class's hit rate.

    `classes` gives one label per result (same order). Skipped trials are left out; a class
    with no scored trial is left out of the mean. Returns (mean, {class: (accuracy, count)}),
    mean NaN when no class has a scored trial.
    """
    results, classes = list(results), list(classes)
    if len(results) != len(classes):
        raise InputError(f"{len(results)} results but {len(classes)} class labels")
    groups: dict[Hashable, list[PointingResult]] = {}
    for result, label in zip(results, classes, strict=True):
        groups.setdefault(label, []).append(result)
    per_class = {label: pointing_accuracy(group) for label, group in groups.items()}
    per_class = {label: value for label, value in per_class.items() if value[1] > 0}
    if not per_class:
        return float("nan"), {}
    return sum(acc for acc, _ in per_class.values()) / len(per_class), per_class
