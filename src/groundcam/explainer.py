"""The object `gc.load` returns: runs the flow adapter -> recorder -> method -> Explanation."""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from PIL import Image

from groundcam import generation
from groundcam.adapters.base import Adapter
from groundcam.contract import ScoreKind, Scores, source_label
from groundcam.errors import GroundcamWarning, InputError
from groundcam.explanation import Explanation, GenerationExplanation, normalize_maps
from groundcam.gradients import check_differentiable, record
from groundcam.methods import METHODS, Method, get_method
from groundcam.targets import check_target
from groundcam.threads import model_lock


class Resolved(NamedTuple):
    """What an explanation will run: the method, the source it reads on this model, the target
    and the layer (None: every layer at once)."""

    method: Method
    source: str
    target: str
    layer: int | None


class Batch(NamedTuple):
    """Model inputs: pixel values per image, token ids and attention mask per phrase."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def serialised(entry: Callable) -> Callable:
    """`entry` run holding the model's lock (re-entrant: entries may call one another)."""

    @functools.wraps(entry)
    def run(self: Explainer, *args, **kwargs):
        with self.lock:
            return entry(self, *args, **kwargs)

    return run


class Explainer:
    """A loaded model with its family adapter; `explain` answers where it finds each phrase.

    Safe to share between threads: every entry that runs the model or its tokenizer (explain,
    explain_many, explain_tensors, explain_generation, scores, score_tensors, embed_images,
    embed_texts, similarity_matrix, prepare_texts)
    holds `lock`, the re-entrant lock of the model (`groundcam.threads.model_lock`, shared by
    every Explainer of that model instance), so calls on one model run one at a time and give
    the maps a single thread gives; different model instances run in parallel, and image
    preparation (`prepare_images`) never waits."""

    def __init__(self, adapter: Adapter, grad_chunk: int = 32):
        self.adapter = adapter
        self.grad_chunk = grad_chunk  # scores per batched backward when rows are shared
        model_lock(adapter.model)  # registered now, for Recorders on the model's modules

    @property
    def lock(self) -> threading.RLock:
        """The model's re-entrant lock (looked up, not stored: an Explainer stays picklable)."""
        return model_lock(self.adapter.model)

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def name(self) -> str:
        return self.adapter.name

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def default_target(self) -> str:
        return self.adapter.default_target

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets this model can explain."""
        return tuple(t for t in self.adapter.targets if t not in self.adapter.missing_targets)

    def has_source(self, kind: str) -> bool:
        """Whether this model offers recorded tensors of `kind` (contract's source kinds)."""
        return kind in self.adapter.sources()

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The patch grid (h, w) the maps of these prepared images are on."""
        g = self.adapter.geometry(pixel_values)
        return g.grid_h, g.grid_w

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated token ids, as the model's tokenizer writes it."""
        return self.adapter.decode(list(token_ids))

    def unknown_words(self, phrases: Sequence[str]) -> list[list[str]]:
        """Per phrase, its words the model's tokenizer reads as the unknown token (named in a
        warning when explained, marked in records)."""
        return self.adapter.unknown_words(list(phrases))

    def score_kind(self, target: str | None = None) -> ScoreKind | None:
        """What the score reported for `target` (default: the family's) is."""
        return self.adapter.score_kind(target or self.adapter.default_target)

    @property
    def batch_images(self) -> int:
        """Images per forward the family supports in an evaluation (ViLT pads: 1)."""
        return self.adapter.batch_images

    def pixel_mean_std(self) -> tuple[list[float], list[float]]:
        """The image processor's per-channel normalisation mean and std (0.5 where it has none):
        what a removed patch is filled with in deletion and insertion curves."""
        ip = getattr(self.adapter.processor, "image_processor", None) or self.adapter.processor
        mean = list(getattr(ip, "image_mean", None) or [0.5, 0.5, 0.5])
        return mean, list(getattr(ip, "image_std", None) or [0.5, 0.5, 0.5])

    @serialised
    def phrase_log_likelihood(
        self, image: Image.Image, phrase: str, prompt: str | None = None
    ) -> float:
        """A generative VLM's log-probability of `phrase` after `prompt` on `image` (forward
        only): the score a phrase explanation reports."""
        if not getattr(self.adapter, "vlm", False):
            raise InputError(f"the {self.family} family has no phrase log-likelihood")
        return generation.phrase_log_likelihood(self, image, phrase, prompt)

    def default_method(self, target: str | None = None) -> str:
        """The method the evidence supports on this family for `target` (default: the family's)."""
        return self.adapter.default_method(target or self.adapter.default_target)

    def layers(self, method: str | None = None, target: str | None = None) -> list[int]:
        """The layers `method` can read on this model (empty: it reads every layer at once)."""
        r = self.resolve(method, None, target)
        return [] if r.method.all_layers else self.adapter.layers(r.source)

    def __repr__(self) -> str:
        return f"Explainer(model={self.name!r}, family={self.adapter.family!r})"

    def explain(
        self,
        image: Image.Image,
        phrases: str | Sequence[str],
        method: str | None = None,
        layer: int | None = None,
        target: str | None = None,
        prompt: str | None = None,
    ) -> Explanation:
        """Maps for every phrase over one image; the image is encoded once for all phrases.
        `method`, `layer` and `target` default to the family's (`default_method()`). On a
        generative VLM each phrase is read after `prompt` (`generation.explain_phrases`)."""
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        return self.explain_many(
            [image], [phrases], method=method, layer=layer, target=target, prompt=prompt
        )

    @serialised
    def explain_many(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        method: str | None = None,
        layer: int | None = None,
        target: str | None = None,
        prompt: str | None = None,
    ) -> Explanation:
        """Maps for many images with their own phrases in one batch (`phrases[i]` belong to
        `images[i]`); each image is encoded once. Rows follow the phrases in order. `prompt`:
        generative VLMs only (the text the phrases are read after)."""
        if isinstance(images, Image.Image) or isinstance(phrases, str):
            raise InputError(
                "explain_many takes a list of images and one list of phrases per image "
                "(use explain for one image)"
            )
        if len(images) != len(phrases):
            raise InputError(f"{len(images)} images but {len(phrases)} phrase lists")
        counts = [1 if isinstance(g, str) else len(g) for g in phrases]
        flat = [p for group in phrases for p in ([group] if isinstance(group, str) else group)]
        if not flat:
            raise InputError("no phrases given: pass at least one phrase to explain")
        if 0 in counts:
            raise InputError(f"image {counts.index(0)} has no phrases")
        if prompt is not None and not getattr(self.adapter, "vlm", False):
            raise InputError(
                f"prompt= is for generative VLMs; the {self.adapter.family} family reads the "
                "phrases alone (leave prompt out)"
            )
        if getattr(self.adapter, "vlm", False):
            if target not in (None, "phrase"):
                raise InputError(
                    f"target {target!r}: a phrase on a generative VLM is explained by its "
                    "log-likelihood after the prompt (target 'phrase', the default)"
                )
            return generation.explain_phrases(self, images, phrases, method, layer, prompt)
        self.resolve(method, layer, target)  # a bad method or layer is refused before any warning
        pixel_values, input_ids, mask = self.prepare(list(images), flat)
        index = torch.repeat_interleave(torch.arange(len(images)), torch.tensor(counts))
        index = index.to(input_ids.device)
        ex = self._run(pixel_values, input_ids, mask, index, method, layer, target)
        ex.phrases, ex.images, ex.image_index = flat, list(images), index.tolist()
        ex.unknown_words = self.unknown_words(flat)
        if not ex.text_conditioned and max(counts) > 1:
            warnings.warn(
                f"method {ex.method!r} does not read the text on this model: the "
                f"{max(counts)} phrases of an image all get the same image-only map (and "
                "differ only in their scores); use a text-conditioned method to compare them",
                GroundcamWarning,
                stacklevel=2,
            )
        return ex

    @serialised
    def explain_tensors(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        method: str | None = None,
        layer: int | None = None,
        target: str | None = None,
        image_index: torch.Tensor | None = None,
        differentiable: bool = False,
    ) -> Explanation:
        """Maps from prepared tensors: row b pairs text b with image b (or `image_index[b]`).
        With `differentiable=True` (gradient methods), `raw_maps` and `raw_token_maps` keep a
        graph back to the model's parameters (the same recorder and method code, gradients
        taken with `create_graph`), for losses on maps; without it no graph is kept."""
        image_index = check_tensors(pixel_values, input_ids, attention_mask, image_index)
        return self._run(
            pixel_values,
            input_ids,
            attention_mask,
            image_index,
            method,
            layer,
            target,
            differentiable,
        )

    @serialised
    def scores(self, image: Image.Image, phrases: Sequence[str], target: str | None = None):
        """The target score per phrase without any explanation (forward only)."""
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        batch = self.prepare([image], phrases)
        index = torch.zeros(len(phrases), dtype=torch.long, device=batch.input_ids.device)
        return self.score_tensors(*batch, image_index=index, target=target).reported

    @serialised
    def score_tensors(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
        target: str | None = None,
    ) -> Scores:
        """Forward-only scores of prepared pairs (`explained`: what a method would explain;
        `reported`: what a person reads), no graph kept."""
        image_index = check_tensors(pixel_values, input_ids, attention_mask, image_index)
        a = self.adapter
        target = check_target(target or a.default_target, list(a.targets))
        if target in a.missing_targets:
            raise InputError(a.missing_targets[target])
        with torch.no_grad():
            return a.forward(pixel_values, input_ids, attention_mask, image_index, target)

    def _check_embeds(self) -> None:
        if "similarity" not in self.targets:
            raise InputError(
                f"a {self.family} model has no similarity target: it does not embed images and "
                "texts apart (retrieval needs one that does: CLIP, SigLIP, ALBEF, BLIP ITM)"
            )

    @serialised
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] of prepared images, no graph kept: with
        `embed_texts`, every image against every text (the `similarity` target's cosine)."""
        self._check_embeds()
        rows = torch.zeros(len(pixel_values), 1, dtype=torch.long)
        check_tensors(pixel_values, rows, rows, None)  # shape, dtype, finite pixels
        with torch.no_grad():
            return self.adapter.embed_images(pixel_values)

    @property
    def embeds_apart(self) -> bool:
        """Whether images and texts embed apart (`embed_images`, `embed_texts`), so that a
        retrieval can encode each once; otherwise use `similarity_matrix` block by block."""
        return "similarity" in self.targets and self.adapter.embeds_apart

    @serialised
    def similarity_matrix(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The model's similarity [N, T] of every prepared image with every prepared text (the
        `similarity` target's cosine for dual encoders), no graph kept."""
        self._check_embeds()
        check_tensors(pixel_values, input_ids, attention_mask, torch.zeros(len(input_ids)).long())
        with torch.no_grad():
            return self.adapter.similarity_matrix(pixel_values, input_ids, attention_mask)

    @serialised
    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings [T, D] of prepared texts, in the space of `embed_images`."""
        self._check_embeds()
        with torch.no_grad():
            return self.adapter.embed_texts(input_ids, attention_mask)

    def prepare(self, images: Sequence[Image.Image], phrases: Sequence[str]) -> Batch:
        """Checked model inputs: pixel values per image, token ids and mask per phrase."""
        phrases = list(phrases)
        if not phrases:
            raise InputError("no phrases given: pass at least one phrase to explain")
        return Batch(self.prepare_images(images), *self.prepare_texts(phrases))

    def prepare_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's preprocessing of `images` ([N, C, H, W] on the model's device)."""
        from groundcam.io import check_image

        if isinstance(images, Image.Image):
            images = [images]
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
            check_image(image, f"image {i}")
        return self.adapter.prepare_images(list(images))

    def prepare_texts(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask per phrase, as the model reads them (a phrase of special
        tokens only is refused; an unreadable or truncated one warns)."""
        for p in phrases:
            if not isinstance(p, str):
                raise InputError(f"phrases must be strings, got {type(p).__name__}: {p!r}")
            if not p.strip():
                raise InputError("empty phrase: every phrase needs some text")
        with self.lock:  # a fast tokenizer refuses concurrent calls ("Already borrowed")
            return self.adapter.prepare_texts(list(phrases))

    def resolve(
        self, method: str | None = None, layer: int | str | None = None, target: str | None = None
    ) -> Resolved:
        """The method (None: the family's default for the target), its source on this family,
        the checked target and layer (None: the family's default)."""
        a = self.adapter
        target = check_target(target or a.default_target, list(a.targets))
        method_obj = get_method(method or a.default_method(target))
        source = next((s for s in method_obj.sources if s in a.sources()), None)
        if getattr(method_obj, "vlm_only", False) and not getattr(a, "vlm", False):
            source = None
        refused = a.REFUSED_METHODS.get(method_obj.name)
        if source is None or refused:
            why = f" ({refused})" if refused else ""
            raise InputError(
                f"method {method_obj.name!r} is not defined for the {a.family} family{why}; "
                f"its methods are {supported_methods(a)}"
            )
        a.check(source, target, method_obj.needs_grad)
        layer = parse_layer(layer)
        if method_obj.all_layers:
            if layer is not None:
                raise InputError(
                    f"method {method_obj.name!r} uses every layer; do not pass a layer"
                )
        else:
            layer = a.default_layer(source, target) if layer is None else layer
            if layer not in a.layers(source):
                raise InputError(
                    f"layer {layer} is not a {source_label(source)} layer of this model; "
                    f"valid layers are {a.layers(source)}"
                )
        return Resolved(method_obj, source, target, layer)

    def _run(
        self,
        pixel_values,
        input_ids,
        mask,
        image_index,
        method_name,
        layer,
        target,
        differentiable=False,
    ):
        a = self.adapter
        method, source, target, layer = self.resolve(method_name, layer, target)
        if differentiable:
            check_differentiable(method, self.model)
        spec = a.record_spec(source, layer, target)
        scores, recorded, grads = record(
            method,
            spec,
            lambda: a.forward(
                pixel_values, input_ids, mask, image_index, target, spec.expand_vision_at
            ),
            input_ids.shape[0],
            image_index,
            self.grad_chunk,
            differentiable,
        )
        geometry = scores.geometry or a.geometry(pixel_values)
        out = method.compute(source, recorded, grads, geometry, mask, spec.graph)
        raw, raw_tokens = out.raw_maps, out.raw_token_maps
        if differentiable:  # on the device, at least float32 (float64 stays float64)
            wide = torch.promote_types(raw.dtype, torch.float32)
            raw = raw.to(wide)
            raw_tokens = None if raw_tokens is None else raw_tokens.to(wide)
        else:
            raw = raw.detach().float().cpu()
            raw_tokens = None if raw_tokens is None else raw_tokens.detach().float().cpu()
        return Explanation(
            maps=normalize_maps(raw.detach()).cpu(),
            raw_maps=raw,
            raw_token_maps=raw_tokens,
            scores=scores.reported.detach().float().cpu(),
            phrases=[],
            tokens=a.token_strings(input_ids, mask),
            method=method.name,
            layer=layer,
            target=target,
            model=self.name,
            text_conditioned=out.text_conditioned,
            score_kind=a.score_kind(target),
        )

    @serialised
    def explain_generation(
        self,
        image_or_images: Image.Image | Sequence[Image.Image] | None = None,
        prompt: str | None = None,
        method: str | None = None,
        layer: int | None = None,
        max_new_tokens: int | None = None,
        text: str | None = None,
        beam: int = 1,
        *,
        image: Image.Image | None = None,
        sinks: str | None = None,
    ) -> GenerationExplanation:
        """Generate text for an image (or take `text` as if generated), then one map per generated
        token, from one teacher-forced forward and a batched backward. `prompt` leads the text
        where the family takes one (BLIP captioning); a list of images is for families that read
        several. On generative VLMs `layer` may be a range, `(first, last)` or "first-last": the
        mean of those layers' maps. `method` defaults to the family's (`attention` for OCR models);
        `max_new_tokens=None` lets the model's own `generation_config` decide the length; `beam`
        > 1 decodes with beam search. `image=` is the first argument's older name. `sinks="drop"`
        (generative VLMs): visual sink tokens read 0 in every map (`methods.sinks`). A
        `groundcam.Video` instead of images (Qwen2/2.5/3-VL, LLaVA-OneVision): one map per frame
        (`gen.image_maps`), the frames side by side in `gen.maps` (`groundcam.video`)."""
        if image is not None and image_or_images is not None:
            raise InputError("pass the image once: as the first argument or as image=")
        if image is None and image_or_images is None:
            raise InputError("no image given: explain_generation needs an image")
        return generation.explain_generation(
            self,
            image if image is not None else image_or_images,
            prompt,
            method,
            layer,
            max_new_tokens,
            text,
            beam,
            sinks,
        )


def parse_layer(layer) -> int | None:
    """A layer number as given: an int, or a string of digits ("2", from a config file); None
    means the default. Anything else (True, 2.5, "last") is refused rather than misread."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int | str):
        raise InputError(f"layer must be an integer, got {layer!r}")
    if isinstance(layer, str):
        text = layer.strip()
        if not text.lstrip("-").isdigit():
            raise InputError(f"layer must be an integer, got {layer!r}")
        return int(text)
    return int(layer)


def check_tensors(
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_index: torch.Tensor | None,
) -> torch.Tensor:
    """Refuse prepared inputs the model would misread (wrong types, shapes or dtypes, NaN or
    infinite pixels, an image index out of range) in one line; the image index, defaulting to
    row b = image b."""
    for name, t in (
        ("pixel_values", pixel_values),
        ("input_ids", input_ids),
        ("attention_mask", attention_mask),
    ):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if pixel_values.dim() != 4 or not pixel_values.is_floating_point():
        raise InputError(
            f"pixel_values must be a float tensor [images, channels, height, width], got "
            f"{pixel_values.dtype} of shape {tuple(pixel_values.shape)}"
        )
    if not bool(torch.isfinite(pixel_values).all()):
        raise InputError("pixel_values hold NaN or infinite values")
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
        raise InputError(
            f"input_ids must be an integer tensor [texts, tokens], got {input_ids.dtype} of "
            f"shape {tuple(input_ids.shape)}"
        )
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
            f"{tuple(input_ids.shape)}: they must match"
        )
    if image_index is None:
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise InputError(
                f"{pixel_values.shape[0]} images and {input_ids.shape[0]} texts: "
                "pass image_index to pair them"
            )
        return torch.arange(input_ids.shape[0], device=input_ids.device)
    image_index = torch.as_tensor(image_index, device=input_ids.device)
    if image_index.shape != (input_ids.shape[0],) or image_index.is_floating_point():
        raise InputError(
            f"image_index must be {input_ids.shape[0]} integers (one image per text), got "
            f"shape {tuple(image_index.shape)}"
        )
    if len(image_index) and not (
        0 <= int(image_index.min()) <= int(image_index.max()) < len(pixel_values)
    ):
        raise InputError(f"image_index values must lie in 0..{pixel_values.shape[0] - 1}")
    return image_index.long()


def supported_methods(adapter: Adapter | type[Adapter]) -> list[str]:
    """Methods with a source this adapter's family has (`sources` must not need an instance)."""
    have = adapter.SOURCES if isinstance(adapter, type) else adapter.sources()
    blind = adapter.NO_GRADIENT_SOURCES
    return sorted(
        n
        for n, m in METHODS.items()
        if any(s in have and not (m.needs_grad and s in blind) for s in m.sources)
        and (getattr(adapter, "vlm", False) or not getattr(m, "vlm_only", False))
        and n not in adapter.REFUSED_METHODS
    )
