"""The attention captioner (show, attend and tell; `groundcam.models.captioner`): a CNN grid read
by an LSTM with soft attention. Its maps are the decoder's own weights per word (`attention`, the
classic figure) and Grad-CAM on the encoder grid for that word's log-probability (`gradcam`).

The recorded weights are aligned with the input tokens: row t is where the decoder looked to write
token t. A phrase passed to `explain` is teacher-forced as the start of a caption (`<SOS>` + its
words); its score is the sum of its words' log-probabilities, reported as their geometric-mean
probability."""

from __future__ import annotations

import warnings

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
from groundcam.errors import GroundcamWarning, InputError
from groundcam.geometry import Geometry
from groundcam.models.captioner import ShowAttendTell
from groundcam.models.saved import load_saved

NO_GRADIENTS = (
    "the captioner's attention weights are recorded after its recurrence, so gradients of a "
    "word's score do not reach them; use `attention` (the weights themselves) or `gradcam` "
    "(the encoder grid)"
)


class CaptionerAdapter(WordVocabAdapter):
    family = "captioner"
    targets = ("token",)
    default_target = "token"
    architectures = ("ShowAttendTell",)
    SOURCES = (TEXT_TO_IMAGE, VISION_TOKENS)
    NO_GRADIENT_SOURCES = {TEXT_TO_IMAGE: NO_GRADIENTS}
    default_methods = {"token": "attention"}
    token_rows_shift = 0  # row t of the recorded weights wrote token t
    SCORES = {
        "token": ScoreKind(
            "word_probability",
            "the model's probability of each word given the image and the words before it "
            "(a phrase: the geometric mean over its words)",
        )
    }

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        super().__init__(model, model.vocab, name or "captioner")

    @classmethod
    def from_pretrained(cls, source, processor=None, tokenizer=None, name=""):
        return cls(load_saved(ShowAttendTell.from_pretrained, source), name=name or str(source))

    # ------------------------------------------------------------------ inputs and geometry
    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.model.preprocess(images)

    def prepare_texts(self, phrases):
        """`<SOS>` + the phrase's words, padded; the mask marks the rows that write a word."""
        vocab = self.model.vocab
        rows = []
        for phrase in phrases:
            words = tokenize(phrase)
            if not words:
                raise InputError(f"phrase {phrase[:60]!r} has no words the captioner can read")
            unknown = sum(w not in vocab.index for w in words)
            if unknown * 2 > len(words):
                warnings.warn(
                    f"phrase {phrase[:60]!r}: {unknown} of its {len(words)} words are not in "
                    "the captioner's vocabulary; the map explains <UNK>, not these words",
                    GroundcamWarning,
                    stacklevel=4,
                )
            elif unknown:
                warnings.warn(
                    unknown_words_message(phrase, self.unknown_words([phrase])[0], vocab.unk_token),
                    GroundcamWarning,
                    stacklevel=4,
                )
            rows.append(vocab.encode(phrase)[:-1])  # no <EOS>: a phrase starts a caption
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), vocab.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, 1 : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        h, w = self.model.encoder.grid(*pixel_values.shape[-2:])
        return Geometry(h, w, prefix=0)

    # ------------------------------------------------------------------ sources
    def table(self) -> tuple[Source, ...]:
        return (
            Source(TEXT_TO_IMAGE, self._weights_spec, (0,), 0),
            Source(VISION_TOKENS, self._grid_spec, (0,), 0),
        )

    def _weights_spec(self, layer: int, target: str) -> RecordSpec:
        return RecordSpec([HookPoint("decoder.attention", self.model.decoder.attention_maps)], 0)

    def _grid_spec(self, layer: int, target: str) -> RecordSpec:
        point = HookPoint("encoder.regions", self.model.encoder.regions, per_image=True)
        return RecordSpec([point], 0)

    def methods_note(self) -> str:
        return "attention: the decoder's soft-attention weights per word; " + NO_GRADIENTS

    # ------------------------------------------------------------------ scoring
    def forward(
        self, pixel_values, input_ids, attention_mask, image_index, target, expand_vision_at=None
    ) -> Scores:
        out = self.model(pixel_values, input_ids, image_index=image_index)
        logp = out.logits[:, :-1].float().log_softmax(-1)
        chosen = logp.gather(-1, input_ids[:, 1:, None])[..., 0]
        keep = attention_mask[:, 1:].to(chosen.dtype)
        total = (chosen * keep).sum(1)
        return Scores(total, (total.detach() / keep.sum(1).clamp(min=1)).exp())

    # ------------------------------------------------------------------ generation
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int | None, beam: int = 1):
        ids = self.model.generate(pixel_values, beam=beam, max_length=max_new_tokens)
        return torch.tensor(ids[:1], device=pixel_values.device), 1

    def teacher_ids(self, text: str):
        if not tokenize(text):
            raise InputError(f"text {text[:60]!r} has no words the captioner can read")
        return torch.tensor([self.model.vocab.encode(text)], device=self.device), 1

    def decoder_logits(self, pixel_values, input_ids, expand_vision_at=None):
        return self.model(pixel_values, input_ids).logits

    def decode(self, input_ids: list[int]) -> str:
        return self.model.vocab.decode(input_ids)

    def special_ids(self) -> set[int]:
        v = self.model.vocab
        return {v.pad_id, v.sos_id, v.eos_id}


__all__ = ["CaptionerAdapter"]
