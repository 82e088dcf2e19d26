"""Move a trained LLaVA with a CLIP tower to another image size (`train vlm --init M
--image-size N`): a finer patch grid without training from scratch.

The patch embedding is kept (same patch size); the grid part of the tower's learned position
embeddings is resized bicubically (the DINO / ViT fine-tuning recipe at a new resolution), the
class position is kept, and the config and processor move to the new size, so the saved model
has `(N / patch)^2` image tokens and loads like any LLaVA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from groundcam.errors import InputError

POSITIONS = "model.vision_tower.embeddings.position_embedding.weight"


def resize_positions(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """`[1 + g*g, D]` position embeddings (class first, then the grid row-major) as
    `[1 + grid*grid, D]`: the g x g part resized bicubically, the class row unchanged."""
    old = round((weight.shape[0] - 1) ** 0.5)
    if old * old != weight.shape[0] - 1:
        raise ValueError(f"{weight.shape[0] - 1} grid positions are not a square grid")
    cells = weight[1:].T.reshape(1, -1, old, old).float()
    cells = F.interpolate(cells, size=(grid, grid), mode="bicubic", align_corners=False)
    cells = cells.reshape(weight.shape[1], grid * grid).T.to(weight.dtype)
    return torch.cat([weight[:1], cells])


def regrid(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, image_size: int
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """`model` (a new one, in its dtype) and `processor` (changed in place) at `image_size` px;
    both returned unchanged where the model already has that size."""
    vision = model.config.vision_config
    if vision.model_type != "clip_vision_model":
        raise InputError(
            f"--image-size with --init: expected a CLIP tower, not {vision.model_type}"
        )
    if image_size == vision.image_size:
        return model, processor
    if image_size % vision.patch_size:
        raise InputError(
            f"--image-size {image_size} is not a multiple of the model's patch size "
            f"{vision.patch_size}"
        )
    grid = image_size // vision.patch_size
    if model.config.text_config.max_position_embeddings < 2 * grid * grid:
        raise InputError(
            f"--image-size {image_size}: {grid * grid} image tokens do not fit the language "
            f"model's {model.config.text_config.max_position_embeddings} positions"
        )
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.vision_config.image_size = image_size
    config.image_seq_length = grid * grid
    state = model.state_dict()
    state[POSITIONS] = resize_positions(state[POSITIONS], grid)
    attn = model.config._attn_implementation
    resized = LlavaForConditionalGeneration._from_config(
        config, attn_implementation=attn, dtype=model.dtype
    )
    resized.load_state_dict(state)
    resized.generation_config = model.generation_config
    images = processor.image_processor
    images.size = {"shortest_edge": image_size}
    images.crop_size = {"height": image_size, "width": image_size}
    return resized, processor
