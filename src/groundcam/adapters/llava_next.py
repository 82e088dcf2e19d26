"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`) and LLaVA-OneVision
(`LlavaOnevisionForConditionalGeneration`): a vision tower read in "any-res" tiles, a projector and
a decoder; each image is one run of tokens at its `<image>` placeholder.

Geometry, read from the processor's `image_sizes` and the model's config as the model packs its
features (DESIGN §12): the run of an image starts with the base tile (the whole image squashed to
one tile, g x g cells), then the hi-res grid: the image resized into the best canvas of
`image_grid_pinpoints` keeping its aspect (`select_best_resolution`), padded in the middle, cut
into tiles whose cells form one grid; the model drops the padded rows (or columns) at cell level
(`unpad_image`) and ends each kept row with one `image_newline` token (no cell). That grid is
placed back by removing the centred padding and the aspect-preserving scale: its box may reach
past the image by the part of a cell that held padding. OneVision shrinks a grid of more than
`anyres_max_N` tiles' worth of cells bilinearly (same box, fewer cells), and an image of a
multi-image sample (`batch_num_images` > 1) is its base tile and one newline. Both families take
several images per prompt, one map per image (base and hi-res cells averaged where both cover a
pixel, `placement.place`). OneVision also reads videos (a `groundcam.video.Video`): each frame
is the image processor's base tile (`onevision_video_features`), pooled by the
model to a ceil(g/2) x ceil(g/2) grid; one map per frame (`video_tokens`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from groundcam.adapters import hf
from groundcam.adapters.vlm import VlmAdapter
from groundcam.contract import Tile, TokenLayout
from groundcam.errors import InputError


class LlavaNextAdapter(VlmAdapter):
    family = "llava-next"
    architectures = ("LlavaNextForConditionalGeneration",)
    template = "USER: {image}\n{prompt} ASSISTANT:"
    # the LLaVA-1.5 evidence ("MLLMs know where to look", layer 14 of 32): the same decoders
    default_depth = 14 / 32
    images_per_generation = sys.maxsize  # as many as the processor and the context take

    def shrunk(self, rows: int, cols: int, cells: int) -> tuple[int, int]:
        """The grid the model keeps of an unpadded `rows` x `cols` grid (`cells`: a tile's side
        in cells); LLaVA-NeXT keeps it whole."""
        return rows, cols

    def hires_tile(self, image: int, size: tuple[int, int], side: int, cells: int) -> Tile:
        """The unpadded hi-res grid of an image of `size` (H, W) as a tile with one newline per
        row, its box in fractions of the original image."""
        from transformers.image_processing_utils import (
            get_patch_output_size,
            select_best_resolution,
        )
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        h, w = size
        pinpoints = hf.image_processor_of(self.processor).image_grid_pinpoints
        canvas_h, canvas_w = select_best_resolution((h, w), pinpoints)
        new_h, new_w = get_patch_output_size(
            np.empty((0, h, w)), (canvas_h, canvas_w), "channels_first"
        )
        top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2
        rows, cols = get_anyres_image_grid_shape(
            (h, w), self.model.config.image_grid_pinpoints, side
        )
        if (rows * side, cols * side) != (canvas_h, canvas_w):
            raise InputError(
                f"the processor puts a {h}x{w} image on a {canvas_h}x{canvas_w} canvas, the model "
                f"reads {rows}x{cols} tiles of {side} px: their image_grid_pinpoints differ"
            )
        grid_h, grid_w = rows * cells, cols * cells
        index = torch.stack(
            torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
        )
        kept = unpad_image(index, (h, w))  # the model's own unpadding, applied to cell indices
        r0, r1 = int(kept[0, 0, 0]), int(kept[0, -1, 0]) + 1
        c0, c1 = int(kept[1, 0, 0]), int(kept[1, 0, -1]) + 1
        box = (
            (c0 * canvas_w / grid_w - left) / new_w,
            (r0 * canvas_h / grid_h - top) / new_h,
            (c1 * canvas_w / grid_w - left) / new_w,
            (r1 * canvas_h / grid_h - top) / new_h,
        )
        return Tile(image, 1, *self.shrunk(r1 - r0, c1 - c0, cells), box, newline=True)

    def patched(self, inputs, images: int) -> list[bool]:
        """Per image, whether the model reads its hi-res tiles (always, on LLaVA-NeXT)."""
        return [True] * images

    def image_tokens(self, inputs, ids, sizes) -> TokenLayout:
        """Per image: the base tile's g x g cells, then the hi-res grid row by row, each row
        followed by its newline (module docstring)."""
        positions = self.image_positions(ids)
        vision = self.model.config.vision_config
        side = int(vision.image_size)
        cells = side // hf.patch_size(vision)[0]
        image_sizes = inputs.get("image_sizes")
        if image_sizes is None or len(image_sizes) != len(sizes):
            raise ValueError(
                f"the {self.family} layout needs the processor's image_sizes per image"
            )
        tiles: list[Tile] = []
        tile, row, col = [], [], []  # per column: its tile's index and its cell (or -1)
        for i, patched in enumerate(self.patched(inputs, len(sizes))):
            size = tuple(int(v) for v in image_sizes[i])
            one = [Tile(i, 0, cells, cells)]
            one += [self.hires_tile(i, size, side, cells)] if patched else []
            for t in one:
                alone = TokenLayout.from_tiles(torch.arange(t.columns), (replace(t, image=0),))
                tile.append(torch.full_like(alone.tile, len(tiles)))
                row.append(alone.row)
                col.append(alone.col)
                tiles.append(t)
            if not patched:  # OneVision's multi-image samples: one newline after the base tile
                tile.append(torch.tensor([len(tiles) - 1]))
                row.append(torch.tensor([-1]))
                col.append(torch.tensor([-1]))
        need = sum(len(t) for t in tile)
        if need != len(positions):
            raise InputError(
                f"{len(positions)} image tokens where the {self.family} geometry of "
                f"{len(sizes)} image(s) gives {need}: the processor does not match the model "
                "(image_grid_pinpoints, tile or patch size)"
            )
        return TokenLayout(
            positions,
            torch.cat(tile),
            torch.cat(row),
            torch.cat(col),
            tuple(tiles),
            tuple(tuple(s) for s in sizes),
        )


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava-onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    template = "<|im_start|>user {image}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    default_depth = 0.5
    videos = True

    def shrunk(self, rows: int, cols: int, cells: int) -> tuple[int, int]:
        """`anyres_max_N`: a grid of more than about N tiles' cells is shrunk bilinearly to
        `(rows // ratio, cols // ratio)`, as the model does."""
        most = int(self.model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * cells**2))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio)
        return rows, cols

    def patched(self, inputs, images: int) -> list[bool]:
        """An image of a multi-image sample (`batch_num_images` > 1) is read from its base tile
        only."""
        counts = inputs.get("batch_num_images")
        if counts is None:
            return [True] * images
        return [int(n) == 1 for n in counts for _ in range(int(n))]

    def video_features(self, video) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """`pixel_values_videos` [1, F, 3, s, s]: each frame the image processor's base tile."""

        return onevision_video_features(hf.image_processor_of(self.processor), video.frames), {}

    def video_layout(self, inputs, ids: torch.Tensor, video) -> tuple[TokenLayout, list[int]]:
        """One map per frame (`video_tokens`), each over the whole frame."""
        layout = self.video_tokens(ids, len(video))
        return replace(layout, sizes=(video.size,) * len(video)), list(range(len(video)))

    def video_tokens(self, ids: torch.Tensor, frames: int) -> TokenLayout:
        """Where a video's tokens (`config.video_token_id`) sit: per frame the tile's cell grid
        pooled bilinearly to ceil(g/2) x ceil(g/2) over the whole (squashed) frame, frames in
        order, then one newline; frame f is image f of the layout."""
        positions = torch.nonzero(ids[0] == int(self.model.config.video_token_id))[:, 0].cpu()
        vision = self.model.config.vision_config
        side = math.ceil(int(vision.image_size) // hf.patch_size(vision)[0] / 2)
        if len(positions) != frames * side * side + 1:
            raise InputError(
                f"{len(positions)} video tokens where {frames} frame(s) of {side}x{side} cells "
                f"and one newline give {frames * side * side + 1}"
            )
        tiles = tuple(Tile(f, 0, side, side) for f in range(frames))
        cells = TokenLayout.from_tiles(positions[:-1], tiles)
        return TokenLayout(
            positions,
            torch.cat([cells.tile, torch.tensor([frames - 1])]),
            torch.cat([cells.row, torch.tensor([-1])]),
            torch.cat([cells.col, torch.tensor([-1])]),
            tiles,
        )


def onevision_video_features(
    image_processor, frames: Sequence[Image.Image]
) -> dict[str, torch.Tensor]:
    """LLaVA-OneVision: `pixel_values_videos` [1, F, 3, s, s], each frame the image processor's
    base tile (the whole frame resized to the tile, as its video processor resizes frames); the
    model pools each frame's patch grid to ceil(g/2) x ceil(g/2) itself."""
    out = image_processor(images=list(frames), return_tensors="pt")
    return {"pixel_values_videos": out["pixel_values"][:, 0][None]}
