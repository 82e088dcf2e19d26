"""Train a tiny ALBEF from scratch on the shapes train split with ITC + ITM only (no boxes).

Every phrase of every scene in the batch is an ITM positive (the image is encoded once), paired
with a negative made by swapping one attribute to an object the scene lacks; per scene, one
phrase is its ITC text, and an in-batch hard-negative text and image are sampled by ITC similarity
among the certainly-false ones (ALBEF's hard negatives, without false negatives).

Training runs on the shared loop (`groundcam.train.loop.fit`: AdamW, warmup + cosine, Accelerate,
checkpoints). The run is deterministic given the seed and resumes from its last checkpoint: each
step's global batch and negatives are drawn from a generator seeded by (seed, step); a
micro-batch (`grad_accum`) or a process (`accelerate launch`) takes its share of the scenes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from groundcam.adapters.albef import AlbefAdapter
from groundcam.data.shapes import generate_scene, vocabulary
from groundcam.eval.shapes import shapes_records, summarize
from groundcam.explainer import Explainer
from groundcam.models.albef import AlbefConfig, AlbefModel
from groundcam.train.loop import LoopConfig, fit, shard
from groundcam.train.shapes_negatives import certainly_false, certainly_true, swap_negative
from groundcam.train.tokenizer import word_tokenizer


@dataclass
class TrainConfig:
    out: str
    steps: int = 3000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.02
    warmup: int = 200
    seed: int = 0
    pool: int = 20000  # training scenes rendered once and sampled from
    scene_size: int = 128
    image_size: int = 96
    patch_size: int = 8
    width: int = 96
    vision_depth: int = 4
    text_layers: int = 4
    fusion_layer: int = 1
    heads: int = 4
    embed_dim: int = 64
    save_every: int = 200
    eval_every: int = 500
    eval_scenes: int = 100
    grad_accum: int = 1  # micro-batches a step (the same global batch of `batch_size` scenes)
    precision: str = "fp32"  # fp32, bf16, fp16 (CUDA) or auto

    def model_config(self, vocab_size: int) -> AlbefConfig:
        return AlbefConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_width=self.width,
            vision_depth=self.vision_depth,
            vision_heads=self.heads,
            vision_mlp=4 * self.width,
            vocab_size=vocab_size,
            hidden_size=self.width,
            text_layers=self.text_layers,
            fusion_layer=self.fusion_layer,
            text_heads=self.heads,
            intermediate_size=4 * self.width,
            max_position_embeddings=32,
            embed_dim=self.embed_dim,
            dropout=0.0,
        )


class Pool:
    """The training scenes `0..pool-1`, each rendered at the model's input resolution (float16,
    normalised) the first time a batch draws it and kept: a run renders only what it uses."""

    def __init__(self, adapter: AlbefAdapter, cfg: TrainConfig):
        self.adapter, self.size = adapter, cfg.pool
        self.seed, self.scene_size = cfg.seed, cfg.scene_size
        self.scenes: dict[int, tuple[torch.Tensor, list, list]] = {}

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> tuple[torch.Tensor, list, list]:
        """Scene `i`: its pixels, phrases and objects."""
        if i not in self.scenes:
            s = generate_scene("train", i, self.seed, self.scene_size)
            pixels = self.adapter.prepare_images([s.image]).half()[0]
            self.scenes[i] = (pixels, s.phrases, s.meta["objects"])
        return self.scenes[i]

    def phrases(self, i: int) -> list:
        """Scene `i`'s phrases (generated again, not prepared, when it was never drawn)."""
        if i in self.scenes:
            return self.scenes[i][1]
        return generate_scene("train", i, self.seed, self.scene_size).phrases


def draw_scenes(pool_size: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """The `size` distinct pool scenes of a batch (the first draw from the step's `rng`)."""
    return rng.choice(pool_size, size=size, replace=False)


def _batch(pool: Pool, rng: np.random.Generator, size: int):
    """`size` scenes; every phrase of each is an ITM positive with its own swapped negative, and
    one phrase per scene (the first of a random order) is its ITC text."""
    scenes = [pool.scene(int(i)) for i in draw_scenes(len(pool), rng, size)]
    phrases, owner = [], []
    for row, (_, scene_phrases, _) in enumerate(scenes):
        for k in rng.permutation(len(scene_phrases)):
            phrases.append(scene_phrases[k])
            owner.append(row)
    objects = [s[2] for s in scenes]
    swaps = [swap_negative(p, objects[o], rng) for p, o in zip(phrases, owner, strict=True)]
    first = np.unique(owner, return_index=True)[1]
    return torch.stack([s[0] for s in scenes]).float(), phrases, owner, first, objects, swaps


def _sample_negatives(weights: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator):
    """One index per row from `weights` restricted to `allowed` (uniform fallback if none)."""
    w = weights * allowed
    empty = w.sum(1) <= 0
    w[empty] = 1.0
    return torch.multinomial(w, 1, generator=gen)[:, 0]


def train_step(model: AlbefModel, adapter: AlbefAdapter, batch, gen: torch.Generator):
    pixels, phrases, owner, first, objects, swaps = batch
    b, n, device = pixels.shape[0], len(phrases), pixels.device
    ids, mask = adapter.prepare_texts([p.text for p in phrases] + swaps)
    image = model.encode_image(pixels)
    text = model.text_encoder.encode_text(ids, mask)
    itc = torch.from_numpy(first).to(device)  # row of each scene's ITC phrase among the n phrases
    itc_phrases = [phrases[i] for i in first]
    img_feat, txt_feat = model.itc_from(image, text[itc])
    sim_i2t = img_feat @ txt_feat.T / model.temp
    # false[i, j]: text j certainly does not describe image i; true[i, j]: it certainly does.
    false = torch.tensor([[certainly_false(p, o) for p in itc_phrases] for o in objects])
    true = torch.tensor([[certainly_true(p, o) for p in itc_phrases] for o in objects])
    true |= torch.eye(b, dtype=torch.bool)
    false, true = false.to(device), true.to(device)
    target = true.float() / true.float().sum(1, keepdim=True)
    target_t = true.T.float() / true.T.float().sum(1, keepdim=True)
    loss_itc = 0.5 * (
        -(F.log_softmax(sim_i2t, 1) * target).sum(1).mean()
        - (F.log_softmax(sim_i2t.T, 1) * target_t).sum(1).mean()
    )
    with torch.no_grad():  # sampled on the CPU, where `gen` lives
        sim = sim_i2t.float().cpu()
        neg_text = _sample_negatives(sim.softmax(1), false.cpu().float(), gen).to(device)
        neg_image = _sample_negatives(sim.T.softmax(1), false.T.cpu().float(), gen).to(device)
    rows, own = torch.arange(b, device=device), torch.tensor(owner, device=device)
    phrase_rows = torch.arange(n, device=device)
    image_index = torch.cat([own, own, rows, neg_image])
    text_index = torch.cat([phrase_rows, phrase_rows + n, itc[neg_text], itc])
    logits = model.itm_from(image, text[text_index], mask[text_index], image_index)
    labels = torch.cat([torch.ones(n), torch.zeros(n + 2 * b)]).long().to(device)
    loss_itm = F.cross_entropy(logits, labels)
    return loss_itc, loss_itm


def evaluate(model: AlbefModel, adapter: AlbefAdapter, cfg: TrainConfig, split="val") -> dict:
    """Pointing accuracy (attn-gradcam) at every fusion layer on `eval_scenes` scenes."""
    model.eval()
    ex = Explainer(adapter)
    out = {}
    for layer in adapter.layers("cross_attention"):
        recs = list(shapes_records(ex, split, cfg.eval_scenes, "attn-gradcam", layer, cfg.seed))
        s = summarize(recs)
        out[f"layer{layer}"] = {
            "accuracy": round(s["accuracy"], 4),
            "n": s["n"],
            "colour_shared": round(s["colour_shared"]["accuracy"], 4),
        }
    model.train()
    return out


def _take(batch, rows: range):
    """Scenes `rows` of a batch with their phrases (owners and ITC rows renumbered)."""
    pixels, phrases, owner, _, objects, swaps = batch
    keep = [k for k, o in enumerate(owner) if o in rows]
    own = [owner[k] - rows.start for k in keep]
    first = np.unique(own, return_index=True)[1]
    picked = slice(rows.start, rows.stop)
    return (
        pixels[picked],
        [phrases[k] for k in keep],
        own,
        first,
        objects[picked],
        [swaps[k] for k in keep],
    )


def loop_config(cfg: TrainConfig, threads: int | None = None) -> LoopConfig:
    """The shared loop's settings for this run (no clipping: the recipe never clipped)."""
    return LoopConfig(
        out=cfg.out,
        steps=cfg.steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        grad_clip=None,
        grad_accum=cfg.grad_accum,
        precision=cfg.precision,
        seed=cfg.seed,
        save_every=cfg.save_every,
        log_every=1,
        eval_every=cfg.eval_every,
        threads=threads or os.cpu_count() or 1,
    )


def train(cfg: TrainConfig, threads: int | None = None) -> Path:
    """Run (or resume) training in `cfg.out` (the shared loop's files); returns `model/`."""
    loop = loop_config(cfg, threads)
    tokenizer = word_tokenizer(vocabulary())
    torch.manual_seed(cfg.seed)
    model = AlbefModel(cfg.model_config(len(tokenizer)))
    adapter = AlbefAdapter(model, tokenizer, name="albef-tiny-shapes")
    pool = functools.cache(lambda: Pool(adapter, cfg))  # rendered once, on first use
    scenes = cfg.batch_size // cfg.grad_accum
    if scenes * cfg.grad_accum != cfg.batch_size:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}"
        )

    @functools.lru_cache(maxsize=1)
    def step_batch(step: int):
        """The step's global batch (the same draw as ever) and its negatives' seed."""
        rng = np.random.default_rng([cfg.seed, step])
        seed = int(rng.integers(2**31))
        return _batch(pool(), rng, cfg.batch_size), seed

    def batch_fn(step: int, micro: int, rank: int, world: int):
        batch, seed = step_batch(step)
        rows = shard(shard(range(cfg.batch_size), micro, cfg.grad_accum), rank, world)
        gen = torch.Generator().manual_seed(seed + micro * world + rank)
        return _take(batch, rows), gen

    def loss_fn(model: AlbefModel, batch, step: int) -> dict[str, torch.Tensor]:
        loss_itc, loss_itm = train_step(model, adapter, *batch)
        return {"loss": loss_itc + loss_itm, "itc": loss_itc, "itm": loss_itm}

    def clamp_temp(model: AlbefModel, step: int) -> None:
        model.temp.clamp_(0.001, 0.5)

    def save_model(model: AlbefModel, path: Path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    return fit(
        model,
        loop,
        batch_fn,
        loss_fn,
        fingerprint=asdict(cfg),
        save_model=save_model,
        evaluate=lambda model, step: evaluate(model, adapter, cfg),
        after_step=clamp_temp,
    )
