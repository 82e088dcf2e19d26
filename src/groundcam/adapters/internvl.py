"""InternVL (`InternVLForConditionalGeneration`): InternViT, a pixel shuffle by
`downsample_ratio` and a Qwen2-style decoder; each image is one run `<img><IMG_CONTEXT>×N</img>`.

Geometry, read from the image processor: with `crop_to_patches`, the image is squashed onto the
rows x cols canvas of tiles that `get_optimal_tiled_canvas` picks for its size (between
`min_patches` and `max_patches` tiles), the tiles read row-major, then (when there are several)
the thumbnail, the whole image squashed to one tile; otherwise the whole image squashed to one
tile. Each tile is an s x s row-major grid, `s = (size/patch)·downsample_ratio`, so
`N = s²·(rows·cols + [rows·cols > 1])`. Tile (r, c) covers its fraction of the original image, the
thumbnail all of it; `placement.place` takes the mean where they overlap. Without a chat template
the prompt is written in InternVL's (Qwen2's) conversation format."""

from __future__ import annotations

import sys

from groundcam.adapters import hf
from groundcam.adapters.idefics3 import runs
from groundcam.adapters.vlm import VlmAdapter
from groundcam.contract import Tile, TokenLayout


def _get(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class InternVLAdapter(VlmAdapter):
    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    template = "<|im_start|>user\n{image}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    images_per_generation = 16  # a bound of this library; the context length is the model's

    def side(self) -> int:
        """Cells per side of one tile's grid after the pixel shuffle."""
        config = self.model.config
        vision = config.vision_config
        size = vision.image_size
        size = size if isinstance(size, int) else int(size[0])
        return round(size // hf.patch_size(vision)[0] * config.downsample_ratio)

    def canvas(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the tiles the image processor cuts an (H, W) image into."""
        ip = hf.image_processor_of(self.processor)
        if not getattr(ip, "crop_to_patches", False) or ip.max_patches <= 1:
            return 1, 1
        choose = getattr(sys.modules[type(ip).__module__], "get_optimal_tiled_canvas", None)
        if choose is None:
            from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
                get_optimal_tiled_canvas as choose,
            )
        tile = (int(_get(ip.size, "height")), int(_get(ip.size, "width")))
        cols, rows = choose(tuple(size), tile, ip.min_patches, ip.max_patches)
        return rows, cols

    def image_tokens(self, inputs, ids, sizes) -> TokenLayout:
        """Per image, its rows x cols tiles row-major, then the thumbnail when there are
        several tiles; each an s x s grid."""
        positions = self.image_positions(ids)
        groups = runs(positions)
        if len(groups) != len(sizes):
            raise ValueError(f"{len(groups)} runs of image tokens for {len(sizes)} image(s)")
        s = self.side()
        tiles: list[Tile] = []
        for image, (run, size) in enumerate(zip(groups, sizes, strict=True)):
            rows, cols = self.canvas(size)
            if len(run) == s * s:  # one tile: the whole image
                rows = cols = 1
            elif len(run) != s * s * (rows * cols + 1):
                raise ValueError(
                    f"image {image}: {len(run)} image tokens; its {rows}x{cols} tiles and "
                    f"thumbnail of {s}x{s} take {s * s * (rows * cols + 1)}"
                )
            for k in range(rows * cols):
                r, c = divmod(k, cols)
                box = (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
                tiles.append(Tile(image, k, s, s, box))
            if rows * cols > 1:
                tiles.append(Tile(image, rows * cols, s, s))  # the thumbnail
        return TokenLayout.from_tiles(positions, tiles, tuple(tuple(hw) for hw in sizes))
