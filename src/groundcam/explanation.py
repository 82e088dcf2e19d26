"""The result of an explanation: maps on the patch grid, per-token maps, scores, and ways to look."""

from __future__ import annotations

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

from groundcam.maps import normalize_maps

__all__ = ["Explanation", "GenerationExplanation", "normalize_maps", "versions"]


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

    @property
    def token_maps(self) -> list[torch.Tensor]:
        """Per phrase, one normalised map per real (unpadded) token: [T_p, h, w]."""
        if self.raw_token_maps is None:
            raise AttributeError(f"method {self.method!r} has no per-token maps")
        return [normalize_maps(self.raw_token_maps[p, : len(t)]) for p, t in enumerate(self.tokens)]

    def __len__(self) -> int:
        return self.maps.shape[0]

    def resize(self, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
        """Maps upsampled to (H, W), `align_corners=False`, unclamped (the AMC protocol's view)."""
        return F.interpolate(self.maps[:, None], size=size, mode=mode, align_corners=False)[:, 0]

    def image(self, i: int) -> Image.Image:
        if not self.images:
            raise ValueError("this explanation was made from tensors and holds no image")
        return self.images[self.image_index[i] if self.image_index else 0]

    def overlay(self, i: int, alpha: float = 0.5, **kwargs: Any) -> Image.Image:
        """Phrase i's map over its image (boxes, point and hit may be passed to draw them)."""
        from groundcam.viz.overlay import overlay

        return overlay(self.image(i), self.maps[i], alpha=alpha, **kwargs)

    def meta(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layer": self.layer,
            "target": self.target,
            "model": self.model,
            "text_conditioned": self.text_conditioned,
            "phrases": self.phrases,
            "tokens": self.tokens,
            "scores": [float(s) for s in self.scores],
            "grid": list(self.maps.shape[-2:]),
            "versions": versions(),
        }

    def save(self, directory: str | Path) -> Path:
        """Overlay PNGs (when images are held), `maps.npz` and `meta.json` under `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"maps": self.maps.numpy(), "raw_maps": self.raw_maps.numpy()}
        if self.raw_token_maps is not None:
            arrays["raw_token_maps"] = self.raw_token_maps.numpy()
        np.savez_compressed(out / "maps.npz", **arrays)
        (out / "meta.json").write_text(json.dumps(self.meta(), indent=1))
        if self.images:
            for i, phrase in enumerate(self.phrases):
                self.overlay(i).save(out / f"{i:03d}_{_slug(phrase)}.png")
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
    layer: int | None
    model: str
    image: Image.Image | None = None
    text_conditioned: bool = True

    @property
    def token_maps(self) -> torch.Tensor:
        return self.maps

    def __len__(self) -> int:
        return len(self.tokens)

    def resize(self, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
        return F.interpolate(self.maps[:, None], size=size, mode=mode, align_corners=False)[:, 0]

    def overlay(self, k: int, alpha: float = 0.5, **kwargs: Any) -> Image.Image:
        """Token k's map over the image."""
        from groundcam.viz.overlay import overlay

        if self.image is None:
            raise ValueError("this explanation holds no image")
        return overlay(self.image, self.maps[k], alpha=alpha, **kwargs)

    def grid(self, columns: int = 6) -> Image.Image:
        """The per-token figure: each token above its overlay."""
        from groundcam.viz.token_grid import token_grid

        if self.image is None:
            raise ValueError("this explanation holds no image")
        return token_grid(self.image, self.maps, self.tokens, self.scores.tolist(), columns)

    def meta(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "positions": self.positions,
            "scores": [float(s) for s in self.scores],
            "method": self.method,
            "layer": self.layer,
            "target": "token",
            "model": self.model,
            "text_conditioned": self.text_conditioned,
            "grid": list(self.maps.shape[-2:]),
            "versions": versions(),
        }

    def save(self, directory: str | Path) -> Path:
        """`tokens.png` (the grid), one overlay PNG per token, `maps.npz` and `meta.json`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            out / "maps.npz", maps=self.maps.numpy(), raw_maps=self.raw_maps.numpy()
        )
        (out / "meta.json").write_text(json.dumps(self.meta(), indent=1))
        if self.image is not None:
            self.grid().save(out / "tokens.png")
            for k, token in enumerate(self.tokens):
                self.overlay(k).save(out / f"{k:03d}_{_slug(token)}.png")
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "phrase"


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
