"""Show, attend and tell (Xu et al. 2015): a CNN grid of region features read by an LSTM decoder
with additive soft attention; each step's attention weights say where that word was found.

Encoder: a transformers `ResNetModel` without its pooling and classifier, built from a config
("resnet-tiny") or loaded from the hub / a directory ("microsoft/resnet-50": 7x7x2048 at 224 px,
49 regions). Decoder, per step t with the previous word y and state (h, c):

    alpha = softmax(w . tanh(W_f f_i + W_h h))            additive attention over regions
    z     = sigmoid(W_b h) * sum_i alpha_i f_i            the gating scalar scales the context
    h, c  = LSTM([embed(y), z], (h, c))
    logits = L_o dropout(embed(y) + L_h h + L_z z)        the paper's deep output layer

with (h, c) initialised from linear maps of the mean feature, and the doubly-stochastic
regulariser `lambda * sum_i (1 - sum_t alpha_ti)^2`. A model is a directory: `config.json`,
`model.safetensors` and the vocabulary `vocab.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from groundcam.data.caption_text import Vocabulary

MODEL_TYPE = "groundcam-captioner"
ARCHITECTURE = "ShowAttendTell"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A small ResNet for synthetic data: stride 8 (96 px -> a 12x12 grid), one block per stage so
# that a region's receptive field (about 50 px) stays local enough for attention to point.
RESNET_TINY = {
    "embedding_size": 32,
    "hidden_sizes": [48, 96],
    "depths": [1, 1],
    "layer_type": "basic",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
}


SIZE_FIELDS = (
    "vocab_size",
    "image_size",
    "embed_dim",
    "attention_dim",
    "decoder_dim",
    "max_length",
)


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild the model without the hub: the encoder's own config travels
    inside (`encoder_config`), its origin is kept for the record (`encoder`)."""

    vocab_size: int
    encoder: str = "resnet-tiny"
    encoder_config: dict = field(default_factory=dict)
    image_size: int = 224
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    embed_dim: int = 512
    attention_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    attention_regularizer: float = 1.0  # lambda of the doubly-stochastic term
    freeze_encoder: bool = True
    max_length: int = 30  # words generated at most (the <EOS> not counted)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> CaptionerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type", "architectures"})
        if unknown:
            raise ValueError(f"{where}: unknown captioner settings {unknown}")
        if "vocab_size" not in d:
            raise ValueError(f"{where}: no vocab_size")
        d = {k: v for k, v in d.items() if k in known}
        for k in ("image_mean", "image_std"):
            if k in d:
                d[k] = tuple(d[k])
        cfg = cls(**d)
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        """Raise ValueError naming `where` and the key when a size is not a positive whole
        number (the encoder's `embedding_size`, `hidden_sizes` and `depths` included)."""
        enc = self.encoder_config if isinstance(self.encoder_config, dict) else {}
        sizes = {k: [getattr(self, k)] for k in SIZE_FIELDS}
        sizes |= {k: enc[k] for k in ("embedding_size", "hidden_sizes", "depths") if k in enc}
        for key, values in sizes.items():
            values = values if isinstance(values, list) else [values]
            if not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
            ):
                raise ValueError(f"{where}: {key} must be positive whole numbers, got {values!r}")

    def parameters(self) -> int:
        """About how many parameters the model has (the ResNet's 3x3 convolutions, the LSTM,
        the attention and the word layers), from the sizes alone."""
        enc = self.encoder_config or RESNET_TINY
        widths, depths = enc.get("hidden_sizes", [2048]), enc.get("depths", [1])
        encoder = sum(2 * 9 * w * w * n for w, n in zip(widths, depths, strict=False))
        f, e, h, a = widths[-1], self.embed_dim, self.decoder_dim, self.attention_dim
        decoder = 2 * self.vocab_size * e + 4 * h * (e + f + h) + a * (f + h) + 3 * h * f
        return encoder + decoder + e * (h + f)


def build_encoder(source: str, config: dict | None = None) -> tuple[nn.Module, dict]:
    """A `ResNetModel` and its config dict: from `config` when given (a saved model), else
    "resnet-tiny" from our config, else `from_pretrained(source)` (a hub id or a directory)."""
    from transformers import ResNetConfig, ResNetModel

    from groundcam.model_files import pretrained

    if config:
        cfg = ResNetConfig(**{k: v for k, v in config.items() if k != "model_type"})
        return ResNetModel(cfg), cfg.to_dict()
    if source == "resnet-tiny":
        cfg = ResNetConfig(**RESNET_TINY)
        return ResNetModel(cfg), cfg.to_dict()
    model = pretrained(ResNetModel, source)
    return model, model.config.to_dict()


class ImageEncoder(nn.Module):
    """Pixels [B, 3, H, W] -> region features [B, h*w, C] (row-major grid, no pooling)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet = resnet
        self.regions = nn.Identity()  # the recorded grid: groundcam's Grad-CAM hooks it here

    @property
    def feature_dim(self) -> int:
        return int(self.resnet.config.hidden_sizes[-1])

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The feature grid for an image of `height` x `width`, from the ResNet's strides: the
        stem (conv 7x7/2, max-pool 3x3/2), then a 3x3/2 convolution per downsampling stage."""
        cfg = self.resnet.config
        stages = len(cfg.depths) - (0 if cfg.downsample_in_first_stage else 1)

        def side(n: int) -> int:
            n = (n - 1) // 2 + 1  # conv 7x7, stride 2, padding 3
            n = (n - 1) // 2 + 1  # max-pool 3x3, stride 2, padding 1
            for _ in range(stages):
                n = (n - 1) // 2 + 1
            return n

        return side(height), side(width)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.resnet(pixel_values).last_hidden_state  # [B, C, h, w]
        h, w = grid.shape[-2:]
        return self.regions(grid.flatten(2).transpose(1, 2)), (h, w)


class AdditiveAttention(nn.Module):
    """Bahdanau attention of the decoder state over the regions."""

    def __init__(self, feature_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.feature = nn.Linear(feature_dim, attention_dim)
        self.state = nn.Linear(decoder_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, projected: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """`projected` = `self.feature(features)` (once per sequence) -> alpha [B, R]."""
        e = self.score(torch.tanh(projected + self.state(h)[:, None])).squeeze(-1)
        return e.softmax(-1)


class AttentionDecoder(nn.Module):
    def __init__(self, cfg: CaptionerConfig, feature_dim: int):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.attention = AdditiveAttention(feature_dim, cfg.decoder_dim, cfg.attention_dim)
        self.init_h = nn.Linear(feature_dim, cfg.decoder_dim)
        self.init_c = nn.Linear(feature_dim, cfg.decoder_dim)
        self.gate = nn.Linear(cfg.decoder_dim, feature_dim)
        self.lstm = nn.LSTMCell(cfg.embed_dim + feature_dim, cfg.decoder_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        # deep output (Xu et al. eq. 7): the word is read from the previous word, the new state
        # and the attended context together, so the context reaches the word directly
        self.out_state = nn.Linear(cfg.decoder_dim, cfg.embed_dim)
        self.out_context = nn.Linear(feature_dim, cfg.embed_dim)
        self.out = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        # Every step's weights as [B, 1 head, T, R] with row t = where the decoder looked to write
        # input token t (row 0, the <SOS>, is zero): what groundcam's `attention` records.
        self.attention_maps = nn.Identity()

    def start(self, features: torch.Tensor):
        mean = features.mean(1)
        return self.init_h(mean), self.init_c(mean), self.attention.feature(features)

    def step(self, features, projected, word, h, c):
        """One word: (logits [B, V], alpha [B, R], h, c)."""
        alpha = self.attention(projected, h)
        context = torch.sigmoid(self.gate(h)) * (alpha[..., None] * features).sum(1)
        embedded = self.embed(word)
        h, c = self.lstm(torch.cat([embedded, context], -1), (h, c))
        deep = embedded + self.out_state(h) + self.out_context(context)
        return self.out(self.dropout(deep)), alpha, h, c

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor):
        """Teacher forcing: row t of the logits and of the weights predicts token t+1."""
        h, c, projected = self.start(features)
        logits, alphas = [], []
        for t in range(input_ids.shape[1]):
            step_logits, alpha, h, c = self.step(features, projected, input_ids[:, t], h, c)
            logits.append(step_logits)
            alphas.append(alpha)
        alphas = torch.stack(alphas, 1)
        self.attention_maps(
            torch.cat([torch.zeros_like(alphas[:, :1]), alphas[:, :-1]], 1)[:, None]
        )
        return torch.stack(logits, 1), alphas


@dataclass
class CaptionOutput:
    logits: torch.Tensor  # [B, T, V]: row t scores token t+1
    alphas: torch.Tensor  # [B, T, R]
    grid: tuple[int, int]
    loss: torch.Tensor | None = None
    cross_entropy: torch.Tensor | None = None
    regularizer: torch.Tensor | None = None


class ShowAttendTell(nn.Module):
    """The captioner: `forward(pixel_values, input_ids)` teacher-forces `<SOS> w1 .. wn <EOS>`
    (padded with `<PAD>`); `generate` decodes greedily or with a beam."""

    def __init__(self, cfg: CaptionerConfig, vocab: Vocabulary, encoder: nn.Module | None = None):
        super().__init__()
        if len(vocab) != cfg.vocab_size:
            raise ValueError(
                f"the vocabulary has {len(vocab)} words but the model expects {cfg.vocab_size}"
            )
        if encoder is None:
            encoder, cfg.encoder_config = build_encoder(cfg.encoder, cfg.encoder_config)
        self.config, self.vocab = cfg, vocab
        self.encoder = ImageEncoder(encoder)
        self.decoder = AttentionDecoder(cfg, self.encoder.feature_dim)
        self.set_encoder_frozen(cfg.freeze_encoder)

    # ------------------------------------------------------------------ encoder
    def set_encoder_frozen(self, frozen: bool) -> None:
        self.config.freeze_encoder = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> ShowAttendTell:
        super().train(mode)
        if self.config.freeze_encoder:  # a frozen encoder keeps its batch-norm statistics
            self.encoder.eval()
        return self

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB, resized to `image_size` square (bilinear), scaled to [0, 1], normalised."""
        size = self.config.image_size
        arrays = [
            np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images
        ]
        return self.normalize(arrays).to(next(self.parameters()).device)

    def normalize(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """[B, 3, H, W] float pixels from resized RGB arrays [H, W, 3] (uint8), on the CPU."""
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.config.image_mean)[:, None, None]
        std = torch.tensor(self.config.image_std)[:, None, None]
        return (x - mean) / std

    # ------------------------------------------------------------------ training and explaining
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        image_index: torch.Tensor | None = None,
        labels: bool = False,
    ) -> CaptionOutput:
        """Logits and weights for `input_ids` [B, T]; `image_index` maps rows to images when one
        image has several captions. `labels=True`: `input_ids` are whole captions, and the loss
        (cross-entropy over non-`<PAD>` targets + the regulariser) is returned too."""
        features, grid = self.encoder(pixel_values)
        if image_index is not None:
            features = features.index_select(0, image_index)
        inputs = input_ids[:, :-1] if labels else input_ids
        logits, alphas = self.decoder(features, inputs)
        out = CaptionOutput(logits, alphas, grid)
        if labels:
            targets = input_ids[:, 1:]
            keep = targets != self.vocab.pad_id
            out.cross_entropy = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.vocab.pad_id
            )
            coverage = (alphas * keep[..., None]).sum(1)  # sum over the real steps only
            out.regularizer = ((1.0 - coverage) ** 2).sum(-1).mean()
            out.loss = out.cross_entropy + self.config.attention_regularizer * out.regularizer
        return out

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor, beam: int = 1, max_length: int | None = None
    ) -> list[list[int]]:
        """Word ids per image, `<SOS>` first, ending in `<EOS>` unless `max_length` words came
        first. `beam=1` is greedy; wider beams keep the `beam` best partial captions by summed
        log-probability and return the best finished one."""
        if beam < 1:
            raise ValueError(f"beam must be at least 1, got {beam}")
        max_length = self.config.max_length if max_length is None else max_length
        features, _ = self.encoder(pixel_values)
        if beam == 1:
            return self._greedy(features, max_length)
        return [self._beam(features[i : i + 1], beam, max_length) for i in range(len(features))]

    def _next_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next word; `<PAD>` and `<SOS>` are never written."""
        logp = logits.float().log_softmax(-1)
        logp[:, [self.vocab.pad_id, self.vocab.sos_id]] = float("-inf")
        return logp

    def _greedy(self, features, max_length):
        d, v = self.decoder, self.vocab
        h, c, projected = d.start(features)
        word = torch.full((len(features),), v.sos_id, device=features.device)
        out = [[v.sos_id] for _ in range(len(features))]
        done = [False] * len(features)
        for _ in range(max_length + 1):
            logits, _, h, c = d.step(features, projected, word, h, c)
            word = self._next_scores(logits).argmax(-1)
            for i, w in enumerate(word.tolist()):
                if not done[i]:
                    out[i].append(w)
                    done[i] = w == v.eos_id
            if all(done):
                break
        return [ids if ids[-1] == v.eos_id else ids[: max_length + 1] for ids in out]

    def _beam(self, features, k, max_length):
        d, v = self.decoder, self.vocab
        h, c, projected = d.start(features)
        seqs = [[v.sos_id]]
        totals = torch.zeros(1, device=features.device)
        finished: list[tuple[float, list[int]]] = []
        for _ in range(max_length + 1):
            n = len(seqs)
            words = torch.tensor([s[-1] for s in seqs], device=features.device)
            logits, _, h, c = d.step(
                features.expand(n, -1, -1), projected.expand(n, -1, -1), words, h, c
            )
            scores = (totals[:, None] + self._next_scores(logits)).flatten()
            top, flat = scores.topk(min(k, scores.numel()))
            rows, ids = flat // logits.shape[1], flat % logits.shape[1]
            keep = []
            for score, r, w in zip(top.tolist(), rows.tolist(), ids.tolist(), strict=True):
                seq = [*seqs[r], w]
                if w == v.eos_id:
                    finished.append((score, seq))
                else:
                    keep.append((score, r, seq))
            if len(finished) >= k or not keep:
                break
            seqs = [s for _, _, s in keep]
            index = torch.tensor([r for _, r, _ in keep], device=features.device)
            totals = torch.tensor([s for s, _, _ in keep], device=features.device)
            h, c = h.index_select(0, index), c.index_select(0, index)
        if not finished:  # no caption ended within max_length words: the best partial one
            return seqs[0][: max_length + 1]
        return max(finished, key=lambda t: t[0])[1]

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | Path) -> None:
        from groundcam.models.saved import write_saved

        write_saved(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ShowAttendTell:
        """A saved captioner; a vocabulary that does not fit the weights is a one-line error."""
        from groundcam.models.saved import load_weights, read_saved, read_weights

        cfg, vocab, cfg_file, weights = read_saved(
            directory, CaptionerConfig.from_dict, "captioner"
        )
        model = cls(cfg, vocab)
        state = read_weights(weights)
        rows = state.get("decoder.embed.weight")
        if rows is not None and rows.shape[0] != len(vocab):
            raise ValueError(
                f"{cfg_file.parent / 'vocab.json'} has {len(vocab)} words but {weights} was "
                f"trained with {rows.shape[0]}: the vocabulary does not belong to this checkpoint"
            )
        return load_weights(model, state, weights, cfg_file)
