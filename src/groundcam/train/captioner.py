"""`groundcam train captioner`: show, attend and tell on a captions file and an image folder, on
the shared training loop (Accelerate, resumable, every loss term logged).

Captions come in any layout `groundcam.data.captions` reads (Flickr `captions.txt`,
`results.csv`, `*.token`, Karpathy's `dataset_*.json`). With Karpathy splits, `train` and
`restval` train and `val` validates; without splits a fixed share of the images (chosen by a hash
of the file name) validates. Validation runs once per epoch: BLEU-1..4 and CIDEr-D of the decoded
captions against every reference, as the COCO caption evaluation computes them."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from groundcam.data.caption_text import Vocabulary, tokenize
from groundcam.data.captions import is_val_image, read_captions
from groundcam.data.sample import ReadReport
from groundcam.errors import InputError
from groundcam.io import read_image
from groundcam.models.captioner import CaptionerConfig, ShowAttendTell, build_encoder
from groundcam.train import caption_grounding as grounding
from groundcam.train.loop import LoopConfig, fit, main_process, shard

TRAIN_SPLITS = ("train", "restval")


@dataclass
class TrainConfig:
    captions: str
    images: str
    out: str
    encoder: str = "resnet-tiny"
    freeze_encoder: bool | None = None  # None: frozen when pretrained, trained when from a config
    image_size: int = 224
    embed_dim: int = 512
    attention_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    attention_regularizer: float = 0.005  # lambda of the sum over regions (about 1/R: see CLI help)
    min_word_count: int = 5
    max_words: int = 30
    epochs: int = 10
    batch_size: int = 32
    lr: float = 4e-4
    weight_decay: float = 0.0
    warmup: int = 0
    clip_grad: float = 5.0
    seed: int = 0
    val_fraction: float = 0.05
    val_images: int = 500
    beam: int = 1
    sample_every: int = 100
    grad_accum: int = 1
    precision: str = "fp32"
    ground: str = "none"  # grounding supervision: none, attention (Liu et al. 2017) or amc
    ground_weight: float = 1.0
    randomise_labels: bool = False  # captions permuted across training images (Adebayo et al.)


@dataclass
class CaptionData:
    """Training rows (image path, caption ids) and validation images with their references."""

    vocab: Vocabulary
    train: list[tuple[Path, list[int]]]
    val: list[tuple[Path, list[str]]]
    report: ReadReport
    truncated: int = 0
    unreadable: int = 0  # empty or all-<UNK> captions left out
    grounding: list[list[tuple]] = field(default_factory=list)  # per train row, with --ground


def load_data(cfg: TrainConfig) -> CaptionData:
    """Read, split, build the vocabulary and encode; malformed rows, missing images and unreadable
    captions are counted and reported, never fatal (an empty result is)."""
    images = Path(cfg.images)
    if not images.is_dir():
        raise InputError(f"--images {images}: not a directory")
    report = ReadReport()
    try:
        rows = read_captions(cfg.captions, report=report)
    except (OSError, ValueError) as e:
        raise InputError(f"--captions {cfg.captions}: {e}") from None
    has_splits = any(getattr(c, "split", "") for c in rows)
    train_rows, val_refs = [], {}
    missing: set[str] = set()
    for c in rows:
        path = images / c.image
        if c.image in missing:
            continue
        if not path.is_file():
            missing.add(c.image)  # reported once, in the summary
            continue
        split = getattr(c, "split", "") if has_splits else ""
        is_val = split == "val" if has_splits else is_val_image(c.image, cfg.val_fraction)
        if is_val:
            val_refs.setdefault(path, []).append(c.caption)
        elif not has_splits or split in TRAIN_SPLITS:
            train_rows.append((path, c.caption))
    report.missing_images.extend(sorted(missing))
    if not train_rows:
        raise InputError(
            f"--captions {cfg.captions}: no training captions with an image under {images} "
            f"({report.samples} read, {len(missing)} images missing)"
        )
    vocab = Vocabulary.build((c for _, c in train_rows), cfg.min_word_count)
    data = CaptionData(vocab, [], sorted(val_refs.items()), report)
    grounded = _grounding(cfg, report)
    for path, caption in train_rows:
        words = tokenize(caption)
        if not words or vocab.unknown_share(caption) == 1.0:
            data.unreadable += 1
            continue
        if len(words) > cfg.max_words:
            data.truncated += 1
        ids = vocab.encode(" ".join(words[: cfg.max_words]))
        data.train.append((path, ids))
        if grounded is not None:
            data.grounding.append(grounded.get((path.name, " ".join(words)), []))
    if not data.train:
        raise InputError(f"--captions {cfg.captions}: every caption is empty or all <UNK>")
    if cfg.randomise_labels:
        permute_labels(data, cfg.seed)
    if grounded is not None and not any(data.grounding):
        raise InputError(
            f"--ground {cfg.ground}: no training caption of {cfg.captions} has 'grounding' "
            "(token index + boxes, as `groundcam data shapes-captions` writes)"
        )
    return data


def permute_labels(data: CaptionData, seed: int) -> None:
    """Give each training image another image's caption (and its grounded words), by a fixed
    permutation of `seed`: the data-randomisation control of Adebayo et al. (2018). The images,
    the captions' multiset and the validation references are unchanged."""
    order = np.random.default_rng(seed).permutation(len(data.train))
    data.train = [(path, data.train[j][1]) for (path, _), j in zip(data.train, order, strict=True)]
    if data.grounding:
        data.grounding = [data.grounding[j] for j in order]


def _grounding(cfg: TrainConfig, report: ReadReport) -> dict | None:
    """The grounded words of the captions file when `--ground` asks for them, else None."""
    if cfg.ground not in grounding.GROUND_CHOICES:
        raise InputError(f"--ground {cfg.ground!r}: expected one of {grounding.GROUND_CHOICES}")
    if cfg.ground == "none":
        return None
    from groundcam.data.captions import detect_layout

    if detect_layout(cfg.captions) != "karpathy":
        raise InputError(
            f"--ground {cfg.ground}: {cfg.captions} is not a Karpathy-layout file; only those "
            "carry 'grounding'"
        )
    return grounding.read_grounding(cfg.captions, report)


class ImageCache:
    """Preprocessed pixels per image file, kept in memory up to `budget` bytes (uint8)."""

    def __init__(self, size: int, budget: int = 1 << 30):
        self.size = size
        self.load = functools.lru_cache(maxsize=max(1, budget // (size * size * 3)))(self._read)

    def _read(self, path: Path) -> np.ndarray | None:
        try:  # groundcam's reader: bombs refused from the header, any mode converted to RGB
            image = read_image(path)
        except (OSError, ValueError):
            return None
        return np.asarray(image.resize((self.size, self.size), Image.BILINEAR))


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids


def build_model(cfg: TrainConfig, vocab: Vocabulary) -> ShowAttendTell:
    """The captioner for `cfg`: the encoder built or loaded, frozen as asked."""
    from groundcam.api import _offline_unless_reachable

    try:
        with _offline_unless_reachable():
            encoder, encoder_config = build_encoder(cfg.encoder)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(
            f"--encoder {cfg.encoder!r} cannot be loaded ({first[:160]}); use resnet-tiny, a "
            "local directory, or a hub id that is in the local cache when offline"
        ) from None
    frozen = cfg.freeze_encoder
    if frozen is None:
        frozen = cfg.encoder != "resnet-tiny"
    mcfg = CaptionerConfig(
        vocab_size=len(vocab),
        encoder=cfg.encoder,
        encoder_config=encoder_config,
        image_size=cfg.image_size,
        embed_dim=cfg.embed_dim,
        attention_dim=cfg.attention_dim,
        decoder_dim=cfg.decoder_dim,
        dropout=cfg.dropout,
        attention_regularizer=cfg.attention_regularizer,
        freeze_encoder=frozen,
        max_length=cfg.max_words,
    )
    return ShowAttendTell(mcfg, vocab, encoder)


def caption_metrics(
    model: ShowAttendTell, val, cache: ImageCache, beam: int, limit: int, batch: int = 32
) -> dict:
    """BLEU-1..4 and CIDEr-D of the decoded captions of the first `limit` validation images."""
    from groundcam.eval.captions import cider_d, corpus_bleu

    val = [(p, refs) for p, refs in val[:limit] if cache.load(p) is not None]
    if not val:
        return {}
    was_training = model.training
    model.eval()
    hyps = []
    for start in range(0, len(val), batch):
        part = val[start : start + batch]
        pixels = model.normalize([cache.load(p) for p, _ in part]).to(
            next(model.parameters()).device
        )
        hyps += [model.vocab.decode(ids) for ids in model.generate(pixels, beam=beam)]
    model.train(was_training)
    refs = [r for _, r in val]
    b = corpus_bleu(hyps, refs)
    out = {f"bleu{n}": round(float(v), 5) for n, v in enumerate(b, 1)}
    out["cider_d"] = round(float(cider_d(hyps, refs)), 5)
    out["images"] = len(val)
    return out


def train(cfg: TrainConfig, threads: int | None = None, stop_at: int | None = None) -> Path:
    """Run (or resume) training in `cfg.out`; writes `out/model` (config, weights, vocabulary)."""
    if cfg.batch_size % cfg.grad_accum:
        raise InputError(
            f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}"
        )
    data = load_data(cfg)
    main = main_process()
    if main:
        _print_data(cfg, data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.vocab)
    per_epoch = max(1, len(data.train) // cfg.batch_size)
    steps = cfg.epochs * per_epoch
    loop = LoopConfig(
        out=cfg.out,
        steps=steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        grad_clip=cfg.clip_grad or None,
        grad_accum=cfg.grad_accum,
        precision=cfg.precision,
        seed=cfg.seed,
        save_every=min(per_epoch, 200),
        log_every=min(per_epoch, 50),
        eval_every=per_epoch,
        threads=threads,
        find_unused=model.config.freeze_encoder is False,
    )
    if main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(
            f"model: {total:,} parameters ({trainable:,} trained; encoder "
            f"{'frozen' if model.config.freeze_encoder else 'trained'}); {steps} steps = "
            f"{cfg.epochs} epochs x {per_epoch}",
            flush=True,
        )
    cache = ImageCache(cfg.image_size)
    grid = model.encoder.grid(cfg.image_size, cfg.image_size)
    regions = (
        [
            grounding.word_regions(words, path, grid, cfg.max_words, data.report)
            for words, (path, _) in zip(data.grounding, data.train, strict=True)
        ]
        if data.grounding
        else []
    )
    if main and cfg.ground != "none":
        print(
            f"grounding ({cfg.ground}, weight {cfg.ground_weight}): "
            f"{sum(map(len, regions)):,} grounded words in {sum(map(bool, regions)):,} captions",
            flush=True,
        )
    sample_image = data.val[0][0] if data.val else data.train[0][0]

    def step_rows(step: int) -> list[int]:
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data.train))
        return order[k * cfg.batch_size : (k + 1) * cfg.batch_size].tolist()

    @functools.lru_cache(maxsize=1)
    def step_batch(step: int):
        rows = step_rows(step)
        arrays = [cache.load(data.train[i][0]) for i in rows]
        kept = [(a, i) for a, i in zip(arrays, rows, strict=True) if a is not None]
        if len(kept) < len(rows):  # unreadable image files: their rows are left out of the batch
            kept += [kept[i % len(kept)] for i in range(len(rows) - len(kept))]
        pixels = model.normalize([a for a, _ in kept])
        ids = _padded([data.train[i][1] for _, i in kept], 0)
        if cfg.ground == "none":
            return pixels, ids
        # [B, T, R]: each grounded word's cell shares at the row that writes it
        targets = torch.zeros(len(kept), ids.shape[1] - 1, grid[0] * grid[1])
        for b, (_, i) in enumerate(kept):
            for row, cover in regions[i]:
                targets[b, row] = torch.from_numpy(cover)
        return pixels, ids, targets

    def batch_fn(step: int, micro: int, rank: int, world: int):
        part = [shard(t, micro, cfg.grad_accum) for t in step_batch(step)]
        return tuple(shard(t, rank, world) for t in part)

    def loss_fn(m: ShowAttendTell, batch, step: int) -> dict[str, torch.Tensor]:
        pixels, ids = batch[:2]
        keep = (ids[:, 1:] != 0).any(0)  # trim columns that are padding in this micro-batch
        width = int(keep.nonzero().max()) + 2 if keep.any() else ids.shape[1]
        if cfg.ground == "amc":
            term, out = grounding.gradcam_amc_loss(
                m, pixels, ids[:, :width], batch[2][:, : width - 1]
            )
        else:
            out = m(pixels, ids[:, :width], labels=True)
        terms = {
            "loss": out.loss,
            "cross_entropy": out.cross_entropy,
            "attention_regularizer": out.regularizer,
        }
        if cfg.ground == "attention":
            term = grounding.attention_correctness_loss(out.alphas, batch[2][:, : width - 1])
        if cfg.ground != "none":
            terms[f"grounding_{cfg.ground}"] = term
            terms["loss"] = out.loss + cfg.ground_weight * term
        return terms

    def after_step(m: ShowAttendTell, step: int) -> None:
        if not main or cfg.sample_every <= 0 or step % cfg.sample_every:
            return
        arr = cache.load(sample_image)
        if arr is None:
            return
        was = m.training
        m.eval()
        ids = m.generate(m.normalize([arr]).to(next(m.parameters()).device), beam=1)[0]
        m.train(was)
        tqdm.write(f"step {step}: {sample_image.name}: {m.vocab.decode(ids)!r}")

    def evaluate(m: ShowAttendTell, step: int) -> dict:
        return caption_metrics(m, data.val, cache, cfg.beam, cfg.val_images)

    fingerprint = asdict(cfg)
    if cfg.ground == "none":  # runs from before grounding existed resume as they were
        del fingerprint["ground"], fingerprint["ground_weight"]
    if not cfg.randomise_labels:  # nor do runs from before the option
        del fingerprint["randomise_labels"]
    fingerprint["vocab_size"] = len(data.vocab)
    final = fit(
        model,
        loop,
        batch_fn,
        loss_fn,
        fingerprint=fingerprint,
        save_model=lambda m, path: _save(m, cfg, path),
        evaluate=evaluate,
        after_step=after_step,
        stop_at=stop_at,
    )
    return final


def _save(model: ShowAttendTell, cfg: TrainConfig, path: Path) -> None:
    model.save_pretrained(path)
    (Path(path) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")


def _print_data(cfg: TrainConfig, data: CaptionData) -> None:
    r = data.report
    print(
        f"captions: {len(data.train):,} training captions, {len(data.val):,} validation images, "
        f"vocabulary {len(data.vocab):,} words (min count {cfg.min_word_count})",
        flush=True,
    )
    if cfg.randomise_labels:
        print(f"  captions permuted across the training images (seed {cfg.seed})", flush=True)
    if r.missing_images:
        print(
            f"  {len(r.missing_images)} images listed but missing under {cfg.images}, their "
            f"captions skipped (first: {r.missing_images[0]})",
            flush=True,
        )
    if r.skipped_rows or data.unreadable or r.repaired_rows or r.errors or data.truncated:
        print(
            f"  {r.skipped_rows} malformed rows skipped, {r.repaired_rows} repaired, "
            f"{data.unreadable} empty or all-<UNK> captions left out, {data.truncated} cut to "
            f"{cfg.max_words} words, {len(r.errors)} problems (first: "
            f"{r.errors[0] if r.errors else 'none'})",
            flush=True,
        )
    if not data.val:
        print("  no validation images: BLEU and CIDEr-D are not computed", flush=True)
