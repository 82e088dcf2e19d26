"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP vision tower whose patch grid is
average-pooled to s x s (`mm_tokens_per_image` = s²), projected into a Gemma 3 decoder. The
processor expands each `<start_of_image>` the prompt holds (one per image) into
`\\n\\n<start_of_image>` + s² image soft tokens + `<end_of_image>\\n\\n`; the image tokens of one
image attend to each other both ways (`token_type_ids` 1 on them, 0 elsewhere and on generated
tokens). Several images per prompt, one map per image.

Geometry: each image is squashed to `size` (no crop, no pad); its p x p patch grid is pooled in
k x k blocks, k = p // s, so token (r, c) covers patches [r·k, (r+1)·k) x [c·k, (c+1)·k) and the
s x s grid covers the first s·k of the p patches per side (all of them when s divides p).
The processor is called without pan-and-scan (its default; an image processor's own
`do_pan_and_scan` does not turn it on); crops that arrive anyway are refused in one line."""

from __future__ import annotations

import math

import torch

from groundcam.adapters import hf
from groundcam.adapters.vlm import VlmAdapter
from groundcam.contract import Tile, TokenLayout
from groundcam.errors import InputError
from groundcam.geometry import Geometry


class Gemma3Adapter(VlmAdapter):
    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    # Gemma's turn format, for processors saved without their chat template
    template = "<start_of_turn>user\n{image}{prompt}<end_of_turn>\n<start_of_turn>model\n"
    per_token_inputs = {"token_type_ids": 0}
    images_per_generation = 32  # a bound of this library (256 tokens each); the processor has none

    def geometry(self, pixel_values: torch.Tensor) -> Geometry:
        """The s x s grid of pooled tokens (not the patch grid the vision tower sees)."""
        s = math.isqrt(int(self.model.config.mm_tokens_per_image))
        return Geometry(s, s, 0)

    def image_tokens(self, inputs, ids, sizes) -> TokenLayout:
        """Per image, one s x s grid over the part of the squashed image its pooled patches
        cover; images in prompt order."""
        positions = self.image_positions(ids)
        cfg = self.model.config
        s = math.isqrt(int(cfg.mm_tokens_per_image))
        pv = inputs["pixel_values"]
        p_h, p_w = hf.patch_size(cfg.vision_config)
        patches_h, patches_w = pv.shape[-2] // p_h, pv.shape[-1] // p_w
        k_h, k_w = patches_h // s, patches_w // s
        box = (0.0, 0.0, s * k_w * p_w / pv.shape[-1], s * k_h * p_h / pv.shape[-2])
        if len(positions) != s * s * len(sizes) or pv.shape[0] != len(sizes):
            raise InputError(
                f"{len(positions)} Gemma 3 image tokens and {pv.shape[0]} processed images for "
                f"{len(sizes)} image(s) of {s * s} tokens: pan-and-scan crops are not placed; "
                "use the processor with do_pan_and_scan=False"
            )
        tiles = tuple(Tile(i, 0, s, s, box) for i in range(len(sizes)))
        return TokenLayout.from_tiles(positions, tiles, tuple(tuple(z) for z in sizes))
