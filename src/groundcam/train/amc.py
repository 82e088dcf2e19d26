"""`groundcam train amc`: Attention Map Consistency fine-tuning (Yang et al., CVPR 2023).

The model keeps its own losses, ITC + ITM with similarity-sampled hard negatives (as ALBEF), and
for every positive pair that has a box the attn-gradcam map of one fusion layer (the explainer's
own maps, `differentiable=True`) is pushed inside the box by `AMCLoss` (DESIGN.md §8). `--no-amc`
runs the same steps, data, seed and schedule without the AMC term: the control.

Data: `shapes` (built in: each step, `batch_size` training scenes with every phrase a positive,
attribute-swapped ITM negatives as `train albef` makes them), or box data read by groundcam's
readers, one (image, phrase, boxes) pair per row: Visual Genome `region_descriptions.json`,
Flickr30k Entities, RefCOCO+. Every step's data is a pure function of (seed, step), so a resumed
or multi-process run sees the same global batch.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundcam.contract import TEXT_TO_IMAGE
from groundcam.data.sample import GroundingSample
from groundcam.errors import InputError
from groundcam.train.amc_loss import AMCLoss, box_masks

DATA = ("shapes", "vg", "flickr30k-entities", "refcoco+")


@dataclass
class AMCConfig:
    """Everything that decides the numbers of an AMC run (its fingerprint)."""

    out: str
    model: str = "albef-tiny-shapes"
    data: str = "shapes"
    root: str | None = None
    images: str | None = None
    split: str = "train"
    tokenizer: str | None = None  # for an official ALBEF .pth: a BERT tokenizer dir or hub id
    steps: int = 1000
    batch_size: int = 32  # per step (split over grad_accum and processes): shapes scenes (all
    # their phrases) or (image, phrase) pairs
    grad_accum: int = 1
    lr: float = 1e-4
    final_lr: float = 1e-5
    weight_decay: float = 0.02
    warmup: int = 50
    grad_clip: float | None = 5.0
    map_method: str = "attn-gradcam"
    layer: int | None = None  # None: the family's default fusion layer (ALBEF block 8)
    amc: bool = True  # False: the control run, the same steps without the AMC term
    mean_weight: float = 0.2
    max_weight: float = 0.8
    mean_margin: float = 0.1
    max_margin: float = 0.5
    seed: int = 0
    precision: str = "fp32"
    pool: int = 20000  # shapes: training scenes rendered once
    scene_size: int = 128
    save_every: int = 200
    eval_every: int = 250
    eval_scenes: int = 200
    num_heads: int = 12  # official ALBEF checkpoints: head counts the tensors do not tell
    text_num_heads: int = 12

    def fingerprint(self) -> dict:
        """What a resumed run must share (where it writes and how often it saves do not)."""
        skip = {"out", "save_every"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def check(self) -> None:
        if self.data not in DATA:
            raise InputError(f"--data {self.data!r}: choose one of {', '.join(DATA)}")
        if self.data != "shapes" and not self.root:
            raise InputError(f"--data {self.data} needs --root (the dataset's annotation files)")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")


# ----------------------------------------------------------------------------- data


class BoxPairs:
    """(image, phrase, boxes) rows of a box dataset, with images read and prepared on demand."""

    def __init__(self, samples: list[GroundingSample], prepare: Callable):
        self.rows = [(s, k) for s in samples for k, p in enumerate(s.phrases) if p.boxes]
        if not self.rows:
            raise InputError("the training data holds no phrase with a box")
        self.prepare = prepare
        self.boxes = box_counts((s.phrases[k].boxes, s.image_size) for s, k in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def pick(self, rng: np.random.Generator, size: int) -> list[int]:
        """`size` distinct rows (all of them when there are fewer)."""
        return rng.choice(len(self.rows), size=min(size, len(self.rows)), replace=False).tolist()

    def load(self, picked: list[int]) -> dict:
        """Rows `picked`: their images prepared for the model, texts, boxes and sizes."""
        samples = [self.rows[i][0] for i in picked]
        phrases = [s.phrases[k] for s, k in (self.rows[i] for i in picked)]
        return {
            "pixels": torch.cat([self.prepare([s.load_image()]) for s in samples]),
            "texts": [p.text for p in phrases],
            "boxes": [list(p.boxes) for p in phrases],
            "sizes": [(s.image_size[1], s.image_size[0]) for s in samples],
            "owner": torch.arange(len(samples)),
        }


def box_counts(rows) -> dict[str, int]:
    """Over (boxes, (width, height)) rows: how many boxes there are, how many the masks clip
    (partly outside the image) and skip (zero-area, inverted, non-finite, wholly outside)."""
    counts = {"boxes": 0, "clipped": 0, "skipped": 0}
    for boxes, (width, height) in rows:
        for x1, y1, x2, y2 in boxes:
            counts["boxes"] += 1
            inside = min(x2, width) > max(x1, 0) and min(y2, height) > max(y1, 0)
            if not np.isfinite([x1, y1, x2, y2]).all() or not inside:
                counts["skipped"] += 1
            elif x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                counts["clipped"] += 1
    return counts


def read_box_data(cfg: AMCConfig) -> list[GroundingSample]:
    """The samples of `cfg.data` (a missing file is named in the error)."""
    root = Path(cfg.root)
    if cfg.data == "vg":
        from groundcam.data.visual_genome import VisualGenomeRegions

        data = VisualGenomeRegions(root, cfg.images or root / "VG_100K")
        samples = list(data)
    elif cfg.data == "flickr30k-entities":
        from groundcam.data.flickr30k_entities import Flickr30kEntities

        samples = list(Flickr30kEntities(root, cfg.split, cfg.images))
    else:
        from groundcam.data.refcoco import RefCOCO

        if not cfg.images:
            raise InputError("--data refcoco+ needs --images (the COCO train2014 directory)")
        samples = list(RefCOCO(root, cfg.images, cfg.split))
    return [s for s in samples if not s.meta.get("error")]


# ----------------------------------------------------------------------------- losses


class AlbefTrainee:
    """Native ALBEF's training forward: image tokens, text-only hidden states, ITC features,
    the fusion's ITM logits, its learned temperature."""

    def __init__(self, model):
        self.model = model

    @property
    def temp(self) -> torch.Tensor:
        return self.model.temp

    def encode(self, pixels, ids, mask):
        m = self.model
        image, text = m.encode_image(pixels), m.text_encoder.encode_text(ids, mask)
        return image, text, *m.itc_from(image, text)

    def itm(self, image, text, ids, mask, rows, image_index):
        return self.model.itm_from(image, text[rows], mask[rows], image_index)

    def clamp(self) -> None:
        self.model.temp.clamp_(0.001, 0.5)


class BlipTrainee:
    """🤗 `BlipForImageTextRetrieval`'s training forward, through its own submodules: ITC on
    `vision_proj`/`text_proj` of the CLS tokens (at BLIP's temperature 0.07: the transformers
    model holds none), ITM on `itm_head` over the text encoder reading the image tokens."""

    TEMP = 0.07

    def __init__(self, model):
        self.model = model
        self.temp = torch.tensor(self.TEMP)

    def encode(self, pixels, ids, mask):
        m = self.model
        image = m.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        text = m.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        img_feat = F.normalize(m.vision_proj(image[:, 0]), dim=-1)
        txt_feat = F.normalize(m.text_proj(text[:, 0]), dim=-1)
        return image, text, img_feat, txt_feat

    def itm(self, image, text, ids, mask, rows, image_index):
        out = self.model.text_encoder(
            input_ids=ids[rows],
            attention_mask=mask[rows],
            encoder_hidden_states=image.index_select(0, image_index),
        )
        return self.model.itm_head(out.last_hidden_state[:, 0])

    def clamp(self) -> None:
        pass


TRAINEES = {"albef": AlbefTrainee, "blip-itm": BlipTrainee}


def itc_itm(trainee, pixels, ids, mask, texts: list[str], gen: torch.Generator):
    """ALBEF's ITC (in-batch, identical texts count as positives) and ITM on the positives plus
    one hard negative text per image and one hard negative image per text, drawn by ITC
    similarity (a text or image equal to the positive's is never drawn)."""
    image, text, img_feat, txt_feat = trainee.encode(pixels, ids, mask)
    sim = img_feat @ txt_feat.T / trainee.temp
    same = torch.tensor([[a == b for b in texts] for a in texts], device=sim.device)
    target = same.float() / same.float().sum(1, keepdim=True)
    loss_itc = 0.5 * (
        -(F.log_softmax(sim, 1) * target).sum(1).mean()
        - (F.log_softmax(sim.T, 1) * target).sum(1).mean()
    )
    b = len(texts)
    with torch.no_grad():
        allowed = (~same).float()
        neg_text = _draw(sim.softmax(1), allowed, gen)
        neg_image = _draw(sim.T.softmax(1), allowed, gen)
    rows = torch.arange(b, device=sim.device)
    image_index = torch.cat([rows, rows, neg_image])
    text_index = torch.cat([rows, neg_text, rows])
    logits = trainee.itm(image, text, ids, mask, text_index, image_index)
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
    return loss_itc, F.cross_entropy(logits, labels)


def _draw(weights: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row from `weights` restricted to `allowed` (uniform where none is)."""
    w = (weights * allowed).cpu()
    w[w.sum(1) <= 0] = 1.0
    return torch.multinomial(w, 1, generator=gen)[:, 0].to(weights.device)


@dataclass
class AMCTrainer:
    """The pieces of one run: the explainer over the model being trained, the data, the loss."""

    cfg: AMCConfig
    explainer: object
    layer: int
    amc_loss: AMCLoss
    trainee: object = None
    pool: object = None
    pairs: BoxPairs | None = None
    mask_size: tuple[int, int] = (0, 0)

    @property
    def model(self):
        return self.explainer.model

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict:
        """This process's share of micro-batch `micro` of step `step`: the step's global batch of
        `batch_size` scenes (or pairs) is drawn from (seed, step) alone, then split into
        `grad_accum` micro-batches and each into `world` equal parts, so resumed runs and any
        number of processes see the same data. (ITC's in-batch negatives are the part's.)"""
        from groundcam.train.loop import shard

        cfg = self.cfg
        rng, seed = self._step_rng(step)
        gen_seed = seed + 7919 * (micro * world + rank)
        if self.pool is not None:
            from groundcam.train.albef_shapes import _batch

            pixels, phrases, owner, first, objects, swaps = _batch(self.pool, rng, cfg.batch_size)
            scenes = list(shard(shard(range(len(pixels)), micro, cfg.grad_accum), rank, world))
            keep = [i for i, o in enumerate(owner) if o in set(scenes)]
            remap = {s: j for j, s in enumerate(scenes)}
            phrases = [phrases[i] for i in keep]
            owner = [remap[owner[i]] for i in keep]
            first = np.unique(owner, return_index=True)[1]
            objects = [objects[s] for s in scenes]
            batch = (pixels[scenes], phrases, owner, first, objects, [swaps[i] for i in keep])
            size = (cfg.scene_size, cfg.scene_size)
            return {
                "shapes": batch,
                "texts": [p.text for p in phrases],
                "boxes": [list(p.boxes) for p in phrases],
                "sizes": [size] * len(phrases),
                "owner": torch.tensor(owner),
                "pixels": pixels[scenes],
                "gen_seed": gen_seed,
            }
        picked = self.pairs.pick(rng, cfg.batch_size)
        mine = shard(shard(picked, micro, cfg.grad_accum), rank, world)
        return self.pairs.load(mine) | {"gen_seed": gen_seed}

    def _step_rng(self, step: int) -> tuple[np.random.Generator, int]:
        """The step's generator (seeded by (seed, step) alone) and its negatives' base seed."""
        rng = np.random.default_rng([self.cfg.seed, step, 0])
        return rng, int(rng.integers(2**31))

    def boxes(self) -> dict[str, int]:
        """The box counts the card reports: over the data's (image, phrase) rows, or for the
        shapes pool over the scenes the run's steps draw (replayed from (seed, step), so a
        resumed or extended run counts the same as an uninterrupted one)."""
        if self.pairs is not None:
            return self.pairs.boxes
        from groundcam.train.albef_shapes import draw_scenes

        drawn = set()
        for step in range(self.cfg.steps):
            rng, _ = self._step_rng(step)
            drawn.update(draw_scenes(len(self.pool), rng, self.cfg.batch_size).tolist())
        size = (self.cfg.scene_size, self.cfg.scene_size)
        return box_counts((p.boxes, size) for i in sorted(drawn) for p in self.pool.phrases(i))

    def losses(self, model, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """ITC + ITM (+ the AMC term on the positives' maps unless this is the control)."""
        a = self.explainer.adapter
        device = self.explainer.device
        gen = torch.Generator().manual_seed(batch["gen_seed"])
        pixels = batch["pixels"].to(device).float()
        ids, mask = self.explainer.prepare_texts(batch["texts"])  # the positives, once
        if "shapes" in batch:
            from groundcam.train.albef_shapes import train_step

            shapes = (pixels, *batch["shapes"][1:])
            loss_itc, loss_itm = train_step(self.model, a, shapes, gen)
        else:
            loss_itc, loss_itm = itc_itm(self.trainee, pixels, ids, mask, batch["texts"], gen)
        terms = {"itc": loss_itc, "itm": loss_itm}
        loss = loss_itc + loss_itm
        amc = self.amc_terms(pixels, ids, mask, batch)
        terms |= {"amc": amc.loss, "amc_mean": amc.mean, "amc_max": amc.max}
        if self.cfg.amc:
            loss = loss + amc.loss
        return terms | {"loss": loss}

    def amc_terms(self, pixels: torch.Tensor, ids, mask, batch: dict):
        """The AMC loss of every positive pair's map at the chosen layer against its boxes
        (computed in the control run too, detached, so both runs log the same quantity)."""
        owner = batch["owner"].to(pixels.device)
        ex = self.explainer.explain_tensors(
            pixels,
            ids,
            mask,
            method=self.cfg.map_method,
            layer=self.layer,
            target="itm",
            image_index=owner,
            differentiable=self.cfg.amc,
        )
        masks, report = box_masks(batch["boxes"], batch["sizes"], self.mask_size, self.mask_size)
        raw = ex.raw_maps.to(pixels.device)
        return self.amc_loss(raw, masks.to(pixels.device), report.has_box.to(pixels.device))


def build(cfg: AMCConfig, device: torch.device | None = None) -> AMCTrainer:
    """Load the start model and the data; check that the map method reaches the layer."""
    import groundcam as gc

    cfg.check()
    tokenizer = None
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        from groundcam.model_files import pretrained

        tokenizer = pretrained(AutoTokenizer, cfg.tokenizer)
    explainer = gc.load(
        cfg.model,
        tokenizer=tokenizer,
        num_heads=cfg.num_heads,
        text_num_heads=cfg.text_num_heads,
        device=device,
    )
    if cfg.map_method == "attn-gradcam" and not explainer.has_source(TEXT_TO_IMAGE):
        raise InputError(
            f"--map-method attn-gradcam: {cfg.model} ({explainer.family}) has no text-to-image "
            "cross-attention to read it from; try --map-method gradcam"
        )
    if explainer.family not in TRAINEES:
        raise InputError(
            f"train amc: the {explainer.family} family is not trainable here; trainable are "
            "native ALBEF (built-in, saved directories, official .pth releases) and "
            "BlipForImageTextRetrieval"
        )
    resolved = explainer.resolve(cfg.map_method, cfg.layer, "itm")
    if not resolved.method.needs_grad:
        raise InputError(f"--map-method {cfg.map_method}: AMC needs gradcam or attn-gradcam")
    probe = explainer.prepare_images([Image.new("RGB", (cfg.scene_size, cfg.scene_size))])
    trainer = AMCTrainer(
        cfg,
        explainer,
        resolved.layer,
        AMCLoss(cfg.mean_margin, cfg.max_margin, cfg.mean_weight, cfg.max_weight),
        TRAINEES[explainer.family](explainer.model),
        mask_size=tuple(probe.shape[-2:]),
    )
    if cfg.data == "shapes" and explainer.family == "albef":
        from groundcam.train.albef_shapes import Pool

        if cfg.batch_size > cfg.pool:
            raise InputError(
                f"--batch-size {cfg.batch_size} is more than the --pool of {cfg.pool} scenes "
                "(a batch draws distinct scenes)"
            )
        trainer.pool = Pool(explainer.adapter, cfg)
    elif cfg.data == "shapes":  # other families: (scene, phrase) pairs of the same scenes
        from groundcam.data.shapes import generate_scene

        scenes = [generate_scene("train", i, cfg.seed, cfg.scene_size) for i in range(cfg.pool)]
        trainer.pairs = BoxPairs(scenes, explainer.prepare_images)
    else:
        trainer.pairs = BoxPairs(read_box_data(cfg), explainer.prepare_images)
    return trainer


def evaluate_shapes(explainer, method: str, layer: int, split: str, scenes: int, seed=0) -> dict:
    """Pointing accuracy on `scenes` shapes scenes of `split`, overall and by phrase kind."""
    from groundcam.eval.shapes import shapes_records, summarize

    model = explainer.model
    was_training = model.training
    model.eval()
    try:
        records = list(shapes_records(explainer, split, scenes, method, layer, seed))
    finally:
        model.train(was_training)
    s = summarize(records)
    return {
        "accuracy": s["accuracy"],
        "n": s["n"],
        "hits": sum(r["hit"] for r in records),
        "by_kind": s["by_kind"],
        "colour_shared": s["colour_shared"],
    }


def save_model(trainer: AMCTrainer, model, directory: Path, extra: dict | None = None) -> None:
    """The trained model as `gc.load` reads it: config, safetensors, tokenizer, a card."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    adapter = trainer.explainer.adapter
    if adapter.processor is not None:  # transformers families: the processor as loaded
        adapter.processor.save_pretrained(directory)
    if adapter.tokenizer is not None:
        adapter.tokenizer.save_pretrained(directory)
    cfg = trainer.cfg
    card = {
        "trained_by": "groundcam train amc",
        "command": " ".join(["groundcam", *sys.argv[1:]]) if sys.argv else "",
        "config": cfg.fingerprint(),
        "layer": trainer.layer,
        "boxes": trainer.boxes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    } | (extra or {})
    (directory / "train_card.json").write_text(json.dumps(card, indent=1) + "\n")


def train(cfg: AMCConfig, threads: int | None = None, stop_at: int | None = None) -> Path:
    """Run, resume or extend (a larger `steps`) AMC fine-tuning in `cfg.out` on the shared loop;
    the model (with its card) goes to `out/model`. The arguments and `out` are checked before
    anything is loaded. `stop_at`: end after that step with a checkpoint (for tests)."""
    from groundcam.train.loop import RESUMABLE, LoopConfig, check_out, check_steps, fit

    cfg.check()
    check_out(Path(cfg.out), cfg.fingerprint(), RESUMABLE | {"steps"})
    check_steps(Path(cfg.out), cfg.steps)
    loop = LoopConfig(
        out=cfg.out,
        steps=cfg.steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        final_lr=cfg.final_lr,
        grad_clip=cfg.grad_clip,
        grad_accum=cfg.grad_accum,
        precision=cfg.precision,
        seed=cfg.seed,
        save_every=cfg.save_every,
        eval_every=cfg.eval_every if cfg.data == "shapes" else 0,
        threads=threads,
    )
    if threads:
        torch.set_num_threads(threads)
    trainer = build(cfg)
    if trainer.pairs is not None:
        b = trainer.pairs.boxes
        print(
            f"{len(trainer.pairs)} (image, phrase) pairs with boxes; of {b['boxes']} boxes "
            f"{b['clipped']} clipped to the image, {b['skipped']} skipped (empty or inverted)",
            flush=True,
        )
    model = trainer.model
    model.train()

    def evaluate(model, step: int) -> dict:
        if cfg.data != "shapes":
            return {}
        r = evaluate_shapes(
            trainer.explainer, cfg.map_method, trainer.layer, "val", cfg.eval_scenes, cfg.seed
        )
        return {"accuracy": round(r["accuracy"], 4), "n": r["n"]}

    def clamp_temperature(model, step: int) -> None:
        trainer.trainee.clamp()

    return fit(
        model,
        loop,
        trainer.batch,
        trainer.losses,
        fingerprint=cfg.fingerprint(),
        save_model=lambda m, path: save_model(trainer, m, path),
        evaluate=evaluate if cfg.data == "shapes" else None,
        after_step=clamp_temperature,
        stop_at=stop_at,
        extendable=True,
    )
