"""Train a tiny ALBEF from scratch on the shapes train split with ITC + ITM only (no boxes).

Every phrase of every scene in the batch is an ITM positive (the image is encoded once), paired
with a negative made by swapping one attribute to an object the scene lacks; per scene, one
phrase is its ITC text, and an in-batch hard-negative text and image are sampled by ITC similarity
among the certainly-false ones (ALBEF's hard negatives, without false negatives). The run is deterministic given the seed and resumes from its last
checkpoint: every step's data and negatives are drawn from a generator seeded by (seed, step).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from groundcam.adapters.albef import AlbefAdapter
from groundcam.data.shapes import generate_scene, vocabulary
from groundcam.eval.shapes import shapes_records, summarize
from groundcam.explainer import Explainer
from groundcam.models.albef import AlbefConfig, AlbefModel
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
    """Training scenes pre-rendered at the model's input resolution (float16, normalised)."""

    def __init__(self, adapter: AlbefAdapter, cfg: TrainConfig):
        self.pixels, self.phrases, self.objects = [], [], []
        chunk = 256
        for start in tqdm(range(0, cfg.pool, chunk), desc="rendering scenes", leave=False):
            samples = [
                generate_scene("train", i, cfg.seed, cfg.scene_size)
                for i in range(start, min(start + chunk, cfg.pool))
            ]
            self.pixels.append(adapter.prepare_images([s.image for s in samples]).half())
            self.phrases += [s.phrases for s in samples]
            self.objects += [s.meta["objects"] for s in samples]
        self.pixels = torch.cat(self.pixels)


def _batch(pool: Pool, rng: np.random.Generator, size: int):
    """`size` scenes; every phrase of each is an ITM positive with its own swapped negative, and
    one phrase per scene (the first of a random order) is its ITC text."""
    idx = rng.choice(len(pool.phrases), size=size, replace=False)
    phrases, owner = [], []
    for row, i in enumerate(idx):
        for k in rng.permutation(len(pool.phrases[i])):
            phrases.append(pool.phrases[i][k])
            owner.append(row)
    objects = [pool.objects[i] for i in idx]
    swaps = [swap_negative(p, objects[o], rng) for p, o in zip(phrases, owner, strict=True)]
    first = np.unique(owner, return_index=True)[1]
    return pool.pixels[torch.from_numpy(idx)].float(), phrases, owner, first, objects, swaps


def _sample_negatives(weights: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator):
    """One index per row from `weights` restricted to `allowed` (uniform fallback if none)."""
    w = weights * allowed
    empty = w.sum(1) <= 0
    w[empty] = 1.0
    return torch.multinomial(w, 1, generator=gen)[:, 0]


def train_step(model: AlbefModel, adapter: AlbefAdapter, batch, gen: torch.Generator):
    pixels, phrases, owner, first, objects, swaps = batch
    b, n = pixels.shape[0], len(phrases)
    ids, mask = adapter.prepare_texts([p.text for p in phrases] + swaps)
    image = model.encode_image(pixels)
    text = model.text_encoder.encode_text(ids, mask)
    itc = torch.from_numpy(first)  # row of each scene's ITC phrase among the n phrases
    itc_phrases = [phrases[i] for i in first]
    img_feat, txt_feat = model.itc_from(image, text[itc])
    sim_i2t = img_feat @ txt_feat.T / model.temp
    # false[i, j]: text j certainly does not describe image i; true[i, j]: it certainly does.
    false = torch.tensor([[certainly_false(p, o) for p in itc_phrases] for o in objects])
    true = torch.tensor([[certainly_true(p, o) for p in itc_phrases] for o in objects])
    true |= torch.eye(b, dtype=torch.bool)
    target = true.float() / true.float().sum(1, keepdim=True)
    target_t = true.T.float() / true.T.float().sum(1, keepdim=True)
    loss_itc = 0.5 * (
        -(F.log_softmax(sim_i2t, 1) * target).sum(1).mean()
        - (F.log_softmax(sim_i2t.T, 1) * target_t).sum(1).mean()
    )
    with torch.no_grad():
        neg_text = _sample_negatives(sim_i2t.softmax(1), false.float(), gen)
        neg_image = _sample_negatives(sim_i2t.T.softmax(1), false.T.float(), gen)
    rows, own = torch.arange(b), torch.tensor(owner)
    phrase_rows = torch.arange(n)
    image_index = torch.cat([own, own, rows, neg_image])
    text_index = torch.cat([phrase_rows, phrase_rows + n, itc[neg_text], itc])
    logits = model.itm_from(image, text[text_index], mask[text_index], image_index)
    labels = torch.cat([torch.ones(n), torch.zeros(n + 2 * b)]).long()
    loss_itm = F.cross_entropy(logits, labels)
    return loss_itc, loss_itm


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be redone)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def train(cfg: TrainConfig, threads: int | None = None) -> Path:
    """Run (or resume) training; writes `checkpoint.pt`, `log.jsonl` and finally `model/`."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    tokenizer = word_tokenizer(vocabulary())
    torch.manual_seed(cfg.seed)
    model = AlbefModel(cfg.model_config(len(tokenizer)))
    adapter = AlbefAdapter(model, tokenizer, name="albef-tiny-shapes")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
    )
    step = 0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt} was written with another configuration; use a new --out")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        step = state["step"]
        _trim_log(out / "log.jsonl", step)
        print(f"resuming from step {step}")
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    pool = Pool(adapter, cfg)
    model.train()
    log = (out / "log.jsonl").open("a")
    t0, bar = time.time(), tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        for g in optim.param_groups:
            g["lr"] = _lr(cfg, step)
        loss_itc, loss_itm = train_step(model, adapter, _batch(pool, rng, cfg.batch_size), gen)
        optim.zero_grad(set_to_none=True)
        (loss_itc + loss_itm).backward()
        optim.step()
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        step += 1
        bar.update(1)
        bar.set_postfix(itc=f"{loss_itc.item():.3f}", itm=f"{loss_itm.item():.3f}")
        record = {
            "step": step,
            "itc": loss_itc.item(),
            "itm": loss_itm.item(),
            "lr": _lr(cfg, step - 1),
            "elapsed_s": round(time.time() - t0, 1),
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["val"] = evaluate(model, adapter, cfg)
            tqdm.write(json.dumps(record))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % cfg.save_every == 0 or step == cfg.steps:
            tmp = out / "checkpoint.pt.tmp"
            torch.save(
                {
                    "model": model.state_dict(),
                    "optim": optim.state_dict(),
                    "step": step,
                    "config": asdict(cfg),
                },
                tmp,
            )
            tmp.replace(ckpt)
    bar.close()
    model.eval()
    final = out / "model"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    return final
