"""What an adapter tells the explanation machinery about one model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from groundcam.capture import HookPoint
from groundcam.geometry import Geometry
from groundcam.methods.base import AttentionGraph


@dataclass
class RecordSpec:
    """Hook points for one explanation; `per_image` records hold one row per image (not per
    phrase) and are gathered by the image index afterwards."""

    points: list[HookPoint]
    layer: int | None
    per_image: bool = False
    expand_vision_at: int | None = None
    graph: AttentionGraph | None = None  # for relevance: how the recorded attentions connect


@dataclass
class Scores:
    explained: torch.Tensor  # [B] the scalar per pair whose gradient explains it
    reported: torch.Tensor  # [B] what a person reads (a probability, a cosine)
    geometry: Geometry | None = None  # when only the forward knows it (ViLT's shuffled patches)


class Adapter:
    """One model family: inputs, geometry, named layer stacks, targets and the forward pass."""

    family: str = ""
    targets: tuple[str, ...] = ()
    default_target: str = ""
    architectures: tuple[str, ...] = ()  # model class names this adapter explains
    SOURCES: tuple[str, ...] = ()  # recorded-tensor kinds the family has (methods.base)

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name or type(model).__name__

    @classmethod
    def from_pretrained(
        cls, source: str, processor=None, tokenizer=None, name: str = ""
    ) -> Adapter:
        """Load a model of this family from a hub id or a local directory."""
        raise NotImplementedError

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.architectures

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
        """Where this model's methods can read from (a subset of `SOURCES` for some configs)."""
        return self.SOURCES

    def layers(self, source: str) -> list[int]:
        """Valid layer numbers of a source, in the family's own numbering."""
        raise NotImplementedError

    def default_layer(self, source: str, target: str) -> int:
        """A layer whose maps are never degenerate for this target."""
        raise NotImplementedError

    def record_spec(self, source: str, layer: int | None, target: str = "") -> RecordSpec:
        """What to record for `source` at `layer` (every layer when None) for `target`."""
        raise NotImplementedError

    def methods_note(self) -> str:
        """Anything a user should know about this family's methods (shown by `groundcam models`)."""
        return ""

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

    # Generation families (target "token") also implement these two.
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, int]:
        """Greedy text for one image: ids [1, T] including any start token or prompt, and the
        position of the first generated token."""
        raise NotImplementedError

    def decoder_logits(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        expand_vision_at: int | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits [1, T, V] for `input_ids`; position k-1 scores token k."""
        raise NotImplementedError

    def teacher_ids(self, text: str) -> tuple[torch.Tensor, int]:
        """`text` as the ids the model would have generated: [1, T] and the first text position."""
        raise NotImplementedError

    def decode(self, input_ids: list[int]) -> str:
        return self.tokenizer.decode(input_ids, skip_special_tokens=True)

    def special_ids(self) -> set[int]:
        """Token ids that are not text (start, end, padding): they get no map."""
        tok = self.tokenizer
        return set(getattr(tok, "all_special_ids", []) or [])


def ensure_eager(model: nn.Module) -> None:
    """Switch a transformers model to eager attention (sdpa returns no attention weights), or say
    clearly why it cannot be switched."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None) if config is not None else None
    if current in (None, "eager"):
        return
    try:
        model.set_attn_implementation("eager")
    except Exception as e:  # noqa: BLE001 - any refusal becomes one clear line
        raise ValueError(
            f"{type(model).__name__} runs {current!r} attention, which returns no attention "
            f"weights, and could not be switched to eager ({e}); load it with "
            "attn_implementation='eager'"
        ) from None
