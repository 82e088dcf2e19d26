"""SCAN, stacked cross attention for image-text matching (Lee et al., ECCV 2018), from the
paper's equations.

Regions v_1..v_k (detector features) are projected by a linear layer and l2-normalised; words
are embedded and read by a bidirectional GRU whose forward and backward states are averaged,
then l2-normalised. With queries q_1..q_n and context items c_1..c_m (all unit vectors):

    s_ij  = c_i . q_j                                    raw cosine scores, [m, n]
    s_ij  = LeakyReLU_0.1(s_ij) / ||LeakyReLU_0.1(s_i.)||  clipped_l2norm, across the queries j
    a_ji  = softmax_i(lambda_softmax * s_ij)             each query attends the context items
    a_j   = sum_i a_ji c_i                               its attended vector
    R_j   = cos(q_j, a_j)                                relevance
    S     = log(sum_j exp(lambda_lse * R_j)) / lambda_lse   (LogSumExp; or Mean, Max, Sum)

Text-to-image (t2i): words are the queries, regions the context; image-to-text (i2t): regions
the queries, words the context. The loss is VSE++'s hinge triplet loss with the hardest negative
of the batch in both directions (margin 0.2, summed over the batch as the paper's code does).
Defaults are the paper's: embed 1024, word 300, lambda_softmax 9 (t2i; the paper used 4 for
i2t), lambda_lse 6, LogSumExp.

For synthetic shapes scenes, which ship no detector, the model carries its own small region
stage (`region_cnn`): a 3-layer CNN over the image, whose features are averaged and max-pooled
inside each proposal box and joined with the box's coordinates. Proposals (`propose`) are the
boxes of the saturated blobs of the image (the shapes' colours against their pale background),
copies of them (jittered while training), and a fixed 3x3 grid of background boxes. Models
trained on bottom-up features have no `region_cnn` and read features and boxes directly
(`groundcam.data.regions`).

A model is a directory: `config.json`, `model.safetensors`, `vocab.json` (`gc.load(dir)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from groundcam.data.caption_text import Vocabulary, tokenize
from groundcam.errors import InputError

MODEL_TYPE = "groundcam-scan"
ARCHITECTURE = "SCAN"
AGGREGATIONS = ("LogSumExp", "Mean", "Max", "Sum")
DIRECTIONS = ("t2i", "i2t")
EPS = 1e-8


@dataclass
class ScanConfig:
    """The paper's hyper-parameters as defaults; `region_cnn` (channels per conv layer) is set
    for models that pool their own regions from pixels (shapes), empty for detector features."""

    vocab_size: int
    img_dim: int = 2048
    word_dim: int = 300
    embed_size: int = 1024
    num_layers: int = 1
    bi_gru: bool = True
    no_imgnorm: bool = False
    direction: str = "t2i"
    lambda_softmax: float = 9.0
    lambda_lse: float = 6.0
    agg: str = "LogSumExp"
    margin: float = 0.2
    max_violation: bool = True
    region_cnn: tuple[int, ...] = ()
    image_size: int = 96
    object_slots: int = 6  # proposals kept for blobs (padded with copies)
    background_grid: int = 3  # background boxes: a grid x grid tiling of the image

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "img_dim", "word_dim", "embed_size", "num_layers", "image_size")
        for name in sizes + ("object_slots",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if not isinstance(self.background_grid, int) or isinstance(self.background_grid, bool):
            raise ValueError(
                f"background_grid must be a whole number, got {self.background_grid!r}"
            )
        if self.background_grid < 0 or not isinstance(self.region_cnn, list | tuple):
            raise ValueError("background_grid must be >= 0 and region_cnn a list of channels")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.region_cnn):
            raise ValueError(
                f"region_cnn must list positive channel counts, got {self.region_cnn!r}"
            )
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        self.region_cnn = tuple(self.region_cnn)
        if self.region_cnn:
            self.img_dim = 2 * self.region_cnn[-1] + 5

    def parameters(self) -> int:
        """How many parameters this configuration builds (checked against memory before building)."""
        e, w = self.embed_size, self.word_dim
        gru, width = 0, w
        for _ in range(self.num_layers):
            gru += (2 if self.bi_gru else 1) * 3 * (width * e + e * e + 2 * e)
            width = e * (2 if self.bi_gru else 1)
        cnn, width = 0, 3
        for c in self.region_cnn:
            cnn += width * c * 9 + c
            width = c
        return self.vocab_size * w + gru + self.img_dim * e + e + cnn

    @property
    def regions(self) -> int:
        """Regions per image for models that propose their own."""
        return self.object_slots + self.background_grid**2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["region_cnn"] = list(self.region_cnn)
        return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> ScanConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type", "architectures"})
        if unknown:
            raise ValueError(f"{where}: unknown SCAN settings {unknown}")
        if "vocab_size" not in d:
            raise ValueError(f"{where}: no vocab_size")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- the equations


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / (||x|| + 1e-8) along `dim` (SCAN's l2norm)."""
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + EPS)


def cosine(x1: torch.Tensor, x2: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Cosine similarity along `dim`, the norms' product clamped at 1e-8."""
    return (x1 * x2).sum(dim) / (x1.norm(dim=dim) * x2.norm(dim=dim)).clamp(min=EPS)


def func_attention(
    query: torch.Tensor,
    context: torch.Tensor,
    lambda_softmax: float,
    query_mask: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query item attends the context items: query [n, q, d], context [n, m, d] ->
    (attended vectors [n, q, d], attention [n, q, m]). Scores are clipped (LeakyReLU 0.1) and
    l2-normalised across the query items; masked items (False) take no part. `hook` sees (and
    may replace) the attention before it weighs the context (where explanations record it)."""
    scores = torch.bmm(context, query.transpose(1, 2))  # [n, m, q]
    scores = F.leaky_relu(scores, 0.1)
    if query_mask is not None:
        scores = scores * query_mask[:, None, :].to(scores.dtype)
    scores = l2norm(scores, 2).transpose(1, 2)  # [n, q, m]
    logits = scores * lambda_softmax
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask[:, None, :], float("-inf"))
    attn = logits.softmax(-1)
    if hook is not None:
        attn = hook(attn)
    return torch.bmm(attn, context), attn


def pool(relevance: torch.Tensor, mask: torch.Tensor, agg: str, lambda_lse: float) -> torch.Tensor:
    """Relevances [n, q] of the real (mask True) query items pooled to [n]."""
    if agg == "LogSumExp":
        r = (relevance * lambda_lse).masked_fill(~mask, float("-inf"))
        return torch.logsumexp(r, 1) / lambda_lse
    if agg == "Max":
        return relevance.masked_fill(~mask, float("-inf")).max(1).values
    total = (relevance * mask.to(relevance.dtype)).sum(1)
    if agg == "Sum":
        return total
    if agg == "Mean":
        return total / mask.sum(1).clamp(min=1).to(relevance.dtype)
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def pair_similarity(
    regions: torch.Tensor,
    words: torch.Tensor,
    word_lengths: torch.Tensor | list[int],
    direction: str = "t2i",
    lambda_softmax: float = 9.0,
    lambda_lse: float = 6.0,
    agg: str = "LogSumExp",
    hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b of `regions` [n, k, d] against row b of `words` [n, L, d] (its first
    `word_lengths[b]` words): (similarity [n], attention) with attention [n, L, k] word->region
    for t2i, [n, k, L] region->word for i2t (`hook`: as `func_attention`'s)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    lengths = torch.as_tensor(word_lengths, device=words.device)
    word_mask = torch.arange(words.shape[1], device=words.device)[None] < lengths[:, None]
    words = words * word_mask[..., None].to(words.dtype)
    if direction == "t2i":
        attended, attn = func_attention(words, regions, lambda_softmax, word_mask, hook=hook)
        relevance = cosine(words, attended)
        return pool(relevance, word_mask, agg, lambda_lse), attn
    attended, attn = func_attention(
        regions, words, lambda_softmax, context_mask=word_mask, hook=hook
    )
    relevance = cosine(regions, attended)
    all_regions = torch.ones(relevance.shape, dtype=torch.bool, device=relevance.device)
    return pool(relevance, all_regions, agg, lambda_lse), attn


def xattn_similarity(
    regions: torch.Tensor,
    words: torch.Tensor,
    word_lengths: torch.Tensor | list[int],
    direction: str = "t2i",
    lambda_softmax: float = 9.0,
    lambda_lse: float = 6.0,
    agg: str = "LogSumExp",
) -> torch.Tensor:
    """SCAN's similarity of every image (`regions` [I, k, d]) with every caption (`words`
    [C, L, d], caption c's first `word_lengths[c]` words): [I, C]. The paper's defaults: t2i,
    lambda_softmax 9, LogSumExp with lambda_lse 6."""
    n_img = regions.shape[0]
    lengths = torch.as_tensor(word_lengths).tolist()
    columns = []
    for c in range(words.shape[0]):
        caption = words[c : c + 1, : lengths[c]].expand(n_img, -1, -1)
        sim, _ = pair_similarity(
            regions, caption, [lengths[c]] * n_img, direction, lambda_softmax, lambda_lse, agg
        )
        columns.append(sim)
    return torch.stack(columns, 1)


def contrastive_loss(
    scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True
) -> torch.Tensor:
    """VSE++'s hinge triplet loss on a square [images, captions] matrix whose diagonal holds the
    matching pairs: per image, its negative captions, and per caption, its negative images;
    the hardest negative of each (`max_violation`) or all of them, summed."""
    diagonal = scores.diagonal()
    cost_caption = (margin + scores - diagonal[:, None]).clamp(min=0)  # image i, caption j
    cost_image = (margin + scores - diagonal[None, :]).clamp(min=0)  # caption j, image i
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption, cost_image = cost_caption.masked_fill(eye, 0), cost_image.masked_fill(eye, 0)
    if max_violation:
        return cost_caption.max(1).values.sum() + cost_image.max(0).values.sum()
    return cost_caption.sum() + cost_image.sum()


# ----------------------------------------------------------------------------- regions of shapes


def _blob_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1 exclusive) of the 4-connected blobs of a boolean mask,
    largest first."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    boxes = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, x0, y0, x1, y1, n = [(y, x)], x, y, x, y, 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            n += 1
            x0, y0, x1, y1 = min(x0, cx), min(y0, cy), max(x1, cx), max(y1, cy)
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        boxes.append((n, (x0, y0, x1 + 1, y1 + 1)))
    return [b for _, b in sorted(boxes, key=lambda t: -t[0])]


def propose(
    image: np.ndarray, slots: int, grid: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Proposal boxes [slots + grid*grid, 4] in fractions of the image for an RGB array: the
    saturated blobs (at least 9 pixels; more than `slots`: the largest), the remaining object
    slots filled with copies of them (jittered by up to 15% of their size when `rng` is given),
    then a fixed grid of background boxes."""
    rgb = image.astype(np.int16)
    saturated = (rgb.max(-1) - rgb.min(-1)) > 60
    h, w = saturated.shape
    found = [b for b in _blob_boxes(saturated) if (b[2] - b[0]) * (b[3] - b[1]) >= 9][:slots]
    boxes = [(x0 / w, y0 / h, x1 / w, y1 / h) for x0, y0, x1, y1 in found] or [(0, 0, 1, 1)]
    objects = []
    for k in range(slots):
        x0, y0, x1, y1 = boxes[k % len(boxes)]
        if rng is not None and k >= len(boxes):
            dx, dy = (x1 - x0) * 0.15, (y1 - y0) * 0.15
            x0, x1 = x0 + rng.uniform(-dx, dx), x1 + rng.uniform(-dx, dx)
            y0, y1 = y0 + rng.uniform(-dy, dy), y1 + rng.uniform(-dy, dy)
        objects.append(_fit((x0, y0, x1, y1)))
    cells = [
        (i / grid, j / grid, (i + 1) / grid, (j + 1) / grid)
        for j in range(grid)
        for i in range(grid)
    ]
    return np.asarray(objects + cells, dtype=np.float32)


def _fit(box: tuple[float, ...]) -> tuple[float, float, float, float]:
    """A box clipped to the image, at least 2% wide and high."""
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in box)
    x1, y1 = max(x1, min(x0 + 0.02, 1.0)), max(y1, min(y0 + 0.02, 1.0))
    x0, y0 = min(x0, x1 - 0.02), min(y0, y1 - 0.02)
    return (x0, y0, x1, y1)


class RegionCNN(nn.Module):
    """Pixels [B, 3, S, S] and boxes [B, K, 4] -> region features [B, K, 2C + 5]: a small CNN's
    features averaged and max-pooled over the cells whose centres lie in each box (the nearest
    cell when none does), joined with the box and its area."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers, width = [], 3
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.ReLU()]
            width = c
        self.net = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        grid = self.net(pixel_values)  # [B, C, h, w]
        h, w = grid.shape[-2:]
        ys = (torch.arange(h, device=grid.device) + 0.5) / h
        xs = (torch.arange(w, device=grid.device) + 0.5) / w
        x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))
        inside = (xs >= x0) & (xs < x1)  # [B, K, 1, w]
        inside = inside & (ys[:, None] >= y0) & (ys[:, None] < y1)  # [B, K, h, w]
        centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
        nearest = ((xs - centre_x).abs() <= 0.5 / w) & ((ys[:, None] - centre_y).abs() <= 0.5 / h)
        empty = ~inside.flatten(2).any(-1)
        mask = torch.where(empty[..., None, None], nearest, inside).to(grid.dtype)
        flat, m = grid.flatten(2), mask.flatten(2)  # [B, C, hw], [B, K, hw]
        mean = torch.bmm(m, flat.transpose(1, 2)) / m.sum(-1, keepdim=True).clamp(min=1)
        big = flat[:, None] + (m[:, :, None] - 1) * 1e4  # outside cells pushed far below
        peak = big.max(-1).values
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[..., None]
        return torch.cat([mean, peak, boxes, area], -1)


# ----------------------------------------------------------------------------- the model


class ImageEncoder(nn.Module):
    """Region features [B, K, img_dim] -> embeddings [B, K, embed] (linear, l2-normalised)."""

    def __init__(self, cfg: ScanConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.img_dim, cfg.embed_size)
        bound = np.sqrt(6.0) / np.sqrt(cfg.img_dim + cfg.embed_size)  # the paper's Xavier init
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        self.regions = nn.Identity()  # the projected regions: groundcam's Grad-CAM hooks here
        self.normalize = not cfg.no_imgnorm

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.regions(self.fc(features))
        return l2norm(x, -1) if self.normalize else x


class TextEncoder(nn.Module):
    """Word ids [B, L] and lengths -> word embeddings [B, L, embed]: embedding, (bi-)GRU with the
    two directions averaged, l2-normalised; padded positions are zero."""

    def __init__(self, cfg: ScanConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.gru = nn.GRU(
            cfg.word_dim, cfg.embed_size, cfg.num_layers, batch_first=True, bidirectional=cfg.bi_gru
        )
        self.bi = cfg.bi_gru

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(input_ids),
            lengths.cpu().clamp(min=1),
            batch_first=True,
            enforce_sorted=False,
        )
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(
            out, batch_first=True, total_length=input_ids.shape[1]
        )
        if self.bi:
            half = out.shape[-1] // 2
            out = (out[..., :half] + out[..., half:]) / 2
        return l2norm(out, -1)


class SCAN(nn.Module):
    """The matching model: `encode_regions`, `encode_words`, `similarity` of matched rows and
    `loss` on a batch of matching pairs; `propose_boxes` and `preprocess` for pixel models."""

    def __init__(self, cfg: ScanConfig, vocab: Vocabulary):
        super().__init__()
        if len(vocab) != cfg.vocab_size:
            raise ValueError(
                f"the vocabulary has {len(vocab)} words but the model expects {cfg.vocab_size}"
            )
        self.config, self.vocab = cfg, vocab
        self.region_cnn = RegionCNN(cfg.region_cnn) if cfg.region_cnn else None
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg)
        # word->region attention of t2i as [B, 1 head, L, K]: what groundcam's `attention` records
        self.word_region_attention = nn.Identity()

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB resized to `image_size` square (bilinear), scaled to [0, 1] (the boxes are
        proposed from these pixels)."""
        size = self.config.image_size
        arrays = [
            np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return x.to(next(self.parameters()).device)

    def propose_boxes(
        self, pixel_values: torch.Tensor, rng: np.random.Generator | None = None
    ) -> torch.Tensor:
        """Proposal boxes [B, K, 4] (fractions) of preprocessed images (`propose`)."""
        arrays = (pixel_values.detach().permute(0, 2, 3, 1).cpu().numpy() * 255).round()
        cfg = self.config
        boxes = [propose(a, cfg.object_slots, cfg.background_grid, rng) for a in arrays]
        return torch.from_numpy(np.stack(boxes)).to(pixel_values.device)

    def encode_words(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids, lengths)

    def encode_regions(
        self, features: torch.Tensor, boxes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embedded regions [B, K, embed] from detector features, or from pixels and proposal
        boxes for a model with its own `region_cnn`."""
        if self.region_cnn is not None:
            if boxes is None:
                boxes = self.propose_boxes(features)
            features = self.region_cnn(features, boxes)
        return self.image(features)

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids [B, L] (unknown words <UNK>, no start or end token) and lengths [B]."""
        rows = [[self.vocab.index.get(w, self.vocab.unk_id) for w in tokenize(t)] for t in texts]
        width = max([1, *(len(r) for r in rows)])
        ids = torch.full((len(rows), width), self.vocab.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        device = next(self.parameters()).device
        return ids.to(device), torch.tensor([len(r) for r in rows], device=device)

    # ------------------------------------------------------------------ scores
    def similarity(
        self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Similarity of matched rows (embedded regions and words) with the model's settings;
        the t2i word->region attention passes through `word_region_attention` (on the score's
        path for t2i models; an i2t model computes it beside its score)."""
        cfg = self.config

        def record(attn: torch.Tensor) -> torch.Tensor:
            return self.word_region_attention(attn[:, None])[:, 0]

        t2i = cfg.direction == "t2i"
        sim, _ = pair_similarity(
            regions, words, lengths, cfg.direction, cfg.lambda_softmax, cfg.lambda_lse, cfg.agg,
            hook=record if t2i else None,
        )  # fmt: skip
        if not t2i:
            pair_similarity(regions, words, lengths, "t2i", cfg.lambda_softmax, hook=record)
        return sim

    def score_matrix(
        self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """[images, captions] similarities with the model's settings."""
        cfg = self.config
        return xattn_similarity(
            regions, words, lengths, cfg.direction, cfg.lambda_softmax, cfg.lambda_lse, cfg.agg
        )

    def loss(self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor):
        """The hinge triplet loss of a batch whose row b of images and captions match."""
        cfg = self.config
        return contrastive_loss(
            self.score_matrix(regions, words, lengths), cfg.margin, cfg.max_violation
        )

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | Path) -> None:
        from groundcam.models.saved import write_saved

        write_saved(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SCAN:
        """A saved SCAN directory; files that do not fit each other are a one-line error."""
        from groundcam.models.saved import load_weights, read_saved, read_weights

        cfg, vocab, cfg_file, weights = read_saved(directory, ScanConfig.from_dict, "SCAN model")
        model = cls(cfg, vocab)
        return load_weights(model, read_weights(weights), weights, cfg_file)
