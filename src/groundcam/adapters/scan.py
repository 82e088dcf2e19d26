"""SCAN (`groundcam.models.scan`): image-text matching by stacked cross attention over detector
regions. Its image tokens are regions, so its geometry is a `RegionGeometry`: every map is painted
on the image, each region's box with its weight (the maximum where boxes overlap).

`attention` is the text-to-image alignment: per word, its softmax over the regions (the paper's
figure); a phrase's map is the mean over its words. `attn-gradcam` (the default: on shapes it
points far better, since function words attend the background) weighs those weights by their
gradient; `gradcam` weighs the projected region features by the gradient of the similarity. The explained and reported score is SCAN's
similarity of the image and the phrase (LogSumExp of word relevances by default)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image
from torch import nn

from groundcam.adapters.hf import unknown_words_message
from groundcam.adapters.word_vocab import WordVocabAdapter
from groundcam.contract import (
    TEXT_TO_IMAGE,
    VISION_TOKENS,
    HookPoint,
    RecordSpec,
    ScoreKind,
    Scores,
    Source,
)
from groundcam.data.caption_text import tokenize
from groundcam.data.regions import RegionFeatures, paint
from groundcam.errors import GroundcamWarning, InputError
from groundcam.geometry import RegionGeometry
from groundcam.models.saved import load_saved
from groundcam.models.scan import SCAN, pair_similarity


class ScanAdapter(WordVocabAdapter):
    family = "scan"
    targets = ("similarity",)
    default_target = "similarity"
    architectures = ("SCAN",)
    SOURCES = (TEXT_TO_IMAGE, VISION_TOKENS)
    default_methods = {"similarity": "attn-gradcam"}  # the built-in's card: 53% vs 31%
    SCORES = {
        "similarity": ScoreKind(
            "scan_similarity",
            "SCAN's image-text similarity: word relevances (cosines with their attended "
            "regions) pooled by LogSumExp (or the model's pooling)",
        )
    }

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        super().__init__(model, model.vocab, name or "scan")
        if model.region_cnn is None:
            raise InputError(
                "this SCAN model reads detector features, not images; score it with "
                "groundcam.models.scan on features read by groundcam.data.regions"
            )
        if model.config.direction != "t2i":  # its score never reads the t2i alignments
            self.NO_GRADIENT_SOURCES = {
                TEXT_TO_IMAGE: "this SCAN model scores image-to-text, so gradients of its score "
                "do not reach the word->region attention; use `attention` or `gradcam`"
            }

    @classmethod
    def from_pretrained(cls, source, processor=None, tokenizer=None, name=""):
        return cls(load_saved(SCAN.from_pretrained, source), name=name or str(source))

    # ------------------------------------------------------------------ inputs and geometry
    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.model.preprocess(images)

    def prepare_texts(self, phrases):
        """The phrase's words (no start or end token); the mask marks them."""
        vocab = self.model.vocab
        for phrase in phrases:
            words = tokenize(phrase)
            if not words:
                raise InputError(f"phrase {phrase[:60]!r} has no words SCAN can read")
            missing = self.unknown_words([phrase])[0]
            if missing:
                warnings.warn(
                    unknown_words_message(phrase, missing, vocab.unk_token),
                    GroundcamWarning,
                    stacklevel=4,
                )
        ids, lengths = self.model.encode_texts(list(phrases))
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()
        return ids, mask

    def geometry(self, pixel_values: torch.Tensor) -> RegionGeometry:
        """Each image's proposals, painted at the model's input resolution."""
        size = self.model.config.image_size
        return RegionGeometry(size, size, 0, boxes=self.model.propose_boxes(pixel_values))

    def token_layout(self, pixel_values, input_ids=None):
        from groundcam.placement import region_layout

        if pixel_values.shape[0] != 1:
            raise ValueError("a region layout is per image: pass one image")
        return region_layout(self.model.propose_boxes(pixel_values)[0])

    # ------------------------------------------------------------------ sources
    def table(self) -> tuple[Source, ...]:
        return (
            Source(TEXT_TO_IMAGE, self._attention_spec, (0,), 0),
            Source(VISION_TOKENS, self._regions_spec, (0,), 0),
        )

    def _attention_spec(self, layer: int, target: str) -> RecordSpec:
        return RecordSpec([HookPoint("word_region_attention", self.model.word_region_attention)], 0)

    def _regions_spec(self, layer: int, target: str) -> RecordSpec:
        point = HookPoint("image.regions", self.model.image.regions, per_image=True)
        return RecordSpec([point], 0)

    def methods_note(self) -> str:
        return (
            "attention: each word's softmax over the regions (text-to-image), painted on the "
            "region boxes; gradcam: the projected region features"
        )

    # ------------------------------------------------------------------ scoring
    def forward(
        self, pixel_values, input_ids, attention_mask, image_index, target, expand_vision_at=None
    ) -> Scores:
        boxes = self.model.propose_boxes(pixel_values)
        regions = self.model.encode_regions(pixel_values, boxes)
        lengths = attention_mask.sum(1)
        words = self.model.encode_words(input_ids, lengths)
        sim = self.model.similarity(regions.index_select(0, image_index), words, lengths)
        size = self.model.config.image_size
        geometry = RegionGeometry(size, size, 0, boxes=boxes.index_select(0, image_index))
        return Scores(sim, sim.detach(), geometry)

    def similarity_matrix(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """SCAN's own [images, captions] similarity (words and regions read together, so a
        retrieval computes it block by block rather than from separate embeddings)."""
        m = self.model
        regions = m.encode_regions(pixel_values, m.propose_boxes(pixel_values))
        lengths = attention_mask.sum(1)
        return m.score_matrix(regions, m.encode_words(input_ids, lengths), lengths)


def region_word_maps(
    model: SCAN, item: RegionFeatures, text: str, size: tuple[int, int] | None = None
) -> tuple[list[str], torch.Tensor, float]:
    """For a SCAN model on detector features: `text`'s words, each word's attention over the
    regions painted on an (H, W) image (default: the item's size, else 100 x 100), and the
    similarity. Features without boxes are one line naming their file and row."""
    boxes = item.require_boxes()
    if size is None:
        size = (item.size[1], item.size[0]) if item.size else (100, 100)
    device = next(model.parameters()).device
    features = torch.tensor(np.array(item.features, dtype=np.float32), device=device)[None]
    with torch.no_grad():
        regions = model.encode_regions(features)
        ids, lengths = model.encode_texts([text])
        sim, attn = pair_similarity(
            regions, model.encode_words(ids, lengths), lengths, "t2i", model.config.lambda_softmax
        )
        if model.config.direction != "t2i":
            sim = model.similarity(regions, model.encode_words(ids, lengths), lengths)
    words = [model.vocab.words[i] for i in ids[0, : int(lengths[0])].tolist()]
    return words, paint(attn[0, : len(words)].cpu(), boxes, size), float(sim[0])


__all__ = ["ScanAdapter", "region_word_maps"]
