"""The result of an explanation: maps on the patch grid, per-token maps, scores, and ways to look."""

from __future__ import annotations

import io
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundcam.contract import ScoreKind
from groundcam.errors import InputError
from groundcam.maps import normalize_maps

__all__ = ["Explanation", "GenerationExplanation", "normalize_maps", "versions"]

GRID_DPI = 110  # tokens.png: 9 pt token labels are 14 px high, readable at the image's size


@dataclass
class Explanation:
    """Maps for P phrases: `maps` [P, h, w] in [0, 1]; `raw_maps` before normalisation."""

    maps: torch.Tensor
    raw_maps: torch.Tensor
    scores: torch.Tensor
    phrases: list[str]
    tokens: list[list[str]]
    method: str
    layer: int | None
    target: str
    model: str
    raw_token_maps: torch.Tensor | None = None  # [P, T, h, w] (head mean only, padded)
    images: list[Image.Image] = field(default_factory=list)
    image_index: list[int] = field(default_factory=list)  # phrase p belongs to images[...]
    text_conditioned: bool = True
    score_kind: ScoreKind | None = None  # what `scores` are (the family's declaration)
    unknown_words: list[list[str]] = field(default_factory=list)  # per phrase, words read as unk

    @property
    def token_maps(self) -> list[torch.Tensor]:
        """Per phrase, one normalised map per real (unpadded) token: [T_p, h, w]."""
        if self.raw_token_maps is None:
            raise AttributeError(f"method {self.method!r} has no per-token maps")
        return [normalize_maps(self.raw_token_maps[p, : len(t)]) for p, t in enumerate(self.tokens)]

    def __len__(self) -> int:
        return self.maps.shape[0]

    def __repr__(self) -> str:
        """One short line (the tensors would print kilobytes): sizes, settings, phrases cut."""
        return (
            f"Explanation({len(self.phrases)} phrases {_cut(self.phrases)}, "
            f"method={self.method!r}, layer={self.layer}, target={self.target!r}, "
            f"model={self.model!r}, maps={_shape(self.maps)})"
        )

    def resize(self, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
        """Maps upsampled to (H, W), `align_corners=False`, unclamped (the AMC protocol's view)."""
        return F.interpolate(self.maps[:, None], size=size, mode=mode, align_corners=False)[:, 0]

    def image(self, i: int) -> Image.Image:
        if not self.images:
            raise ValueError("this explanation was made from tensors and holds no image")
        return self.images[self.image_index[i] if self.image_index else 0]

    def overlay(
        self, i: int, alpha: float | None = None, cmap: str | None = None, **kwargs: Any
    ) -> Image.Image:
        """Phrase i's map over its image (`groundcam.viz.overlay.overlay`: opacity ``alpha *
        value`` in colour map `cmap`, None for the defaults 0.5 and 'inferno'); boxes, point and
        hit may be passed to draw them, ``colorbar=True`` adds a colour bar, ``max_side`` bounds
        the drawn size."""
        from groundcam.viz.overlay import overlay

        kwargs.setdefault("note", image_only_note(self.method, self.text_conditioned))
        return overlay(self.image(i), self.maps[i], **_style(cmap, alpha), **kwargs)

    def figure(self, boxes=None, protocol: str = "amc", **kwargs: Any):
        """A paper figure of every phrase (`groundcam.viz.figures.explanation_figure`: triptych,
        cmap, alpha, style), as a matplotlib Figure; with `boxes` (xyxy, image pixels) each map
        is scored by the pointing game under `protocol`."""
        from groundcam.eval.pointing import pointing_game
        from groundcam.viz.figures import explanation_figure

        if not self.images:
            raise ValueError("this explanation was made from tensors and holds no image")
        scored = None
        if boxes is not None:
            sizes = [self.image(i).size[::-1] for i in range(len(self))]
            scored = {
                self.method: [
                    pointing_game(m, boxes, protocol, image_size=hw)
                    for m, hw in zip(self.maps, sizes, strict=True)
                ]
            }
        return explanation_figure({self.method: self}, boxes=boxes, scored=scored, **kwargs)

    def _repr_png_(self) -> bytes | None:
        """What a notebook shows: the figure of every phrase (nothing without an image)."""
        return _png(self.figure()) if self.images else None

    def _repr_html_(self) -> str:
        return _html(repr(self), self._repr_png_())

    def meta(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layer": self.layer,
            "target": self.target,
            "model": self.model,
            "text_conditioned": self.text_conditioned,
            "phrases": self.phrases,
            "tokens": self.tokens,
            "unknown_words": self.unknown_words,
            "score_kind": self.score_kind.as_dict() if self.score_kind else None,
            "scores": [float(s) for s in self.scores],
            "grid": list(self.maps.shape[-2:]),
            "versions": versions(),
        }

    def save(
        self,
        directory: str | Path,
        *,
        cmap: str | None = None,
        alpha: float | None = None,
        colorbar: bool = True,
        full_res: bool = False,
    ) -> Path:
        """Overlay PNGs ``NNN_<phrase>.png`` (when images are held; with a colour bar unless
        ``colorbar=False``, in `cmap` at `alpha` as `overlay`), `maps.npz` and `meta.json`
        under `directory` (created). Overlay PNGs an earlier save left there (``NNN_slug.png``
        and ``tokens.png``, nothing else) are removed first, so the folder holds this result
        only. A `directory` that is an existing file is an `InputError`. ``full_res=True`` adds
        each map at its image's size as the pointing game sees it (`full_res_arrays`)."""
        style = _style(cmap, alpha)
        out = _output_directory(directory)
        _remove_old_overlays(out)
        arrays = {"maps": self.maps.numpy(), "raw_maps": self.raw_maps.numpy()}
        if self.raw_token_maps is not None:
            arrays["raw_token_maps"] = self.raw_token_maps.numpy()
        if full_res:
            pictures = [self.image(i) for i in range(len(self))]
            arrays |= full_res_arrays(self.maps, [(p.height, p.width) for p in pictures])
        np.savez_compressed(out / "maps.npz", **arrays)
        (out / "meta.json").write_text(json.dumps(self.meta(), indent=1))
        if self.images:
            for i, phrase in enumerate(self.phrases):
                picture = self.overlay(i, colorbar=colorbar, **style)
                picture.save(out / f"{i:03d}_{_slug(phrase)}.png")
        return out


@dataclass
class GenerationExplanation:
    """Text a model generated for one image, with one map per generated token: `maps` [K, h, w]
    in [0, 1]; `scores` are the tokens' probabilities; `positions` index the generated ids."""

    text: str
    tokens: list[str]
    token_ids: list[int]
    positions: list[int]
    maps: torch.Tensor
    raw_maps: torch.Tensor
    scores: torch.Tensor
    method: str
    layer: int | tuple[int, ...] | None  # a tuple: the layers whose maps were averaged
    model: str
    image: Image.Image | None = None
    text_conditioned: bool = True
    score_kind: ScoreKind | None = None  # what `scores` are (the family's declaration)
    unknown_words: list[str] = field(default_factory=list)  # of a given text, words read as unk
    # generative VLMs: sub-word tokens grouped into words (`groundcam.generation.group_words`),
    # each word's map the mean of its tokens' raw maps, normalised; per image maps where several
    words: list[str] = field(default_factory=list)
    word_tokens: list[list[int]] = field(default_factory=list)  # per word, its token indices
    word_maps: torch.Tensor | None = None
    image_maps: list[torch.Tensor] | None = None  # per image, [K, h_i, w_i] normalised
    prompt: str | None = None  # the text the model read before its answer
    notes: dict[str, str] = field(default_factory=dict)  # e.g. how attention was recorded
    # a video: its frames; `image` is their strip side by side, `maps` [K, h, F*w] one map per
    # frame in the same order, `image_maps` one [K, h, w] per frame
    frames: list[Image.Image] | None = None

    @property
    def token_maps(self) -> torch.Tensor:
        return self.maps

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        """One short line (the tensors would print kilobytes): sizes, settings, text cut."""
        return (
            f"GenerationExplanation({len(self.tokens)} tokens, text={_cut_text(self.text)!r}, "
            f"method={self.method!r}, layer={self.layer}, model={self.model!r}, "
            f"maps={_shape(self.maps)})"
        )

    def resize(self, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
        return F.interpolate(self.maps[:, None], size=size, mode=mode, align_corners=False)[:, 0]

    def overlay(
        self, k: int, alpha: float | None = None, cmap: str | None = None, **kwargs: Any
    ) -> Image.Image:
        """Token k's map over the image (as `Explanation.overlay`)."""
        from groundcam.viz.overlay import overlay

        if self.image is None:
            raise ValueError("this explanation holds no image")
        kwargs.setdefault("note", image_only_note(self.method, self.text_conditioned))
        return overlay(self.image, self.maps[k], **_style(cmap, alpha), **kwargs)

    def grid(
        self,
        columns: int = 6,
        *,
        cmap: str | None = None,
        alpha: float | None = None,
        colorbar: bool = True,
        dpi: int = GRID_DPI,
    ) -> Image.Image:
        """The per-token figure as an image (`tokens.png`): `figure` with one panel per token,
        drawn at `dpi` (`cmap`, `alpha` as `overlay`; ``colorbar=False`` leaves out the colour
        bar)."""
        from groundcam.viz.figures import figure_png

        fig = self.figure(columns, tokens=True, colorbar=colorbar, **_style(cmap, alpha))
        with Image.open(io.BytesIO(figure_png(fig, dpi))) as png:
            return png.convert("RGB")

    def figure(self, columns: int = 6, *, tokens: bool = False, **kwargs: Any):
        """The paper's per-word grid (`groundcam.viz.figures.word_grid_figure`): each word (or
        token, for models without words, or with ``tokens=True``) over the image with its
        probability, the generated text, model, method and layer above; a matplotlib Figure."""
        from groundcam.viz.figures import word_grid_figure

        if self.image is None:
            raise ValueError("this explanation holds no image")
        maps, labels, scores = self.maps, self.tokens, self.scores.tolist()
        if self.words and self.word_maps is not None and not tokens:
            maps, labels = self.word_maps, self.words
            scores = [float(np.prod([scores[t] for t in ts])) for ts in self.word_tokens]
        layer = f" · layer {self.layer}" if self.layer is not None else ""
        subtitle = f"{self.model} · {self.method}{layer}"
        note = image_only_note(self.method, self.text_conditioned)
        subtitle += f" · {note}" if note else ""
        return word_grid_figure(
            self.image,
            maps,
            labels,
            scores,
            text=self.text,
            subtitle=subtitle,
            columns=columns,
            **kwargs,
        )

    def _repr_png_(self) -> bytes | None:
        """What a notebook shows: the per-word grid (nothing without an image)."""
        return _png(self.figure()) if self.image is not None else None

    def _repr_html_(self) -> str:
        return _html(repr(self), self._repr_png_())

    def meta(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "positions": self.positions,
            "unknown_words": self.unknown_words,
            "score_kind": self.score_kind.as_dict() if self.score_kind else None,
            "scores": [float(s) for s in self.scores],
            "method": self.method,
            "layer": self.layer,
            "target": "token",
            "model": self.model,
            "text_conditioned": self.text_conditioned,
            "grid": list(self.maps.shape[-2:]),
            "versions": versions(),
            **({"words": self.words, "word_tokens": self.word_tokens} if self.words else {}),
            **({"prompt": self.prompt} if self.prompt is not None else {}),
            **({"notes": self.notes} if self.notes else {}),
            **({"frames": len(self.frames)} if self.frames else {}),
        }

    def save(
        self,
        directory: str | Path,
        *,
        cmap: str | None = None,
        alpha: float | None = None,
        colorbar: bool = True,
        full_res: bool = False,
    ) -> Path:
        """`tokens.png` (the grid), one overlay PNG ``NNN_<token>.png`` per token (both with a
        colour bar unless ``colorbar=False``), `maps.npz` and `meta.json`; overlay PNGs an
        earlier save left in `directory` are removed first (as `Explanation.save`).
        ``full_res=True`` adds the maps at the image's size (as `Explanation.save`)."""
        style = _style(cmap, alpha)
        out = _output_directory(directory)
        _remove_old_overlays(out)
        arrays = {"maps": self.maps.numpy(), "raw_maps": self.raw_maps.numpy()}
        if full_res:
            if self.image is None:
                raise InputError("full_res needs the image: this explanation holds none")
            arrays |= full_res_arrays(
                self.maps, [(self.image.height, self.image.width)] * len(self)
            )
        np.savez_compressed(out / "maps.npz", **arrays)
        (out / "meta.json").write_text(json.dumps(self.meta(), indent=1))
        if self.image is not None:
            self.grid(colorbar=colorbar, **style).save(out / "tokens.png")
            for k, token in enumerate(self.tokens):
                picture = self.overlay(k, colorbar=colorbar, **style)
                picture.save(out / f"{k:03d}_{_slug(token)}.png")
        return out


def full_res_arrays(
    maps: torch.Tensor, sizes: list[tuple[int, int]], mode: str = "bicubic"
) -> dict[str, np.ndarray]:
    """The maps at their images' (H, W), resized as the pointing game's 'amc' protocol does
    (bicubic, unclamped): `full_res_maps` [N, H, W] when all sizes agree, else one
    `full_res_maps_NNN` per map."""
    from groundcam.maps import upsample, upsample_many

    if not sizes:
        return {}
    if len(set(sizes)) == 1:
        return {"full_res_maps": upsample_many(maps, sizes[0], mode=mode).numpy()}
    return {
        f"full_res_maps_{i:03d}": upsample(m, size, mode=mode).numpy()
        for i, (m, size) in enumerate(zip(maps, sizes, strict=True))
    }


def _png(fig) -> bytes:
    from groundcam.viz.figures import figure_png

    return figure_png(fig)


def _html(title: str, png: bytes | None) -> str:
    """A notebook's rich view: the one-line summary, then the figure inline."""
    import base64
    import html

    picture = f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    return f"<div><code>{html.escape(title)}</code><br>{picture}</div>"


def _cut_text(text: str, width: int = 40) -> str:
    """`text`, or its first `width` characters and an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _cut(phrases: list[str], first: int = 3) -> str:
    """The first phrases, each cut, and how many more there are."""
    shown = ", ".join(repr(_cut_text(p)) for p in phrases[:first])
    more = f", +{len(phrases) - first} more" if len(phrases) > first else ""
    return f"[{shown}{more}]"


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(n) for n in t.shape)


def image_only_note(method: str, text_conditioned: bool) -> str | None:
    """The caption an image-only map carries (None for a text-conditioned one): every phrase
    of the image gets this same map, which a person should see on the figure itself."""
    if text_conditioned:
        return None
    return f"image-only map: {method} does not read the text"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "phrase"


# The names `save` gives overlay PNGs: f"{index:03d}_{_slug(text)}.png" and the token grid.
_OVERLAY_NAME = re.compile(r"\d{3,}_[a-z0-9-]{1,40}\.png|tokens\.png")


def _style(cmap: str | None, alpha: float | None) -> dict[str, Any]:
    """`overlay`'s cmap and alpha, checked now (before anything is written); None: default."""
    from groundcam.viz.overlay import DEFAULT_ALPHA, DEFAULT_CMAP, check_alpha, colormap

    cmap = DEFAULT_CMAP if cmap is None else cmap
    colormap(cmap)
    return {"cmap": cmap, "alpha": check_alpha(DEFAULT_ALPHA if alpha is None else alpha)}


def _output_directory(directory: str | Path) -> Path:
    """`directory`, created with its parents; an InputError when it or a parent is a file."""
    out = Path(directory)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise InputError(f"{path} exists and is not a directory")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create directory {out}: {e.strerror or e}") from None
    return out


def _remove_old_overlays(out: Path) -> None:
    """Delete the overlay PNGs an earlier `save` wrote into `out` (names matching
    `_OVERLAY_NAME` only; folders and every other file are left alone)."""
    for entry in out.iterdir():
        if _OVERLAY_NAME.fullmatch(entry.name) and (entry.is_file() or entry.is_symlink()):
            entry.unlink()


def versions() -> dict[str, str]:
    """The library versions a saved result was made with."""
    import transformers

    return {
        "groundcam": _version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("groundcam")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"
