"""Heatmap overlays: a [0, 1] map drawn over an image, with boxes, the pointed pixel and, on
request, a colour bar.

How a map is drawn, and why. Each pixel is blended with the colour map's colour for its value
``v`` (the map resized to the drawn size, clamped to [0, 1]) at an opacity of ``alpha * v``:

- where the map is 0 the photo is untouched, and the overlay fades in with the value. A constant
  blend (the classic Grad-CAM figure) paints the whole scene with the colour map's low end: with
  'jet' that is navy, so everything the model ignores turns blue and a red object turns purple;
- the default colour map is 'inferno': perceptually uniform, its lightness rises monotonically
  with the value (readable in greyscale and with the common colour-vision deficiencies), and its
  high end (orange to pale yellow), the only part drawn strongly, keeps a red object reddish.
  Any matplotlib colour map name may be passed ('turbo' and 'jet' for the rainbow look);
- `alpha` is the opacity at the map's maximum (1 paints the colour there exactly).

Huge photos are drawn at most `MAX_SIDE` px on their longer side (the model saw a few hundred);
boxes and the point, given in the original image's pixels, are scaled with the image. Boxes are
white lines with a black edge and the point a dot in a white then black ring (green for a hit, red
for a miss), as `groundcam.viz.figures` draws them, so they stay visible on any photo and map;
their sizes grow with the drawn image (one unit per 200 px of its shorter side).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.colors
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from groundcam.errors import InputError
from groundcam.io import to_rgb
from groundcam.maps import as_2d_tensor, check_finite, upsample

ArrayLike = torch.Tensor | np.ndarray
Cmap = str | matplotlib.colors.Colormap

DEFAULT_CMAP = "inferno"
DEFAULT_ALPHA = 0.5
MAX_SIDE = 1024  # longest side of a drawn overlay, in pixels (None in `overlay` lifts it)

BOX_COLOUR = (255, 255, 255)
BOX_WIDTH = 2  # px per unit, with one unit of EDGE_COLOUR either side
EDGE_COLOUR = (0, 0, 0)
POINT_RADIUS = 3  # px per unit, the white ring included; a unit of EDGE_COLOUR around it
POINT_BORDER = (255, 255, 255)
HIT_COLOUR, MISS_COLOUR = "#1a9850", "#d73027"  # green and red that stay apart for most eyes
POINT_FILL = {True: (26, 152, 80), False: (215, 48, 39), None: (255, 255, 255)}

COLORBAR_BACKGROUND = (255, 255, 255)
COLORBAR_TEXT = (0, 0, 0)
COLORBAR_PANEL_OPACITY = 0.75  # how much the inset panel whitens the photo under it

_SUGGESTED_CMAPS = ("inferno", "magma", "viridis", "turbo", "jet", "hot")


def colormap(cmap: Cmap = DEFAULT_CMAP) -> matplotlib.colors.Colormap:
    """The matplotlib colour map named `cmap` (a Colormap passes through); an unknown name is an
    `InputError` listing a few valid ones."""
    if isinstance(cmap, matplotlib.colors.Colormap):
        return cmap
    if isinstance(cmap, str) and cmap in matplotlib.colormaps:
        return matplotlib.colormaps[cmap]
    raise InputError(
        f"unknown colour map {cmap!r}; valid: {', '.join(_SUGGESTED_CMAPS)}, ... "
        "(any matplotlib colormap name)"
    )


def check_alpha(alpha: float) -> float:
    """`alpha` as a float in [0, 1], or an `InputError`."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= value <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    return value


def _to_numpy_2d(heatmap: ArrayLike) -> np.ndarray:
    """Return a float32 [H, W] numpy copy of a torch/numpy map."""
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().cpu().float().numpy()
    array = np.asarray(heatmap, dtype=np.float32)
    if array.ndim != 2:
        raise InputError(f"heatmap must be 2-D [h, w], got shape {array.shape}")
    return array


def colorize(heatmap: ArrayLike, cmap: Cmap = DEFAULT_CMAP) -> Image.Image:
    """Map a [0, 1] heatmap to an RGB image with a matplotlib colormap (values clamped, NaN as 0)."""
    values = np.clip(np.nan_to_num(_to_numpy_2d(heatmap), nan=0.0), 0.0, 1.0)
    rgba = colormap(cmap)(values, bytes=True)
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))


def drawn_size(size: tuple[int, int], max_side: int | None = MAX_SIDE) -> tuple[int, int]:
    """(W, H) an image of `size` (W, H) is drawn at: scaled down (never up) so that its longer
    side is at most `max_side`, aspect kept, each side at least 1 px."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return width, height
    if max_side < 1:
        raise InputError(f"max_side must be at least 1, got {max_side}")
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay(
    image: Image.Image,
    heatmap: ArrayLike,
    alpha: float = DEFAULT_ALPHA,
    boxes: Sequence[Sequence[float]] | ArrayLike | None = None,
    point: tuple[int, int] | None = None,
    resample: str = "bicubic",
    hit: bool | None = None,
    cmap: Cmap = DEFAULT_CMAP,
    *,
    max_side: int | None = MAX_SIDE,
    colorbar: bool = False,
    note: str | None = None,
) -> Image.Image:
    """`heatmap` (any grid, values in [0, 1]) over `image`, each pixel at opacity ``alpha * value``
    in colour map `cmap` (see the module docstring); ground-truth xyxy `boxes` and the pointed
    pixel `point` (x, y), both in `image`'s pixels, drawn on top (the point coloured by `hit`).

    The result is RGB at `drawn_size(image.size, max_side)`: a photo larger than `max_side` on
    its longer side is scaled down first and the boxes and point with it (``max_side=None``
    draws at full size). The map is resized to that size with `resample` ('bicubic' as the AMC
    protocol, or 'bilinear') and clamped. ``colorbar=True`` insets a small colour bar labelled
    0 and 1 at the top right (`add_colorbar`; the size stays); `note` is written along the
    bottom edge (`add_note`). NaN or inf in the map is an `InputError`.
    """
    alpha = check_alpha(alpha)
    colours_of = colormap(cmap)
    grid = as_2d_tensor(_to_numpy_2d(heatmap))
    check_finite(grid)
    width, height = image.size
    size = drawn_size((width, height), max_side)
    base = _scaled_rgb(image, size)
    sx, sy = size[0] / width, size[1] / height

    resized = upsample(grid, (size[1], size[0]), mode=resample)
    check_finite(resized, when=" after the resize (float32 overflow)")
    values = resized.clamp(0.0, 1.0).numpy()
    colours = colours_of(values, bytes=True)[..., :3].astype(np.float32)
    pixels = np.asarray(base, dtype=np.float32)
    opacity = (alpha * values)[..., None]
    blended = pixels + opacity * (colours - pixels)  # exactly the photo where the value is 0
    result = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(result)
    unit = max(1, round(min(size) / 200))
    for box in _box_list(boxes):
        x1, y1, x2, y2 = (float(v) for v in box)
        edges = (round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy))
        wider = (edges[0] - unit, edges[1] - unit, edges[2] + unit, edges[3] + unit)
        draw.rectangle(wider, outline=EDGE_COLOUR, width=(BOX_WIDTH + 2) * unit)
        draw.rectangle(edges, outline=BOX_COLOUR, width=BOX_WIDTH * unit)
    if point is not None:
        x, y = _scaled_point(point, (sx, sy), size)
        r = POINT_RADIUS * unit
        draw.ellipse((x - r - unit, y - r - unit, x + r + unit, y + r + unit), fill=EDGE_COLOUR)
        draw.ellipse(
            (x - r, y - r, x + r, y + r),
            fill=POINT_FILL[None if hit is None else bool(hit)],
            outline=POINT_BORDER,
            width=unit,
        )
    result = add_colorbar(result, colours_of) if colorbar else result
    return add_note(result, note) if note else result


def add_note(image: Image.Image, text: str) -> Image.Image:
    """A copy of `image` (RGB) with `text` (wrapped at words to its width) on a translucent white
    strip along its bottom edge, the size kept (the overlay still lines up with the photo); an
    image too small to hold the text in its lower third is returned without it."""
    sheet = image.convert("RGB").copy()
    width, height = sheet.size
    unit = max(1, round(min(width, height) / 200))
    font = _font(10 * unit)
    draw = ImageDraw.Draw(sheet)
    pad = 2 * unit
    lines: list[str] = []
    for word in text.split():
        wider = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(wider, font=font) > width - 2 * pad:
            lines.append(word)
        else:
            lines[-1:] = [wider]
    left, top, _, bottom = draw.multiline_textbbox((0, 0), "\n".join(lines), font=font)
    strip = bottom - top + 2 * pad
    if strip > height // 3:
        return sheet
    box = (0, height - strip, width, height)
    region = np.asarray(sheet.crop(box), dtype=np.float32)
    lightened = region + COLORBAR_PANEL_OPACITY * (255.0 - region)
    sheet.paste(Image.fromarray(np.rint(lightened).astype(np.uint8)), box[:2])
    corner = (pad - left, height - strip + pad - top)
    draw.multiline_text(corner, "\n".join(lines), fill=COLORBAR_TEXT, font=font)
    return sheet


def _scaled_rgb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` as RGB at `size`: downscaled before the mode conversion where Pillow can resize
    the mode itself (no full-size RGB copy of a huge photo), after it otherwise."""
    if size == image.size:
        return to_rgb(image)
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return to_rgb(image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
    return to_rgb(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _scaled_point(
    point: Sequence[float], scale: tuple[float, float], size: tuple[int, int]
) -> tuple[int, int]:
    """A pixel of the original image -> the drawn pixel whose centre is nearest its centre:
    ``(x + 0.5) * s - 0.5``, clamped into the drawn image. Identity at scale 1."""
    x, y = (float(v) for v in point)
    (sx, sy), (width, height) = scale, size
    if sx == 1.0 and sy == 1.0:
        return round(x), round(y)
    u = min(max(round((x + 0.5) * sx - 0.5), 0), width - 1)
    v = min(max(round((y + 0.5) * sy - 0.5), 0), height - 1)
    return int(u), int(v)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw_colorbar(
    sheet: Image.Image, corner: tuple[int, int], bar: tuple[int, int], unit: int, cmap
) -> None:
    """Draw the bar (`bar` = (width, height) px; 1 at the top, 0 at the bottom) and its labels
    into `sheet` with the panel's top-left at `corner`; the panel is `_colorbar_panel` big."""
    font = _font(10 * unit)
    (x0, y0), (bar_w, bar_h), pad = corner, bar, 2 * unit
    values = np.linspace(1.0, 0.0, bar_h, dtype=np.float32)
    column = colormap(cmap)(values, bytes=True)[:, :3]
    strip = np.ascontiguousarray(np.repeat(column[:, None, :], bar_w, axis=1))
    left, top = x0 + pad, y0 + pad
    sheet.paste(Image.fromarray(strip), (left, top))
    draw = ImageDraw.Draw(sheet)
    text_x = left + bar_w + pad
    for label, align_bottom in (("1", False), ("0", True)):
        bx0, by0, _, by1 = draw.textbbox((0, 0), label, font=font)
        y = top + bar_h - (by1 - by0) if align_bottom else top
        draw.text((text_x - bx0, y - by0), label, fill=COLORBAR_TEXT, font=font)


def _colorbar_panel(unit: int, bar_h: int) -> tuple[int, int, int]:
    """(panel width, panel height, bar width) for a bar `bar_h` px tall at scale `unit`."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(10 * unit)
    label_w = max(probe.textbbox((0, 0), t, font=font)[2] for t in ("0", "1"))
    bar_w, pad = 5 * unit, 2 * unit
    return pad + bar_w + pad + label_w + pad, bar_h + 2 * pad, bar_w


def add_colorbar(
    image: Image.Image, cmap: Cmap = DEFAULT_CMAP, *, inset: bool = True
) -> Image.Image:
    """A copy of `image` (RGB) with a small vertical colour bar labelled "1" (top) and "0"
    (bottom): `cmap` at full opacity, so a colour on the overlay reads off against it (the
    overlay's opacity is ``alpha * value`` besides).

    ``inset=True`` (what `overlay` draws): inside the image at its top-right corner on a
    translucent white panel, about 30% of its height, so the picture keeps its size and its
    pixel coordinates (a saved overlay still lines up with the photo and its boxes); an image
    too small to hold the bar (under ~48x36 px) is returned without one. ``inset=False``: in a
    white margin added at the right (the image grows wider, at least as tall as the bar).
    """
    sheet = image.convert("RGB")
    width, height = sheet.size
    unit = max(1, round(min(width, height) / 200))
    if inset:
        bar_h = max(12 * unit, round(0.3 * height))
        panel_w, panel_h, bar_w = _colorbar_panel(unit, bar_h)
        margin = 2 * unit
        if panel_w + 2 * margin > width // 2 or panel_h + 2 * margin > height:
            return sheet.copy()
        x0, y0 = width - margin - panel_w, margin
        box = (x0, y0, x0 + panel_w, y0 + panel_h)
        region = np.asarray(sheet.crop(box), dtype=np.float32)
        lightened = region + COLORBAR_PANEL_OPACITY * (255.0 - region)
        sheet = sheet.copy()
        sheet.paste(Image.fromarray(np.rint(lightened).astype(np.uint8)), box[:2])
        _draw_colorbar(sheet, (x0, y0), (bar_w, bar_h), unit, cmap)
        return sheet
    bar_h = max(24 * unit, round(0.5 * height))
    panel_w, panel_h, bar_w = _colorbar_panel(unit, bar_h)
    grown = Image.new("RGB", (width + panel_w, max(height, panel_h)), COLORBAR_BACKGROUND)
    grown.paste(sheet, (0, 0))
    _draw_colorbar(
        grown, (width, (max(height, panel_h) - panel_h) // 2), (bar_w, bar_h), unit, cmap
    )
    return grown


def _box_list(boxes: Sequence[Sequence[float]] | ArrayLike | None) -> list[Sequence[float]]:
    """Normalise None / list / array / tensor boxes to a list of xyxy rows."""
    if boxes is None:
        return []
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    return [row for row in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)]
