"""CLIP (a dual encoder): the explained score of a pair is the logit CLIPModel itself outputs,
`logits_per_image[i, t] = exp(logit_scale) * cos(image i, text t)`; the reported score is the
cosine. Only the vision tower is explained (the score reads the image through its CLS token), so
no method here is text-conditioned except through the gradient of that logit.

Layer stacks are found by structure: the longest `nn.ModuleList` under `vision_model` holds the
vision blocks; in a block the outermost module of an attention class returns `(output, probs)`
under eager attention, and its first LayerNorm is what the block reads its input through.

Grad-CAM layer `i` is block `i`'s output *as the next block reads it*, after that block's first
LayerNorm (`layers[i + 1].layer_norm1`), as pytorch-grad-cam's CLIP example does for the last
block. The last block's own output is not offered: CLIP's score reads only its CLS token, so its
patch tokens get exactly zero gradient (DESIGN.md §4)."""

from __future__ import annotations

import contextlib

import torch
from PIL import Image
from torch import nn

from groundcam.adapters import hf
from groundcam.adapters.base import Adapter
from groundcam.contract import (
    ATTENTION_GRAPH,
    COSINE_SIMILARITY,
    VISION_ATTENTION,
    VISION_TOKENS,
    AttentionGraph,
    AttentionStep,
    HookPoint,
    RecordSpec,
    Scores,
    Source,
)
from groundcam.geometry import Geometry


def pooled(out) -> torch.Tensor:
    """The projected embedding `get_*_features` returns (a tensor, or since transformers 5 an
    output whose `pooler_output` holds it)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def first_norm(block: nn.Module) -> nn.Module:
    """The LayerNorm a pre-norm block reads its input through (before its attention)."""
    norm = getattr(block, "layer_norm1", None)
    if norm is None:
        norm = next((m for m in block.children() if isinstance(m, nn.LayerNorm)), None)
    if norm is None:
        raise ValueError(f"{type(block).__name__}: no input LayerNorm found")
    return norm


class ClipAdapter(Adapter):
    family = "clip"
    targets = ("similarity",)
    default_target = "similarity"
    SCORES = {"similarity": COSINE_SIMILARITY}
    architectures = ("CLIPModel",)
    SOURCES = (VISION_TOKENS, VISION_ATTENTION, ATTENTION_GRAPH)
    default_methods = {"similarity": "gradcam"}
    prefix = 1  # the CLS token before the patches
    padding: str | bool = "longest"  # the text tower pools the EOS token, wherever it is

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        super().__init__(hf.prepare_instance(model), hf.tokenizer_of(processor, tokenizer), name)
        self.processor = processor
        self.vision = model.vision_model
        self.blocks = hf.layer_stack(self.vision, "vision")
        self.attentions = [hf.attention_modules(b)[0] for b in self.blocks]
        self.readers = self._token_readers()

    @classmethod
    def from_pretrained(
        cls, source: str, processor=None, tokenizer=None, name: str = ""
    ) -> ClipAdapter:
        """Load with eager attention; the tokenizer comes from the processor when not given."""
        import transformers

        model_class = getattr(transformers, cls.architectures[0])
        model, processor = hf.load_pretrained(model_class, source, processor)
        tokenizer = hf.load_tokenizer(source, processor, tokenizer)
        return cls(model, tokenizer=tokenizer, name=name or source, processor=processor)

    @classmethod
    def default_image_processor(cls, model: nn.Module):
        """CLIP's preprocessing at the model's image size: resize the short side, centre crop,
        CLIP's mean and std (the processor's defaults)."""
        size = hf.square(model.config.vision_config.image_size)
        return hf.build_image_processor(
            "CLIPImageProcessor", size={"shortest_edge": size["height"]}, crop_size=size
        )

    def _token_readers(self) -> list[nn.Module]:
        """Per Grad-CAM layer i, the module whose output is block i's tokens as they are read."""
        return [first_norm(b) for b in self.blocks[1:]]

    # ------------------------------------------------------------------ inputs and geometry
    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        return hf.pixel_values(self.processor, images, self.device)

    def prepare_texts(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        max_length = self.model.config.text_config.max_position_embeddings
        return hf.text_inputs(self.tokenizer, phrases, max_length, self.device, self.padding)

    def token_strings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[list[str]]:
        return hf.token_strings(self.tokenizer, input_ids, attention_mask)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        p_h, p_w = hf.patch_size(self.model.config.vision_config)
        return Geometry(pixel_values.shape[-2] // p_h, pixel_values.shape[-1] // p_w, self.prefix)

    # ------------------------------------------------------------------ layers
    def table(self) -> tuple[Source, ...]:
        """Grad-CAM: the last layer whose patch tokens reach the score (for CLIP the input of
        the last block). Attention: the last block, whose CLS row the pooled output reads. A dual
        encoder's score never passes through a cross-attention: there is none."""
        readers = tuple(range(len(self.readers)))
        blocks = tuple(range(len(self.blocks)))
        rows = [Source(VISION_TOKENS, self._tokens_spec, readers, readers[-1])]
        if VISION_ATTENTION in self.SOURCES:
            rows.append(Source(VISION_ATTENTION, self._attention_spec, blocks, blocks[-1]))
        rows.append(Source(ATTENTION_GRAPH, lambda layer, target: self._graph_spec()))
        return tuple(rows)

    def _tokens_spec(self, layer: int, target: str) -> RecordSpec:
        point = HookPoint(f"vision.{layer}", self.readers[layer], per_image=True)
        return RecordSpec([point], layer, per_image=True)

    def _attention_spec(self, layer: int | None, target: str) -> RecordSpec:
        layers = range(len(self.blocks)) if layer is None else [layer]
        return RecordSpec([self._attention_point(i) for i in layers], layer, per_image=True)

    def _attention_point(self, i: int) -> HookPoint:
        return HookPoint(f"vision.{i}.attn", self.attentions[i], index=1, per_image=True)

    def _graph_spec(self) -> RecordSpec:
        """Relevance over every vision self-attention (once per image), read from the CLS row."""
        points = [self._attention_point(i) for i in range(len(self.blocks))]
        steps = (AttentionStep("image", "image"),) * len(points)
        graph = AttentionGraph(steps, "image", "image")
        return RecordSpec(points, None, per_image=True, graph=graph)

    def methods_note(self) -> str:
        return (
            "attention and rollout read the vision CLS row (not text-conditioned); gradcam layer i "
            "is block i's output after the next block's first LayerNorm (the last block's patch "
            "outputs never reach CLIP's score); score: the model's logit exp(logit_scale)*cosine, "
            "reported as the cosine"
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor,
        target: str,
        expand_vision_at: int | None = None,
    ) -> Scores:
        """Each image and each text encoded once; pair b scores image `image_index[b]` with text
        b from the model's own logit matrix."""
        size = self.model.config.vision_config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        with self._forward_hooks():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                interpolate_pos_encoding=tuple(pixel_values.shape[-2:]) != size,
            )
        pairs = torch.arange(input_ids.shape[0], device=input_ids.device)
        image_index = image_index.to(input_ids.device)
        logits = out.logits_per_image[image_index, pairs]
        return Scores(logits, self._reported(out, image_index, logits.detach()))

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.model.config.vision_config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        out = self.model.get_image_features(
            pixel_values=pixel_values,
            interpolate_pos_encoding=tuple(pixel_values.shape[-2:]) != size,
        )
        return nn.functional.normalize(pooled(out), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return nn.functional.normalize(pooled(out), dim=-1)

    def _forward_hooks(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _reported(self, out, image_index: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The cosine similarity of the pair (the logit without its scale)."""
        return (out.image_embeds[image_index] * out.text_embeds).sum(-1).detach()
