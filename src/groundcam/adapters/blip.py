"""BLIP (🤗 transformers): image-text matching (ITM head or ITC cosine) and captioning.

Both models are a ViT (`vision_model`) plus a BERT whose every layer cross-attends to all image
tokens. The image is encoded once per image; the text side reads it through
`encoder_hidden_states=image_embeds.index_select(0, image_index)`, using the model's own modules.
BLIP's outputs carry no cross-attentions, so attention probabilities are recorded where they are
made: each attention core (`crossattention.self`, `attention.self`, the vision `self_attn`)
returns `(context, probs)` under eager attention, and item 1 is recorded.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from groundcam import grouping
from groundcam.adapters import hf
from groundcam.adapters.base import Adapter
from groundcam.contract import (
    ATTENTION_GRAPH,
    COSINE_SIMILARITY,
    ITM_PROBABILITY,
    TEXT_TO_IMAGE,
    TOKEN_PROBABILITY,
    VISION_ATTENTION,
    VISION_TOKENS,
    AttentionGraph,
    AttentionStep,
    HookPoint,
    RecordSpec,
    Scores,
    Source,
    middle_layer,
)
from groundcam.data.text import blip_pre_caption
from groundcam.errors import GroundcamWarning
from groundcam.geometry import Geometry
from groundcam.grouping import ImageGroups

QUERY_NAMES = ("query", "qkv", "q_proj")
BLIP_MAX_WORDS = 30  # pre_caption's cut in BLIP's retrieval sets
NO_PHRASES = (
    "BLIP captioning explains the tokens it generates: use explain_generation "
    "(pass text= to explain a given caption)"
)


def attention_cores(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Per attention of `block`, in forward order: (its path, the module that owns the query
    projection, which returns `(context, probs)`)."""
    found = []
    for name, module in block.named_modules():
        children = dict(module.named_children())
        if any(isinstance(children.get(q), nn.Linear) for q in QUERY_NAMES):
            found.append((name, module))
    if not found:
        raise ValueError(f"{type(block).__name__}: no attention module found")
    return found


def probs_point(name: str, core: nn.Module, per_image: bool = False) -> HookPoint:
    """The attention probabilities an attention core returns beside its context."""
    return HookPoint(name, core, index=1, per_image=per_image)


class _BlipBase(Adapter):
    """What the ITM and captioning models share: the vision tower, its geometry and hooks."""

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        hf.prepare_instance(model)
        super().__init__(model, hf.tokenizer_of(processor, tokenizer), name, processor)
        cfg = model.config
        self.vision_blocks = hf.layer_stack(
            model.vision_model, "vision", cfg.vision_config.num_hidden_layers
        )
        self.text_layers = hf.layer_stack(self._text(), "text", cfg.text_config.num_hidden_layers)
        self.cross = {}  # text layer -> its cross-attention core
        for i, layer in enumerate(self.text_layers):
            cross = [m for path, m in attention_cores(layer) if "cross" in path]
            if cross:
                self.cross[i] = cross[0]
        if not self.cross:
            raise ValueError(
                f"{type(model).__name__}: its text model has no cross-attention to the image "
                "(text_config.is_decoder is False), so nothing reads the image"
            )

    @classmethod
    def _model_class(cls) -> type[nn.Module]:
        import transformers

        return getattr(transformers, cls.architectures[0])

    @classmethod
    def from_pretrained(cls, source: str, processor=None, tokenizer=None, name: str = ""):
        """A saved or hub BLIP model with eager attention, and its processor."""
        model, processor = hf.load_pretrained(cls._model_class(), source, processor)
        tokenizer = hf.load_tokenizer(source, processor, tokenizer)
        return cls(model, tokenizer=tokenizer, processor=processor, name=name or source)

    @classmethod
    def default_image_processor(cls, model: nn.Module):
        """BLIP's preprocessing: a resize to the model's size, CLIP's mean and std."""
        size = hf.square(model.config.vision_config.image_size)
        return hf.build_image_processor("BlipImageProcessor", size=size)

    @property
    def _vcfg(self):
        return self.model.config.vision_config

    def _text(self) -> nn.Module:
        raise NotImplementedError

    def _encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens [n_img, 1 + h*w, C] (CLS first), position embeddings interpolated to
        the input's actual grid (a no-op at the model's own square size)."""
        out = self.model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True)
        return out.last_hidden_state

    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        return hf.pixel_values(self.processor, images, self.device)

    def token_strings(self, input_ids, attention_mask):
        return hf.token_strings(self.tokenizer, input_ids, attention_mask)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        ph, pw = hf.patch_size(self._vcfg)
        return Geometry(pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw, prefix=1)

    def _vision_points(self) -> list[HookPoint]:
        """Every vision self-attention, recorded once per image."""
        return [
            probs_point(f"vision.{i}.attn", attention_cores(block)[0][1], per_image=True)
            for i, block in enumerate(self.vision_blocks)
        ]

    def _cross_spec(self, layer: int, target: str) -> RecordSpec:
        return RecordSpec([probs_point(f"text.{layer}.cross", self.cross[layer])], layer)

    def _tokens_spec(self, layer: int, target: str) -> RecordSpec:
        block = self.vision_blocks[layer]
        return RecordSpec([HookPoint(f"vision.{layer}", block, per_image=True)], layer)

    def _vision_attention_spec(self, layer: int | None, target: str) -> RecordSpec:
        points = self._vision_points()
        return RecordSpec(points if layer is None else [points[layer]], layer, per_image=True)

    def _vision_graph(self) -> RecordSpec:
        """Relevance over the vision tower alone, read at the image CLS."""
        points = self._vision_points()
        steps = (AttentionStep("image", "image"),) * len(points)
        return RecordSpec(points, None, graph=AttentionGraph(steps, "image", "image"))

    def _text_graph(self, layer: None = None, target: str = "") -> RecordSpec:
        """Vision self-attention once per image, then per text layer its self-attention and its
        cross-attention to the image tokens; read from the text stream."""
        points = self._vision_points()
        steps = [AttentionStep("image", "image")] * len(points)
        for i, layer in enumerate(self.text_layers):
            for name, core in attention_cores(layer):
                cross = "cross" in name
                points.append(probs_point(f"text.{i}.{'cross' if cross else 'self'}", core))
                steps.append(AttentionStep("text", "image" if cross else "text"))
        return RecordSpec(points, None, graph=AttentionGraph(tuple(steps), "text", "image"))


class BlipItmAdapter(_BlipBase):
    """`BlipForImageTextRetrieval`: target `itm` (explained: the match logit `itm_score[:, 1]`;
    reported: the match probability) or `similarity` (explained and reported: the ITC cosine that
    the model itself outputs with `use_itm_head=False`; no temperature is applied)."""

    family = "blip-itm"
    targets = ("itm", "similarity")
    default_target = "itm"
    SCORES = {"itm": ITM_PROBABILITY, "similarity": COSINE_SIMILARITY}
    architectures = ("BlipForImageTextRetrieval",)
    SOURCES = (TEXT_TO_IMAGE, VISION_ATTENTION, VISION_TOKENS, ATTENTION_GRAPH)

    def _text(self) -> nn.Module:
        return self.model.text_encoder

    def prepare_texts(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP's `pre_caption` of each phrase (as its retrieval and ITM code read text), tokenised."""
        limit = self.model.config.text_config.max_position_embeddings
        texts = [self.fed_text(p) for p in phrases]
        for phrase, text in zip(phrases, texts, strict=True):
            if len(text.split()) < len(blip_pre_caption(phrase, len(phrase) + 1).split()):
                warnings.warn(
                    f"phrase truncated to BLIP's {BLIP_MAX_WORDS} words (pre_caption): {phrase[:60]!r}",
                    GroundcamWarning,
                    stacklevel=3,
                )
        return hf.text_inputs(self.tokenizer, texts, limit, self.device, shown=phrases)

    def fed_text(self, phrase: str) -> str:
        return blip_pre_caption(phrase, BLIP_MAX_WORDS)

    def table(self) -> tuple[Source, ...]:
        """Cross-attention: the middle text layer (6 of 12, LAVIS's `compute_gradcam` default
        for BLIP; never the last, whose non-CLS rows get no gradient). Vision: the last block for
        ITM (every text layer cross-attends to every image token), the one before for similarity
        (ITC reads only the image CLS, so the last block's patch outputs get zero gradient)."""
        cross = tuple(sorted(self.cross))
        vision = tuple(range(self._vcfg.num_hidden_layers))
        last = vision[-1]
        return (
            Source(
                TEXT_TO_IMAGE,
                self._cross_spec,
                cross,
                middle_layer(cross),
                targets=("itm",),
                unreachable="BLIP's similarity (ITC cosine) target never passes through a "
                "cross-attention: use target 'itm', or a vision method (gradcam, rollout, "
                "relevance)",
            ),
            Source(VISION_ATTENTION, self._vision_attention_spec, vision, last),
            Source(
                VISION_TOKENS,
                self._tokens_spec,
                vision,
                {"itm": last, "similarity": max(last - 1, 0)},
            ),
            Source(
                ATTENTION_GRAPH,
                lambda layer, target: (
                    self._vision_graph() if target == "similarity" else self._text_graph()
                ),
            ),
        )

    def methods_note(self) -> str:
        return (
            "every BLIP text layer cross-attends to the image (layers 0..L-1); similarity is "
            "BLIP's ITC cosine and only reaches the vision tower (gradcam, rollout, relevance)"
        )

    def forward(
        self, pixel_values, input_ids, attention_mask, image_index, target, expand_vision_at=None
    ):
        m = self.model
        image = self._encode_image(pixel_values)
        if target == "similarity":
            text = m.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
            img_feat = F.normalize(m.vision_proj(image[:, 0]), dim=-1).index_select(0, image_index)
            txt_feat = F.normalize(m.text_proj(text.last_hidden_state[:, 0]), dim=-1)
            cosine = (img_feat * txt_feat).sum(-1)
            return Scores(cosine, cosine.detach())
        groups = ImageGroups.of(image_index, image.shape[0])
        with grouping.grouped(self.cross.values(), groups) as on:
            text = m.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image if on else image.index_select(0, image_index),
            )
        logits = m.itm_head(text.last_hidden_state[:, 0])
        return Scores(logits[:, 1], logits.detach().softmax(-1)[:, 1])

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self._encode_image(pixel_values)
        return F.normalize(self.model.vision_proj(image[:, 0]), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = self.model
        text = m.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(m.text_proj(text.last_hidden_state[:, 0]), dim=-1)


class BlipCaptionAdapter(_BlipBase):
    """`BlipForConditionalGeneration`: one map per generated token (target `token`, its
    log-probability). Captions start with BLIP's [DEC] (bos) token, then the optional `prompt`
    (e.g. "a picture of"), then the generated text."""

    family = "blip-caption"
    targets = ("token",)
    default_target = "token"
    SCORES = {"token": TOKEN_PROBABILITY}
    architectures = ("BlipForConditionalGeneration",)
    SOURCES = (TEXT_TO_IMAGE, VISION_TOKENS, ATTENTION_GRAPH)
    default_methods = {"token": "attn-gradcam"}  # LAVIS explains BLIP with this
    prompt: str | None = None
    takes_prompt = True  # a call's prompt replaces `prompt` for that call

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        name: str = "",
        processor=None,
        prompt: str | None = None,
    ):
        super().__init__(model, tokenizer, name, processor)
        self.prompt = prompt

    def _text(self) -> nn.Module:
        return self.model.text_decoder

    def table(self) -> tuple[Source, ...]:
        """Cross-attention: the middle decoder layer (as for ITM); vision: the last block (the
        decoder cross-attends to every image token)."""
        cross = tuple(sorted(self.cross))
        vision = tuple(range(self._vcfg.num_hidden_layers))
        return (
            Source(TEXT_TO_IMAGE, self._cross_spec, cross, middle_layer(cross)),
            Source(VISION_TOKENS, self._tokens_spec, vision, vision[-1]),
            Source(ATTENTION_GRAPH, self._text_graph),
        )

    def prepare_texts(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(NO_PHRASES)

    def forward(self, *args, **kwargs) -> Scores:
        raise ValueError(NO_PHRASES)

    def _prompt_ids(self, text: str = "", prompt: str | None = None) -> torch.Tensor:
        """`[bos] prompt text [SEP]` as the decoder reads it (BLIP swaps [CLS] for [DEC])."""
        if self.tokenizer is None:
            raise ValueError("this BLIP model has no tokenizer: pass tokenizer= (or processor=)")
        prompt = self.prompt if prompt is None else prompt
        full = " ".join(s for s in (prompt or "", text) if s.strip())
        ids = self.tokenizer([full], return_tensors="pt")["input_ids"].to(self.device)
        ids[:, 0] = self.model.config.text_config.bos_token_id
        return ids

    def generate(
        self,
        pixel_values: torch.Tensor,
        max_new_tokens: int | None,
        beam: int = 1,
        prompt: str | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Greedy (or `beam`-search) caption: ids [1, T] = [bos] + prompt + generated (ending at [SEP] if reached);
        its length is the model's generation_config's unless `max_new_tokens` is given."""
        start = self._prompt_ids(prompt=prompt)  # model.generate drops the trailing [SEP] itself
        length = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        ids = self.model.generate(
            pixel_values,
            input_ids=start.clone(),
            attention_mask=torch.ones_like(start),
            do_sample=False,
            num_beams=beam,
            interpolate_pos_encoding=True,
            **length,
        )
        return ids, start.shape[1] - 1

    def teacher_ids(self, text: str, prompt: str | None = None) -> tuple[torch.Tensor, int]:
        return self._prompt_ids(text, prompt), self._prompt_ids(prompt=prompt).shape[1] - 1

    def max_positions(self) -> int | None:
        return getattr(self.model.config.text_config, "max_position_embeddings", None)

    def decoder_logits(self, pixel_values, input_ids, expand_vision_at=None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]: each image encoded once, the decoder reading it;
        several texts of one image attend to it as one query block (keys and values once)."""
        image = self._encode_image(pixel_values)
        index = grouping.row_images(image.shape[0], input_ids.shape[0], input_ids.device)
        groups = ImageGroups.of(index, image.shape[0])
        with grouping.grouped(self.cross.values(), groups) as on:
            out = self.model.text_decoder(
                input_ids=input_ids,
                encoder_hidden_states=image if on else image.index_select(0, index),
                use_cache=False,
            )
        return out.logits

    def output_head(self) -> nn.Module | None:
        return self.model.text_decoder.get_output_embeddings()

    def special_ids(self) -> set[int]:
        cfg = self.model.config.text_config
        ids = set(super().special_ids())
        for i in (cfg.bos_token_id, cfg.pad_token_id, cfg.sep_token_id, cfg.eos_token_id):
            ids.update(i if isinstance(i, list) else [i] if i is not None else [])
        return ids

    def decode(self, input_ids: list[int]) -> str:
        skip = self.special_ids()
        return self.tokenizer.decode([i for i in input_ids if i not in skip]).strip()

    def methods_note(self) -> str:
        return "per generated token: decoder cross-attention row k-1, vision Grad-CAM, relevance"
