"""What an adapter tells the explanation machinery about one model family."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from PIL import Image
from torch import nn

from groundcam.contract import RecordSpec, ScoreKind, Scores, Source, TokenLayout, source_label
from groundcam.geometry import Geometry

__all__ = ["Adapter", "RecordSpec", "ScoreKind", "Scores", "Source", "ensure_eager"]


class Adapter:
    """One model family: inputs, geometry, named layer stacks, targets and the forward pass."""

    family: str = ""
    targets: tuple[str, ...] = ()
    default_target: str = ""
    architectures: tuple[str, ...] = ()  # model class names this adapter explains
    SOURCES: tuple[str, ...] = ()  # recorded-tensor kinds the family has (contract)
    default_methods: Mapping[str, str] = {"itm": "attn-gradcam"}  # target -> default method
    batch_images: int = 8  # images per forward in an evaluation (all their phrases together)
    missing_targets: Mapping[str, str] = {}  # target -> why this model cannot explain it
    # source -> why no score's gradient reaches its tensors (gradient methods refuse it)
    NO_GRADIENT_SOURCES: Mapping[str, str] = {}
    # method -> why this family cannot run it although it has the method's source
    REFUSED_METHODS: Mapping[str, str] = {}
    token_rows_shift: int = 1  # generation: the decoder row that predicted token k is k - shift
    takes_prompt: bool = False  # generation: whether a text prompt can lead the generated text
    reads_phrases: bool = True  # False: it explains only text it writes or is given to write (OCR)
    images_per_generation: int = 1  # generation: how many images one generation can read
    SCORES: Mapping[str, ScoreKind] = {}  # target -> what the reported score is

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
    def default_image_processor(cls, model: nn.Module):
        """The image processor that follows from `model`'s config (its image size and the
        family's normalisation), for a model instance passed without one; None when the family
        has no such processor or needs none."""
        return None

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

    def fed_text(self, phrase: str) -> str:
        """The text the model reads for `phrase` (a family that cleans phrases first says how)."""
        return phrase

    def unknown_words(self, phrases: list[str]) -> list[list[str]]:
        """Per phrase, the words of the text the model reads that are wholly unknown to its
        tokenizer (every sub-token the unknown token), so that they can be named and marked."""
        from groundcam.adapters.hf import unknown_words

        return unknown_words(self.tokenizer, [self.fed_text(p) for p in phrases])

    def score_kind(self, target: str) -> ScoreKind | None:
        """What the score reported for `target` is (None: the family does not say)."""
        return self.SCORES.get(target)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        raise NotImplementedError

    # ------------------------------------------------------------------ the table
    def table(self) -> tuple[Source, ...]:
        """The family's sources on this model: one row per kind of recorded tensor, with its
        layers, default layer, the targets that reach it and how to record it."""
        raise NotImplementedError

    @property
    def _table_of_sources(self) -> dict[str, Source]:
        rows = self.__dict__.get("_table_rows")
        if rows is None:
            rows = {row.kind: row for row in self.table()}
            self.__dict__["_table_rows"] = rows
        return rows

    def sources(self) -> tuple[str, ...]:
        """Where this model's methods can read from (a subset of `SOURCES` for some configs)."""
        return tuple(self._table_of_sources)

    def source(self, kind: str) -> Source:
        """The table row of `kind`, or a ValueError naming what this model has."""
        row = self._table_of_sources.get(kind)
        if row is None:
            have = ", ".join(source_label(k) for k in self._table_of_sources)
            raise ValueError(
                f"the {self.family} family has no {source_label(kind)} (it has {have})"
            )
        return row

    def layers(self, source: str) -> list[int]:
        """Valid layer numbers of a source, in the family's own numbering."""
        return list(self.source(source).layers)

    def default_layer(self, source: str, target: str) -> int | None:
        """A layer whose maps are never degenerate for this target (None: every layer)."""
        return self.source(source).default_for(target)

    def record_spec(self, source: str, layer: int | None, target: str = "") -> RecordSpec:
        """What to record for `source` at `layer` (every layer when None) for `target`."""
        return self.source(source).record(layer, target or self.default_target)

    def check(self, source: str, target: str, needs_grad: bool = False) -> None:
        """Raise ValueError when this model cannot explain `target`, or when the target's score
        never reaches this source (e.g. a dual-encoder score never passes through a fusion
        layer)."""
        if target in self.missing_targets:
            raise ValueError(self.missing_targets[target])
        row = self.source(source)
        if needs_grad and source in self.NO_GRADIENT_SOURCES:
            raise ValueError(self.NO_GRADIENT_SOURCES[source])
        if row.targets is not None and target not in row.targets:
            raise ValueError(
                row.unreachable
                or f"target {target!r} never reaches the {source_label(source)} of this model"
            )

    def methods_note(self) -> str:
        """Anything a user should know about this family's methods (shown by `groundcam models`)."""
        return ""

    def default_method(self, target: str) -> str:
        """The method the evidence supports for `target` on this family."""
        return self.default_methods.get(target) or next(iter(self.default_methods.values()))

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

    # Families with a `similarity` target also embed images and texts on their own, so that
    # every image can be compared with every text (retrieval) without a forward per pair.
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] whose dot products are the similarity's cosine."""
        raise NotImplementedError

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings [T, D] in the space of `embed_images`."""
        raise NotImplementedError

    @property
    def embeds_apart(self) -> bool:
        """Whether this family's similarity is a dot product of `embed_images`/`embed_texts`."""
        return type(self).embed_images is not Adapter.embed_images

    def similarity_matrix(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The similarity [N, T] of every image with every text: the embeddings' cosine here; a
        family whose similarity reads images and texts together (cross attention) overrides it."""
        return self.embed_images(pixel_values) @ self.embed_texts(input_ids, attention_mask).T

    # Generation families (target "token") also implement these two; a family that
    # `takes_prompt` also accepts `prompt=` (the text before the generated text) in both
    # `generate` and `teacher_ids`.
    def generate(
        self, pixel_values: torch.Tensor, max_new_tokens: int | None, beam: int = 1
    ) -> tuple[torch.Tensor, int]:
        """Greedy (`beam` 1) or beam-search text for one image: ids [1, T] including any start token or prompt, and the
        position of the first generated token (None: the model's generation_config's length)."""
        raise NotImplementedError

    def token_layout(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> TokenLayout:
        """Where the image tokens sit among the columns the maps read (which image, tile and
        cell each is). The default: one image, one tile covering it, the geometry's grid after
        its prefix; families that tile, crop or interleave images with text declare their own."""
        g = self.geometry(pixel_values)
        if g.cells is not None:
            raise ValueError(f"the {self.family} family places its image tokens per forward")
        return TokenLayout.grid(g.grid_h, g.grid_w, start=g.prefix)

    def scored_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The recorded rows that scored the tokens at `positions` of the generated sequence
        (a causal decoder: row k-1 predicts token k, prompt included in k)."""
        return positions - self.token_rows_shift

    def decoder_logits(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        expand_vision_at: int | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits [1, T, V] for `input_ids`; position k-1 scores token k."""
        raise NotImplementedError

    def output_head(self) -> nn.Module | None:
        """The module turning decoder states into vocabulary logits (its input `[1, T, C]`), so
        that only the explained positions' logits are computed; None where there is none to
        hook (the whole logits are then computed)."""
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return head if isinstance(head, nn.Module) else None

    def teacher_ids(self, text: str) -> tuple[torch.Tensor, int]:
        """`text` as the ids the model would have generated: [1, T] and the first text position."""
        raise NotImplementedError

    def max_positions(self) -> int | None:
        """How many text positions the decoder reads at most (None: no limit)."""
        return None

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
