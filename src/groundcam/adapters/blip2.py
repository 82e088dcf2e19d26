"""BLIP-2 (`Blip2ForConditionalGeneration`) and InstructBLIP
(`InstructBlipForConditionalGeneration`): a ViT, a Q-Former whose `num_query_tokens` learned
queries read the ViT's patches through cross-attention, and a decoder-only language model (OPT,
Llama; Flan-T5 is refused in one line) that reads the queries as a run of `<image>` tokens
before BOS.

The language model's image columns are the queries, which have no place on the image. Every method
(attention, attn-gradcam, gradcam, logit-lens) is computed over the query columns exactly as for
the other families, then composed down to the patches with the Q-Former's cross-attention:
`map_k = values_k @ C`, where `C[q, p]` is the cross-attention probability from query q to patch
p, the mean over heads and over every cross-attention layer (every `cross_attention_frequency`
layers), the CLS column dropped and rows not renormalised. `C` is kept by hooks on those modules
during the same teacher-forced forward (`model(...)` never returns it), with eager attention
switched on for the cross-attention modules only and restored afterwards; it carries no gradient
(attn-gradcam weights the language model's attention only). So `gradcam` is Grad-CAM on
the Q-Former output as the language model holds it (its hidden states at the query positions),
and `logit-lens` the token's logit at each query, both composed with `C`.

`tam` runs TAM's steps on the query columns as on any LM's image tokens (the logit lens, the
estimated causal inference, the min-max over image and text scores), then composes the
normalised query scores with `C` and applies the rank Gaussian filter on the patch grid, `× 255`
left unrounded (rounding a composed map, whose values are fractions of the query scale, would
keep only a few levels). `relevance` does not use `C`: it composes the LM's relevance over the
queries with the Q-Former's own relevance from the same token's gradients (Chefer's self- and
co-attention rules, `methods.qformer_relevance`; `relevance_vision = True` also propagates
through the ViT's self-attention), eager in the recorded modules only.

Geometry: the image processor squashes the image to `size`; the patches are a g x g row-major
grid over the whole image (vision positions 1..g², CLS at 0). The prompt is always
written `Question: {prompt} Answer:` for BLIP-2 (its documented VQA format) and as given for
InstructBLIP; the processor puts the query tokens before it itself."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from groundcam.adapters import hf
from groundcam.adapters.vlm import DEFAULT_PROMPT, VlmAdapter, eager_only
from groundcam.contract import RecordSpec, Tile, TokenLayout
from groundcam.errors import InputError


class Blip2Adapter(VlmAdapter):
    family = "blip2"
    architectures = ("Blip2ForConditionalGeneration",)
    template = "Question: {prompt} Answer:"
    relevance_vision = False  # relevance: also through the ViT's self-attention (R_ii)

    def language_decoder(self, model: nn.Module) -> nn.Module:
        """The LM's decoder: `language_model.model.decoder` (OPT) or `language_model.model`."""
        if not model.config.use_decoder_only_language_model:
            raise InputError(
                f"{type(model).__name__} with an encoder-decoder language model "
                f"({model.config.text_config.model_type}): groundcam explains BLIP-2 and "
                "InstructBLIP with a decoder-only language model (OPT, Llama, Vicuna) only"
            )
        inner = model.language_model.model
        return getattr(inner, "decoder", inner)

    def prompt_text(self, prompt: str | None, images: int) -> str:
        """`prompt` in the family's template; the processor adds the query tokens itself."""
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        mark = self.placeholder()
        if mark in prompt:
            raise InputError(
                f"prompt {prompt[:60]!r} holds the image placeholder {mark!r}: the {self.family} "
                "processor puts the query tokens before the prompt itself; leave it out"
            )
        return self.template.format(prompt=prompt)

    def cross_attentions(self) -> list[nn.Module]:
        """The Q-Former's cross-attention modules (queries -> ViT tokens), in layer order."""
        return [
            layer.crossattention.attention
            for layer in self.model.qformer.encoder.layer
            if getattr(layer, "has_cross_attention", False)
        ]

    def lm_columns(self, ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The query positions (the `<image>` run) of the language model's sequence."""
        positions = self.image_positions(ids)
        queries = self.model.config.num_query_tokens
        if len(positions) != queries:
            raise InputError(
                f"{len(positions)} image tokens in the input for {queries} queries: the "
                "processor must put num_query_tokens image tokens before the prompt (set "
                f"processor.num_query_tokens = {queries})"
            )
        return positions

    def image_tokens(self, inputs, ids, sizes) -> TokenLayout:
        """The ViT's patches (vision positions 1..g²): one g x g grid over the squashed image."""
        pv = inputs["pixel_values"]
        p_h, p_w = hf.patch_size(self.model.config.vision_config)
        g_h, g_w = pv.shape[-2] // p_h, pv.shape[-1] // p_w
        tile = Tile(0, 0, g_h, g_w)
        layout = TokenLayout.from_tiles(torch.arange(1, g_h * g_w + 1), (tile,))
        return TokenLayout(
            layout.positions, layout.tile, layout.row, layout.col, (tile,), (tuple(sizes[0]),)
        )

    def qformer_attentions(self) -> list[tuple[str, nn.Module]]:
        """The attention modules under the LM in forward order, each with its kind for
        `methods.qformer_relevance`: the ViT's (when `relevance_vision`), then per Q-Former
        layer its self-attention and its cross-attention."""
        found = []
        if self.relevance_vision:
            found += [
                ("vision", layer.self_attn) for layer in self.model.vision_model.encoder.layers
            ]
        for layer in self.model.qformer.encoder.layer:
            found.append(("self", layer.attention.attention))
            if getattr(layer, "has_cross_attention", False):
                found.append(("cross", layer.crossattention.attention))
        return found

    def relevance_below(self) -> tuple[list[str], list[nn.Module]]:
        """Chefer's rules go on below the LM: through the Q-Former's self- and cross-attention
        (and the ViT's self-attention with `relevance_vision`), forward order, with their kinds
        (`methods.qformer_relevance`)."""
        kinds, modules = zip(*self.qformer_attentions(), strict=True)
        return list(kinds), list(modules)

    @contextmanager
    def relevance_scope(self, kinds: Sequence[str], modules: Sequence[nn.Module]):
        """While open, the modules below the LM run eager (those only); yields the note."""
        vision = [m for k, m in zip(kinds, modules, strict=True) if k == "vision"]
        qformer = [m for k, m in zip(kinds, modules, strict=True) if k != "vision"]
        try:
            with (
                eager_only(self.model.vision_model, vision),
                eager_only(self.model.qformer, qformer) as note,
            ):
                yield note
        finally:
            self._kept = None  # the cross-attention kept by `recording` is not a composition

    def relevance_note(self, kinds: Sequence[str], note: str) -> str:
        """What the composition below the LM was, for the result's notes."""
        n_self, n_cross, n_vision = (kinds.count(k) for k in ("self", "cross", "vision"))
        through = f", after the ViT's {n_vision} self-attention layers" if n_vision else ""
        return (
            f"LM relevance over the queries composed to patches by the Q-Former's relevance "
            f"(Chefer's rules through {n_self} self-attention and {n_cross} cross-attention "
            f"layers{through}; CLS dropped; {note})"
        )

    @contextmanager
    def _cross_attention(self):
        """While open, the Q-Former's cross-attention weights are kept as each module runs
        (eager in those modules only); on a clean exit they become `composition`'s."""
        modules = self.cross_attentions()
        seen: list[torch.Tensor] = []

        def keep(module, args, output):
            seen.append(output[1].detach() if output[1] is not None else None)

        handles = [m.register_forward_hook(keep) for m in modules]
        try:
            with eager_only(self.model.qformer, modules) as note:
                yield
        finally:
            for h in handles:
                h.remove()
        self._kept = (seen[-len(modules) :], note)

    @contextmanager
    def recording(self, spec: RecordSpec):
        """The LM's recording scope, the Q-Former's cross-attention kept in the same forward."""
        self._kept = None
        with self._cross_attention(), super().recording(spec) as note:
            yield note

    def composition(self, inputs) -> tuple[torch.Tensor, str]:
        """`C` [queries, patches] (module docstring): kept by the last recorded forward, else
        from one image-only pass of the vision tower and Q-Former."""
        kept, self._kept = getattr(self, "_kept", None), None
        if kept is None:
            keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")
            with torch.no_grad(), self._cross_attention():
                self.model.get_image_features(**{k: inputs[k] for k in keys if k in inputs})
            kept, self._kept = self._kept, None
        seen, note = kept
        n = len(self.cross_attentions())
        if len(seen) != n or any(a is None for a in seen):
            raise InputError(
                f"{type(self.model).__name__}: the Q-Former's cross-attention weights could not "
                "be recorded, so no map can reach the patches"
            )
        mix = torch.stack([a[0].float() for a in seen]).mean((0, 1))[:, 1:]  # CLS dropped
        return mix, (
            f"query columns composed to patches by the Q-Former cross-attention (mean over heads "
            f"and {n} cross-attention layers, CLS dropped; {note})"
        )

    def methods_note(self) -> str:
        return (
            "per generated token, over the query tokens: LM self-attention row k-1 (attention, "
            "attn-gradcam), Grad-CAM on LM hidden states, the logit lens, TAM; each composed to "
            "the patches by the Q-Former's cross-attention; relevance by Chefer's rules through "
            "the LM and the Q-Former"
        )


class InstructBlipAdapter(Blip2Adapter):
    family = "instructblip"
    architectures = ("InstructBlipForConditionalGeneration",)
    REFUSED_METHODS = {
        **Blip2Adapter.REFUSED_METHODS,
        "relative-attention": "its Q-Former reads the prompt, so the generic prompt's forward "
        "would compose the ratio with another prompt's cross-attention",
    }
    template = "{prompt}"
