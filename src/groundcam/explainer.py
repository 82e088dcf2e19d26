"""The object `gc.load` returns: runs the flow adapter -> recorder -> method -> Explanation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from groundcam.adapters.base import Adapter
from groundcam.capture import Recorder
from groundcam.explanation import Explanation, normalize_maps
from groundcam.methods import get_method
from groundcam.targets import check_target


class Explainer:
    """A loaded model with its family adapter; `explain` answers where it finds each phrase."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def name(self) -> str:
        return self.adapter.name

    def __repr__(self) -> str:
        return f"Explainer(model={self.name!r}, family={self.adapter.family!r})"

    def explain(
        self,
        image: Image.Image,
        phrases: str | Sequence[str],
        method: str = "attn-gradcam",
        layer: int | None = None,
        target: str | None = None,
    ) -> Explanation:
        """Maps for every phrase over one image; the image is encoded once for all phrases."""
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        pixel_values, input_ids, mask, index = self._prepare(image, phrases)
        ex = self._run(pixel_values, input_ids, mask, index, method, layer, target)
        ex.phrases, ex.images, ex.image_index = phrases, [image], [0] * len(phrases)
        return ex

    def explain_tensors(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        method: str = "attn-gradcam",
        layer: int | None = None,
        target: str | None = None,
        image_index: torch.Tensor | None = None,
    ) -> Explanation:
        """Maps from prepared tensors: row b pairs text b with image b (or `image_index[b]`)."""
        if image_index is None:
            if pixel_values.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"{pixel_values.shape[0]} images and {input_ids.shape[0]} texts: "
                    "pass image_index to pair them"
                )
            image_index = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self._run(
            pixel_values, input_ids, attention_mask, image_index, method, layer, target
        )

    def scores(self, image: Image.Image, phrases: Sequence[str], target: str | None = None):
        """The target score per phrase without any explanation (forward only)."""
        a = self.adapter
        pixel_values, input_ids, mask, index = self._prepare(image, list(phrases))
        with torch.no_grad():
            return a.forward(
                pixel_values, input_ids, mask, index, target or a.default_target
            ).reported

    def _prepare(self, image: Image.Image, phrases: list[str]):
        """Checked model inputs for one image and its phrases, every phrase on image row 0."""
        if not phrases:
            raise ValueError("no phrases given: pass at least one phrase to explain")
        if any(not p.strip() for p in phrases):
            raise ValueError("empty phrase: every phrase needs some text")
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
        pixel_values = self.adapter.prepare_images([image])
        input_ids, mask = self.adapter.prepare_texts(phrases)
        index = torch.zeros(len(phrases), dtype=torch.long, device=input_ids.device)
        return pixel_values, input_ids, mask, index

    def _run(self, pixel_values, input_ids, mask, image_index, method_name, layer, target):
        a = self.adapter
        method = get_method(method_name)
        source = next((s for s in method.sources if s in a.sources()), None)
        if source is None:
            raise ValueError(f"method {method_name!r} is not defined for the {a.family} family")
        target = check_target(target or a.default_target, list(a.targets))
        a.check(source, target)
        if method.all_layers:
            if layer is not None:
                raise ValueError(f"method {method_name!r} uses every layer; do not pass a layer")
        else:
            layer = a.default_layer(source, target) if layer is None else layer
            if layer not in a.layers(source):
                raise ValueError(
                    f"layer {layer} is not a {source.replace('_', '-')} layer of this model; "
                    f"valid layers are {a.layers(source)}"
                )
        spec = a.record_spec(source, layer)
        grad_mode = torch.enable_grad() if method.needs_grad else torch.no_grad()
        with grad_mode, Recorder(spec.points, leaf=method.needs_grad) as rec:
            scores = a.forward(
                pixel_values, input_ids, mask, image_index, target, spec.expand_vision_at
            )
            recorded = rec.tensors()
            grads = None
            if method.needs_grad:
                grads = list(torch.autograd.grad(scores.explained.sum(), recorded))
        if spec.per_image:
            recorded = [t.index_select(0, image_index) for t in recorded]
        out = method.compute(source, recorded, grads, a.geometry(pixel_values), mask)
        raw = out.raw_maps.detach().float()
        raw_tokens = None if out.raw_token_maps is None else out.raw_token_maps.detach().float()
        return Explanation(
            maps=normalize_maps(raw).cpu(),
            raw_maps=raw.cpu(),
            raw_token_maps=None if raw_tokens is None else raw_tokens.cpu(),
            scores=scores.reported.detach().float().cpu(),
            phrases=[],
            tokens=a.token_strings(input_ids, mask),
            method=method_name,
            layer=layer,
            target=target,
            model=self.name,
            text_conditioned=out.text_conditioned,
        )
