"""Detector region features for region models (SCAN), and their maps painted on the image.

Readers:

- `read_bottom_up_tsv(path)`: the TSV written by bottom-up-attention's `generate_tsv.py`, no header,
  one image per line, tab-separated ``image_id, image_w, image_h, num_boxes, boxes, features``;
  `boxes` and `features` are base64 of float32 arrays, ``num_boxes x 4`` (x0, y0, x1, y1 in pixels)
  and ``num_boxes x D``. Boxes are returned in fractions of (image_w, image_h).
- `read_precomp(directory, split)`: SCAN's `*_precomp` folders: ``{split}_ims.npy`` ``[N, K, D]``
  (read with `allow_pickle=False`, memory-mapped). They hold no boxes; a boxes file beside them,
  ``{split}_boxes.npy`` ``[N, K, 4]`` (x0, y0, x1, y1 in fractions of each image's width and
  height), gives them; without it the features still score, but maps cannot be drawn.

A row that cannot be used (wrong field count, a box count that disagrees with its boxes or
features, bad base64, sizes that are not positive) is one line naming the file, the row and the
image id: raised as `InputError`, or, when a `ReadReport` is passed, recorded there and skipped.
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from groundcam.data.sample import ReadReport
from groundcam.errors import InputError

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass
class RegionFeatures:
    """One image's regions: `features` [K, D], `boxes` [K, 4] in fractions of the image (None
    when the source has none), the image's (width, height) when known, and where it was read."""

    image_id: str
    features: np.ndarray
    boxes: np.ndarray | None
    size: tuple[int, int] | None
    where: str

    def require_boxes(self) -> np.ndarray:
        """The boxes, or one line saying that maps need them."""
        if self.boxes is None:
            raise InputError(
                f"{self.where}: region features without boxes; maps need each region's box "
                "(for *_ims.npy: a {split}_boxes.npy of [N, K, 4] fractions beside it)"
            )
        return self.boxes


def _decode(text: str, rows: int, what: str) -> np.ndarray:
    """A base64 float32 array cut into `rows` rows; ValueError saying what does not fit."""
    try:
        flat = np.frombuffer(base64.b64decode(text, validate=True), dtype=np.float32)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not base64 float32 ({e})") from None
    if rows <= 0 or flat.size % rows or flat.size == 0:
        raise ValueError(
            f"num_boxes is {rows} but {what} holds {flat.size} floats (not {rows} equal rows)"
        )
    return flat.reshape(rows, -1)


def _row(fields: list[str], where: str) -> RegionFeatures:
    if len(fields) != len(TSV_FIELDS):
        raise ValueError(
            f"{len(fields)} fields, expected {len(TSV_FIELDS)} ({', '.join(TSV_FIELDS)})"
        )
    image_id, w, h, n, boxes, features = fields
    try:
        w, h, n = int(float(w)), int(float(h)), int(n)
    except ValueError:
        raise ValueError("image_w, image_h and num_boxes must be numbers") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {w}x{h} is not positive")
    boxes = _decode(boxes, n, "boxes")
    if boxes.shape[1] != 4:
        raise ValueError(f"num_boxes is {n} but boxes holds {boxes.size} floats, not {n}x4")
    features = _decode(features, n, "features")
    scale = np.array([w, h, w, h], dtype=np.float32)
    return RegionFeatures(image_id, features, boxes / scale, (w, h), where)


def read_bottom_up_tsv(
    path: str | Path, report: ReadReport | None = None
) -> Iterator[RegionFeatures]:
    """Images of a bottom-up-attention TSV (module docstring); a bad row raises `InputError`
    naming the file and row, or is recorded in `report` and skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such TSV file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(newline="", encoding="utf-8") as f:
        for number, fields in enumerate(csv.reader(f, delimiter="\t"), 1):
            image_id = fields[0] if fields else ""
            where = f"{path}:{number} (image {image_id})"
            try:
                item = _row(fields, where)
            except ValueError as e:
                if report is None:
                    raise InputError(f"{where}: {e}") from None
                report.skipped_rows += 1
                report.error(where, str(e))
                continue
            if report is not None:
                report.samples += 1
            yield item


def read_precomp(directory: str | Path, split: str) -> Iterator[RegionFeatures]:
    """Images of SCAN's `{split}_ims.npy` in `directory`, with boxes from `{split}_boxes.npy`
    when it is there (module docstring); ids are the row numbers."""
    directory = Path(directory)
    ims = directory / f"{split}_ims.npy"
    if not ims.is_file():
        raise InputError(f"{directory}: no {ims.name} (SCAN's precomputed features of {split!r})")
    try:
        features = np.load(ims, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{ims}: not a numpy array file ({e})") from None
    if features.ndim != 3:
        raise InputError(f"{ims}: expected [images, regions, dim], got shape {features.shape}")
    boxes_file = directory / f"{split}_boxes.npy"
    boxes = None
    if boxes_file.is_file():
        try:
            boxes = np.load(boxes_file, allow_pickle=False)
        except ValueError as e:
            raise InputError(f"{boxes_file}: not a numpy array file ({e})") from None
        if boxes.shape != (*features.shape[:2], 4):
            raise InputError(
                f"{boxes_file}: shape {boxes.shape} does not fit {ims.name} "
                f"{features.shape}: expected {(*features.shape[:2], 4)}"
            )
    for i in range(features.shape[0]):
        rows = None if boxes is None else np.asarray(boxes[i], dtype=np.float32)
        yield RegionFeatures(str(i), np.asarray(features[i]), rows, None, f"{ims}:{i}")


def paint(
    weights: torch.Tensor, boxes: np.ndarray | torch.Tensor, size: tuple[int, int], overlap="max"
) -> torch.Tensor:
    """Per-region weights [..., K] painted on an (H, W) image: each box with its weight, the
    maximum (or mean) where boxes overlap, 0 where none lies (`placement.place`)."""
    from groundcam.placement import place, region_layout

    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).clamp(0, 1)
    eps = 1e-4  # a degenerate box keeps a sliver, so that every region is a tile
    b[:, 2:] = torch.maximum(b[:, 2:], (b[:, :2] + eps).clamp(max=1))
    b[:, :2] = torch.minimum(b[:, :2], b[:, 2:] - eps).clamp(min=0)
    boxes = b
    return place(weights, region_layout(boxes.tolist()), [tuple(size)], overlap)[0]
