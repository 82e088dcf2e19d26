"""`groundcam eval`: stream a dataset through a model, one JSON line per phrase, resumable and
sharded across the processes `accelerate launch` starts.

Layout of `--out`: `config.json` (what must match to resume), `parts/rank<r>.jsonl` (records as
each process writes them, one image at a time), then, merged by the main process in dataset
order, `results.jsonl` and `summary.json` (and `report.html` with `--report`). Every image's
phrases are computed in one batch on their own, so a record never depends on which process
computed it or on what ran before: 1 process, 2 processes and an interrupted-then-resumed run
give the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from groundcam.data.text import pre_caption
from groundcam.eval.datasets import Unit, Units
from groundcam.eval.pointing import PROTOCOLS, pointing_game, read_dets, upsample
from groundcam.eval.summary import summarize

METRICS = ("pointing", "deletion", "insertion")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides the numbers of a run (paths and `--limit` do not)."""

    dataset: str
    splits: tuple[str, ...]
    model: str
    method: str = "attn-gradcam"
    layer: int | None = None
    target: str | None = None
    protocol: str = "amc"
    metrics: tuple[str, ...] = ("pointing",)
    steps: int = 16
    precision: str = "fp32"
    seed: int = 0
    dets: str | None = None

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
    """Every record written so far by any process of any earlier run, by uid; a successful
    record wins over an error record of the same phrase (the image may have appeared since)."""
    done: dict[str, dict] = {}
    for path in sorted((out / "parts").glob("*.jsonl")):
        for rec in _read_jsonl(path):
            if rec.get("error") and rec["uid"] in done and not done[rec["uid"]].get("error"):
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


def in_box_fraction(heatmap: torch.Tensor, boxes: list[list[float]]) -> float | None:
    """The share of the (non-negative) map's mass on pixels inside any box, edges included."""
    mass = heatmap.clamp(min=0)
    total = float(mass.sum())
    if total <= 0 or not boxes:
        return None
    h, w = mass.shape
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    inside = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        inside |= (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
    return float(mass[inside].sum()) / total


class UnitScorer:
    """Scores every phrase of one image: explanation, pointing, optional faithfulness."""

    def __init__(self, explainer, cfg: EvalConfig, raw_box_shift: float, device_type: str):
        self.explainer = explainer
        self.cfg = cfg
        self.protocol = PROTOCOLS[cfg.protocol]
        # `mg` scores the raw 1-based annotation boxes; the others the parser's boxes.
        self.shift = raw_box_shift if cfg.protocol == "mg" else 0.0
        self.dets = read_dets(cfg.dets) if cfg.dets else None
        self.autocast = (
            torch.autocast(device_type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else contextlib.nullcontext()
        )

    def explain(self, unit: Unit, k: int):
        """The unit's image and phrase `k`'s map, computed in the same batch as when scored."""
        texts = [pre_caption(p.text) for p in unit.sample.phrases]
        keep = [j for j, t in enumerate(texts) if t.strip()]
        image = unit.sample.load_image()
        with self.autocast:
            ex = self.explainer.explain(
                image, [texts[j] for j in keep], self.cfg.method, self.cfg.layer, self.cfg.target
            )
        return image, ex.maps[keep.index(k)]

    def __call__(self, unit: Unit) -> list[dict]:
        cfg = self.cfg
        texts = [pre_caption(p.text) for p in unit.sample.phrases]
        bases = [_base_record(unit, k, t, self.shift) for k, t in enumerate(texts)]
        if error := unit.sample.meta.get("error"):
            return [_failed(b, error) for b in bases]
        proposals = None
        if self.dets is not None:
            proposals = self.dets.get(unit.sample.image_id)
            if proposals is None:
                message = f"no detections for image {unit.sample.image_id} in {cfg.dets}"
                return [_failed(b, message) for b in bases]
        keep = [k for k, t in enumerate(texts) if t.strip()]
        records = {
            k: _failed(bases[k], "phrase is empty after preprocessing")
            for k in range(len(texts))
            if k not in keep
        }
        if keep:
            records |= self._score(unit, keep, [texts[k] for k in keep], bases, proposals)
        return [records[k] for k in range(len(texts))]

    def _score(self, unit, keep, texts, bases, proposals) -> dict[int, dict]:
        cfg = self.cfg
        try:
            image = unit.sample.load_image()
        except (FileNotFoundError, OSError) as e:
            return {k: _failed(bases[k], str(e)) for k in keep}
        with self.autocast:
            ex = self.explainer.explain(image, texts, cfg.method, cfg.layer, cfg.target)
        curves = None
        if len(cfg.metrics) > 1:
            from groundcam.eval.faithfulness import faithfulness

            wanted = tuple(m for m in cfg.metrics if m != "pointing")
            with self.autocast:
                curves = faithfulness(
                    self.explainer, image, texts, ex.maps, wanted, cfg.steps, cfg.target
                )
        size = (image.height, image.width)
        out = {}
        for row, k in enumerate(keep):
            base = bases[k]
            heatmap = upsample(ex.maps[row], size, mode=self.protocol.resize_mode)
            result = pointing_game(heatmap, base["boxes"], cfg.protocol, proposals=proposals)
            rec = base | {
                "image_size": [image.width, image.height],
                "point": list(result.point),
                "hit": result.hit,
                "skipped": result.skipped,
                "score": float(ex.scores[row]),
                "in_box": in_box_fraction(heatmap, base["boxes"]),
            }
            if result.box is not None or result.iou is not None:
                rec |= {"proposal": result.box, "iou": result.iou}
            if curves is not None:
                c = curves[row]
                for name in ("deletion", "insertion"):
                    if name in cfg.metrics:
                        rec[name] = getattr(c, name)
                        rec[f"{name}_auc"] = getattr(c, f"{name}_auc")
            out[k] = rec
        return out


# ----------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    summary: dict | None  # None on processes other than the main one
    out: Path
    computed: int  # phrases this process computed in this run
    resumed: int  # phrases found done before this run started


def fingerprint(cfg: EvalConfig, explainer) -> dict:
    """The configuration a resumed run must share, with the layer and target resolved."""
    _, _, target, layer = explainer._resolve(cfg.method, cfg.layer, cfg.target)
    lists = {"splits": list(cfg.splits), "metrics": list(cfg.metrics)}
    return asdict(cfg) | lists | {"layer": layer, "target": target}


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

    pending = [
        u for u in units.units if any(u.uid(k) not in done for k in range(len(u.sample.phrases)))
    ]
    mine = pending[procs.rank :: procs.world]
    scorer = UnitScorer(explainer, cfg, units.spec.raw_box_shift, procs.device.type)
    total = sum(len(u.sample.phrases) for u in mine)
    desc = f"{cfg.dataset}/{','.join(cfg.splits)}"
    if procs.world > 1:
        desc += f" [{procs.rank + 1}/{procs.world}]"
    computed = 0
    with (
        _open_part(out / "parts" / f"rank{procs.rank}.jsonl") as part,
        tqdm(total=total, desc=desc, unit="phrase", disable=not progress) as bar,
    ):
        for unit in mine:
            records = scorer(unit)
            part.write("".join(json.dumps(r) + "\n" for r in records))
            part.flush()
            computed += len(records)
            bar.update(len(records))
    procs.barrier()
    resumed = sum(len(u.sample.phrases) for u in units.units) - sum(
        len(u.sample.phrases) for u in pending
    )
    if not procs.is_main:
        return RunResult(None, out, computed, resumed)

    records = merge_records(out, units)
    summary = summarize(records)
    summary["config"] = fp | {"dataset_units": len(units)}
    summary["reader"] = {
        split: {
            "samples": r.samples,
            "phrases": r.phrases,
            "skipped_samples": r.skipped_samples,
            "skipped_lines": r.skipped_lines,
            "missing_images": len(r.missing_images),
            "errors": r.errors[:20],
        }
        for split, r in units.reports.items()
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if report:
        write_report(out, summary, records, units, scorer, report_examples)
    return RunResult(summary, out, computed, resumed)


def merge_records(out: Path, units: Units) -> list[dict]:
    """This evaluation's records from every part, in dataset order, as `results.jsonl`."""
    found = read_parts(out)
    records = []
    for unit in units.units:
        for k in range(len(unit.sample.phrases)):
            rec = found.get(unit.uid(k))
            if rec is None:
                raise RuntimeError(f"no record for {unit.uid(k)} after every process finished")
            records.append(rec | {"unit": unit.index, "index": k})
    tmp = out / "results.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(out / "results.jsonl")
    return records


def write_report(out: Path, summary, records, units: Units, scorer: UnitScorer, k: int) -> Path:
    """`report.html`: the summary and the best and worst examples, their maps recomputed."""
    from groundcam.viz.report import Example, select_examples, write_eval_report

    best, worst = select_examples(records, k)
    by_index = {u.index: u for u in units.units}

    def examples(chosen: list[dict]) -> list[Example]:
        result = []
        for rec in chosen:
            unit = by_index[rec["unit"]]
            image, heatmap = scorer.explain(unit, rec["index"])
            result.append(Example(rec, image, heatmap, scorer.protocol.resize_mode))
        return result

    title = f"groundcam eval: {summary['config']['dataset']} ({summary['config']['model']})"
    return write_eval_report(out / "report.html", summary, examples(best), examples(worst), title)
