"""The vocabulary adapters and methods share, and nothing else: where recorded tensors come from,
how attentions connect, what to hook, and the scores a forward pass returns. Methods and adapters
both import this module; neither imports the other."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from groundcam.geometry import Geometry

# ----------------------------------------------------------------------------- sources
# The kinds of recorded tensor a method can read. The string values are stable identifiers (they
# appear in `adapter.layers("tokens")` and in messages), the names say what the tensors hold.

TEXT_TO_IMAGE = "cross_attention"
"""Attention probabilities of text-token rows over image-token columns, [B, H, T, K]: a fusion or
decoder cross-attention, or the text rows of a single-stream model's self-attention (ViLT, FLAVA)."""

VISION_ATTENTION = "self_attention"
"""Self-attention probabilities of the vision tokens, [B, H, N, N] (CLS row read by rollout)."""

VISION_TOKENS = "tokens"
"""Activations of the vision tokens at a layer, [B, N, C] (what Grad-CAM weighs)."""

ATTENTION_GRAPH = "attention_graph"
"""Every attention of the model in forward order, with how they connect (relevance)."""

SOURCE_KINDS = (TEXT_TO_IMAGE, VISION_ATTENTION, VISION_TOKENS, ATTENTION_GRAPH)


def source_label(kind: str) -> str:
    """How a source is named in messages ("cross-attention", "tokens", ...)."""
    return kind.replace("_", "-")


# ----------------------------------------------------------------------------- attention graphs


@dataclass(frozen=True)
class AttentionStep:
    """One recorded attention: tokens of stream `query` attend tokens of stream `key` (the same
    stream for self-attention). Streams are named by the adapter: "image", "text", "joint"..."""

    query: str
    key: str


@dataclass(frozen=True)
class AttentionGraph:
    """How a model's attentions connect, for relevance propagation: `steps` align with the
    recorded tensors; the map is read from rows of stream `readout` (row `readout_row` for the
    whole-text map, e.g. CLS) over the key positions of stream `image`, placed by the geometry."""

    steps: tuple[AttentionStep, ...]
    readout: str
    image: str
    readout_row: int = 0


# ----------------------------------------------------------------------------- what to record


@dataclass(frozen=True)
class HookPoint:
    """A module whose output (or item `index` of its tuple output) is recorded under `name`.
    `per_image` marks tensors computed once per image (row i = image i) rather than per pair."""

    name: str
    module: nn.Module
    index: int | None = None
    per_image: bool = False


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


@dataclass(frozen=True)
class ScoreKind:
    """What the score reported beside a phrase (or a generated token) is: a stable `name` for
    records and a short `description` for people; declared by each family per target."""

    name: str
    description: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description}


ITM_PROBABILITY = ScoreKind(
    "itm_probability",
    "probability that the text matches the image (softmax of the image-text matching head)",
)
COSINE_SIMILARITY = ScoreKind(
    "cosine_similarity", "cosine similarity of the image and text embeddings, -1 to 1"
)
TOKEN_PROBABILITY = ScoreKind(
    "token_probability",
    "the model's probability of each generated token given the image and the tokens before it",
)


# ----------------------------------------------------------------------------- the adapter's table


@dataclass(frozen=True)
class Source:
    """One row of an adapter's table: a kind of tensor this model offers, its valid layers (none:
    the source is read at every layer at once), the default layer (one for every target, or per
    target), the targets whose score reaches it (None: every target of the family) with the
    reason shown when another target asks for it, and how to record it at (layer, target)."""

    kind: str
    record: Callable[[int | None, str], RecordSpec]
    layers: tuple[int, ...] = ()
    default: int | Mapping[str, int] | None = None
    targets: tuple[str, ...] | None = None
    unreachable: str = ""

    def default_for(self, target: str) -> int | None:
        if isinstance(self.default, Mapping):
            return self.default[target]
        return self.default


def middle_layer(layers: list[int] | tuple[int, ...]) -> int:
    """The middle of a stack, never its last layer when there are two or more."""
    layers = list(layers)
    return layers[min(len(layers) // 2, len(layers) - 2)] if len(layers) > 1 else layers[0]
