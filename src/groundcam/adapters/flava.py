"""FLAVA (🤗 transformers `FlavaForPreTraining`, `FlavaModel`): a ViT image encoder, a BERT text
encoder and a single-stream multimodal encoder over `[mm-CLS, image CLS, patches, text]`.

Targets: `itm` is FlavaForPreTraining's ITM head on the multimodal CLS (explained: the match
logit; reported: the match probability); `similarity` is the contrastive logit the model computes,
`cos(image, text) * exp(logit_scale)` (reported: the cosine). A bare FlavaModel has no ITM head.

Sources (layers are 0-based in the named stack):
- `VISION_ATTENTION`: the image encoder's self-attention (attention, rollout: the image CLS row;
  not text-conditioned).
- `VISION_TOKENS`: layer k < image depth is image block k's output (encoded once per image); layer
  k >= image depth is multimodal block `k - image depth`, its image tokens (itm only). The itm
  default is the multimodal stream, whose image tokens have already read the phrase.
- `TEXT_TO_IMAGE`: a multimodal block's self-attention, text rows over image columns (itm only).
- `ATTENTION_GRAPH`: for itm, the multimodal blocks only (Chefer et al.'s rule for a single-stream
  fusion: relevance starts from the identity at the multimodal input and is read at the mm-CLS row
  that the ITM head pools; the image encoder is not chained on, as the method has no rule across
  the image-to-multimodal projection); for similarity, the image blocks, read at the image CLS.

Every map uses one geometry, image CLS then patches (prefix 1). Multimodal tensors are recorded in
that layout through taps: the mm-CLS is dropped from token activations and cross-attention columns,
and moved to the end of the joint stream for relevance (whose readout row is then -1). A tap's
output is what the model computes on with, so recorded slices carry exact gradients.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from groundcam.adapters import hf
from groundcam.adapters.base import Adapter
from groundcam.adapters.taps import Tap, route
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
from groundcam.geometry import Geometry


class FlavaAdapter(Adapter):
    family = "flava"
    targets = ("itm", "similarity")
    default_target = "itm"
    SCORES = {"itm": ITM_PROBABILITY, "similarity": COSINE_SIMILARITY}
    architectures = ("FlavaModel", "FlavaForPreTraining")
    SOURCES = (TEXT_TO_IMAGE, VISION_ATTENTION, VISION_TOKENS, ATTENTION_GRAPH)
    default_methods = {"itm": "attn-gradcam", "similarity": "gradcam"}

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        hf.prepare_instance(model)
        super().__init__(model, hf.tokenizer_of(processor, tokenizer), name, processor)
        self.flava = next(
            (
                m
                for m in model.modules()
                if all(hasattr(m, a) for a in ("image_model", "text_model", "multimodal_model"))
            ),
            None,
        )
        if self.flava is None:
            raise ValueError(f"{type(model).__name__}: no FLAVA image/text/multimodal encoders")
        self.itm_head = getattr(model, "itm_head", None)
        if self.itm_head is None:
            self.default_target = "similarity"
            self.default_methods = {"similarity": "gradcam"}
            self.missing_targets = {
                "itm": f"{type(model).__name__} has no ITM head: target 'itm' needs "
                "FlavaForPreTraining (e.g. facebook/flava-full); this model explains "
                "target 'similarity'"
            }
        self.image_blocks = hf.layer_stack(self.flava.image_model, "image")
        self.mm_blocks = hf.layer_stack(self.flava.multimodal_model, "multimodal")
        self.image_probs = [hf.attention_probs(b) for b in self.image_blocks]
        self.mm_probs = [hf.attention_probs(b) for b in self.mm_blocks]
        self.mm_cls = int(getattr(self.flava.multimodal_model, "cls_token", None) is not None)
        n = len(self.mm_blocks)
        self._cross, self._joint, self._mm_tokens = ([Tap() for _ in range(n)] for _ in range(3))

    @classmethod
    def from_pretrained(cls, source: str, processor=None, tokenizer=None, name: str = ""):
        """FlavaForPreTraining when the saved config names it (it has the ITM head), else
        FlavaModel; eager attention, and the saved processor and tokenizer."""
        import transformers

        from groundcam.model_files import pretrained

        config = pretrained(transformers.AutoConfig, source)
        arch = "FlavaForPreTraining"
        if arch not in (getattr(config, "architectures", None) or []):
            arch = "FlavaModel"
        model, processor = hf.load_pretrained(getattr(transformers, arch), source, processor)
        tokenizer = hf.load_tokenizer(source, processor, tokenizer)
        return cls(model, tokenizer=tokenizer, processor=processor, name=name or source)

    @classmethod
    def default_image_processor(cls, model: nn.Module):
        """FLAVA's preprocessing at the model's image size, its own mean and std."""
        size = hf.square(model.config.image_config.image_size)
        return hf.build_image_processor("FlavaImageProcessor", size=size, crop_size=size)

    @property
    def _depths(self) -> tuple[int, int]:
        return len(self.image_blocks), len(self.mm_blocks)

    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        return hf.pixel_values(self.processor, images, self.device)

    def prepare_texts(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.flava.text_model.config.max_position_embeddings
        return hf.text_inputs(self.tokenizer, phrases, limit, self.device)

    def token_strings(self, input_ids, attention_mask):
        return hf.token_strings(self.tokenizer, input_ids, attention_mask)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        ph, pw = hf.patch_size(self.flava.image_model.config)
        return Geometry(pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw, prefix=1)

    def table(self) -> tuple[Source, ...]:
        """Never a stack's last block where only a CLS is read after it: the ITM head pools the
        mm-CLS (the last multimodal block's text rows and image outputs get no gradient), the
        contrastive head the image CLS. Itm Grad-CAM reads the multimodal stream's image tokens
        at the input of its last block (the last image block when there is one multimodal
        block); raw image attention reads the last image block. Grad-CAM layers are the image
        blocks, then (with an ITM head) the multimodal blocks."""
        image, mm = self._depths
        tokens = tuple(range(image + (mm if self.itm_head is not None else 0)))
        return (
            Source(
                TEXT_TO_IMAGE,
                self._cross_spec,
                tuple(range(mm)),
                max(mm - 2, 0),
                targets=("itm",),
                unreachable="FLAVA's similarity (contrastive) target never passes through the "
                "multimodal encoder: use target 'itm', or a vision method (gradcam, rollout, "
                "relevance)",
            ),
            Source(VISION_ATTENTION, self._image_attention_spec, tuple(range(image)), image - 1),
            Source(
                VISION_TOKENS,
                self._tokens_spec,
                tokens,
                {"itm": image + mm - 2, "similarity": max(image - 2, 0)},
            ),
            Source(ATTENTION_GRAPH, lambda layer, target: self._graph_spec(target)),
        )

    def methods_note(self) -> str:
        image, _ = self._depths
        return (
            f"gradcam layers 0-{image - 1} are image blocks, {image}+ multimodal blocks (itm); "
            "attention/attn-gradcam read text rows of a multimodal block; relevance (itm) "
            "propagates over the multimodal blocks"
        )

    def _cross_spec(self, layer: int, target: str) -> RecordSpec:
        point = HookPoint(f"multimodal.{layer}.text_to_image", self._cross[layer])
        return RecordSpec([point], layer)

    def _tokens_spec(self, layer: int, target: str) -> RecordSpec:
        image, _ = self._depths
        if layer < image:
            point = HookPoint(f"image.{layer}", self.image_blocks[layer], 0, per_image=True)
            return RecordSpec([point], layer)
        if target != "itm":
            raise ValueError(
                f"layer {layer} is a multimodal block, which target {target!r} never "
                f"passes through: use an image layer 0-{image - 1}"
            )
        point = HookPoint(f"multimodal.{layer - image}.tokens", self._mm_tokens[layer - image])
        return RecordSpec([point], layer)

    def _image_attention_spec(self, layer: int | None, target: str) -> RecordSpec:
        image, _ = self._depths
        layers = range(image) if layer is None else [layer]
        points = [HookPoint(f"image.{i}.attn", self.image_probs[i], per_image=True) for i in layers]
        return RecordSpec(points, layer)

    def _graph_spec(self, target: str) -> RecordSpec:
        if target == "similarity":
            points = [
                HookPoint(f"image.{i}.attn", probs, per_image=True)
                for i, probs in enumerate(self.image_probs)
            ]
            steps = (AttentionStep("image", "image"),) * len(points)
            return RecordSpec(points, None, graph=AttentionGraph(steps, "image", "image"))
        points = [HookPoint(f"multimodal.{i}.joint", tap) for i, tap in enumerate(self._joint)]
        steps = (AttentionStep("joint", "joint"),) * len(points)
        graph = AttentionGraph(steps, "joint", "joint", readout_row=-1 if self.mm_cls else 0)
        return RecordSpec(points, None, graph=graph)

    def _route_multimodal(self, stack: ExitStack, n_image: int) -> None:
        """Present watched multimodal tensors in the image-CLS-first layout (see the module
        docstring); `n_image` image tokens (CLS + patches) follow the `mm_cls` token."""
        c, text = self.mm_cls, self.mm_cls + n_image

        def put_text_rows(t, seen):
            t = t.clone()
            t[:, :, text:, c:] = seen
            return t

        for i, (block, probs) in enumerate(zip(self.mm_blocks, self.mm_probs, strict=True)):
            route(stack, probs, self._cross[i], lambda t: t[:, :, text:, c:], put_text_rows)
            route(
                stack,
                probs,
                self._joint[i],
                lambda t: t.roll((-c, -c), (-2, -1)),
                lambda t, seen: seen.roll((c, c), (-2, -1)),
            )
            route(
                stack,
                block,
                self._mm_tokens[i],
                lambda h: h[:, c:],
                lambda h, seen: torch.cat([h[:, :c], seen], 1),
                index=0,
            )

    def forward(
        self, pixel_values, input_ids, attention_mask, image_index, target, expand_vision_at=None
    ):
        f = self.flava
        image = f.image_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=True,
            output_hidden_states=True,
            return_dict=True,
        )
        text = f.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            return_dict=True,
        )
        if target == "similarity":
            img = F.normalize(f.image_projection(image.last_hidden_state[:, 0]), dim=-1)
            txt = F.normalize(f.text_projection(text.last_hidden_state[:, 0]), dim=-1)
            cosine = (img.index_select(0, image_index) * txt).sum(-1)
            return Scores(cosine * f.logit_scale.exp(), cosine.detach())
        if self.itm_head is None:
            raise ValueError(self.missing_targets["itm"])
        # The multimodal encoder reads the last blocks' outputs before their final LayerNorm.
        img_mm = f.image_to_mm_projection(image.hidden_states[-1]).index_select(0, image_index)
        txt_mm = f.text_to_mm_projection(text.hidden_states[-1])
        n_image = img_mm.shape[1]
        mask = torch.cat(
            [attention_mask.new_ones(len(txt_mm), self.mm_cls + n_image), attention_mask], 1
        )
        with ExitStack() as stack:
            self._route_multimodal(stack, n_image)
            mm = f.multimodal_model(
                torch.cat([img_mm, txt_mm], 1), attention_mask=mask, return_dict=True
            )
        logits = self.itm_head(mm.last_hidden_state)
        return Scores(logits[:, 1], logits.detach().softmax(-1)[:, 1])
