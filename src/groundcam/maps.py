"""The map math every layer shares: normalisation, resizing to image size, flatness, finiteness.

A neutral module (it imports only torch, numpy and groundcam.errors) so that `explanation`,
`eval` and `viz` all use one definition without importing each other.

- `normalize_maps`: per map ``(m - min) / (max - min)`` when ``max > min`` (no epsilon), zeros
  otherwise; float32 in [0, 1], never NaN, for any input dtype and range (DESIGN §3).
- `upsample` / `upsample_many`: the protocols' resize to image size (bicubic or bilinear,
  ``align_corners=False``, unclamped), float32.
- `map_range` / `is_flat`: does a map vary at all? A map is flat when ``max - min`` is at most
  `FLAT_RTOL` times its magnitude; that absorbs the float32 rounding of a bicubic or bilinear
  resize of a constant map (measured up to ~3e-6 relative) and nothing a map means.
- `check_finite`: refuse NaN and +-inf with an `InputError` naming what was wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from groundcam.errors import InputError

ArrayLike = torch.Tensor | np.ndarray

RESIZE_MODES = ("bicubic", "bilinear")

# max - min <= FLAT_RTOL * max(|max|, |min|) is "no variation". A constant float32 map resized
# bicubically varies by up to ~3e-6 of its value through rounding alone (25 ulps; measured over
# grids 1..50 and sizes up to 8000 px); 1e-5 leaves a 3x margin and is far below any real signal.
FLAT_RTOL = 1e-5

# float64 holds the span of any float32/fp16/bf16 map without overflow; MPS has no float64.
_MAX_EXPONENT = {torch.float64: 1024, torch.float32: 128}


def as_2d_tensor(heatmap: ArrayLike | Sequence) -> torch.Tensor:
    """A torch/numpy/nested-list map as a tensor, insisting on [h, w]."""
    tensor = heatmap if isinstance(heatmap, torch.Tensor) else torch.as_tensor(np.asarray(heatmap))
    if tensor.ndim != 2:
        raise InputError(f"heatmap must be 2-D [h, w], got shape {tuple(tensor.shape)}")
    return tensor


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per map over the last two axes: ``(m - min) / (max - min)`` when ``max > min``, zeros
    otherwise. No epsilon: raw Grad-CAM of small models can be ~1e-5, an epsilon would distort it.

    Returns float32 in [0, 1] with the input's shape and device, never NaN, whatever the input:

    - the arithmetic runs in float64 (float32 on MPS), after scaling each map by an exact power
      of two so its largest magnitude is below 2; so fp16 maps whose range exceeds 65,504,
      float32 maps near 3.4e38 and float64 maps near 1e308 neither overflow nor lose precision
      (scaling by a power of two changes no rounding);
    - non-finite entries: min and max are taken over the finite entries; ``+inf`` becomes 1 and
      ``-inf`` 0 (the top and the bottom of the map), NaN becomes 0;
    - a map whose non-NaN entries are all equal (all zero, constant, all ``+inf``) is zeros.

    Differentiable in the finite entries (the scale factor is a constant).
    """
    work = _work_dtype(maps)
    flat = maps.flatten(-2).to(work)
    finite = torch.isfinite(flat)
    inf = torch.tensor(float("inf"), dtype=work, device=flat.device)
    lo = torch.where(finite, flat, inf).amin(-1, keepdim=True)
    hi = torch.where(finite, flat, -inf).amax(-1, keepdim=True)
    has_finite = finite.any(-1, keepdim=True)
    lo = torch.where(has_finite, lo, 0)
    hi = torch.where(has_finite, hi, 0)

    # An exact power of two per map: |values| * factor < 2, so hi - lo cannot overflow.
    magnitude = torch.maximum(lo.abs(), hi.abs()).detach()
    limit = _MAX_EXPONENT[work]
    exponent = torch.where(magnitude > 0, torch.floor(torch.log2(magnitude)) + 1, 0)
    exponent = exponent.clamp(-(limit - 2), limit)
    factor = torch.exp2(-exponent)

    values = torch.where(finite, flat, 0) * factor
    lo, hi = lo * factor, hi * factor
    span = hi - lo
    out = torch.where(span > 0, (values - lo) / torch.where(span > 0, span, 1), 0)
    out = torch.where(flat == float("inf"), 1, out)
    out = torch.where(finite | (flat == float("inf")), out, 0)  # -inf and NaN

    present = ~torch.isnan(flat)
    top = torch.where(present, flat, -inf).amax(-1, keepdim=True)
    bottom = torch.where(present, flat, inf).amin(-1, keepdim=True)
    out = torch.where(top > bottom, out, 0)  # constant over its non-NaN entries
    return out.clamp(0, 1).to(torch.float32).reshape(maps.shape)


def upsample(heatmap: ArrayLike, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a patch-grid map to (H, W) exactly as the reference grounding code does."""
    return upsample_many(as_2d_tensor(heatmap)[None], size, mode)[0]


def upsample_many(maps: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """`upsample` for a stack of maps [P, h, w] in one call (the same values, map by map).

    float32 out; a map already at (H, W) is returned as float32 unchanged. No clamping afterwards:
    bicubic overshoot is part of the protocol."""
    if maps.ndim != 3:
        raise InputError(f"maps must be [P, h, w], got shape {tuple(maps.shape)}")
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise InputError(f"size must be positive (H, W), got {tuple(size)}")
    if tuple(maps.shape[1:]) == (height, width):
        return maps.float()
    if mode not in RESIZE_MODES:
        raise InputError(f"unsupported resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    resized = F.interpolate(
        maps[:, None].float(), size=(height, width), mode=mode, align_corners=False
    )
    return resized[:, 0]


def map_range(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each map over the last two axes, as float64 CPU tensors of the leading shape
    (one reduction on the maps' own device, then only the two small results move)."""
    flat = maps.detach().flatten(-2)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.amin(-1).cpu().double(), flat.amax(-1).cpu().double()


def is_flat(maps: torch.Tensor, rtol: float = FLAT_RTOL) -> torch.Tensor:
    """True per map (over the last two axes) when it has no variation:
    ``max - min <= rtol * max(|max|, |min|)``; an all-zero map is flat.

    A constant map stays flat after `upsample` (its rounding noise is below `FLAT_RTOL`); a map
    holding NaN or inf is never flat (refuse those with `check_finite` first). Returns a bool
    tensor of the leading shape, on the CPU.
    """
    lo, hi = map_range(maps)
    return (hi - lo) <= rtol * torch.maximum(lo.abs(), hi.abs())


def check_finite(maps: torch.Tensor, what: str = "heatmap", when: str = "") -> None:
    """Raise an `InputError` ``"<what> contains NaN<when>"`` (or ``inf``) unless every value is
    finite; `when` is appended (e.g. ``" after the resize to 40x40"``)."""
    if maps.dtype.is_floating_point and not bool(torch.isfinite(maps).all()):
        kind = "NaN" if bool(torch.isnan(maps).any()) else "inf"
        raise InputError(f"{what} contains {kind}{when}")
