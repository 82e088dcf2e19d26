"""VisionEncoderDecoderModel (TrOCR-style): a ViT/DeiT/BEiT encoder read by a text decoder
(TrOCR, GPT-2, BERT) through cross-attention. Explains generated text, one map per token.

Layer stacks are found by structure, not by path: the encoder's and the decoder's longest
`nn.ModuleList` are their layers; in a decoder layer the outermost attention module whose name
says cross (`encoder_attn`, `crossattention`) reads the image, the other attends to the text.
Each of these modules returns `(output, probs)` under eager attention."""

from __future__ import annotations

import copy

import torch
from PIL import Image
from torch import nn

from groundcam import grouping
from groundcam.adapters import hf
from groundcam.adapters.base import Adapter
from groundcam.contract import (
    ATTENTION_GRAPH,
    TEXT_TO_IMAGE,
    TOKEN_PROBABILITY,
    VISION_ATTENTION,
    VISION_TOKENS,
    AttentionGraph,
    AttentionStep,
    HookPoint,
    RecordSpec,
    Source,
)
from groundcam.geometry import Geometry
from groundcam.grouping import ImageGroups


class VisionEncoderDecoderAdapter(Adapter):
    family = "vision-encoder-decoder"
    targets = ("token",)
    default_target = "token"
    SCORES = {"token": TOKEN_PROBABILITY}
    architectures = ("VisionEncoderDecoderModel",)
    SOURCES = (TEXT_TO_IMAGE, VISION_TOKENS, VISION_ATTENTION, ATTENTION_GRAPH)
    # trocr-tiny-glyphs' card: token pointing 90.4% with `attention`, 7.1% with `gradcam`
    default_methods = {"token": "attention"}
    reads_phrases = False

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        super().__init__(hf.prepare_instance(model), hf.tokenizer_of(processor, tokenizer), name)
        self.processor = processor
        self.encoder_layers = hf.layer_stack(model.encoder, "encoder")
        self.decoder_layers = hf.layer_stack(model.decoder, "decoder")
        self.decoder_attn = [hf.attention_modules(layer) for layer in self.decoder_layers]
        if any(cross is None for _, cross in self.decoder_attn):
            raise ValueError(
                f"{type(model.decoder).__name__} has no cross-attention to the image in every "
                "layer; a VisionEncoderDecoder decoder needs add_cross_attention"
            )

    @classmethod
    def from_pretrained(cls, source, processor=None, tokenizer=None, name=""):
        from transformers import VisionEncoderDecoderModel

        model, processor = hf.load_pretrained(VisionEncoderDecoderModel, source, processor)
        tokenizer = hf.load_tokenizer(source, processor, tokenizer)
        if tokenizer is None:
            raise ValueError(f"{source}: no tokenizer saved beside the model; pass tokenizer=")
        return cls(model, tokenizer=tokenizer, name=name or source, processor=processor)

    @classmethod
    def default_image_processor(cls, model: nn.Module):
        """For a ViT-style encoder: a resize to the encoder's image size, mean and std 0.5 (ViT's
        and TrOCR's preprocessing)."""
        size = getattr(model.config.encoder, "image_size", None)
        if size is None:
            return None
        return hf.build_image_processor("ViTImageProcessor", size=hf.square(size))

    # ------------------------------------------------------------------ inputs and geometry
    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        return hf.pixel_values(self.processor, images, self.device)

    def prepare_texts(self, phrases):
        raise ValueError(
            "a vision-encoder-decoder model explains the text it writes: use "
            "explain_generation(image) (CLI: groundcam caption IMAGE)"
        )

    def token_strings(self, input_ids, attention_mask):
        return hf.token_strings(self.tokenizer, input_ids, attention_mask)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        p_h, p_w = hf.patch_size(self.model.config.encoder)
        emb = getattr(self.model.encoder, "embeddings", None)
        prefix = sum(getattr(emb, n, None) is not None for n in ("cls_token", "distillation_token"))
        registers = getattr(emb, "register_tokens", None)
        prefix += 0 if registers is None else registers.shape[-2]
        return Geometry(pixel_values.shape[-2] // p_h, pixel_values.shape[-1] // p_w, prefix)

    # ------------------------------------------------------------------ layers
    def table(self) -> tuple[Source, ...]:
        """The last decoder layer's cross-attention (row k-1 feeds token k's logit directly);
        the last encoder layer (the decoder reads every encoder token)."""
        decoder = tuple(range(len(self.decoder_layers)))
        encoder = tuple(range(len(self.encoder_layers)))
        return (
            Source(TEXT_TO_IMAGE, self._cross_spec, decoder, decoder[-1]),
            Source(VISION_TOKENS, self._tokens_spec, encoder, encoder[-1]),
            Source(VISION_ATTENTION, self._vision_attention_spec, encoder, encoder[-1]),
            Source(ATTENTION_GRAPH, self._graph_spec),
        )

    def _cross_spec(self, layer: int, target: str) -> RecordSpec:
        _, cross = self.decoder_attn[layer]
        return RecordSpec([HookPoint(f"decoder.{layer}.cross", cross, index=1)], layer)

    def _tokens_spec(self, layer: int, target: str) -> RecordSpec:
        return RecordSpec([HookPoint(f"encoder.{layer}", self.encoder_layers[layer])], layer)

    def _vision_attention_spec(self, layer: int | None, target: str) -> RecordSpec:
        layers = range(len(self.encoder_layers)) if layer is None else [layer]
        return RecordSpec([self._encoder_attention(i) for i in layers], layer)

    def _graph_spec(self, layer: None, target: str) -> RecordSpec:
        """Encoder self-attention, then per decoder layer its self- and cross-attention."""
        points = [self._encoder_attention(i) for i in range(len(self.encoder_layers))]
        steps = [AttentionStep("image", "image")] * len(points)
        for i, (own, cross) in enumerate(self.decoder_attn):
            points += [
                HookPoint(f"decoder.{i}.self", own, index=1),
                HookPoint(f"decoder.{i}.cross", cross, index=1),
            ]
            steps += [AttentionStep("text", "text"), AttentionStep("text", "image")]
        return RecordSpec(points, None, graph=AttentionGraph(tuple(steps), "text", "image"))

    def _encoder_attention(self, i: int) -> HookPoint:
        own, _ = hf.attention_modules(self.encoder_layers[i])
        return HookPoint(f"encoder.{i}.attn", own, index=1)

    def forward(self, *args, **kwargs):
        self.prepare_texts([])

    # ------------------------------------------------------------------ generation
    def _start_id(self) -> int:
        cfg = self.model.config
        start = cfg.decoder_start_token_id
        if start is None:
            start = getattr(self.model.generation_config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError("the model's config sets no decoder_start_token_id")
        return int(start)

    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int | None, beam: int = 1):
        """Greedy (or `beam`-search) text; its length is the model's generation_config's unless `max_new_tokens`."""
        config = copy.deepcopy(self.model.generation_config)
        if max_new_tokens is not None:
            config.max_length, config.max_new_tokens = None, max_new_tokens
        config.do_sample, config.num_beams = False, beam
        ids = self.model.generate(pixel_values=pixel_values, generation_config=config)
        return ids[:1], 1

    def teacher_ids(self, text: str):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass tokenizer= to gc.load")
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.model.config.eos_token_id or self.tokenizer.eos_token_id
        ids = [self._start_id(), *body] + ([int(eos)] if eos is not None else [])
        return torch.tensor([ids], device=self.device), 1

    def max_positions(self) -> int | None:
        cfg = self.model.config.decoder
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def decoder_logits(self, pixel_values, input_ids, expand_vision_at=None):
        """Teacher-forced logits [B, T, V]; several texts of one image (`pixel_values` [1]) attend
        to it as one query block of every cross-attention (its keys and values once)."""
        index = grouping.row_images(pixel_values.shape[0], input_ids.shape[0], input_ids.device)
        groups = ImageGroups.of(index, pixel_values.shape[0])
        cross = [c for _, c in self.decoder_attn]
        with grouping.grouped(cross, groups):
            # TrOCR's attention modules return their weights only when asked for them
            out = self.model(
                pixel_values=pixel_values, decoder_input_ids=input_ids, output_attentions=True
            )
        return out.logits

    def special_ids(self) -> set[int]:
        cfg = self.model.config
        ids = set(super().special_ids()) if self.tokenizer is not None else set()
        for v in (cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id):
            if v is not None:
                ids.add(int(v))
        return ids
