"""`groundcam train scan`: SCAN on shapes scenes, on the shared training loop (Accelerate,
resumable, every loss term logged).

Each scene of a step's batch is paired with one text drawn by the step's generator: its caption
(every object, left to right) or one of its attribute phrases ("the small red circle"). Regions
are the model's own proposals (blob boxes, jittered copies, a background grid; see
`groundcam.models.scan`). The loss is SCAN's hinge triplet loss with the hardest in-batch
negative, after `all_negatives_steps` steps that sum it over every negative (from step 0 the tiny
model collapsed to positives equal to their hardest negatives); a scene whose objects make
another scene's phrase certainly true is no negative for it.
The paper's step decay (x0.1 at half of training) is the loop's cosine from `lr` to `lr / 10`."""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from groundcam.data.caption_text import Vocabulary
from groundcam.data.shapes import generate_scene, vocabulary
from groundcam.models.scan import SCAN, ScanConfig, contrastive_loss
from groundcam.train.loop import LoopConfig, fit, shard
from groundcam.train.shapes_negatives import certainly_true


@dataclass
class TrainConfig:
    out: str
    steps: int = 1500
    batch_size: int = 32
    lr: float = 5e-4  # the built-in's (the paper: 2e-4 for its full-size model)
    grad_clip: float = 2.0
    seed: int = 0
    pool: int = 5000  # training scenes rendered once and sampled from
    scene_size: int = 128
    image_size: int = 96
    word_dim: int = 64
    embed_size: int = 128
    region_cnn: tuple[int, ...] = (32, 64, 64)
    caption_share: float = 0.5  # chance a scene's text is its caption rather than a phrase
    # first steps sum every negative, then the hardest (from step 0 the tiny model collapsed)
    all_negatives_steps: int = 500
    save_every: int = 200
    eval_every: int = 500
    eval_scenes: int = 50
    grad_accum: int = 1
    precision: str = "fp32"

    def model_config(self, vocab_size: int) -> ScanConfig:
        return ScanConfig(
            vocab_size=vocab_size,
            word_dim=self.word_dim,
            embed_size=self.embed_size,
            region_cnn=tuple(self.region_cnn),
            image_size=self.image_size,
        )


class Pool:
    """Training scenes at the model's input resolution (uint8), their texts and objects."""

    def __init__(self, model: SCAN, cfg: TrainConfig):
        pixels, self.texts, self.objects = [], [], []
        for start in tqdm(range(0, cfg.pool, 256), desc="rendering scenes", leave=False):
            samples = [
                generate_scene("train", i, cfg.seed, cfg.scene_size)
                for i in range(start, min(start + 256, cfg.pool))
            ]
            pixels.append((model.preprocess([s.image for s in samples]) * 255).round().byte())
            self.texts += [
                [s.caption] + [p for p in s.phrases if p.kind == "attribute"] for s in samples
            ]
            self.objects += [s.meta["objects"] for s in samples]
        self.pixels = torch.cat(pixels)


def draw_batch(pool: Pool, model: SCAN, cfg: TrainConfig, step: int):
    """The step's global batch: pixels, proposal boxes, texts and which pairs are certainly
    true (a pure function of seed and step)."""
    rng = np.random.default_rng([cfg.seed, step])
    idx = rng.choice(len(pool.texts), size=cfg.batch_size, replace=False)
    texts, phrases = [], []
    for i in idx:
        options = pool.texts[i]
        pick = 0 if rng.random() < cfg.caption_share else 1 + rng.integers(len(options) - 1)
        texts.append(options[pick] if pick == 0 else options[pick].text)
        phrases.append(None if pick == 0 else options[pick])
    objects = [pool.objects[i] for i in idx]
    true = torch.tensor(
        [[p is not None and certainly_true(p, o) for p in phrases] for o in objects]
    )
    pixels = pool.pixels[torch.from_numpy(idx)].float() / 255
    boxes = model.propose_boxes(pixels, rng)
    return pixels, boxes, texts, true


def loss_terms(model: SCAN, batch, hardest: bool = True) -> dict[str, torch.Tensor]:
    """SCAN's loss on a batch, known-true off-diagonal pairs left out of the negatives; every
    negative summed instead of the hardest when `hardest` is False."""
    pixels, boxes, texts, true = batch
    regions = model.encode_regions(pixels, boxes)
    ids, lengths = model.encode_texts(texts)
    words = model.encode_words(ids, lengths)
    scores = model.score_matrix(regions, words, lengths)
    eye = torch.eye(len(texts), dtype=torch.bool, device=scores.device)
    negatives = scores.masked_fill(true.to(scores.device) & ~eye, -1e4)
    cfg = model.config
    loss = contrastive_loss(negatives, cfg.margin, cfg.max_violation and hardest)
    with torch.no_grad():
        diagonal = scores.diagonal()
        r1_i2t = (negatives.argmax(1) == torch.arange(len(texts), device=scores.device)).float()
    return {
        "loss": loss,
        "positive": diagonal.mean(),
        "hardest_negative": negatives.masked_fill(eye, -1e4).max(1).values.mean(),
        "batch_r1": r1_i2t.mean(),
    }


def evaluate(model: SCAN, cfg: TrainConfig, split: str = "val") -> dict:
    """Pointing accuracy of `attention` and `gradcam` on `eval_scenes` scenes of `split`, and
    caption retrieval R@1 among them."""
    from groundcam.adapters.scan import ScanAdapter
    from groundcam.eval.shapes import shapes_records, summarize
    from groundcam.explainer import Explainer

    model.eval()
    explainer = Explainer(ScanAdapter(model, name="scan"))
    out = {}
    for method in ("attention", "gradcam"):
        records = list(shapes_records(explainer, split, cfg.eval_scenes, method, None, cfg.seed))
        out[method] = round(summarize(records)["accuracy"], 4)
    scenes = [generate_scene(split, i, cfg.seed, cfg.scene_size) for i in range(cfg.eval_scenes)]
    with torch.no_grad():
        regions = model.encode_regions(model.preprocess([s.image for s in scenes]))
        ids, lengths = model.encode_texts([s.caption for s in scenes])
        sim = model.score_matrix(regions, model.encode_words(ids, lengths), lengths)
    truth = torch.arange(len(scenes))
    out["i2t_r1"] = round(float((sim.argmax(1) == truth).float().mean()), 4)
    out["t2i_r1"] = round(float((sim.argmax(0) == truth).float().mean()), 4)
    model.train()
    return out


def train(cfg: TrainConfig, threads: int | None = None, stop_at: int | None = None) -> Path:
    """Run (or resume) training in `cfg.out` (the shared loop's files); returns `model/`."""
    loop = LoopConfig(
        out=cfg.out,
        steps=cfg.steps,
        lr=cfg.lr,
        weight_decay=0.0,
        final_lr=cfg.lr / 10,
        grad_clip=cfg.grad_clip,
        grad_accum=cfg.grad_accum,
        precision=cfg.precision,
        seed=cfg.seed,
        save_every=cfg.save_every,
        eval_every=cfg.eval_every,
        threads=threads or os.cpu_count() or 1,
    )
    vocab = Vocabulary(vocabulary())
    torch.manual_seed(cfg.seed)
    model = SCAN(cfg.model_config(len(vocab)), vocab)
    pool = functools.cache(lambda: Pool(model, cfg))
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}"
        )

    @functools.lru_cache(maxsize=1)
    def step_batch(step: int):
        return draw_batch(pool(), model, cfg, step)

    def batch_fn(step: int, micro: int, rank: int, world: int):
        pixels, boxes, texts, true = step_batch(step)
        rows = shard(shard(list(range(cfg.batch_size)), micro, cfg.grad_accum), rank, world)
        pick = torch.tensor(rows)
        return pixels[pick], boxes[pick], [texts[r] for r in rows], true[pick][:, pick]

    fingerprint = asdict(cfg)
    fingerprint["region_cnn"] = list(cfg.region_cnn)
    return fit(
        model,
        loop,
        batch_fn,
        lambda model, batch, step: loss_terms(model, batch, step >= cfg.all_negatives_steps),
        fingerprint=fingerprint,
        save_model=lambda model, path: model.save_pretrained(path),
        evaluate=lambda model, step: evaluate(model, cfg),
        stop_at=stop_at,
        progress=False,
    )
