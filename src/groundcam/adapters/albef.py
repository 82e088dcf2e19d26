"""ALBEF (our native model): ViT + BERT with cross-attention from `fusion_layer` on."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from groundcam.adapters.base import Adapter, RecordSpec, Scores
from groundcam.capture import HookPoint
from groundcam.data.text import pre_caption
from groundcam.geometry import Geometry
from groundcam.io import to_rgb
from groundcam.methods.base import (
    ATTENTION_GRAPH,
    CROSS_ATTENTION,
    SELF_ATTENTION,
    TOKENS,
    AttentionGraph,
    AttentionStep,
)
from groundcam.models.albef import AlbefModel

# The normalisation ALBEF's grounding transform uses (CLIP's statistics).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class AlbefAdapter(Adapter):
    family = "albef"
    targets = ("itm", "similarity")
    default_target = "itm"
    architectures = ("AlbefModel",)
    SOURCES = (CROSS_ATTENTION, SELF_ATTENTION, TOKENS, ATTENTION_GRAPH)
    model: AlbefModel

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
        if self.tokenizer is None:
            raise ValueError("this ALBEF model has no tokenizer: pass tokenizer= to gc.load")
        enc = self.tokenizer(
            [pre_caption(p) for p in phrases],
            padding="longest",
            truncation=True,
            max_length=self.model.config.max_position_embeddings,
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def token_strings(self, input_ids, attention_mask):
        out = []
        for ids, m in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            ids = [i for i, keep in zip(ids, m, strict=True) if keep]
            if self.tokenizer is None:
                out.append([str(i) for i in ids])
            else:
                out.append(self.tokenizer.convert_ids_to_tokens(ids))
        return out

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        p = self.model.config.patch_size
        return Geometry(pixel_values.shape[-2] // p, pixel_values.shape[-1] // p, prefix=1)

    def layers(self, source: str) -> list[int]:
        cfg = self.model.config
        if source == CROSS_ATTENTION:  # ALBEF's `block_num`: absolute index into the text layers
            return list(range(cfg.fusion_layer, cfg.text_layers))
        if source == ATTENTION_GRAPH:
            return []
        return list(range(cfg.vision_depth))

    def default_layer(self, source: str, target: str) -> int:
        """A middle fusion layer (8 of 12 in the released models; never the last, whose
        non-CLS rows get no gradient). Vision: the last block for ITM (the fusion layers read
        every image token), the one before for similarity (ITC reads only the image CLS, so the
        last block's patch outputs get exactly zero gradient)."""
        cfg = self.model.config
        if source == CROSS_ATTENTION:
            return cfg.fusion_layer + (cfg.text_layers - cfg.fusion_layer - 1) // 2
        if source == TOKENS and target == "similarity":
            return max(cfg.vision_depth - 2, 0)
        return cfg.vision_depth - 1

    def record_spec(self, source: str, layer: int | None, target: str = "") -> RecordSpec:
        vit, text = self.model.visual_encoder, self.model.text_encoder
        if source == ATTENTION_GRAPH:
            return self._graph_spec(target)
        if source == CROSS_ATTENTION:
            mod = text.encoder.layer[layer].crossattention.self.probs
            return RecordSpec([HookPoint(f"text.{layer}.cross", mod)], layer)
        if source == TOKENS:
            return RecordSpec(
                [HookPoint(f"vision.{layer}", vit.blocks[layer])], layer, expand_vision_at=layer
            )
        layers = self.layers(source) if layer is None else [layer]
        points = [HookPoint(f"vision.{i}.attn", vit.blocks[i].attn.probs) for i in layers]
        return RecordSpec(points, layer, per_image=True)

    def _graph_spec(self, target: str) -> RecordSpec:
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

    def check(self, source: str, target: str) -> None:
        if target == "similarity" and source == CROSS_ATTENTION:
            raise ValueError(
                "ALBEF's similarity (ITC) target never passes through the fusion layers: "
                "use target 'itm', or a vision method (gradcam, rollout)"
            )

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
