"""The object `gc.load` returns: runs the flow adapter -> recorder -> method -> Explanation."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import torch
from PIL import Image

from groundcam.adapters.base import Adapter, Scores
from groundcam.capture import Recorder, trainable
from groundcam.explanation import Explanation, GenerationExplanation, normalize_maps
from groundcam.methods import METHODS, get_method
from groundcam.targets import check_target


class Explainer:
    """A loaded model with its family adapter; `explain` answers where it finds each phrase."""

    def __init__(self, adapter: Adapter, grad_chunk: int = 32):
        self.adapter = adapter
        self.grad_chunk = grad_chunk  # scores per batched backward when rows are shared

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
        return self.explain_many([image], [phrases], method=method, layer=layer, target=target)

    def explain_many(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        method: str = "attn-gradcam",
        layer: int | None = None,
        target: str | None = None,
    ) -> Explanation:
        """Maps for many images with their own phrases in one batch (`phrases[i]` belong to
        `images[i]`); each image is encoded once. Rows follow the phrases in order."""
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        flat = [p for group in phrases for p in ([group] if isinstance(group, str) else group)]
        pixel_values, input_ids, mask = self._prepare(list(images), flat)
        counts = [1 if isinstance(g, str) else len(g) for g in phrases]
        if 0 in counts:
            raise ValueError(f"image {counts.index(0)} has no phrases")
        index = torch.repeat_interleave(torch.arange(len(images)), torch.tensor(counts))
        index = index.to(input_ids.device)
        ex = self._run(pixel_values, input_ids, mask, index, method, layer, target)
        ex.phrases, ex.images, ex.image_index = flat, list(images), index.tolist()
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
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        pixel_values, input_ids, mask = self._prepare([image], phrases)
        index = torch.zeros(len(phrases), dtype=torch.long, device=input_ids.device)
        with torch.no_grad():
            return a.forward(
                pixel_values, input_ids, mask, index, target or a.default_target
            ).reported

    def _prepare(self, images: list[Image.Image], phrases: list[str]):
        """Checked model inputs: pixel values per image, token ids and mask per phrase."""
        if not phrases:
            raise ValueError("no phrases given: pass at least one phrase to explain")
        if any(not isinstance(p, str) or not p.strip() for p in phrases):
            raise ValueError("empty phrase: every phrase needs some text")
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
        pixel_values = self.adapter.prepare_images(images)
        input_ids, mask = self.adapter.prepare_texts(phrases)
        return pixel_values, input_ids, mask

    def _resolve(self, method_name: str, layer: int | None, target: str | None):
        """The method, its source on this family, the checked target and layer."""
        a = self.adapter
        method = get_method(method_name)
        source = next((s for s in method.sources if s in a.sources()), None)
        if source is None:
            raise ValueError(
                f"method {method_name!r} is not defined for the {a.family} family; "
                f"its methods are {supported_methods(a)}"
            )
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
        return method, source, target, layer

    def _record(self, method, spec, run, pairs: int, image_index: torch.Tensor):
        """Run `run()` (a forward returning Scores) under the recorder; per explained score, the
        recorded tensors' rows and their gradients."""
        grad_mode = torch.enable_grad() if method.needs_grad else torch.no_grad()
        params = trainable(self.model) if method.needs_grad else contextlib.nullcontext()
        with grad_mode, params, Recorder(spec.points, leaf=method.needs_grad) as rec:
            scores = run()
            recorded = rec.tensors()
            rows = [
                image_index
                if (p.per_image or spec.per_image)
                else torch.arange(pairs, device=image_index.device)
                for p in spec.points
            ]
            grads = None
            if method.needs_grad:
                grads = per_target_grads(scores.explained, recorded, rows, self.grad_chunk)
        recorded = [take_rows(t.detach(), r) for t, r in zip(recorded, rows, strict=True)]
        return scores, recorded, grads

    def _run(self, pixel_values, input_ids, mask, image_index, method_name, layer, target):
        a = self.adapter
        method, source, target, layer = self._resolve(method_name, layer, target)
        spec = a.record_spec(source, layer, target)
        scores, recorded, grads = self._record(
            method,
            spec,
            lambda: a.forward(
                pixel_values, input_ids, mask, image_index, target, spec.expand_vision_at
            ),
            input_ids.shape[0],
            image_index,
        )
        geometry = scores.geometry or a.geometry(pixel_values)
        out = method.compute(source, recorded, grads, geometry, mask, spec.graph)
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

    def explain_generation(
        self,
        image: Image.Image,
        method: str = "gradcam",
        layer: int | None = None,
        max_new_tokens: int = 30,
        text: str | None = None,
    ) -> GenerationExplanation:
        """Generate text for `image` (or take `text` as if generated), then one map per generated
        token, from one teacher-forced forward and a batched backward."""
        a = self.adapter
        if "token" not in a.targets:
            raise ValueError(
                f"the {a.family} family does not generate text; explain_generation needs a "
                "captioning or OCR model"
            )
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
        method_obj, source, target, layer = self._resolve(method, layer, "token")
        pixel_values = a.prepare_images([image])
        if text is None:
            with torch.no_grad():
                ids, first = a.generate(pixel_values, max_new_tokens)
        else:
            ids, first = a.teacher_ids(text)
        skip = a.special_ids()
        positions = [k for k in range(first, ids.shape[1]) if int(ids[0, k]) not in skip]
        if not positions:  # nothing but start/end tokens: an empty explanation, not an error
            g = a.geometry(pixel_values)
            empty = torch.zeros(0, g.grid_h, g.grid_w)
            return GenerationExplanation(
                text="",
                tokens=[],
                token_ids=[],
                positions=[],
                maps=empty,
                raw_maps=empty,
                scores=torch.zeros(0),
                method=method,
                layer=layer,
                model=self.name,
                image=image,
            )
        pos = torch.tensor(positions, device=ids.device)
        spec = a.record_spec(source, layer, "token")

        def run():
            logits = a.decoder_logits(pixel_values, ids, spec.expand_vision_at)
            logp = logits[0, pos - 1].float().log_softmax(-1)
            chosen = logp.gather(-1, ids[0, pos][:, None])[:, 0]
            return Scores(chosen, chosen.detach().exp())

        k = len(positions)
        zeros = torch.zeros(k, dtype=torch.long, device=ids.device)
        scores, recorded, grads = self._record(
            method_obj, replace(spec, per_image=True), run, k, zeros
        )
        geometry = a.geometry(pixel_values).select(zeros)
        mask = torch.ones(k, ids.shape[1], dtype=torch.long, device=ids.device)
        out = method_obj.compute(source, recorded, grads, geometry, mask, spec.graph)
        if out.raw_token_maps is not None:  # the decoder row that predicted token k is k-1
            raw = out.raw_token_maps[torch.arange(k), pos - 1]
        else:
            raw = out.raw_maps
        raw = raw.detach().float().cpu()
        id_list = ids[0].tolist()
        return GenerationExplanation(
            text=a.decode(id_list[first:]),
            tokens=a.token_strings(ids[:, pos], torch.ones_like(ids[:, pos]))[0],
            token_ids=[id_list[p] for p in positions],
            positions=positions,
            maps=normalize_maps(raw),
            raw_maps=raw,
            scores=scores.reported.detach().float().cpu(),
            method=method,
            layer=layer,
            model=self.name,
            image=image,
            text_conditioned=out.text_conditioned,
        )


def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of `t`; no copy when they are all its rows in order, a view when they are all
    the same row."""
    rows = rows.to(t.device)
    if len(rows) == t.shape[0] and torch.equal(rows, torch.arange(len(rows), device=t.device)):
        return t
    if len(rows) and bool((rows == rows[0]).all()):
        return t[rows[0] : rows[0] + 1].expand(len(rows), *t.shape[1:])
    return t.index_select(0, rows)


def supported_methods(adapter: Adapter | type[Adapter]) -> list[str]:
    """Methods with a source this adapter's family has (`sources` must not need an instance)."""
    have = adapter.SOURCES if isinstance(adapter, type) else adapter.sources()
    return sorted(n for n, m in METHODS.items() if any(s in have for s in m.sources))


def per_target_grads(
    explained: torch.Tensor, recorded: list[torch.Tensor], rows: list[torch.Tensor], chunk: int
) -> list[torch.Tensor]:
    """For each explained score b, the gradient of that score alone w.r.t. row `rows[i][b]` of
    each recorded tensor i. When every score owns its own rows, one backward of the sum gives all
    of them; shared rows (an image encoded once for many phrases, one decoder pass for many
    tokens) take a batched backward (`is_grads_batched`), `chunk` scores at a time."""
    n = explained.shape[0]
    own = all(
        t.shape[0] == n and torch.equal(r.cpu(), torch.arange(n))
        for t, r in zip(recorded, rows, strict=True)
    )
    if own:
        grads = torch.autograd.grad(
            explained.sum(), recorded, allow_unused=True, materialize_grads=True
        )
        return list(grads)
    out: list[list[torch.Tensor]] = [[] for _ in recorded]
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(start + chunk, n), device=explained.device)
        seeds = torch.zeros(len(idx), n, dtype=explained.dtype, device=explained.device)
        seeds[torch.arange(len(idx)), idx] = 1
        grads = torch.autograd.grad(
            explained,
            recorded,
            grad_outputs=seeds,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        for i, (g, r) in enumerate(zip(grads, rows, strict=True)):
            out[i].append(g[torch.arange(len(idx)), r[idx].to(g.device)])
    return [torch.cat(parts) for parts in out]
