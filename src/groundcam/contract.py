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

LM_TOKENS = "lm_tokens"
"""A generative VLM's language-model hidden states at a decoder layer, [B, T, C], read at the
image-token columns (Grad-CAM on the LM)."""

TOKEN_LOGITS = "token_logits"
"""Per explained token y_k, its logit read at every position from the LM's last hidden state
(after the final norm, through the LM head's row for y_k: the logit lens), [B, T]."""

SOURCE_KINDS = (
    TEXT_TO_IMAGE,
    VISION_ATTENTION,
    VISION_TOKENS,
    ATTENTION_GRAPH,
    LM_TOKENS,
    TOKEN_LOGITS,
)


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
PHRASE_LOG_LIKELIHOOD = ScoreKind(
    "phrase_log_likelihood",
    "the log-probability of the phrase written after the prompt, given the image (sum over its "
    "tokens)",
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


# ----------------------------------------------------------------------------- image tokens


@dataclass(frozen=True)
class Tile:
    """One grid of image tokens: tile (or frame) `index` of image `image`, `grid_h` x `grid_w`
    cells read row-major, over `box` = (x0, y0, x1, y1) of the original image in fractions of its
    width and height (a global or thumbnail tile: the whole image; a centre crop: part of it).
    `newline`: every row of cells is followed by one token with no cell (LLaVA-NeXT). A grid cut
    from a padded canvas may reach past the image's edges (LLaVA-NeXT's unpadded grid keeps part of
    a padded cell): its box then extends beyond 0 or 1, and pixels sample it as they lie."""

    image: int
    index: int
    grid_h: int
    grid_w: int
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    newline: bool = False

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if self.grid_h < 1 or self.grid_w < 1:
            raise ValueError(f"tile grid must be at least 1x1, got {self.grid_h}x{self.grid_w}")
        if not (x0 < x1 and y0 < y1 and x0 < 1 and y0 < 1 and x1 > 0 and y1 > 0):
            raise ValueError(
                f"tile box must lie inside (0, 0, 1, 1) (or overlap it, reaching past it by a "
                f"padded margin) with x0<x1, y0<y1: {self.box}"
            )

    @property
    def columns(self) -> int:
        """How many sequence columns the tile takes (cells and newlines)."""
        return self.grid_h * (self.grid_w + int(self.newline))


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """Where the image tokens of a recorded sequence sit: column `positions[m]` holds the token of
    `tiles[tile[m]]` at cell (`row[m]`, `col[m]`) of that tile's grid, or no cell when `row[m]`
    is -1 (a newline or separator). `sizes[i]`: (H, W) of original image i, when known. Families
    declare it through `Adapter.token_layout`; `placement.place` paints values back with it."""

    positions: torch.Tensor
    tile: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    tiles: tuple[Tile, ...]
    sizes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        m = self.positions.shape
        if len(m) != 1 or any(t.shape != m for t in (self.tile, self.row, self.col)):
            raise ValueError("positions, tile, row and col must be 1-D of one length")
        if not self.tiles:
            raise ValueError("a token layout needs at least one tile")
        images = sorted({t.image for t in self.tiles})
        if images != list(range(len(images))):
            raise ValueError(f"tiles must name images 0..n-1, got {images}")
        if self.sizes is not None and len(self.sizes) != len(images):
            raise ValueError(f"{len(self.sizes)} image sizes for {len(images)} images")
        if len(self.tile) and not 0 <= int(self.tile.min()) <= int(self.tile.max()) < len(
            self.tiles
        ):
            raise ValueError(f"tile indices must lie in 0..{len(self.tiles) - 1}")
        height = torch.tensor([t.grid_h for t in self.tiles])[self.tile]
        width = torch.tensor([t.grid_w for t in self.tiles])[self.tile]
        cell = self.row >= 0
        if bool(((self.row >= height) | (self.col >= width) | (cell & (self.col < 0))).any()):
            raise ValueError("a column's cell lies outside its tile's grid")

    @property
    def images(self) -> int:
        """How many images the sequence holds."""
        return 1 + max(t.image for t in self.tiles)

    @property
    def image(self) -> torch.Tensor:
        """Per column, which image it belongs to."""
        return torch.tensor([t.image for t in self.tiles], dtype=torch.long)[self.tile]

    @property
    def has_cell(self) -> torch.Tensor:
        """Per column, whether it is a grid cell (not a newline or separator)."""
        return self.row >= 0

    @classmethod
    def from_tiles(
        cls,
        positions: torch.Tensor | list[int],
        tiles: tuple[Tile, ...] | list[Tile],
        sizes: tuple[tuple[int, int], ...] | None = None,
    ) -> TokenLayout:
        """The image-token columns `positions`, in sequence order, given to `tiles` in order:
        each tile's cells row-major, with a no-cell column after each row of a `newline` tile.
        Refuses a count of columns that the tiles do not take exactly."""
        positions = torch.as_tensor(positions, dtype=torch.long).flatten()
        tiles = tuple(tiles)
        need = sum(t.columns for t in tiles)
        if len(positions) != need:
            raise ValueError(
                f"{len(positions)} image-token columns, but the tiles take {need} "
                f"({', '.join(f'{t.grid_h}x{t.grid_w}' for t in tiles)})"
            )
        tile, row, col = [], [], []
        for i, t in enumerate(tiles):
            width = t.grid_w + int(t.newline)
            cells = torch.arange(t.grid_h * width)
            r, c = cells // width, cells % width
            gap = c >= t.grid_w  # the newline column after each row
            tile.append(torch.full_like(cells, i))
            row.append(torch.where(gap, -1, r))
            col.append(torch.where(gap, -1, c))
        return cls(positions, torch.cat(tile), torch.cat(row), torch.cat(col), tiles, sizes)

    @classmethod
    def grid(
        cls, grid_h: int, grid_w: int, start: int = 0, size: tuple[int, int] | None = None
    ) -> TokenLayout:
        """One image, one tile covering it, its cells row-major from column `start` (the layout
        of every family that reads one image through one patch grid)."""
        tile = Tile(0, 0, grid_h, grid_w)
        positions = torch.arange(start, start + grid_h * grid_w)
        return cls.from_tiles(positions, (tile,), None if size is None else (tuple(size),))
