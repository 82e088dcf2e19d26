"""Figures for a paper: maps over the image with titles, one colour bar sized to the grid, an
outlined box and pointed-pixel marker, method (or layer) comparisons and per-word grids, saved
as PNG, PDF or SVG at a chosen DPI.

Heat is drawn as `groundcam.viz.overlay.overlay` draws it (opacity ``alpha * value``, so a pixel
where the map is 0 keeps the photo's colour). Over red or yellow objects inferno's orange-yellow
high end can vanish: ``style="muted"`` draws the same heat over a light grey copy of the photo (the
heat is then the only colour; the demo and the reports use it), and ``style="contour"`` draws the
map as iso-lines at 0.25, 0.5 and 0.75 instead,
in the colour map's colours with a black edge (visible on any colour), and 'viridis' or 'cividis' (blue to yellow-green)
keep heat apart from red. Boxes and the pointed pixel are white lines with a black edge, the
marker filled green for a hit and red for a miss, so they stay visible on any photo and any map.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.cm
import matplotlib.colors
import matplotlib.patheffects as effects
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from groundcam.errors import InputError
from groundcam.io import to_rgb
from groundcam.maps import as_2d_tensor, upsample
from groundcam.viz.overlay import (
    DEFAULT_ALPHA,
    DEFAULT_CMAP,
    HIT_COLOUR,
    MISS_COLOUR,
    Cmap,
    check_alpha,
    colormap,
    drawn_size,
    overlay,
)

FORMATS = ("png", "pdf", "svg")
STYLES = ("heat", "muted", "contour")
# How the demo and the reports draw maps: heat over a grey photo, strong enough to read at a glance.
PAGE_STYLE, PAGE_ALPHA = "muted", 0.9
MUTED_FLOOR = 0.45  # "muted": the photo's luminance mapped into [MUTED_FLOOR, 1] of white
DEFAULT_DPI = 150
CELL_INCHES = 1.9  # one panel's width: six fit a page's text width at print size
FONT_SIZE = 8  # points: readable when the figure is printed at its size
CONTOUR_LEVELS = (0.25, 0.5, 0.75)
PANEL_SIDE = 512  # longest side a panel's photo is drawn at (a print needs no more)
_EDGE = [effects.withStroke(linewidth=3.0, foreground="black")]


@dataclass
class Panel:
    """One column of a comparison: its heading, the maps (one per row), how they are drawn
    ('overlay' over the photo or 'heatmap' alone) and, per row, the pointing game's result."""

    label: str
    maps: Sequence[torch.Tensor]
    kind: str = "overlay"
    results: Sequence[object | None] | None = None  # PointingResult per row, or None


def check_format(fmt: str) -> str:
    """`fmt` lower-cased if it is one of `FORMATS`, else an `InputError` naming them."""
    value = str(fmt).lower().lstrip(".")
    if value not in FORMATS:
        raise InputError(f"figure format {value!r}: expected one of {', '.join(FORMATS)}")
    return value


def save_figure(fig: Figure, path: str | Path, dpi: int = DEFAULT_DPI) -> Path:
    """Write `fig` to `path` in the format its suffix names, at `dpi` (PNG records it)."""
    path = Path(path)
    fmt = check_format(path.suffix)
    if not 30 <= int(dpi) <= 1200:
        raise InputError(f"dpi must be between 30 and 1200, got {dpi}")
    fig.savefig(path, format=fmt, dpi=int(dpi), metadata=_metadata(fmt))
    return path


def figure_png(fig: Figure, dpi: int = 100, palette: bool = False) -> bytes:
    """`fig` as PNG bytes (for a notebook's `_repr_png_`); `palette`: 256 colours without
    dithering, several times smaller (pages that hold many figures)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    if not palette:
        return buffer.getvalue()
    buffer.seek(0)
    with Image.open(buffer) as picture:
        small = picture.convert("RGB").quantize(
            256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    out = io.BytesIO()
    small.save(out, format="png", optimize=True)
    return out.getvalue()


def draw_map(
    ax,
    image: Image.Image,
    heatmap: torch.Tensor | np.ndarray,
    *,
    cmap: Cmap = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    style: str = "heat",
    kind: str = "overlay",
    resample: str = "bicubic",
) -> None:
    """Draw `heatmap` on `ax` in image coordinates: over `image` (heat as `overlay`, or contour
    lines) or, for ``kind='heatmap'``, alone in `cmap` at full opacity; the map resized with
    `resample` ('bicubic' or 'bilinear', as the pointing protocol that scored it)."""
    if style not in STYLES:
        raise InputError(f"figure style {style!r}: expected one of {', '.join(STYLES)}")
    width, height = image.size
    size = drawn_size(image.size, PANEL_SIDE)
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # pixel centres at integer coordinates
    if kind == "heatmap":
        values = upsample(as_2d_tensor(heatmap), (size[1], size[0]), resample)
        values = values.clamp(0, 1).numpy()
        ax.imshow(values, cmap=colormap(cmap), vmin=0, vmax=1, extent=extent)
    elif style in ("heat", "muted"):
        base = muted(image) if style == "muted" else image
        ax.imshow(
            np.asarray(
                overlay(base, heatmap, alpha, resample=resample, cmap=cmap, max_side=PANEL_SIDE)
            ),
            extent=extent,
        )
    else:
        base = to_rgb(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        ax.imshow(np.asarray(base), extent=extent)
        values = upsample(as_2d_tensor(heatmap), (height, width), resample).clamp(0, 1).numpy()
        colours = colormap(cmap)(np.asarray(CONTOUR_LEVELS))
        lines = ax.contour(values, levels=CONTOUR_LEVELS, colors=colours, linewidths=1.0)
        lines.set_path_effects([effects.withStroke(linewidth=2.2, foreground="black")])
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)


def muted(image: Image.Image) -> Image.Image:
    """`image` as a light grey picture (its luminance scaled into [MUTED_FLOOR, 1]), so that the
    heat is the only colour in the panel and shows over objects of any colour."""
    grey = np.asarray(to_rgb(image).convert("L"), dtype=np.float32) / 255.0
    light = (MUTED_FLOOR + (1.0 - MUTED_FLOOR) * grey) * 255.0
    return Image.fromarray(np.round(light).astype(np.uint8)).convert("RGB")


def mark(ax, boxes=None, point: tuple[float, float] | None = None, hit: bool | None = None):
    """Outlined xyxy `boxes` and a marker at `point` (x, y) on `ax`: white with a black edge,
    the marker filled green for a hit, red for a miss, white when not scored."""
    for box in [] if boxes is None else np.asarray(boxes, dtype=float).reshape(-1, 4):
        x0, y0, x1, y1 = box
        rect = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=1.5)
        rect.set_path_effects(_EDGE)
        ax.add_patch(rect)
    if point is not None:
        fill = "white" if hit is None else HIT_COLOUR if hit else MISS_COLOUR
        ax.plot(
            [point[0]],
            [point[1]],
            marker="o" if hit or hit is None else "X",
            ms=9,
            mfc=fill,
            mec="white",
            mew=1.5,
            path_effects=_EDGE,
            linestyle="none",
        )


def compare_figure(
    image: Image.Image | Sequence[Image.Image],
    phrases: Sequence[str],
    panels: Sequence[Panel],
    *,
    row_notes: Sequence[str] | None = None,
    boxes=None,
    title: str | None = None,
    cmap: Cmap = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    style: str = "heat",
    row_boxes: Sequence | None = None,
) -> Figure:
    """The image, then one column per panel (method, layer, or heatmap and overlay for the
    triptych), one row per phrase (`image` may be one image per row); a cell with a pointing
    result shows its point and says hit or miss; one colour bar as tall as the grid. `boxes`
    are drawn in every row, `row_boxes` (one list per row) each in its own."""
    alpha, colours = check_alpha(alpha), colormap(cmap)
    rows, columns = len(phrases), len(panels) + 1
    pictures = [image] * rows if isinstance(image, Image.Image) else list(image)
    aspect = pictures[0].height / pictures[0].width
    scored = any(panel.results for panel in panels)
    fig = _figure(columns, rows, aspect, title, below=0.2 if scored else 0)
    axes = np.atleast_2d(fig.subplots(rows, columns, squeeze=False))
    for r, (phrase, image) in enumerate(zip(phrases, pictures, strict=True)):
        here = boxes if row_boxes is None else row_boxes[r]
        first = axes[r, 0]
        first.imshow(np.asarray(_panel_photo(image)), extent=_extent(image))
        mark(first, here)
        note = f"\n{row_notes[r]}" if row_notes else ""
        first.set_ylabel(_wrap(phrase, 22) + note, fontsize=FONT_SIZE)
        if r == 0:
            first.set_title("image", fontsize=FONT_SIZE)
        for c, panel in enumerate(panels, start=1):
            ax = axes[r, c]
            draw_map(
                ax, image, panel.maps[r], cmap=colours, alpha=alpha, style=style, kind=panel.kind
            )
            result = panel.results[r] if panel.results else None
            if result is not None:
                mark(ax, here, result.point, None if result.skipped else result.hit)
                verdict = "skipped" if result.skipped else "hit" if result.hit else "miss"
                ax.set_xlabel(f"{verdict} ({result.protocol})", fontsize=FONT_SIZE)
            if r == 0:
                ax.set_title(_wrap(panel.label, 24), fontsize=FONT_SIZE)
    _clean(axes)
    _colorbar(fig, axes, colours)
    return fig


def map_figure(
    image: Image.Image,
    heatmap: torch.Tensor,
    title: str | None = None,
    *,
    boxes=None,
    point: tuple[float, float] | None = None,
    hit: bool | None = None,
    cmap: Cmap = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    style: str = "heat",
    resample: str = "bicubic",
) -> Figure:
    """One map over its image, titled (e.g. with the phrase and its score), with the box, the
    pointed pixel and a colour bar as tall as the picture."""
    colours = colormap(cmap)
    fig = _figure(1, 1, image.height / image.width, None, width=3.2, below=0.15)
    ax = fig.subplots()
    alpha = check_alpha(alpha)
    draw_map(ax, image, heatmap, cmap=colours, alpha=alpha, style=style, resample=resample)
    mark(ax, boxes, point, hit)
    if title:
        ax.set_title(_wrap(title, 40), fontsize=FONT_SIZE + 1)
    _clean(np.array([[ax]]))
    _colorbar(fig, np.array([[ax]]), colours)
    return fig


def word_grid_figure(
    image: Image.Image,
    maps: torch.Tensor,
    labels: Sequence[str],
    scores: Sequence[float] | None = None,
    *,
    text: str = "",
    subtitle: str = "",
    columns: int = 6,
    cmap: Cmap = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    style: str = "heat",
    marks: Sequence[tuple] | None = None,
    colorbar: bool = True,
) -> Figure:
    """One panel per generated word (or token), titled with it and its probability; the
    generated `text` and a `subtitle` (model, method, layer) above; one colour bar (unless
    ``colorbar=False``). `marks`: per panel (boxes, point, hit) as `mark` draws them (e.g. the
    word's object, scored)."""
    if len(labels) != maps.shape[0]:
        raise InputError(f"{len(labels)} labels but {maps.shape[0]} maps")
    colours = colormap(cmap)
    count = max(1, len(labels))
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    heading = "\n".join(filter(None, [_wrap(f"“{text}”", 18 * columns) if text else "", subtitle]))
    fig = _figure(columns, rows, image.height / image.width, heading or None, below=0.22)
    axes = np.atleast_2d(fig.subplots(rows, columns, squeeze=False))
    for k, ax in enumerate(axes.flat):
        if k >= len(labels):
            ax.set_visible(False)
            continue
        draw_map(ax, image, maps[k], cmap=colours, alpha=check_alpha(alpha), style=style)
        if marks is not None:
            mark(ax, *marks[k])
        label = repr(labels[k])[1:-1].strip() or "␣"
        if scores is not None:
            label += f"  p={float(scores[k]):.2f}"
        ax.set_title(label, fontsize=FONT_SIZE + 1)
    _clean(axes)
    if colorbar:
        _colorbar(fig, axes, colours)
    return fig


def _figure(
    columns: int, rows: int, aspect: float, title: str | None, width: float = 0, below: float = 0
):
    """A constrained-layout figure sized for `columns` x `rows` panels of `aspect` (h/w), each
    with `below` inches of labels (a title above or a verdict under it)."""
    width = width or CELL_INCHES * columns + 0.6
    panel = (width - 1.3) / columns  # the colour bar and the row labels take ~1.3 in
    height = rows * (panel * min(max(aspect, 0.3), 3.0) + below) + 0.35 + (0.3 if title else 0)
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE + 1)
    return fig


def _panel_photo(image: Image.Image) -> Image.Image:
    size = drawn_size(image.size, PANEL_SIDE)
    return to_rgb(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _extent(image: Image.Image) -> tuple[float, float, float, float]:
    return (-0.5, image.width - 0.5, image.height - 0.5, -0.5)


def _clean(axes: np.ndarray) -> None:
    """No ticks or frames: the panels are pictures, not plots."""
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)


def _colorbar(fig: Figure, axes: np.ndarray, cmap: matplotlib.colors.Colormap) -> None:
    """One colour bar beside the grid, as tall as it, labelled 0 and 1."""
    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap)
    bar = fig.colorbar(mappable, ax=list(axes.flat), fraction=0.03, aspect=25, pad=0.01)
    bar.set_ticks([0, 0.5, 1])
    bar.ax.tick_params(labelsize=FONT_SIZE)
    bar.set_label("map value", fontsize=FONT_SIZE)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _metadata(fmt: str) -> dict:
    """No creation date, so the same figure writes the same file."""
    return {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt, {})


def explanation_figure(
    explanations: dict[str, object],
    *,
    boxes=None,
    scored: dict[str, list] | None = None,
    triptych: bool = False,
    cmap: Cmap = DEFAULT_CMAP,
    alpha: float = DEFAULT_ALPHA,
    style: str = "heat",
) -> Figure:
    """One figure of `Explanation`s of the same phrases over the same image, one column per
    entry (keyed by its label: a method or a layer); `boxes` (xyxy, image pixels) are drawn, and
    `scored[label]` (one pointing-game result per phrase, as `groundcam.pointing_game` gives
    them) marks each cell hit or miss; ``triptych=True`` draws each entry as its heatmap alone,
    then its overlay (the classic image, heatmap, overlay)."""
    first = next(iter(explanations.values()))
    images = [first.image(i) for i in range(len(first))]
    panels = []
    for label, ex in explanations.items():
        results = (scored or {}).get(label)
        if triptych:
            panels.append(Panel(f"{label}: heatmap", list(ex.maps), "heatmap"))
        name = f"{label}: overlay" if triptych else label
        panels.append(Panel(name, list(ex.maps), "overlay", results))
    kind = first.score_kind.name if first.score_kind else "score"
    notes = [f"{kind} {s:.3f}" for s in first.scores.tolist()]
    return compare_figure(
        images,
        first.phrases,
        panels,
        row_notes=notes,
        boxes=boxes,
        title=f"{first.model} · target {first.target}",
        cmap=cmap,
        alpha=alpha,
        style=style,
    )
