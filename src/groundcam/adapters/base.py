"""What an adapter tells the explanation machinery about one model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from groundcam.capture import HookPoint
from groundcam.geometry import Geometry


@dataclass
class RecordSpec:
    """Hook points for one explanation; `per_image` records hold one row per image (not per
    phrase) and are gathered by the image index afterwards."""

    points: list[HookPoint]
    layer: int | None
    per_image: bool = False
    expand_vision_at: int | None = None


@dataclass
class Scores:
    explained: torch.Tensor  # [B] the scalar per pair whose gradient explains it
    reported: torch.Tensor  # [B] what a person reads (a probability, a cosine)


class Adapter:
    """One model family: inputs, geometry, named layer stacks, targets and the forward pass."""

    family: str = ""
    targets: tuple[str, ...] = ()
    default_target: str = ""

    def __init__(self, model: nn.Module, tokenizer=None, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or type(model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def prepare_texts(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def token_strings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[list[str]]:
        raise NotImplementedError

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        raise NotImplementedError

    def sources(self) -> tuple[str, ...]:
        raise NotImplementedError

    def layers(self, source: str) -> list[int]:
        """Valid layer numbers of a source, in the family's own numbering."""
        raise NotImplementedError

    def default_layer(self, source: str, target: str) -> int:
        """A layer whose maps are never degenerate for this target."""
        raise NotImplementedError

    def record_spec(self, source: str, layer: int | None) -> RecordSpec:
        raise NotImplementedError

    def check(self, source: str, target: str) -> None:
        """Raise ValueError when this target cannot reach this source (e.g. a dual-encoder score
        never passes through a fusion layer)."""

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor,
        target: str,
        expand_vision_at: int | None = None,
    ) -> Scores:
        raise NotImplementedError
