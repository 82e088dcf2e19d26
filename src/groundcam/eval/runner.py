"""`groundcam eval`: stream a dataset through a model, one JSON line per phrase, resumable and
sharded across the processes `accelerate launch` starts.

Layout of `--out`: `config.json` (what must match to resume), `parts/rank<r>.jsonl` (records as
each process writes them, one batch of images at a time), then, merged by the main process in
dataset order, `results.jsonl` and `summary.json` (and `report.html` with `--report`). Batches
are fixed groups of consecutive images, so a record never depends on which process computed it
or on what ran before: 1 process, 2 processes and an interrupted-then-resumed run give the same
numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

from groundcam.data.text import pre_caption
from groundcam.errors import GroundcamWarning, ImageError, InputError
from groundcam.eval.datasets import Unit, Units
from groundcam.eval.pointing import PROTOCOLS, pointing_games, read_dets, upsample_many
from groundcam.eval.summary import summarize

METRICS = ("pointing", "deletion", "insertion")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides the numbers of a run (paths and `--limit` do not)."""

    dataset: str
    splits: tuple[str, ...]
    model: str
    method: str | None = None  # None: the family's default method
    layer: int | None = None
    target: str | None = None
    protocol: str = "amc"
    metrics: tuple[str, ...] = ("pointing",)
    steps: int = 16
    precision: str = "fp32"
    seed: int = 0
    dets: str | None = None
    batch_images: int | None = None  # images per forward; None: 8 (1 for ViLT, which pads)

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol {self.protocol!r}: valid are {', '.join(PROTOCOLS)}")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or "pointing" not in self.metrics:
            raise ValueError(
                f"--metrics {','.join(self.metrics)!r}: give pointing plus any of deletion, "
                "insertion (e.g. pointing,deletion,insertion)"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: valid are {', '.join(PRECISIONS)}")
        if self.batch_images is not None and self.batch_images < 1:
            raise ValueError(f"--batch-images must be at least 1, got {self.batch_images}")
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if PROTOCOLS[self.protocol].uses_proposals and not self.dets:
            raise ValueError(
                f"--protocol {self.protocol} ranks detector proposals: pass --dets dets.json"
            )


# ----------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """This process's place among the ones `accelerate launch` started (1 of 1 without it)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Processes:
        """Accelerate's view when launched by it (WORLD_SIZE > 1); gloo on CPU-only machines."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return cls(device=device)
        from accelerate import PartialState

        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        state = PartialState(cpu=cpu or not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state.device, state.wait_for_everyone)


# ----------------------------------------------------------------------------- resume


def _read_jsonl(path: Path) -> list[dict]:
    """Records of one part file; a torn last line (a process killed mid-write) is ignored."""
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_parts(out: Path) -> dict[str, dict]:
    """Every record written so far by any process of any earlier run, by uid: the latest one,
    except that a successful record wins over a later error (the image may have gone since)."""
    done: dict[str, dict] = {}
    for path in sorted((out / "parts").glob("*.jsonl")):
        for rec in _read_jsonl(path):
            old = done.get(rec["uid"])
            if old is not None:
                if rec.get("error") and not old.get("error"):
                    continue
                if rec.get("_seq", 0) < old.get("_seq", 0) and not old.get("error"):
                    continue
            done[rec["uid"]] = rec
    return done


def _open_part(path: Path):
    """Append to this process's part file, first cutting off a torn last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    return path.open("a", encoding="utf-8")


def check_config(out: Path, fingerprint: dict) -> None:
    """Refuse to mix results: an `--out` written under another configuration is not reused."""
    path = out / "config.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"--out {out}: config.json is not valid JSON") from None
        diffs = [
            f"{k}: {old.get(k)!r} there, {v!r} now"
            for k, v in fingerprint.items()
            if old.get(k) != v
        ]
        if diffs:
            raise ValueError(
                f"--out {out} holds results of a different configuration ({'; '.join(diffs)}); "
                f"pass another --out, or delete {out} to start fresh"
            )
    elif (out / "parts").is_dir() and any((out / "parts").glob("*.jsonl")):
        raise ValueError(
            f"--out {out} holds results without a config.json; delete {out} to start fresh"
        )


# ----------------------------------------------------------------------------- scoring


def _base_record(unit: Unit, k: int, text: str, shift: float) -> dict:
    sample, phrase = unit.sample, unit.sample.phrases[k]
    return {
        "uid": unit.uid(k),
        "unit": unit.index,
        "index": k,
        "split": sample.split,
        "image_id": sample.image_id,
        "phrase_id": phrase.id,
        "phrase": phrase.text,
        "text": text,
        "kind": phrase.kind,
        "types": list(phrase.meta.get("types") or [phrase.kind]),
        "boxes": [[float(v) + shift for v in box] for box in phrase.boxes],
        "image_size": list(sample.image_size),
        "meta": {
            key: value
            for key, value in phrase.meta.items()
            if isinstance(value, str | int | float | bool) and key not in ("caption", "raw")
        },
    }


def _failed(base: dict, message: str) -> dict:
    return base | {
        "point": None,
        "hit": None,
        "skipped": False,
        "score": None,
        "in_box": None,
        "error": message,
    }


def in_box_fractions(heatmaps: torch.Tensor, boxes: list[list[list[float]]]) -> list[float | None]:
    """Per map [P, H, W], the share of its (non-negative) mass on pixels inside any of its boxes,
    edges included (a box is clipped to the image; one wholly outside holds no pixel); None for a
    map with no mass or no box. A NaN or infinite box is an `InputError`."""
    mass = heatmaps.clamp(min=0)
    _, h, w = mass.shape
    inside = torch.zeros_like(mass, dtype=torch.bool)
    for p, phrase_boxes in enumerate(boxes):
        for box in phrase_boxes:  # pixels x with x1 <= x <= x2, likewise y
            if not all(math.isfinite(v) for v in box):
                raise InputError(f"map {p}: box {list(box)} is not finite (NaN or infinite)")
            x1, y1, x2, y2 = box
            left, top = max(math.ceil(x1), 0), max(math.ceil(y1), 0)
            right, bottom = min(math.floor(x2), w - 1), min(math.floor(y2), h - 1)
            if left <= right and top <= bottom:  # a negative bound would wrap around
                inside[p, top : bottom + 1, left : right + 1] = True
    # both sums in one transfer from the maps' device
    totals, within = torch.stack([mass.sum(dim=(1, 2)), (mass * inside).sum(dim=(1, 2))]).tolist()
    return [
        float(a / t) if t > 0 and phrase_boxes else None
        for a, t, phrase_boxes in zip(within, totals, boxes, strict=True)
    ]


def _finite_boxes(base: dict) -> bool:
    return all(math.isfinite(v) for box in base["boxes"] for v in box)


def _phrase_problem(base: dict) -> str:
    """Why a phrase of a loaded image is not scored."""
    if not _finite_boxes(base):
        return f"a ground-truth box is not finite (NaN or infinite): {base['boxes']}"
    return "phrase is empty after preprocessing"


@dataclass
class _Ready:
    """One unit that reached the model: its image, phrase rows kept and partial records."""

    unit: Unit
    image: Image.Image
    pixels: torch.Tensor  # the model's input for this image, [1, C, H, W]
    keep: list[int]
    texts: list[str]
    bases: list[dict]
    proposals: list | None


class UnitScorer:
    """Scores every phrase of a batch of images: explanation, pointing, optional faithfulness.

    A batch is always the same images (fixed groups of `batch_images` consecutive images), so a
    record does not depend on which process computed it or on what ran before."""

    def __init__(self, explainer, cfg: EvalConfig, raw_box_shift: float, device_type: str):
        self.explainer = explainer
        self.cfg = cfg
        self.protocol = PROTOCOLS[cfg.protocol]
        self.text_warnings: list[str] = []  # this run's warned phrases, one message each
        self._warned: set[str] = set()  # uids of the phrases in `text_warnings`
        self.text_conditioned: bool | None = None  # known once a batch was explained
        # `mg` scores the raw 1-based annotation boxes; the others the parser's boxes.
        self.shift = raw_box_shift if cfg.protocol == "mg" else 0.0
        self.dets = read_dets(cfg.dets) if cfg.dets else None
        self.autocast = (
            torch.autocast(device_type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else contextlib.nullcontext()
        )

    def _explain(self, ready: list[_Ready]):
        """One explanation for the batch; each image was prepared on its own (possibly in a
        loader thread), which gives the same input as preparing them together."""
        explainer = self.explainer
        texts = [t for r in ready for t in r.texts]
        if getattr(explainer.adapter, "vlm", False):
            return self._explain_phrases(ready, texts)
        with warnings.catch_warnings(record=True) as caught:
            # one warning per unreadable phrase would flood a dataset run: they are counted
            warnings.simplefilter("always", GroundcamWarning)
            input_ids, mask = explainer.prepare_texts(texts)
        for w in caught:
            if not issubclass(w.category, GroundcamWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if any(issubclass(w.category, GroundcamWarning) for w in caught):
            uids = [r.bases[k]["uid"] for r in ready for k in r.keep]
            self._count_warned(uids, texts)
        counts = torch.tensor([len(r.texts) for r in ready])
        index = torch.repeat_interleave(torch.arange(len(ready)), counts).to(input_ids.device)
        pixels = torch.cat([r.pixels for r in ready]).to(explainer.device)
        with self.autocast:
            ex = self.explainer.explain_tensors(
                pixels, input_ids, mask, self.cfg.method, self.cfg.layer, self.cfg.target, index
            )
        self.text_conditioned = ex.text_conditioned
        return ex

    def _explain_phrases(self, ready: list[_Ready], texts: list[str]):
        """A generative VLM's batch: each phrase teacher-forced after the default prompt
        (`Explainer.explain_many`), its unreadable words counted once by uid."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GroundcamWarning)  # counted below
            with self.autocast:
                ex = self.explainer.explain_many(
                    [r.image for r in ready],
                    [r.texts for r in ready],
                    self.cfg.method,
                    self.cfg.layer,
                )
        uids = [r.bases[k]["uid"] for r in ready for k in r.keep]
        for uid, text, unknown in zip(uids, texts, ex.unknown_words, strict=True):
            if unknown and uid not in self._warned:
                self._warned.add(uid)
                self.text_warnings.append(f"phrase {text!r}: {', '.join(unknown)} unknown")
        self.text_conditioned = ex.text_conditioned
        return ex

    def _count_warned(self, uids: list[str], texts: list[str]) -> None:
        """Count each phrase that warns once, by uid, whatever batch it came in and however often
        it is explained (the report's pictures): the texts are tokenised again one at a time
        (only for a batch that warned) to learn which phrases the warnings were about."""
        for uid, text in zip(uids, texts, strict=True):
            if uid in self._warned:
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("ignore")
                warnings.simplefilter("always", GroundcamWarning)
                self.explainer.prepare_texts([text])
            if caught:
                self._warned.add(uid)
                self.text_warnings.append(str(caught[0].message))

    def load(self, unit: Unit):
        """The unit's image and model input, or the error loading it raised (None when the
        reader already knows the image is missing)."""
        if unit.sample.meta.get("error"):
            return None
        try:  # a missing, broken or oversized image is that unit's error, not the run's
            image = unit.sample.load_image()
            return image, self.explainer.prepare_images([image])
        except (OSError, ImageError) as e:
            return e

    def explain(self, unit: Unit) -> tuple[Image.Image, dict[int, torch.Tensor]]:
        """The unit's image and its phrases' maps by phrase index, the unit explained alone
        (for pictures: the values differ from the scored batch's only by float rounding)."""
        ready = self._prepare([unit], [None], {})
        if not ready:
            raise ValueError(f"image {unit.sample.image_id} has no phrase to explain")
        maps = self._explain(ready).maps
        return ready[0].image, {k: maps[row] for row, k in enumerate(ready[0].keep)}

    def _prepare(self, batch: list[Unit], images: list, records: dict) -> list[_Ready]:
        """Units whose image loads, with their phrases' texts; failures go to `records`."""
        ready = []
        for unit, image in zip(batch, images, strict=True):
            texts = [pre_caption(p.text) for p in unit.sample.phrases]
            bases = [_base_record(unit, k, t, self.shift) for k, t in enumerate(texts)]
            error = unit.sample.meta.get("error")
            proposals = None
            if not error and self.dets is not None:
                proposals = self.dets.get(unit.sample.image_id)
                if proposals is None:
                    error = f"no detections for image {unit.sample.image_id} in {self.cfg.dets}"
            loaded = image if error or image is not None else self.load(unit)
            if not error and isinstance(loaded, Exception):
                error = str(loaded)
            keep = [] if error else [k for k, t in enumerate(texts) if t.strip()]
            keep = [k for k in keep if _finite_boxes(bases[k])]
            for k, base in enumerate(bases):
                if k not in keep:
                    records[base["uid"]] = _failed(base, error or _phrase_problem(base))
            if keep:
                kept_texts = [texts[k] for k in keep]
                image, pixels = loaded
                ready.append(_Ready(unit, image, pixels, keep, kept_texts, bases, proposals))
        return ready

    def __call__(self, batch: list[Unit], images: list | None = None) -> list[dict]:
        """Records of every phrase of the batch's units, in order (`images`: already loaded
        images or None per unit)."""
        records: dict[str, dict] = {}
        ready = self._prepare(batch, images or [None] * len(batch), records)
        if ready:
            ex = self._explain(ready)
            unknown = self.explainer.unknown_words([t for r in ready for t in r.texts])
            row = 0
            for r in ready:
                n = len(r.keep)
                scores = ex.scores[row : row + n]
                for k, rec in enumerate(self._score(r, ex.maps[row : row + n], scores)):
                    if unknown[row + k]:  # marked only where the model read [UNK] for a word
                        rec["unknown_words"] = unknown[row + k]
                    records[rec["uid"]] = rec
                row += n
        return [records[u.uid(k)] for u in batch for k in range(len(u.sample.phrases))]

    def _score(self, r: _Ready, maps: torch.Tensor, scores: torch.Tensor) -> list[dict]:
        cfg = self.cfg
        curves = None
        if len(cfg.metrics) > 1:
            from groundcam.eval.faithfulness import faithfulness

            wanted = tuple(m for m in cfg.metrics if m != "pointing")
            with self.autocast, warnings.catch_warnings():
                # the phrases' text warnings were counted when the batch was explained
                warnings.simplefilter("ignore", GroundcamWarning)
                curves = faithfulness(
                    self.explainer, r.image, r.texts, maps, wanted, cfg.steps, cfg.target
                )
        size = (r.image.height, r.image.width)
        # at image size on the model's device: on a GPU this is most of the work saved
        grid = maps.to(self.explainer.device)
        heatmaps = upsample_many(grid, size, mode=self.protocol.resize_mode)
        boxes = [r.bases[k]["boxes"] for k in r.keep]
        results = pointing_games(heatmaps, boxes, cfg.protocol, proposals=r.proposals)
        in_box = in_box_fractions(heatmaps, boxes)
        out = []
        for row, k in enumerate(r.keep):
            result = results[row]
            rec = r.bases[k] | {
                "image_size": [r.image.width, r.image.height],
                "point": list(result.point),
                "hit": result.hit,
                "skipped": result.skipped,
                "flat": result.flat,
                "score": float(scores[row]),
                "in_box": in_box[row],
            }
            if result.box is not None or result.iou is not None:
                rec |= {"proposal": result.box, "iou": result.iou}
            if curves is not None:
                rec |= curves[row].to_record()
            out.append(rec)
        return out


def batches_of(units: Units, size: int) -> list[list[Unit]]:
    """Fixed groups of `size` consecutive images, never across a split boundary."""
    groups: list[list[Unit]] = []
    for unit in units.units:
        last = groups[-1] if groups else None
        if last and len(last) < size and last[0].split == unit.split:
            last.append(unit)
        else:
            groups.append([unit])
    return groups


# ----------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    summary: dict | None  # None on processes other than the main one
    out: Path
    computed: int  # phrases this process computed in this run
    resumed: int  # phrases found done before this run started
    text_warnings: list[str] = field(default_factory=list)  # this run's phrase warnings
    text_conditioned: bool | None = None  # False: one image-only map per image (None: unknown)


PREFETCH = 2  # batches of images decoded ahead of the model


def fingerprint(cfg: EvalConfig, explainer) -> dict:
    """The configuration a resumed run must share, with the layer and target resolved."""
    method, _, target, layer = explainer.resolve(cfg.method, cfg.layer, cfg.target)
    lists = {"splits": list(cfg.splits), "metrics": list(cfg.metrics)}
    batch = cfg.batch_images or explainer.batch_images
    resolved = {"method": method.name, "layer": layer, "target": target, "batch_images": batch}
    return asdict(cfg) | lists | resolved


def run_eval(
    cfg: EvalConfig,
    units: Units,
    explainer,
    out: str | Path,
    procs: Processes | None = None,
    progress: bool = True,
    report: bool = False,
    report_examples: int = 8,
) -> RunResult:
    """Score every phrase of `units` not already in `out`, this process's share of them, then
    (main process) merge all records into `results.jsonl` and `summary.json`."""
    from tqdm import tqdm

    cfg.check()
    procs = procs or Processes()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    fp = fingerprint(cfg, explainer)
    check_config(out, fp)
    procs.barrier()  # every process has checked before the main one writes anything
    if procs.is_main:
        (out / "parts").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(fp, indent=1) + "\n")
    done = {uid: r for uid, r in read_parts(out).items() if not r.get("error")}
    procs.barrier()  # nobody writes until every process has read what is done

    batches = batches_of(units, fp["batch_images"])
    pending = [
        b
        for b in batches
        if any(u.uid(k) not in done for u in b for k in range(len(u.sample.phrases)))
    ]
    mine = pending[procs.rank :: procs.world]
    scorer = UnitScorer(explainer, cfg, units.spec.raw_box_shift, procs.device.type)
    total = sum(len(u.sample.phrases) for b in mine for u in b)
    desc = f"{cfg.dataset}/{','.join(cfg.splits)}"
    if procs.world > 1:
        desc += f" [{procs.rank + 1}/{procs.world}]"
    computed = 0
    with (
        _open_part(out / "parts" / f"rank{procs.rank}.jsonl") as part,
        tqdm(total=total, desc=desc, unit="phrase", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        # images are decoded and prepared ahead, in threads, while the model works
        ahead = [[pool.submit(scorer.load, u) for u in b] for b in mine[:PREFETCH]]
        for i, batch in enumerate(mine):
            if i + PREFETCH < len(mine):
                ahead.append([pool.submit(scorer.load, u) for u in mine[i + PREFETCH]])
            records = scorer(batch, [f.result() for f in ahead[i]])
            ahead[i] = []
            seq = time.time_ns()  # a recomputed batch's records supersede older ones
            part.write("".join(json.dumps(r | {"_seq": seq}) + "\n" for r in records))
            part.flush()
            computed += len(records)
            bar.update(len(records))
    procs.barrier()
    resumed = sum(len(u.sample.phrases) for u in units.units) - sum(
        len(u.sample.phrases) for b in pending for u in b
    )
    if not procs.is_main:
        return RunResult(
            None, out, computed, resumed, scorer.text_warnings, scorer.text_conditioned
        )

    records = merge_records(out, units)
    summary = summarize(records)
    summary["config"] = fp | {"dataset_units": len(units)}
    vlm = getattr(explainer.adapter, "vlm", False)  # phrases score their log-likelihood
    kind = explainer.score_kind("phrase" if vlm else fp["target"])
    if kind is not None:
        summary["config"]["score"] = kind.name
    summary["reader"] = {
        split: {
            "samples": r.samples,
            "phrases": r.phrases,
            "skipped_samples": r.skipped_samples,
            "skipped_lines": r.skipped_lines,
            "skipped_rows": r.skipped_rows,
            "recoded_files": r.recoded_files,
            "missing_images": len(r.missing_images),
            "errors": r.errors[:20],
        }
        for split, r in units.reports.items()
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if report:
        write_report(out, summary, records, units, scorer, report_examples)
    return RunResult(summary, out, computed, resumed, scorer.text_warnings, scorer.text_conditioned)


def merge_records(out: Path, units: Units) -> list[dict]:
    """This evaluation's records from every part, in dataset order, as `results.jsonl`."""
    found = read_parts(out)
    records = []
    for unit in units.units:
        for k in range(len(unit.sample.phrases)):
            rec = found.get(unit.uid(k))
            if rec is None:
                raise RuntimeError(f"no record for {unit.uid(k)} after every process finished")
            rec = {key: v for key, v in rec.items() if key != "_seq"}
            records.append(rec | {"unit": unit.index, "index": k})
    tmp = out / "results.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out / "results.jsonl")
    return records


def write_report(out: Path, summary, records, units: Units, scorer: UnitScorer, k: int) -> Path:
    """`report.html`: the summary and the best and worst examples, each image explained once."""
    from groundcam.viz.report import Example, select_examples, write_eval_report

    best, worst = select_examples(records, k)
    by_index = {u.index: u for u in units.units}
    explained: dict[int, tuple[Image.Image, dict[int, torch.Tensor]]] = {}

    def examples(chosen: list[dict]) -> list[Example]:
        result = []
        for rec in chosen:
            if rec["unit"] not in explained:
                explained[rec["unit"]] = scorer.explain(by_index[rec["unit"]])
            image, maps = explained[rec["unit"]]
            result.append(Example(rec, image, maps[rec["index"]], scorer.protocol.resize_mode))
        return result

    title = f"groundcam eval: {summary['config']['dataset']} ({summary['config']['model']})"
    best, worst = examples(best), examples(worst)
    if scorer.text_conditioned is False:  # known once an example was explained
        title += f" - image-only maps: {summary['config']['method']} does not read the text"
    defaults = option_defaults(scorer.explainer)
    return write_eval_report(out / "report.html", summary, best, worst, title, defaults=defaults)


def option_defaults(explainer) -> dict:
    """The value each `EvalConfig` option has when it is not set, as `summary.json` records it
    (the report lists only the options that differ)."""
    defaults = {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in fields(EvalConfig)
        if f.default is not MISSING
    }
    return defaults | {"batch_images": explainer.batch_images}
