"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`): a ViT whose patches are
merged `merge x merge` into one language-model token, and a Qwen decoder with M-RoPE.

Geometry, read from the processor's `image_grid_thw` (never from constants): each image is
`smart_resize`d to multiples of patch·merge (any resolution and aspect, no crop, no pad), so its
tokens are a `(grid_h / merge) x (grid_w / merge)` row-major grid over the whole image, one run of
`config.image_token_id` inside `<|vision_start|>…<|vision_end|>`. A prompt with several images
gets one map per image, in the order the images appear.

Video (`video_grid_thw`, `config.video_token_id`; a `groundcam.video.Video` given to
`explain_generation` or `explain`): `temporal_patch_size` consecutive frames are merged into one
temporal step; each step's tokens are a grid over the whole frame, and each step is placed as a
map of its own (after the still images that precede it in the sequence). The frames are prepared
without torchvision (`qwen_video_features`); a step's map is given to every frame
of the step (with 2 frames per step, frames 0 and 1 show map 0, frames 2 and 3 map 1, ...).

Generated tokens get `mm_token_type_ids` 0, as `generate()` pads them (DESIGN §12)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from PIL import Image

from groundcam.adapters.vlm import VlmAdapter
from groundcam.contract import Tile, TokenLayout
from groundcam.errors import InputError

# A stand-in for "no fixed limit": Qwen's processor takes any number of images (the context
# length is what bounds them).
MANY_IMAGES = 1 << 16


def merged_grids(grid_thw: torch.Tensor, merge: int) -> list[tuple[int, int, int]]:
    """Per image or video, (steps, rows, cols) of its language-model tokens: `grid_thw` rows
    (t, h, w) in patches, h and w divided by the spatial `merge`."""
    out = []
    for t, h, w in grid_thw.tolist():
        if h % merge or w % merge:
            raise ValueError(f"grid {h}x{w} patches is not a multiple of the merge size {merge}")
        out.append((int(t), int(h) // merge, int(w) // merge))
    return out


class QwenVlAdapter(VlmAdapter):
    family = "qwen-vl"
    architectures = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    )
    template = "<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n"
    per_token_inputs = {"mm_token_type_ids": 0}
    images_per_generation = MANY_IMAGES
    videos = True
    # "MLLMs know where to look" (ICLR 2025): layer 22 of Qwen2.5-VL-7B's 28 localises best
    default_depth = 22 / 28

    def placeholder(self) -> str:
        """One image as the prompt writes it: the image token inside its vision start and end
        tokens (ids from the config), which the processor expands into the image's run."""
        cfg = self.model.config
        ids = [cfg.vision_start_token_id, self.image_token_id, cfg.vision_end_token_id]
        return "".join(self.tokenizer.convert_ids_to_tokens(ids))

    def image_tokens(
        self, inputs: Mapping[str, torch.Tensor], ids: torch.Tensor, sizes: list[tuple[int, int]]
    ) -> TokenLayout:
        """The merged grids of `image_grid_thw` (one map per image) and of `video_grid_thw` (one
        map per temporal step), in sequence order; `sizes`: one (H, W) per image, then one per
        video."""
        merge = int(self.model.config.vision_config.spatial_merge_size)
        runs = []  # (token positions, (steps, rows, cols)): the images, then the videos
        for key, token in (
            ("image_grid_thw", self.image_token_id),
            ("video_grid_thw", self.video_id()),
        ):
            grids = [] if inputs.get(key) is None else merged_grids(inputs[key], merge)
            found = torch.nonzero(ids[0] == token)[:, 0].cpu() if token is not None else ids[0, :0]
            counts = [t * h * w for t, h, w in grids]
            if len(found) != sum(counts):
                raise ValueError(
                    f"{len(found)} tokens of id {token} for {key} {[list(g) for g in grids]} "
                    f"(merge {merge}): {sum(counts)} expected"
                )
            runs += list(zip(found.split(counts), grids, strict=True))
        if not runs:
            raise ValueError("no image or video tokens in the sequence")
        if len(sizes) != len(runs):
            raise ValueError(f"{len(sizes)} sizes for {len(runs)} images and videos")
        tiles, frame_sizes, positions = [], [], []
        for (run, (steps, rows, cols)), size in sorted(
            zip(runs, sizes, strict=True), key=lambda r: int(r[0][0][0])
        ):
            for _ in range(steps):
                tiles.append(Tile(len(tiles), 0, rows, cols))
                frame_sizes.append(tuple(size))
            positions.append(run)
        return TokenLayout.from_tiles(torch.cat(positions), tiles, tuple(frame_sizes))

    def video_placeholder(self) -> str:
        """One video as the prompt writes it: the video token inside the vision start and end
        tokens (ids from the config)."""
        cfg = self.model.config
        ids = [cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id]
        return "".join(self.tokenizer.convert_ids_to_tokens(ids))

    def video_features(self, video) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """`pixel_values_videos` and `video_grid_thw` from the image processor's frames, and
        the merge and temporal sizes the processor's expansion reads."""
        from groundcam.adapters import hf

        images = hf.image_processor_of(self.processor)
        sizes = {
            "merge_size": int(images.merge_size),
            "temporal_patch_size": int(images.temporal_patch_size),
            "patch_size": int(images.patch_size),
        }
        return qwen_video_features(images, video.frames), sizes

    def video_layout(self, inputs, ids: torch.Tensor, video) -> tuple[TokenLayout, list[int]]:
        """One map per temporal step; frame f shows step f // (frames per step)."""
        layout = self.image_tokens(inputs, ids, [video.size])
        per_step = math.ceil(len(video) / len(layout.tiles))
        return layout, [f // per_step for f in range(len(video))]

    def video_id(self) -> int | None:
        """The video token's id (config.video_token_id), if the model has one."""
        vid = getattr(self.model.config, "video_token_id", None)
        return None if vid is None else int(vid)


def qwen_video_features(image_processor, frames: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """Qwen2/2.5/3-VL: `pixel_values_videos` and `video_grid_thw` of one video. Each frame is
    prepared by the image processor (which repeats a still image `temporal_patch_size` times);
    one copy of each frame's patches is kept and consecutive frames are stacked into the temporal
    slots of one patch (the last frame repeated to fill the final step), patches in the image's
    (merged, row-major) order: the video processor's layout, `[steps*h*w, C*T*p*p]`."""
    out = image_processor(images=list(frames), return_tensors="pt")
    grids = out["image_grid_thw"]
    if not bool((grids == grids[0]).all()) or int(grids[0, 0]) != 1:
        raise InputError(f"the frames were prepared to different grids {grids.tolist()}")
    t, p = int(image_processor.temporal_patch_size), int(image_processor.patch_size)
    n = int(grids[0, 1] * grids[0, 2])
    patches = out["pixel_values"].reshape(len(frames), n, -1, t, p, p)[
        :, :, :, 0
    ]  # [F, N, C, p, p]
    if pad := -len(frames) % t:
        patches = torch.cat([patches, patches[-1:].expand(pad, -1, -1, -1, -1)])
    steps = patches.shape[0] // t
    grouped = patches.reshape(steps, t, n, -1, p, p).permute(0, 2, 3, 1, 4, 5)  # [S, N, C, T, p, p]
    grid = torch.tensor([[steps, int(grids[0, 1]), int(grids[0, 2])]])
    return {"pixel_values_videos": grouped.reshape(steps * n, -1), "video_grid_thw": grid}
