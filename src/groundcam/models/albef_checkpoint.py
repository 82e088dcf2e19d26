"""Read released ALBEF checkpoints (pre-training or fine-tuning layout) into `AlbefModel`.

Sizes are inferred from tensor shapes; head counts cannot be, so they are arguments. Every key of
the file is accounted for: loaded, or listed as intentionally unused with the reason. A key that
fits nowhere, a missing weight or a shape that disagrees is an error naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from groundcam.errors import InputError
from groundcam.model_files import check_model_size, one_line
from groundcam.models.albef import AlbefConfig, AlbefModel

_UNUSED = [
    (
        re.compile(r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\."),
        "momentum copy",
    ),
    (re.compile(r"^(image_queue|text_queue|idx_queue|queue_ptr)$"), "ITC queue"),
    (re.compile(r"^text_encoder\.cls\."), "MLM head"),
    (re.compile(r"^text_encoder\.embeddings\.position_ids$"), "derived buffer (arange)"),
]


class CheckpointError(InputError):
    """A checkpoint that cannot be read as ALBEF; the message names the file and the key."""


@dataclass
class LoadReport:
    """What happened to every key of the checkpoint."""

    path: str
    layout: str  # "fine-tuning" (text_encoder.*) or "pre-training" (text_encoder.bert.*)
    loaded: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)  # key -> reason
    defaulted: list[str] = field(default_factory=list)  # model keys the file lacks, left at init


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a `.pth` read with `weights_only=True` (either a
    bare state dict or the release wrapper `{'model': state_dict}`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear line
        raise CheckpointError(f"cannot read checkpoint {path}: {one_line(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors or {{'model': ...}}")
    return obj


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_config(
    state: dict[str, torch.Tensor], num_heads: int, text_num_heads: int, where: str = "checkpoint"
) -> AlbefConfig:
    """Every size that tensor shapes determine; head counts come from the caller."""

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{where}: missing key {key!r}; not an ALBEF checkpoint?")
        return state[key]

    pos = need("visual_encoder.pos_embed")
    patch_w = need("visual_encoder.patch_embed.proj.weight")
    grid = math_isqrt(pos.shape[1] - 1, where)
    words = need("text_encoder.embeddings.word_embeddings.weight")
    text_layers = _count(state, r"^text_encoder\.encoder\.layer\.(\d+)\.attention\.self\.query\.")
    cross = sorted(
        int(m.group(1))
        for k in state
        if (
            m := re.match(
                r"^text_encoder\.encoder\.layer\.(\d+)\.crossattention\.self\.key\.weight$", k
            )
        )
    )
    if not cross:
        raise CheckpointError(f"{where}: no cross-attention layers; not an ALBEF ITM checkpoint")
    cfg = AlbefConfig(
        image_size=grid * patch_w.shape[-1],
        patch_size=patch_w.shape[-1],
        in_chans=patch_w.shape[1],
        vision_width=pos.shape[-1],
        vision_depth=_count(state, r"^visual_encoder\.blocks\.(\d+)\.norm1\.weight$"),
        vision_heads=num_heads,
        vision_mlp=need("visual_encoder.blocks.0.mlp.fc1.weight").shape[0],
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        text_layers=text_layers,
        fusion_layer=cross[0],
        text_heads=text_num_heads,
        intermediate_size=need("text_encoder.encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=need("text_encoder.embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=need("text_encoder.embeddings.token_type_embeddings.weight").shape[0],
        embed_dim=need("vision_proj.weight").shape[0],
        temp=float(need("temp")) if "temp" in state else 0.07,
    )
    if cross != list(range(cfg.fusion_layer, cfg.text_layers)):
        raise CheckpointError(f"{where}: cross-attention layers {cross} are not a contiguous tail")
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e} (pass num_heads/text_num_heads)") from None
    return cfg


def math_isqrt(n: int, where: str) -> int:
    g = int(round(n**0.5))
    if g * g != n:
        raise CheckpointError(f"{where}: {n} patch positions do not form a square grid")
    return g


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resize of the patch position embeddings to a new square grid (CLS kept)."""
    old = math_isqrt(pos.shape[1] - 1, "pos_embed")
    if old == grid:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def load_official(
    path: str | Path,
    num_heads: int = 12,
    text_num_heads: int = 12,
    image_size: int | None = None,
) -> AlbefModel:
    """An `AlbefModel` (eval mode) from a released checkpoint; `model.load_report` lists what
    happened to every key. `image_size` resizes the position embeddings (e.g. 256 -> 384)."""
    state = read_state_dict(path)
    layout = "fine-tuning"
    if any(k.startswith("text_encoder.bert.") for k in state):
        layout = "pre-training"
        state = {re.sub(r"^(text_encoder(_m)?)\.bert\.", r"\1.", k): v for k, v in state.items()}
    cfg = infer_config(state, num_heads, text_num_heads, where=str(path))
    if image_size is not None and image_size != cfg.image_size:
        grid = image_size // cfg.patch_size
        state["visual_encoder.pos_embed"] = resize_pos_embed(
            state["visual_encoder.pos_embed"], grid
        )
        cfg.image_size = image_size
    # key counts set the depths: a file of a few tensors must not describe a model beyond memory
    check_model_size(cfg.parameters(), path)
    model = AlbefModel(cfg)
    expected = model.state_dict()
    report = LoadReport(path=str(path), layout=layout)
    to_load = {}
    for key, tensor in state.items():
        reason = next((why for rx, why in _UNUSED if rx.match(key)), None)
        if reason is not None:
            report.unused[key] = reason
            continue
        if key not in expected:
            raise CheckpointError(f"{path}: key {key!r} fits no part of the ALBEF model")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
        to_load[key] = tensor
    if "temp" not in to_load:  # some fine-tuned releases drop it; ITC scores then use 0.07
        report.defaulted.append("temp")
    missing = sorted(set(expected) - set(to_load) - set(report.defaulted))
    if missing:
        raise CheckpointError(
            f"{path}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    model.load_state_dict(to_load, strict=not report.defaulted)
    report.loaded = list(to_load)
    model.load_report = report
    return model.eval()
