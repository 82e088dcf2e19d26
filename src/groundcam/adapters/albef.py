"""ALBEF (our native model): ViT + BERT with cross-attention from `fusion_layer` on."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from groundcam.adapters import hf
from groundcam.adapters.base import Adapter
from groundcam.contract import (
    ATTENTION_GRAPH,
    COSINE_SIMILARITY,
    ITM_PROBABILITY,
    TEXT_TO_IMAGE,
    VISION_ATTENTION,
    VISION_TOKENS,
    AttentionGraph,
    AttentionStep,
    HookPoint,
    RecordSpec,
    Scores,
    Source,
)
from groundcam.data.text import pre_caption
from groundcam.errors import GroundcamWarning
from groundcam.geometry import Geometry
from groundcam.io import to_rgb
from groundcam.models.albef import AlbefModel

MAX_WORDS = 30  # pre_caption's cut in ALBEF's grounding code
# The normalisation ALBEF's grounding transform uses (CLIP's statistics).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class AlbefAdapter(Adapter):
    family = "albef"
    targets = ("itm", "similarity")
    default_target = "itm"
    SCORES = {"itm": ITM_PROBABILITY, "similarity": COSINE_SIMILARITY}
    architectures = ("AlbefModel",)
    SOURCES = (TEXT_TO_IMAGE, VISION_ATTENTION, VISION_TOKENS, ATTENTION_GRAPH)
    model: AlbefModel

    def __init__(self, model: AlbefModel, tokenizer=None, name: str = "", processor=None):
        super().__init__(model, hf.tokenizer_of(processor, tokenizer), name, processor)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        processor=None,
        tokenizer=None,
        name: str = "",
        num_heads: int = 12,
        text_num_heads: int = 12,
    ) -> AlbefAdapter:
        """A saved directory (config.json with model_type "albef", safetensors, tokenizer), or an
        official ALBEF checkpoint file (`num_heads`/`text_num_heads`: its head counts, which the
        tensors do not tell)."""
        path = Path(source)
        if path.is_dir():
            net = AlbefModel.from_pretrained(path)
            tokenizer = hf.tokenizer_of(processor, tokenizer) or hf.tokenizer_from_directory(path)
            return cls(net, tokenizer, name=name or source)
        from groundcam.models.albef_checkpoint import load_official

        net = load_official(path, num_heads=num_heads, text_num_heads=text_num_heads)
        return cls(net, tokenizer, name=name or source, processor=processor)

    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Bicubic resize to the model's resolution, [0, 1], then ALBEF's mean/std."""
        size = self.model.config.image_size
        arrays = [
            np.asarray(to_rgb(im).resize((size, size), Image.BICUBIC), dtype=np.float32)
            for im in images
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        return x.to(self.device)

    def prepare_texts(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ALBEF's `pre_caption` of each phrase, tokenised (too long: truncated, with a warning)."""
        if self.tokenizer is None:
            raise ValueError("this ALBEF model has no tokenizer: pass tokenizer= to gc.load")
        limit = self.model.config.max_position_embeddings
        texts = []
        for phrase in phrases:
            words = pre_caption(phrase, max_words=len(phrase) + 1).split()
            if len(words) > MAX_WORDS:
                warnings.warn(
                    f"phrase truncated to ALBEF's {MAX_WORDS} words (pre_caption): {phrase[:60]!r}",
                    GroundcamWarning,
                    stacklevel=3,
                )
            texts.append(pre_caption(phrase, MAX_WORDS))
        return hf.text_inputs(self.tokenizer, texts, limit, self.device, shown=phrases)

    def fed_text(self, phrase: str) -> str:
        return pre_caption(phrase, MAX_WORDS)

    def token_strings(self, input_ids, attention_mask):
        return hf.token_strings(self.tokenizer, input_ids, attention_mask)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        p = self.model.config.patch_size
        return Geometry(pixel_values.shape[-2] // p, pixel_values.shape[-1] // p, prefix=1)

    def table(self) -> tuple[Source, ...]:
        """Cross-attention: ALBEF's `block_num`, an absolute index into the text layers, from the
        fusion layer on; the default is a middle fusion layer (8 of 12 in the released models;
        never the last, whose non-CLS rows get no gradient). Vision Grad-CAM: the last block for
        ITM (the fusion layers read every image token), the one before for similarity (ITC reads
        only the image CLS, so the last block's patch outputs get exactly zero gradient)."""
        cfg = self.model.config
        fusion = tuple(range(cfg.fusion_layer, cfg.text_layers))
        vision = tuple(range(cfg.vision_depth))
        last = cfg.vision_depth - 1
        return (
            Source(
                TEXT_TO_IMAGE,
                self._cross_spec,
                fusion,
                cfg.fusion_layer + (cfg.text_layers - cfg.fusion_layer - 1) // 2,
                targets=("itm",),
                unreachable="ALBEF's similarity (ITC) target never passes through the fusion "
                "layers: use target 'itm', or a vision method (gradcam, rollout)",
            ),
            Source(VISION_ATTENTION, self._vision_attention_spec, vision, last),
            Source(
                VISION_TOKENS,
                self._tokens_spec,
                vision,
                {"itm": last, "similarity": max(last - 1, 0)},
            ),
            Source(ATTENTION_GRAPH, self._graph_spec),
        )

    def _cross_spec(self, layer: int, target: str) -> RecordSpec:
        mod = self.model.text_encoder.encoder.layer[layer].crossattention.self.probs
        return RecordSpec([HookPoint(f"text.{layer}.cross", mod)], layer)

    def _tokens_spec(self, layer: int, target: str) -> RecordSpec:
        block = self.model.visual_encoder.blocks[layer]
        return RecordSpec([HookPoint(f"vision.{layer}", block)], layer, expand_vision_at=layer)

    def _vision_attention_spec(self, layer: int | None, target: str) -> RecordSpec:
        blocks = self.model.visual_encoder.blocks
        layers = range(len(blocks)) if layer is None else [layer]
        points = [HookPoint(f"vision.{i}.attn", blocks[i].attn.probs) for i in layers]
        return RecordSpec(points, layer, per_image=True)

    def _graph_spec(self, layer: None, target: str) -> RecordSpec:
        """Vision self-attention (once per image), then per text layer its self-attention and,
        in fusion layers, its cross-attention to the image. ITC reads only the vision side."""
        vit, text = self.model.visual_encoder, self.model.text_encoder
        points = [
            HookPoint(f"vision.{i}.attn", b.attn.probs, per_image=True)
            for i, b in enumerate(vit.blocks)
        ]
        steps = [AttentionStep("image", "image")] * len(points)
        if target == "similarity":
            return RecordSpec(points, None, graph=AttentionGraph(tuple(steps), "image", "image"))
        for i, layer in enumerate(text.encoder.layer):
            points.append(HookPoint(f"text.{i}.self", layer.attention.self.probs))
            steps.append(AttentionStep("text", "text"))
            if layer.crossattention is not None:
                points.append(HookPoint(f"text.{i}.cross", layer.crossattention.self.probs))
                steps.append(AttentionStep("text", "image"))
        return RecordSpec(points, None, graph=AttentionGraph(tuple(steps), "text", "image"))

    def forward(
        self, pixel_values, input_ids, attention_mask, image_index, target, expand_vision_at=None
    ):
        m = self.model
        if expand_vision_at is not None:
            image = m.encode_image(pixel_values, image_index, expand_vision_at)
            index = None
        else:
            image, index = m.encode_image(pixel_values), image_index
        text = m.text_encoder.encode_text(input_ids, attention_mask)
        if target == "similarity":
            img_feat, txt_feat = m.itc_from(image, text)
            if index is not None:
                img_feat = img_feat.index_select(0, index)
            cosine = (img_feat * txt_feat).sum(-1)
            return Scores(cosine / m.temp, cosine.detach())
        logits = m.itm_from(image, text, attention_mask, index)
        return Scores(logits[:, 1], logits.detach().softmax(-1)[:, 1])

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.model
        return torch.nn.functional.normalize(
            m.vision_proj(m.encode_image(pixel_values)[:, 0]), dim=-1
        )

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = self.model
        text = m.text_encoder.encode_text(input_ids, attention_mask)
        return torch.nn.functional.normalize(m.text_proj(text[:, 0]), dim=-1)
