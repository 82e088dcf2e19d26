"""What the page's buttons do, in plain Python (no Gradio here, so tests call them directly):
every step is a call to groundcam's public API; bad input is an `InputError` with one line."""

from __future__ import annotations

import base64
import html
import io
import math
import shutil
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

import groundcam as gc
from groundcam.data.glyphs import render_line
from groundcam.data.shapes import generate_scene
from groundcam.errors import GroundcamWarning, InputError
from groundcam.explanation import Explanation, GenerationExplanation
from groundcam.viz.overlay import _scaled_point, overlay
from groundcam.web.limits import (
    Limits,
    check_text,
    check_token_count,
    generation_cap,
    parse_phrases,
    read_upload,
)
from groundcam.web.models import ModelCache
from groundcam.web.store import display_copy

Box = tuple[float, float, float, float]
Progress = Callable[[float, str], None]

# Pointing-game protocols a drawn box can be scored with (albef-boxes needs detector proposals).
PROTOCOLS = ("amc", "torchray", "mg")
CMAPS = ("inferno", "magma", "viridis", "turbo", "jet", "hot", "gray")
HOVER_SIDE = 320  # longest side of the map shown when hovering a generated token


def _quiet(progress: Progress | None) -> Progress:
    return progress or (lambda fraction, desc: None)


@dataclass
class PhraseResult:
    """One explained request: the explanation, its image (a copy at most `MAX_SIDE` px a side for
    drawing; `size` is the uploaded image's), where its files are, and the boxes drawn (or known
    from an example scene) in the uploaded image's pixels with their pointing-game results."""

    explanation: Explanation
    image: Image.Image
    folder: Path
    warnings: list[str] = field(default_factory=list)
    boxes: dict[int, list[Box]] = field(default_factory=dict)
    points: dict[int, gc.PointingResult] = field(default_factory=dict)
    protocol: str = "amc"
    seconds: float = 0.0
    size: tuple[int, int] | None = None  # (W, H) of the uploaded image; None: image.size

    def __post_init__(self) -> None:
        self.size = tuple(self.size or self.image.size)

    @property
    def phrases(self) -> list[str]:
        return self.explanation.phrases


@dataclass
class CaptionResult:
    """Text a model generated (or was given) for the image (a copy at most `MAX_SIDE` px a side),
    with one map per token."""

    generation: GenerationExplanation
    image: Image.Image
    folder: Path
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Example:
    """A built-in example: an image the server rendered, its phrases and their true boxes."""

    label: str
    path: Path
    phrases: list[str]
    boxes: dict[str, list[Box]]
    captions: bool  # an OCR line (caption mode) rather than a scene with phrases
    prefer: str = ""  # the model picked for it when the current one does not fit (if offered)


class Workspace:
    """Folders for results (each request's `save` output) under one server-owned directory; the
    oldest are removed beyond `keep` folders or `max_bytes` in all (the newest request's folder
    always stays), so a long-running server does not fill the disk."""

    def __init__(
        self, root: Path | None = None, keep: int = 64, max_bytes: int | None = None
    ) -> None:
        self.root = (
            Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="groundcam-web-"))
        )
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def new_folder(self, kind: str) -> Path:
        with self._lock:
            results = self.root / "results"
            results.mkdir(exist_ok=True)
            old = sorted(results.iterdir(), key=lambda p: p.stat().st_mtime)
            n = max(len(old) - self.keep + 1, 0)  # room for the new one within `keep`
            for path in old[:n] + self._over_bytes(old[n:]):
                shutil.rmtree(path, ignore_errors=True)
            return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=results))

    def _over_bytes(self, folders: list[Path]) -> list[Path]:
        """The oldest of `folders` (oldest first) that must go for the rest to fit `max_bytes`."""
        if self.max_bytes is None:
            return []
        sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in folders]
        total, out = sum(sizes), []
        for folder, size in zip(folders, sizes, strict=True):
            if total <= self.max_bytes:
                break
            out.append(folder)
            total -= size
        return out

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"


def one_line(text: object) -> str:
    """`text` as one line (messages shown on the page)."""
    return " ".join(str(text).split()) or "(no message)"


def _collect(caught: list[warnings.WarningMessage]) -> list[str]:
    """groundcam's own warnings of a request (unreadable text, truncation), once each; warnings
    of other kinds (other threads' resource warnings, deprecations) are not the user's business."""
    mine = [w for w in caught if issubclass(w.category, GroundcamWarning)]
    return list(dict.fromkeys(one_line(w.message) for w in mine))


# ---------------------------------------------------------------- choices for the dropdowns
def method_choices(cache: ModelCache, model: str, target: str | None) -> tuple[list, str]:
    """(label, value) pairs of the methods of `model`, the default for `target` marked; and it."""
    info = cache.info(model)
    default = cache.get(model).default_method(target or info.default_target)
    return [(f"{m} (default)" if m == default else m, m) for m in info.methods], default


def target_choices(cache: ModelCache, model: str) -> tuple[list, str]:
    """(label, value) pairs of the targets of `model`, the default marked; and the default."""
    info = cache.info(model)
    marked = [(f"{t} (default)" if t == info.default_target else t, t) for t in info.targets]
    return marked, info.default_target


def layer_choices(
    cache: ModelCache, model: str, method: str | None, target: str | None
) -> tuple[list, str]:
    """(label, value) pairs of the layers `method` reads on `model` (values are strings, "" for
    "every layer"), the default marked; and the default value."""
    explainer = cache.get(model)
    layers = explainer.layers(method or None, target or None)
    if not layers:
        return [("every layer (this method reads them all)", "")], ""
    default = explainer.resolve(method or None, None, target or None).layer
    return [(f"{k} (default)" if k == default else str(k), str(k)) for k in layers], str(default)


def _layer(value: str | int | None) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value  # type: ignore[return-value] - parsed (and refused if odd) by the explainer


# ---------------------------------------------------------------- phrase mode
def explain_phrases(
    cache: ModelCache,
    workspace: Workspace,
    limits: Limits,
    model: str,
    image_path: str | None,
    phrases_text: str | None,
    method: str | None = None,
    layer: str | int | None = None,
    target: str | None = None,
    alpha: float | None = None,
    cmap: str | None = None,
    known_boxes: dict[str, list[Box]] | None = None,
    progress: Progress | None = None,
) -> PhraseResult:
    """`Explainer.explain` on the uploaded image and the typed phrases; the result saved with
    `Explanation.save` (the files `groundcam explain` writes), boxes already known for a phrase
    (an example scene's) scored at once."""
    progress = _quiet(progress)
    t0 = time.perf_counter()
    phrases = parse_phrases(phrases_text, limits)
    image = read_upload(image_path, limits)
    progress(0.1, f"loading {model}")
    explainer = cache.get(model)
    if "token" in explainer.targets:
        raise InputError(f"{model} generates text: use 'Generate and explain' (caption mode)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, mask = explainer.prepare_texts(phrases)
        check_token_count(int(mask.sum()), limits)
        progress(0.3, f"explaining {len(phrases)} phrase(s)")
        with cache.run(model):
            ex = explainer.explain(
                image, phrases, method=method or None, layer=_layer(layer), target=target or None
            )
    folder = workspace.new_folder("explain")
    ex.images = [display_copy(image)]  # overlays draw at most that size: keep no more pixels
    result = PhraseResult(ex, ex.images[0], folder, warnings=_collect(caught), size=image.size)
    for i, phrase in enumerate(phrases):
        if known_boxes and phrase in known_boxes:
            score_box(result, i, known_boxes[phrase])
    progress(0.8, "writing overlays, maps.npz and meta.json")
    save_phrases(result, alpha, cmap)
    result.seconds = time.perf_counter() - t0
    return result


def save_phrases(result: PhraseResult, alpha: float | None, cmap: str | None) -> list[Path]:
    """`Explanation.save` into the result's folder (overlays in this colour map and opacity) and a
    zip of it; the files, for downloading."""
    result.explanation.save(result.folder / "explain", cmap=cmap or None, alpha=alpha)
    return _files(result.folder / "explain", result.folder / "groundcam-explain.zip")


def _files(directory: Path, archive: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, f.name)
    return saved_files(directory.parent)


def saved_files(folder: Path) -> list[Path]:
    """The files a result folder offers for download: maps.npz and meta.json first, then the
    overlay PNGs, then the zip of them all."""
    directory = next(p for p in sorted(folder.iterdir()) if p.is_dir())
    files = sorted(p for p in directory.iterdir() if p.is_file())
    first = [f for f in files if f.name in ("maps.npz", "meta.json")]
    return first + [f for f in files if f not in first] + sorted(folder.glob("*.zip"))


def phrase_caption(result: PhraseResult, i: int) -> str:
    """The label under phrase i's overlay: the phrase, its score, its pointing-game result."""
    ex = result.explanation
    text = f"{ex.phrases[i]} - score {float(ex.scores[i]):.3f}"
    point = result.points.get(i)
    if point is not None:
        text += f" - {point_word(point)} at {tuple(point.point)}"
    return text


def point_word(point: gc.PointingResult) -> str:
    if point.skipped:
        return "skipped"
    return "hit" if point.hit else ("miss (flat map)" if point.flat else "miss")


def phrase_overlays(
    result: PhraseResult, alpha: float | None, cmap: str | None
) -> list[tuple[Image.Image, str]]:
    """Each phrase's overlay (its box and pointed pixel drawn when it has a box) and its label."""
    ex = result.explanation
    out = []
    for i in range(len(ex)):
        picture = ex.overlay(i, alpha=alpha, cmap=cmap or None, colorbar=True, **_marks(result, i))
        out.append((picture, phrase_caption(result, i)))
    return out


def _marks(result: PhraseResult, i: int) -> dict:
    """Phrase i's boxes, pointed pixel and hit for `overlay`, moved from the uploaded image's
    pixels to those of the kept copy as `overlay` moves them to the drawn size."""
    point = result.points.get(i)
    if point is None:
        return {}
    (width, height), size = result.size, result.image.size
    sx, sy = size[0] / width, size[1] / height
    boxes = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in result.boxes[i]]
    return {"boxes": boxes, "point": _scaled_point(point.point, (sx, sy), size), "hit": point.hit}


def token_overlays(
    result: PhraseResult, i: int, alpha: float | None, cmap: str | None
) -> list[tuple[Image.Image, str]]:
    """Phrase i's per-token maps over the image, each labelled with its token."""
    ex = result.explanation
    if not 0 <= i < len(ex):
        raise InputError(f"no phrase {i}: the result has {len(ex)} phrase(s)")
    try:
        maps = ex.token_maps[i]
    except AttributeError as e:
        raise InputError(f"{e} (try attention or attn-gradcam)") from None
    tokens = ex.tokens[i]
    return [
        (overlay(result.image, maps[t], **_style(alpha, cmap)), f"{t}: {tokens[t]}")
        for t in range(len(tokens))
    ]


def _style(alpha: float | None, cmap: str | None) -> dict:
    style = {}
    if alpha is not None:
        style["alpha"] = alpha
    if cmap:
        style["cmap"] = cmap
    return style


def parse_box(values: tuple | list, image_size: tuple[int, int]) -> Box:
    """x0, y0, x1, y1 in the image's pixels (corners in any order), clipped to the image of
    `image_size` (W, H); refused when a value is missing or not a number, or the box is empty."""
    if len(values) != 4 or any(v is None or v == "" for v in values):
        raise InputError("the box needs x0, y0, x1 and y1: click two corners on the image")
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"the box {tuple(values)} is not four numbers") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"the box {tuple(values)} is not four finite numbers")
    width, height = image_size
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    if x1 <= x0 or y1 <= y0:
        raise InputError(
            f"the box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty inside the {width}x{height} image"
        )
    return (x0, y0, x1, y1)


def score_box(
    result: PhraseResult, i: int, boxes: list[Box] | Box, protocol: str | None = None
) -> gc.PointingResult:
    """The pointing game (`groundcam.pointing_game`) of phrase i's map against `boxes` (xyxy,
    the image's pixels); kept in the result for the overlays and the table."""
    ex = result.explanation
    if not 0 <= i < len(ex):
        raise InputError(f"no phrase {i}: the result has {len(ex)} phrase(s)")
    protocol = protocol or result.protocol
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    boxes = [tuple(float(v) for v in b) for b in ([boxes] if _is_box(boxes) else boxes)]
    width, height = result.size
    # mg reads raw 1-based annotation boxes (MultiGrounding's convention): shift drawn pixels
    scored = [tuple(v + 1 for v in b) for b in boxes] if protocol == "mg" else boxes
    point = gc.pointing_game(ex.maps[i], scored, protocol=protocol, image_size=(height, width))
    result.boxes[i], result.points[i], result.protocol = list(boxes), point, protocol
    return point


def _is_box(value) -> bool:
    return len(value) == 4 and all(isinstance(v, int | float) for v in value)


def pointing_rows(result: PhraseResult) -> list[list]:
    """The pointing table: phrase, score, box, hit or miss, the pointed pixel (x, y)."""
    rows = []
    ex = result.explanation
    for i, phrase in enumerate(ex.phrases):
        point = result.points.get(i)
        boxes = result.boxes.get(i)
        rows.append(
            [
                phrase,
                round(float(ex.scores[i]), 4),
                "; ".join(", ".join(f"{v:g}" for v in b) for b in boxes) if boxes else "",
                point_word(point) if point is not None else "no box yet",
                f"{point.point[0]}, {point.point[1]}" if point is not None else "",
            ]
        )
    return rows


def accuracy_line(result: PhraseResult) -> str:
    """'pointing: 2 of 3 hits (protocol amc)' over the phrases that have a box."""
    scored = [p for p in result.points.values() if not p.skipped]
    if not scored:
        return "pointing: draw a box (click two corners on the image) and score a phrase"
    hits = sum(bool(p.hit) for p in scored)
    return f"pointing: {hits} of {len(scored)} hit (protocol {result.protocol})"


# ---------------------------------------------------------------- caption mode
def explain_caption(
    cache: ModelCache,
    workspace: Workspace,
    limits: Limits,
    model: str,
    image_path: str | None,
    method: str | None = None,
    layer: str | int | None = None,
    text: str | None = None,
    max_new_tokens: int | None = None,
    alpha: float | None = None,
    cmap: str | None = None,
    progress: Progress | None = None,
    prompt: str | None = None,
) -> CaptionResult:
    """`Explainer.explain_generation` on the uploaded image (or `text` taken as generated), after
    `prompt` where the family takes one (blank: the family's default), saved with
    `GenerationExplanation.save` (the files `groundcam caption` writes)."""
    progress = _quiet(progress)
    t0 = time.perf_counter()
    text = check_text(text, limits)
    prompt = check_text(prompt, limits, "the prompt")
    image = read_upload(image_path, limits)
    progress(0.1, f"loading {model}")
    explainer = cache.get(model)
    if "token" not in explainer.targets:
        raise InputError(f"{model} does not generate text: type phrases and use 'Explain'")
    cap = generation_cap(
        getattr(explainer.model, "generation_config", None), max_new_tokens, limits
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        progress(0.3, "generating and explaining each token" if text is None else "explaining")
        with cache.run(model):
            gen = explainer.explain_generation(
                image,
                method=method or None,
                layer=_layer(layer),
                max_new_tokens=cap,
                text=text,
                **({"prompt": prompt} if prompt is not None else {}),
            )
    if text is not None and len(gen) > limits.max_tokens:
        raise InputError(f"the text makes {len(gen)} tokens; at most {limits.max_tokens}")
    folder = workspace.new_folder("caption")
    gen.image = display_copy(image)
    result = CaptionResult(gen, gen.image, folder, warnings=_collect(caught))
    progress(0.8, "writing tokens.png, overlays, maps.npz and meta.json")
    save_caption(result, alpha, cmap)
    result.seconds = time.perf_counter() - t0
    return result


def save_caption(result: CaptionResult, alpha: float | None, cmap: str | None) -> list[Path]:
    """`GenerationExplanation.save` into the result's folder and a zip of it; the files."""
    result.generation.save(result.folder / "caption", cmap=cmap or None, alpha=alpha)
    return _files(result.folder / "caption", result.folder / "groundcam-caption.zip")


def caption_overlays(
    result: CaptionResult, alpha: float | None, cmap: str | None
) -> list[tuple[Image.Image, str]]:
    """Each generated token's map over the image, labelled with the token and its probability."""
    gen = result.generation
    return [
        (
            gen.overlay(k, alpha=alpha, cmap=cmap or None, colorbar=True),
            f"{k}: {gen.tokens[k]} (p={float(gen.scores[k]):.2f})",
        )
        for k in range(len(gen))
    ]


def _data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def caption_html(result: CaptionResult, alpha: float | None, cmap: str | None) -> str:
    """The generated text, one span per token (per word where the model groups its sub-word
    tokens into words: generative VLMs); hovering (or focusing) one shows its map."""
    gen = result.generation
    if not len(gen):
        return '<p class="gc-empty">The model generated no text for this image.</p>'
    unit, units, scores = "token", gen, gen.scores.tolist()
    if gen.words and gen.word_maps is not None:  # a word's p: the product of its tokens' p
        unit, units = "word", replace(gen, tokens=gen.words, maps=gen.word_maps)
        scores = [float(gen.scores[t].prod()) for t in gen.word_tokens]
    sep = " " if unit == "word" else ""  # words lost their spaces; tokens keep theirs
    spans = []
    for k, token in enumerate(units.tokens):
        picture = units.overlay(k, alpha=alpha, cmap=cmap or None, max_side=HOVER_SIDE)
        label = html.escape(token)
        spans.append(
            f'<span class="gc-tok" tabindex="0" data-k="{k}">{label or "&nbsp;"}'
            f'<span class="gc-pop"><img alt="map of {unit} {k}: {label}" '
            f'src="{_data_url(picture)}"><small>{label} p={scores[k]:.2f}</small>'
            "</span></span>"
        )
    prompt = f'<p class="gc-prompt">after: {html.escape(gen.prompt)}</p>' if gen.prompt else ""
    return (
        f'<div class="gc-caption">{prompt}<p class="gc-text">{sep.join(spans)}</p>'
        f'<p class="gc-hint">Hover a {unit} (or tab to it) to see where the model looked.</p></div>'
    )


# ---------------------------------------------------------------- examples
def make_examples(directory: Path, scenes: int = 4, lines: int = 2) -> list[Example]:
    """Shapes test scenes (with their phrases and true boxes) and rendered text lines (for OCR
    models), written as PNGs into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for index in range(scenes):
        sample = generate_scene("test", index)
        path = directory / f"shapes-test-{index}.png"
        sample.image.save(path)
        phrases = [p.text for p in sample.phrases]
        boxes = {p.text: [tuple(b) for b in p.boxes] for p in sample.phrases}
        label = f"shapes scene {index}: {sample.caption}"
        out.append(Example(label, path, phrases, boxes, captions=False))
    for index in range(lines):
        line = render_line("test", index)
        path = directory / f"glyphs-test-{index}.png"
        line.image.save(path)
        label = f"text line {index}: {line.text!r}"
        out.append(Example(label, path, [], {}, captions=True, prefer="trocr-tiny-glyphs"))
    return out


DRAW_SIDE = 512  # longest side of the map a box is drawn on


def drawer_html(
    result: PhraseResult | None, i: int | None, alpha: float | None, cmap: str | None
) -> str:
    """Phrase i's overlay to drag a box on (its box and pointed pixel drawn once scored); the
    image's own size rides along so the page turns a drag into the image's pixels."""
    if (
        not isinstance(result, PhraseResult)
        or i is None
        or not 0 <= int(i) < len(result.explanation)
    ):
        return '<p class="gc-empty">Explain some phrases, then drag a box on the map here.</p>'
    i = int(i)
    picture = result.explanation.overlay(
        i, alpha=alpha, cmap=cmap or None, max_side=DRAW_SIDE, **_marks(result, i)
    )
    width, height = result.size
    phrase = html.escape(result.explanation.phrases[i])
    return (
        f'<div class="gc-stage" data-phrase="{i}"><img class="gc-draw" draggable="false" '
        f'alt="map of {phrase}" data-w="{width}" data-h="{height}" src="{_data_url(picture)}">'
        '<div class="gc-rect"></div></div>'
        f'<p class="gc-hint">Drag a box on the map of <b>{phrase}</b> ({width}x{height} pixels) '
        "to score it with the pointing game.</p>"
    )
