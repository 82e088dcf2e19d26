"""PaliGemma (`PaliGemmaForConditionalGeneration`): a SigLIP vision tower, a linear projector and
a Gemma decoder. The image comes first: `image_seq_length` tokens, then BOS, the prompt and a
newline (the processor writes them); image and prompt form a prefix that attends both ways, the
generated text attends causally (`token_type_ids` 0 for the prefix, 1 for generated tokens, as
`generate()` extends them).

Geometry: the processor squashes each image to `size` (no crop, no pad), so an image's tokens
are a g x g row-major grid of patches over the whole image. Several images (PaliGemma's transfer
to multi-image tasks and video frames) are runs of g² tokens in image order, one map each."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from groundcam.adapters import hf
from groundcam.adapters.vlm import VlmAdapter
from groundcam.contract import Tile, TokenLayout


class PaliGemmaAdapter(VlmAdapter):
    family = "paligemma"
    architectures = ("PaliGemmaForConditionalGeneration",)
    template = "{image}{prompt}"  # the processor adds BOS after the image tokens and the newline
    per_token_inputs = {"token_type_ids": 1}
    default_prompt = "caption en"  # PaliGemma's task prefixes ("caption en", "ocr", ...)
    images_per_generation = 32  # a bound of this library; the processor has none

    def inputs(self, images: Sequence[Image.Image], prompt: str | None) -> dict[str, torch.Tensor]:
        """The processor's inputs without its `labels` (all -100 without a suffix; the model
        would compute a loss of the prompt's length)."""
        out = super().inputs(images, prompt)
        out.pop("labels", None)
        return out

    def image_tokens(self, inputs, ids, sizes) -> TokenLayout:
        """Per image, one g_h x g_w grid of patches over the whole (squashed) image."""
        positions = self.image_positions(ids)
        pv = inputs["pixel_values"]
        p_h, p_w = hf.patch_size(self.model.config.vision_config)
        tiles = tuple(
            Tile(i, 0, pv.shape[-2] // p_h, pv.shape[-1] // p_w) for i in range(len(sizes))
        )
        if len(positions) != sum(t.columns for t in tiles):
            raise ValueError(
                f"{len(positions)} image tokens for {len(sizes)} image(s) of a "
                f"{tiles[0].grid_h}x{tiles[0].grid_w} patch grid: not PaliGemma's layout"
            )
        return TokenLayout.from_tiles(positions, tiles, tuple(tuple(z) for z in sizes))
