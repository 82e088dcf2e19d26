"""What every explanation method is: the tensors it needs, and the math that turns them into maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from groundcam.geometry import Geometry

# Where recorded tensors come from; adapters say which of these their family has.
CROSS_ATTENTION = "cross_attention"  # text -> image attention probs [B, H, T, K]
SELF_ATTENTION = "self_attention"  # vision self-attention probs [B, H, N, N]
TOKENS = "tokens"  # vision token activations [B, N, C]
ATTENTION_GRAPH = "attention_graph"  # every attention of the model in forward order (relevance)


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


@dataclass
class MethodOutput:
    raw_maps: torch.Tensor  # [B, h, w]
    raw_token_maps: torch.Tensor | None = None  # [B, T, h, w] where the method has them
    text_conditioned: bool = True


class Method:
    """A method declares the sources it can read (in order of preference), whether it needs every
    layer of that source or one, and whether it needs gradients; `compute` is pure math."""

    name: str = ""
    sources: tuple[str, ...] = ()
    all_layers: bool = False
    needs_grad: bool = False

    def compute(
        self,
        source: str,
        recorded: list[torch.Tensor],
        grads: list[torch.Tensor] | None,
        geometry: Geometry,
        text_mask: torch.Tensor | None,
        graph: AttentionGraph | None = None,
    ) -> MethodOutput:
        raise NotImplementedError


def masked_token_maps(per_token: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the maps of padded text positions ([B, T, h, w] times the [B, T] mask)."""
    if text_mask is None:
        return per_token
    return per_token * text_mask[:, :, None, None].to(per_token.dtype)
