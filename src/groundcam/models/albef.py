"""ALBEF (Li et al., NeurIPS 2021) in one readable file: ViT image encoder, BERT text encoder whose
layers from `fusion_layer` on cross-attend to the image, ITC projections and the ITM head.

Module names follow the official checkpoints (`visual_encoder.blocks.i.attn.qkv`,
`text_encoder.encoder.layer.i.crossattention.self.key`, ...) so that a released state dict maps
onto this model key for key. Every attention exposes its softmax probabilities through an
`nn.Identity` named `probs` (before dropout), which is where explanation hooks attach.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from groundcam.grouping import ImageGroups


@dataclass
class AlbefConfig:
    """Every size of an ALBEF model; defaults are the released ALBEF (ViT-B/16, BERT-base)."""

    image_size: int = 256
    patch_size: int = 16
    in_chans: int = 3
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    vision_eps: float = 1e-6
    vocab_size: int = 30522
    hidden_size: int = 768
    text_layers: int = 12
    fusion_layer: int = 6
    text_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    text_eps: float = 1e-12
    embed_dim: int = 256
    temp: float = 0.07
    dropout: float = 0.1  # BERT hidden and attention dropout (the ViT uses none)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        """Raise ValueError on sizes that cannot form a model (a size that is not a positive
        whole number, heads not dividing widths, ...)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                least = 0 if f.name in ("fusion_layer", "pad_token_id") else 1
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ValueError(
                        f"{f.name} must be a whole number of at least {least}, got {value!r}"
                    )
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            elif not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        for name in ("vision_eps", "text_eps", "temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.vision_width % self.vision_heads:
            raise ValueError(
                f"vision width {self.vision_width} is not divisible by {self.vision_heads} heads"
            )
        if self.hidden_size % self.text_heads:
            raise ValueError(
                f"text hidden size {self.hidden_size} is not divisible by {self.text_heads} heads"
            )
        if not 0 <= self.fusion_layer < self.text_layers:
            raise ValueError(
                f"fusion_layer {self.fusion_layer} must lie in [0, {self.text_layers})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of patch size")

    def to_dict(self) -> dict:
        return {"model_type": "albef", **asdict(self)}

    def parameters(self) -> int:
        """The number of parameters `AlbefModel(self)` has, from the sizes alone (nothing is
        built), so that a config too large for the machine is refused before allocating."""
        w, h, g = self.vision_width, self.hidden_size, self.grid
        block = 4 * w + 4 * w * w + 4 * w + 2 * w * self.vision_mlp + self.vision_mlp + w
        vision = self.in_chans * self.patch_size**2 * w + w + (g * g + 2) * w
        vision += self.vision_depth * block + 2 * w
        rows = self.vocab_size + self.max_position_embeddings + self.type_vocab_size
        layer = 4 * h * h + 4 * h + 2 * h + 2 * h * self.intermediate_size
        layer += self.intermediate_size + h + 2 * h
        cross = 2 * h * h + 2 * h + 2 * w * h + 2 * h + 2 * h
        fused = self.text_layers - self.fusion_layer
        text = rows * h + 2 * h + self.text_layers * layer + fused * cross
        heads = (w + h + 2) * self.embed_dim + 2 * h + 2 + 1
        return vision + text + heads

    @classmethod
    def from_dict(cls, d: dict) -> AlbefConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- vision (timm-style ViT)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.vision_width, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, C], row-major grid


class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.probs = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.probs(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_eps)
        self.attn = VisionAttention(cfg.vision_width, cfg.vision_heads)
        self.norm2 = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_eps)
        self.mlp = Mlp(cfg.vision_width, cfg.vision_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, cfg.vision_width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vision_depth))
        self.norm = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(
        self,
        pixel_values: torch.Tensor,
        expand_index: torch.Tensor | None = None,
        expand_at: int | None = None,
    ) -> torch.Tensor:
        """Encode images; with `expand_index`, rows are gathered (one per phrase) before block
        `expand_at`, so blocks before it run once per image and later ones once per phrase."""
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for i, block in enumerate(self.blocks):
            if expand_index is not None and i == expand_at:
                x = x.index_select(0, expand_index)
            x = block(x)
        if expand_index is not None and expand_at is not None and expand_at >= len(self.blocks):
            x = x.index_select(0, expand_index)
        return self.norm(x)


# --------------------------------------------------------------------------- text (BERT, post-norm)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.text_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
            + self.position_embeddings(positions)[None]
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Scaled dot-product attention; keys/values come from `context` when it is given."""

    def __init__(self, hidden: int, kv_width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.probs = nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        additive_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_index: torch.Tensor | ImageGroups | None = None,
    ) -> torch.Tensor:
        """`context_index[b]`: the context row text row b attends to; as `ImageGroups`, the text
        rows of each context row attend as one query block (keys and values once per image)."""
        kv = x if context is None else context
        k, v = self._split(self.key(kv)), self._split(self.value(kv))
        if isinstance(context_index, ImageGroups):
            return self._grouped(x, k, v, additive_mask, context_index)
        if context_index is not None:  # keys/values once per image, then one row per phrase
            k, v = k.index_select(0, context_index), v.index_select(0, context_index)
        scores = self._split(self.query(x)) @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if additive_mask is not None:
            scores = scores + additive_mask
        attn = self.dropout(self.probs(scores.softmax(dim=-1)))
        out = (attn @ v).transpose(1, 2)
        return out.reshape(*out.shape[:2], -1)

    def _grouped(self, x, k, v, additive_mask, groups: ImageGroups) -> torch.Tensor:
        """The same attention with each image's phrases as one block of query rows; the
        probabilities are per pair ([B, H, T, N]) where `probs` sees them."""
        t = x.shape[1]
        q = self._split(groups.rows_to_blocks(self.query(x)))  # [G, H, P*T, d]
        scores = groups.probs_to_rows(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), t)
        if additive_mask is not None:
            scores = scores + additive_mask
        attn = self.dropout(self.probs(scores.softmax(dim=-1)))
        out = (groups.rows_to_probs(attn) @ v).transpose(1, 2)  # [G, P*T, H, d]
        return groups.blocks_to_rows(out.reshape(*out.shape[:2], -1), t)


class BertOutput(nn.Module):
    """Dense projection, dropout, residual add and LayerNorm (BERT's post-norm sublayer end)."""

    def __init__(self, width_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(width_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: AlbefConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg.hidden_size, kv_width, cfg.text_heads, cfg.dropout)
        self.output = BertOutput(cfg.hidden_size, cfg.hidden_size, cfg.text_eps, cfg.dropout)

    def forward(self, x, additive_mask=None, context=None, context_index=None):
        return self.output(self.self(x, additive_mask, context, context_index), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: AlbefConfig, cross: bool):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, cfg.vision_width) if cross else None
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg.intermediate_size, cfg.hidden_size, cfg.text_eps, cfg.dropout)

    def forward(self, x, additive_mask, image_embeds=None, image_index=None):
        x = self.attention(x, additive_mask)
        if self.crossattention is not None:
            x = self.crossattention(x, None, image_embeds, image_index)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(cfg, cross=i >= cfg.fusion_layer) for i in range(cfg.text_layers)
        )


class TextEncoder(nn.Module):
    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.fusion_layer = cfg.fusion_layer
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    @staticmethod
    def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Padding keys get -10000 added to their scores, as the original BERT/ALBEF code does."""
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only layers [0, fusion_layer): the ITC text features come from here."""
        x = self.embeddings(input_ids)
        mask = self.additive_mask(attention_mask, x.dtype)
        for layer in self.encoder.layer[: self.fusion_layer]:
            x = layer(x, mask)
        return x

    def fuse(
        self,
        text_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fusion layers [fusion_layer, end): text self-attention, then cross-attention to the
        image; `image_index[b]` says which image row text row b attends to."""
        x = text_hidden
        mask = self.additive_mask(attention_mask, x.dtype)
        if image_index is not None:  # each image's phrases attend to it as one query block
            image_index = ImageGroups.of(image_index, image_embeds.shape[0]) or image_index
        for layer in self.encoder.layer[self.fusion_layer :]:
            x = layer(x, mask, image_embeds, image_index)
        return x


# --------------------------------------------------------------------------- the model


class AlbefModel(nn.Module):
    """ALBEF with the heads that grounding needs: ITC projections and the ITM head."""

    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.visual_encoder = VisionTransformer(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        expand_index: torch.Tensor | None = None,
        expand_at: int | None = None,
    ) -> torch.Tensor:
        return self.visual_encoder(pixel_values, expand_index, expand_at)

    def itc_from(self, image_embeds: torch.Tensor, text_hidden: torch.Tensor):
        """Normalised ITC features from the image and text CLS tokens."""
        img = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        txt = F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)
        return img, txt

    def itm_from(
        self,
        image_embeds: torch.Tensor,
        text_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM logits [B, 2] (column 1 = match) from text-only hidden states and image tokens."""
        fused = self.text_encoder.fuse(text_hidden, attention_mask, image_embeds, image_index)
        return self.itm_head(fused[:, 0])

    def itc_features(self, pixel_values, input_ids, attention_mask):
        """(image features, text features), each L2-normalised [B, embed_dim]."""
        text = self.text_encoder.encode_text(input_ids, attention_mask)
        return self.itc_from(self.encode_image(pixel_values), text)

    def itm_logits(self, pixel_values, input_ids, attention_mask, image_index=None):
        """ITM logits [B, 2]; row b pairs text b with image `image_index[b]` (default b)."""
        text = self.text_encoder.encode_text(input_ids, attention_mask)
        return self.itm_from(self.encode_image(pixel_values), text, attention_mask, image_index)

    # ----------------------------------------------------------------------- our own format

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors, loadable by `AlbefModel.from_pretrained`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> AlbefModel:
        """A saved model; a config that cannot form a model, one larger than this machine's
        memory (`groundcam.model_files.check_model_size`) or weights that do not fit it are
        refused in one line naming the file."""
        from groundcam.errors import InputError
        from groundcam.model_files import check_model_size, check_safetensors, read_json

        directory = Path(directory)
        cfg_file, weights = directory / "config.json", directory / "model.safetensors"
        try:
            cfg = AlbefConfig.from_dict(read_json(cfg_file))
            cfg.validate()
        except InputError:
            raise
        except (TypeError, ValueError) as e:
            raise InputError(f"{cfg_file}: {e}") from None
        check_model_size(cfg.parameters(), cfg_file)
        if not weights.is_file():
            raise InputError(f"{directory}: no model.safetensors beside config.json")
        check_safetensors(weights)
        model = cls(cfg)
        try:
            model.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as e:
            first = " ".join(str(e).split())[:300]
            raise InputError(f"{weights} does not fit {cfg_file}: {first}") from None
        return model.eval()
