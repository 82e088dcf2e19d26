"""ViLT (🤗 transformers `ViltForImageAndTextRetrieval`): one transformer over the joint sequence
`[text tokens, image CLS, image patches]`; the score is `rank_output` on the pooled text CLS.

Target `itm`: explained is the model's own output, the rank logit; reported is its sigmoid. The
retrieval head was fine-tuned to rank candidates (a softmax over one positive and its negatives),
so the sigmoid orders pairs like the logit but is not a calibrated match probability.

Sources (layers are 0-based joint blocks):
- `TEXT_TO_IMAGE`: a block's self-attention, text rows over the image columns (the rows are
  recorded through a tap whose output the model computes on, so gradients to them are exact).
- `VISION_TOKENS`: a block's output; Grad-CAM reads its image tokens.
- `ATTENTION_GRAPH`: every block's self-attention on the joint stream (Chefer et al.'s
  self-attention rule), read at row 0, the text CLS that the pooler reads.

ViLT draws a random order of the image tokens on every call (`visual_embed` samples with
`torch.multinomial`) and keeps at most `max_image_length` of them. The adapter embeds each image
once with the model's `visual_embed`, keeps the `patch_index` it returns, and feeds the embedded
tokens to the model (`image_embeds`); the maps' geometry places every token on its grid cell, so
the order drawn does not change a map. Cells whose patch was not kept stay 0 (which patches are
kept is random: seed torch for a reproducible subset). Pixel values are taken as unpadded.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from PIL import Image
from torch import nn

from groundcam.adapters import hf
from groundcam.adapters.base import Adapter
from groundcam.adapters.taps import Tap, route
from groundcam.contract import (
    ATTENTION_GRAPH,
    TEXT_TO_IMAGE,
    VISION_TOKENS,
    AttentionGraph,
    AttentionStep,
    HookPoint,
    RecordSpec,
    ScoreKind,
    Scores,
    Source,
)
from groundcam.geometry import Geometry
from groundcam.io import to_rgb


class ViltAdapter(Adapter):
    family = "vilt"
    targets = ("itm",)
    default_target = "itm"
    SCORES = {
        "itm": ScoreKind(
            "rank_sigmoid",
            "sigmoid of the retrieval head's rank logit: it orders pairs but is not a "
            "calibrated match probability",
        )
    }
    architectures = ("ViltForImageAndTextRetrieval",)
    SOURCES = (TEXT_TO_IMAGE, VISION_TOKENS, ATTENTION_GRAPH)
    batch_images = 1  # its processor pads images of a batch to a common size

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        hf.prepare_instance(model)
        super().__init__(model, hf.tokenizer_of(processor, tokenizer), name, processor)
        self.vilt = next(
            (m for m in model.modules() if hasattr(getattr(m, "embeddings", None), "visual_embed")),
            None,
        )
        if self.vilt is None:
            raise ValueError(f"{type(model).__name__}: no ViLT embeddings with visual_embed")
        self.blocks = hf.layer_stack(self.vilt.encoder, "joint")
        self.probs = [hf.attention_probs(b) for b in self.blocks]
        self._rows = [Tap() for _ in self.blocks]

    @classmethod
    def from_pretrained(cls, source: str, processor=None, tokenizer=None, name: str = ""):
        from transformers import ViltForImageAndTextRetrieval

        model, processor = hf.load_pretrained(ViltForImageAndTextRetrieval, source, processor)
        tokenizer = hf.load_tokenizer(source, processor, tokenizer)
        return cls(model, tokenizer=tokenizer, processor=processor, name=name or source)

    @classmethod
    def default_image_processor(cls, model: nn.Module):
        """ViLT's preprocessing: the short side resized to the model's image size (the long
        side bounded, both multiples of 32), mean and std 0.5."""
        size = model.config.image_size
        size = size if isinstance(size, int) else int(min(size))
        return hf.build_image_processor("ViltImageProcessor", size={"shortest_edge": size})

    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        """The model's preprocessing; images that it would pad to a common size are refused (the
        forward treats every pixel as valid)."""
        ip = hf.image_processor_of(self.processor)
        if ip is None:
            raise ValueError("this model has no image processor: pass processor= to gc.load")
        out = ip(images=[to_rgb(im) for im in images], return_tensors="pt")
        mask = out.get("pixel_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(
                "these images have different sizes after ViLT's resizing: explain them one "
                "image at a time"
            )
        return out["pixel_values"].to(self.device)

    def prepare_texts(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.model.config.max_position_embeddings
        return hf.text_inputs(self.tokenizer, phrases, limit, self.device)

    def token_strings(self, input_ids, attention_mask):
        return hf.token_strings(self.tokenizer, input_ids, attention_mask)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        """The patch grid alone; the forward returns the full geometry (text prefix, token
        cells), which the maps use."""
        ph, pw = hf.patch_size(self.model.config)
        return Geometry(pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw, prefix=1)

    def table(self) -> tuple[Source, ...]:
        """Defaults: the input of the last block. After it only the text CLS is read, so the
        last block's image outputs and its non-CLS attention rows get no gradient."""
        joint = tuple(range(len(self.blocks)))
        default = max(len(self.blocks) - 2, 0)
        return (
            Source(TEXT_TO_IMAGE, self._rows_spec, joint, default),
            Source(VISION_TOKENS, self._tokens_spec, joint, default),
            Source(ATTENTION_GRAPH, self._graph_spec),
        )

    def _rows_spec(self, layer: int, target: str) -> RecordSpec:
        return RecordSpec([HookPoint(f"joint.{layer}.text_rows", self._rows[layer])], layer)

    def _tokens_spec(self, layer: int, target: str) -> RecordSpec:
        return RecordSpec([HookPoint(f"joint.{layer}", self.blocks[layer], 0)], layer)

    def _graph_spec(self, layer: None, target: str) -> RecordSpec:
        points = [HookPoint(f"joint.{i}.attn", probs) for i, probs in enumerate(self.probs)]
        steps = (AttentionStep("joint", "joint"),) * len(points)
        return RecordSpec(points, None, graph=AttentionGraph(steps, "joint", "joint"))

    def forward(
        self, pixel_values, input_ids, attention_mask, image_index, target, expand_vision_at=None
    ):
        n_img, _, height, width = pixel_values.shape
        full = torch.ones(n_img, height, width, dtype=torch.long, device=pixel_values.device)
        tokens, token_mask, (patch_index, _) = self.vilt.embeddings.visual_embed(
            pixel_values, full, max_image_length=self.model.config.max_image_length
        )
        t = input_ids.shape[1]
        with ExitStack() as stack:
            for probs, tap in zip(self.probs, self._rows, strict=True):
                route(
                    stack,
                    probs,
                    tap,
                    lambda p: p[:, :, :t],
                    lambda p, seen: torch.cat([seen, p[:, :, t:]], 2),
                )
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                image_embeds=tokens.index_select(0, image_index),
                pixel_mask=token_mask.index_select(0, image_index),
            ).logits[:, 0]
        ph, pw = hf.patch_size(self.model.config)
        cells = patch_index[..., 0] * (width // pw) + patch_index[..., 1]
        geometry = Geometry(
            height // ph, width // pw, prefix=t + 1, cells=cells.index_select(0, image_index)
        )
        return Scores(logits, logits.detach().sigmoid(), geometry)
