"""Shared plumbing for generative VLMs (transformers image-text-to-text models: an image encoder
whose tokens are spliced into a decoder language model's sequence). A new family is one module
subclassing `VlmAdapter` (`family`, `architectures`, `template` for processors without a chat
template, `per_token_inputs` that `generate()` extends per token, `default_depth`, and
`image_tokens`: where its image tokens sit, read through `token_layout`) plus one registry entry
in `adapters/__init__.py` (see `adapters/llava.py`); everything else is here.

- Inputs: images and the prompt through the processor. The prompt is written into the
  processor's chat template when it has one, else into the family's `template`; a prompt that
  already holds the image placeholder (one per image) is used as it is. `prompt=None` is the
  family's `default_prompt` (`DEFAULT_PROMPT` unless it knows better).
- Image tokens: the positions holding `config.image_token_id` (never a constant).
- Layers by structure: `model.get_decoder().layers[i].self_attn`, the LM head
  `model.get_output_embeddings()`; token k is scored by the logits at row k-1.
- Attention is recorded without switching the model to eager: inside `eager_only`, the language
  model runs the attention implementation `groundcam-record` (registered with transformers'
  `AttentionInterface` and `AttentionMaskInterface`), which runs eager attention for the recorded
  modules and sdpa for every other one, with the eager (additive) mask; on exit the configs'
  implementations are put back exactly, even after an error. A model that already runs eager is
  left alone.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from PIL import Image
from torch import nn

from groundcam.adapters import hf
from groundcam.adapters.base import Adapter
from groundcam.contract import (
    ATTENTION_GRAPH,
    LM_TOKENS,
    PHRASE_LOG_LIKELIHOOD,
    TEXT_TO_IMAGE,
    TOKEN_LOGITS,
    TOKEN_PROBABILITY,
    HookPoint,
    RecordSpec,
    Source,
    TokenLayout,
)
from groundcam.errors import InputError
from groundcam.geometry import Geometry
from groundcam.io import to_rgb

DEFAULT_PROMPT = "Describe the image."
RECORD_IMPL = "groundcam-record"
_EAGER: dict[nn.Module, object] = {}  # attention module -> its family's eager function


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention (weights returned) for the modules being recorded, sdpa for the rest."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = _EAGER.get(module)
    if eager is not None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RECORD_IMPL, _recording_attention)
    AttentionMaskInterface.register(RECORD_IMPL, eager_mask)


_register()


def eager_function(module: nn.Module):
    """The eager attention function of `module`'s own model file (it repeats grouped keys and
    values as that family does), or a one-line error saying which methods still work."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise InputError(
            f"{type(module).__name__}: its model code defines no eager attention to record "
            "weights from; methods gradcam and logit-lens still work on this model"
        )
    return fn


def _configs(root: nn.Module) -> list:
    """Every distinct config object the modules under `root` read their attention from."""
    seen: dict[int, object] = {}
    for m in root.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            stack = [cfg]
            while stack:
                c = stack.pop()
                if id(c) in seen:
                    continue
                seen[id(c)] = c
                stack += [
                    getattr(c, k) for k in getattr(c, "sub_configs", {}) if getattr(c, k, None)
                ]
    return list(seen.values())


@contextmanager
def eager_only(decoder: nn.Module, modules: Iterable[nn.Module]):
    """While open, `modules` (attention modules of `decoder`) run eager attention and return
    their weights, every other attention of `decoder` its sdpa; yields a note of what ran. The
    configs' attention implementations are restored on exit, whatever happened."""
    modules = list(modules)
    configs = _configs(decoder)
    before = [c._attn_implementation_internal for c in configs]
    if not modules or all(b == "eager" for b in before):
        yield "the model runs eager attention; nothing was switched"
        return
    fns = {m: eager_function(m) for m in modules}
    try:
        _EAGER.update(fns)
        for c in configs:
            c._attn_implementation_internal = RECORD_IMPL
        kinds = sorted({str(b) for b in before})
        yield (
            f"eager attention in the recorded layers only; the other layers ran sdpa (the "
            f"model's own: {', '.join(kinds)}), restored afterwards"
        )
    finally:
        for c, b in zip(configs, before, strict=True):
            c._attn_implementation_internal = b
        for m in fns:
            _EAGER.pop(m, None)


def attention_implementations(model: nn.Module) -> list:
    """The attention implementation of every config of `model` (to check nothing changed)."""
    return [c._attn_implementation_internal for c in _configs(model)]


class LogitLens(nn.Module):
    """The LM head's rows for chosen tokens applied at every position: [1, T, C] -> [K, T]
    (token k's logit at each position). Recorded as the logit lens's source."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = [head]  # a list: not a submodule (the model owns it)

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        bias = None if getattr(head, "bias", None) is None else head.bias[token_ids]
        out = nn.functional.linear(hidden[0], head.weight[token_ids], bias)  # [T, K]
        return out.transpose(0, 1).float()


class VlmAdapter(Adapter):
    """A generative VLM: prompt + images in, text out, one map per generated token."""

    targets = ("token", "phrase")  # each generated token; a given phrase's log-likelihood
    default_target = "token"
    SCORES = {"token": TOKEN_PROBABILITY, "phrase": PHRASE_LOG_LIKELIHOOD}
    SOURCES = (TEXT_TO_IMAGE, LM_TOKENS, TOKEN_LOGITS, ATTENTION_GRAPH)
    # the methods table (benchmarks/results/methods_table.md): on vlm-tiny-shapes (a LLaVA)
    # attn-gradcam puts 86% [84-88] of generated object words in their box, the next best 80%
    default_methods = {"token": "attn-gradcam", "phrase": "attn-gradcam"}
    takes_prompt = True
    images_per_generation = 1
    videos = False  # whether the family reads videos (`video_inputs`, `groundcam.video`)
    batch_images = 1  # an evaluation's phrase maps are placed on each image's own shape
    vlm = True  # generation runs through `groundcam.generation`'s VLM path
    template: str | None = None  # "{image}" and "{prompt}"; used when no chat template
    per_token_inputs: Mapping[str, int] = {}  # side inputs generate() extends: key -> pad value
    default_depth = 0.5  # default layer as a fraction of the LM's depth (the evidence's)
    default_prompt = DEFAULT_PROMPT  # the prompt when none is given (a family may know better)

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        if processor is None:
            raise InputError(
                f"{type(model).__name__}: pass processor= (the model's AutoProcessor) to gc.load"
            )
        super().__init__(model.eval(), hf.tokenizer_of(processor, tokenizer), name, processor)
        self.decoder = self.language_decoder(model)
        self.lm_layers = self.decoder.layers
        self.attn = [layer.self_attn for layer in self.lm_layers]
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Module) or getattr(head, "weight", None) is None:
            raise ValueError(f"{type(model).__name__}: no language-model head found")
        self.lens = LogitLens(head)
        image_id = getattr(model.config, "image_token_id", None)
        if image_id is None:
            raise ValueError(f"{type(model).__name__}: its config names no image_token_id")
        self.image_token_id = int(image_id)

    def language_decoder(self, model: nn.Module) -> nn.Module:
        """The language model's decoder (the module holding `layers`), found by structure."""
        return model.get_decoder()

    @classmethod
    def from_pretrained(cls, source, processor=None, tokenizer=None, name=""):
        """A saved or hub model (no remote code, the model's own attention) and its processor."""
        import transformers

        from groundcam.adapters.vlm_compat import load_processor
        from groundcam.model_files import pretrained

        model_class = getattr(transformers, cls.architectures[0])
        if len(cls.architectures) > 1:  # a family of several classes: the one the config names
            model_class = transformers.AutoModelForImageTextToText
        model = pretrained(model_class, source)
        processor = processor if processor is not None else load_processor(source)
        return cls(model, tokenizer=tokenizer, processor=processor, name=name or source)

    # ------------------------------------------------------------------ inputs
    def placeholder(self) -> str:
        """The text the processor expands into a run of image tokens."""
        text = getattr(self.processor, "image_token", None)  # may be an AddedToken
        return str(text) if text else self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def video_placeholder(self) -> str:
        """The text the processor expands into a video's tokens (config.video_token_id)."""
        return self.tokenizer.convert_ids_to_tokens(int(self.model.config.video_token_id))

    def prompt_text(self, prompt: str | None, images: int, video: bool = False) -> str:
        """The text the processor reads: `prompt` (default `default_prompt`) in the chat
        template or the family's template, or as given when it holds the image placeholders
        (`video`: one video's placeholder instead of `images` images')."""
        prompt = self.default_prompt if prompt is None else prompt
        mark, kind = (self.video_placeholder(), "video") if video else (self.placeholder(), "image")
        given = prompt.count(mark)
        if given:
            if given != images:
                raise InputError(
                    f"prompt holds {given} {kind} placeholder(s) {mark!r} for {images} {kind}(s): "
                    f"give one per {kind}, or none to let the template place them"
                )
            return prompt
        if getattr(self.processor, "chat_template", None):
            content = [{"type": kind}] * images + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        if self.template is None:
            raise InputError(
                f"prompt {prompt[:60]!r} has no image placeholder {mark!r}, and this processor "
                "has no chat template to place the image: write one placeholder per image"
            )
        return self.template.format(image=mark * images, prompt=prompt)

    def inputs(self, images: Sequence[Image.Image], prompt: str | None) -> dict[str, torch.Tensor]:
        """The model inputs of the prompt and images (the processor's own expansion)."""
        text = self.prompt_text(prompt, len(images))
        bos = getattr(self.tokenizer, "bos_token", None)
        # a chat template that writes BOS (Gemma 3): the tokenizer must not add a second one
        extra = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        try:
            enc = self.processor(
                images=[to_rgb(im) for im in images], text=[text], return_tensors="pt", **extra
            )
        except (ValueError, TypeError) as e:
            raise InputError(f"the processor refused the prompt and images: {e}") from None
        return {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def video_inputs(self, video, prompt: str | None) -> dict[str, torch.Tensor]:
        """The model inputs of the prompt and one `groundcam.video.Video`: the frames prepared
        by `video_features`, the text expanded by the processor itself; a video longer than the
        model reads is one line."""
        if not self.videos:
            raise InputError(
                f"the {self.family} family reads images, not videos: video frames are read by "
                "qwen-vl (Qwen2/2.5/3-VL) and llava-onevision"
            )
        from groundcam.adapters.vlm_compat import with_frames

        most = getattr(getattr(self.processor, "video_processor", None), "max_frames", None)
        if isinstance(most, int) and len(video) > most:
            raise InputError(
                f"{video.name}: {len(video)} frames, the processor reads at most {most}: "
                "keep fewer (frames=N, CLI --frames N)"
            )
        features, sizes = self.video_features(video)
        processor = with_frames(self.processor, features, video.metadata(), **sizes)
        text = self.prompt_text(prompt, 1, video=True)
        try:
            enc = processor(videos=[video.frames], text=[text], return_tensors="pt")
        except (ValueError, TypeError) as e:
            raise InputError(f"the processor refused the prompt and video: {e}") from None
        limit = self.max_positions()
        if limit is not None and enc["input_ids"].shape[1] > limit:
            raise InputError(
                f"{video.name}: {len(video)} frames make {enc['input_ids'].shape[1]} tokens with "
                f"the prompt; this model reads at most {limit}: keep fewer frames (frames=N, CLI "
                "--frames N)"
            )
        return {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def video_features(self, video) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """A video's model inputs (`groundcam.video`) and the sizes the processor's text
        expansion reads off its video slot: the family hook of `video_inputs`."""
        raise NotImplementedError

    def video_layout(self, inputs, ids: torch.Tensor, video) -> tuple[TokenLayout, list[int]]:
        """Where a video's tokens sit (one layout image per map) and, per frame, which of those
        maps is the frame's: the family hook of `video_inputs`."""
        raise NotImplementedError

    def prepare_images(self, images: list[Image.Image]) -> torch.Tensor:
        return hf.pixel_values(self.processor, images, self.device)

    def prepare_texts(self, phrases):
        raise InputError(
            f"the {self.family} family explains the text it writes: use "
            "explain_generation(image, prompt=...) (CLI: groundcam caption IMAGE --prompt ...)"
        )

    def forward(self, *args, **kwargs):
        self.prepare_texts([])

    def token_strings(self, input_ids, attention_mask):
        return hf.token_strings(self.tokenizer, input_ids, attention_mask)

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        """The working grid of one prepared image (maps of generated tokens are placed through
        `token_layout`; this serves callers that ask for a grid)."""
        p = hf.patch_size(self.model.config.vision_config)
        return Geometry(pixel_values.shape[-2] // p[0], pixel_values.shape[-1] // p[1], 0)

    # ------------------------------------------------------------------ generation
    def generate(self, inputs, max_new_tokens, beam: int = 1):
        """Greedy (or `beam`) text after the prompt: ids [1, T] (prompt first) and the first
        generated position; the length is the generation_config's unless `max_new_tokens`."""
        config = copy.deepcopy(self.model.generation_config)
        if max_new_tokens is not None:
            config.max_length, config.max_new_tokens = None, max_new_tokens
        config.do_sample, config.num_beams = False, beam
        # an image token in the answer would take image features in the teacher-forced forward
        config.suppress_tokens = [*(config.suppress_tokens or []), *self.media_ids()]
        ids = self.model.generate(**inputs, generation_config=config)
        return ids[:1], inputs["input_ids"].shape[1]

    def teacher_ids(self, inputs, text: str):
        """`text` after the prompt, as if generated: ids [1, T] and the first text position."""
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = inputs["input_ids"]
        ids = torch.cat([prompt, torch.tensor([body], dtype=prompt.dtype, device=prompt.device)], 1)
        return ids, prompt.shape[1]

    def max_positions(self) -> int | None:
        return getattr(self.decoder.config, "max_position_embeddings", None)

    def teacher_inputs(self, inputs, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inputs of one teacher-forced forward over `ids` (prompt + text): the mask and the
        family's per-token side inputs extended as `generate()` extends them."""
        n = ids.shape[1] - inputs["input_ids"].shape[1]
        out = dict(inputs, input_ids=ids)
        for key, pad in {"attention_mask": 1, **self.per_token_inputs}.items():
            if key in out:
                t = out[key]
                out[key] = torch.cat([t, t.new_full((t.shape[0], n), pad)], 1)
        return out

    def image_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The sequence positions of the image tokens (config.image_token_id), in order."""
        return torch.nonzero(ids[0] == self.image_token_id)[:, 0].cpu()

    def token_layout(
        self,
        inputs: Mapping[str, torch.Tensor] | torch.Tensor,
        input_ids: torch.Tensor | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> TokenLayout:
        """Where every image token of `input_ids` sits (image, tile and cell per position): the
        family hook. `inputs`: the processor's output (pixel values and side inputs such as
        `image_grid_thw` or `image_sizes`; bare pixel values are accepted); `sizes`: the original
        images' (H, W), which crops and tiles are placed on."""
        if input_ids is None or sizes is None:
            raise ValueError(f"the {self.family} layout needs the input ids and the image sizes")
        if isinstance(inputs, torch.Tensor):
            inputs = {"pixel_values": inputs}
        return self.image_tokens(inputs, input_ids, list(sizes))

    def image_tokens(
        self, inputs: Mapping[str, torch.Tensor], ids: torch.Tensor, sizes: list[tuple[int, int]]
    ) -> TokenLayout:
        """`token_layout` of one family (with its arguments checked): what a family declares."""
        raise NotImplementedError

    def lm_columns(self, ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The LM sequence positions whose values make the maps: by default the layout's own
        (its cells are LM tokens); a family whose LM reads queries says which positions."""
        return layout.positions

    def composition(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, str] | None:
        """How values over `lm_columns` reach the layout's cells: a `[columns, cells]` matrix and
        a note saying what it is, or None where the columns are the cells (every family whose
        image tokens sit on the image)."""
        return None

    def relevance_below(self) -> tuple[list[str], list[nn.Module]] | None:
        """Attention modules below the LM that `relevance` goes on through (their kinds and the
        modules, forward order), or None where the LM's image tokens are the cells."""
        return None

    def media_ids(self) -> list[int]:
        """The ids that stand for image (and video) features, never text."""
        video = getattr(self.model.config, "video_token_id", None)
        return [self.image_token_id] + ([int(video)] if video is not None else [])

    def special_ids(self) -> set[int]:
        ids = set(super().special_ids())
        ids.update(self.media_ids())
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return {int(i) for i in ids}

    # ------------------------------------------------------------------ layers
    def default_lm_layer(self) -> int:
        """`default_depth` of the LM, never its last layer when there are two or more."""
        n = len(self.lm_layers)
        return max(0, min(round(self.default_depth * n), n - 2))

    def table(self) -> tuple[Source, ...]:
        """Decoder self-attention rows over the image columns and LM hidden states, at every
        layer (default: `default_lm_layer`); the logit lens at the last."""
        layers = tuple(range(len(self.lm_layers)))
        mid = self.default_lm_layer()
        return (
            Source(TEXT_TO_IMAGE, self._attention_spec, layers, mid),
            Source(LM_TOKENS, self._tokens_spec, layers, mid),
            Source(TOKEN_LOGITS, self._lens_spec, layers[-1:], layers[-1]),
            Source(ATTENTION_GRAPH, self._graph_spec),  # relevance: methods/lm_relevance.py
        )

    def _attention_spec(self, layer: int, target: str) -> RecordSpec:
        point = HookPoint(f"lm.{layer}.attn", self.attn[layer], index=1, per_image=True)
        return RecordSpec([point], layer)

    def _tokens_spec(self, layer: int, target: str) -> RecordSpec:
        return RecordSpec([HookPoint(f"lm.{layer}", self.lm_layers[layer], per_image=True)], layer)

    def _lens_spec(self, layer: int, target: str) -> RecordSpec:
        return RecordSpec([HookPoint("lm.lens", self.lens)], layer)

    def _graph_spec(self, layer: int | None, target: str) -> RecordSpec:
        return RecordSpec([HookPoint(f"lm.{i}.attn", m, 1) for i, m in enumerate(self.attn)], None)

    def recording(self, spec: RecordSpec):
        """The scope a forward recording `spec` runs in: eager attention for the recorded
        attention modules only (`eager_only`)."""
        return eager_only(self.decoder, [p.module for p in spec.points if p.module in self.attn])

    def methods_note(self) -> str:
        return (
            "per generated token: LM self-attention row k-1 over the image tokens (attention, "
            "attn-gradcam; eager in the recorded layer only), Grad-CAM on LM hidden states at "
            "the image tokens, the logit lens at the last layer"
        )
