"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a projector and a Llama-style
decoder; the image is one run of `(crop/patch)^2` tokens (plus the CLS feature under the "full"
feature strategy) at the `<image>` placeholder.

Geometry, read from the processor: the image's shortest edge is resized to `size`, then a centre
crop of `crop_size` is taken (top `(h - crop_h) // 2`, left `(w - crop_w) // 2`, as transformers'
`center_crop`); the tokens are a g x g row-major grid over that crop, and the cropped sides of the
image have no token (their maps are 0). A processor that squashes to a fixed size covers the whole
image. Without a chat template the prompt is written `USER: <image>\\n{prompt} ASSISTANT:`, the
LLaVA-1.5 conversation format."""

from __future__ import annotations

import torch

from groundcam.adapters import hf
from groundcam.adapters.vlm import VlmAdapter
from groundcam.contract import Tile, TokenLayout
from groundcam.errors import InputError


class LlavaAdapter(VlmAdapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    template = "USER: {image}\n{prompt} ASSISTANT:"
    # "MLLMs know where to look" (ICLR 2025): layer 14 of LLaVA-1.5's 32 localises best
    default_depth = 14 / 32

    def crop_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The part of an (H, W) image the processor keeps, in fractions of W and H."""
        ip = hf.image_processor_of(self.processor)
        if getattr(ip, "do_pad", False):
            raise InputError(
                f"{type(ip).__name__} pads images to a square (do_pad=True); groundcam places "
                "LLaVA maps for the resize-and-crop preprocessing only: load the processor "
                "with do_pad=False"
            )
        h, w = size
        rh, rw = h, w
        resize = getattr(ip, "size", None) or {}
        get = resize.get if isinstance(resize, dict) else lambda k: getattr(resize, k, None)
        if getattr(ip, "do_resize", True) and get("shortest_edge"):
            s = int(get("shortest_edge"))
            if w <= h:
                rw, rh = s, int(s * h / w)
            else:
                rh, rw = s, int(s * w / h)
        elif getattr(ip, "do_resize", True) and get("height") and get("width"):
            return (0.0, 0.0, 1.0, 1.0)
        if not getattr(ip, "do_center_crop", False):
            return (0.0, 0.0, 1.0, 1.0)
        crop = ip.crop_size
        ch = crop["height"] if isinstance(crop, dict) else crop.height
        cw = crop["width"] if isinstance(crop, dict) else crop.width
        top, left = max((rh - ch) // 2, 0), max((rw - cw) // 2, 0)
        return (left / rw, top / rh, min(left + cw, rw) / rw, min(top + ch, rh) / rh)

    def image_tokens(self, inputs, ids, sizes) -> TokenLayout:
        """One g_h x g_w grid over the centre crop; under the "full" strategy the first token
        (the CLS feature) has no cell."""
        positions = self.image_positions(ids)
        pv = inputs["pixel_values"]
        p_h, p_w = hf.patch_size(self.model.config.vision_config)
        g_h, g_w = pv.shape[-2] // p_h, pv.shape[-1] // p_w
        extra = len(positions) - g_h * g_w
        if extra not in (0, 1):
            raise ValueError(
                f"{len(positions)} image tokens for a {g_h}x{g_w} patch grid: not one LLaVA image"
            )
        tile = Tile(0, 0, g_h, g_w, self.crop_box(sizes[0]))
        grid = TokenLayout.from_tiles(positions[extra:], (tile,))
        none = torch.full((extra,), -1, dtype=torch.long)
        return TokenLayout(
            positions,
            torch.cat([torch.zeros(extra, dtype=torch.long), grid.tile]),
            torch.cat([none, grid.row]),
            torch.cat([none, grid.col]),
            (tile,),
            (tuple(sizes[0]),),
        )
