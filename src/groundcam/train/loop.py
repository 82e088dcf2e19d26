"""One training loop for groundcam's trainers, on 🤗 Accelerate (nanoGPT-like, no framework).

A trainer hands `fit` its model and two functions:

- `batch_fn(step, micro, rank, world)` returns this process's share of micro-batch `micro`
  (0 <= micro < grad_accum) of step `step` (0-based). The data must be a pure function of
  (seed, step, micro): never of an iterator's position, the process count or how many steps ran
  before. Then a resumed run sees exactly the batches an uninterrupted one does, and N processes
  together see the one global batch a single process would (each its `shard`). The usual shape:
  draw the step's global batch from a generator seeded by (seed, step), cut micro-batch `micro`
  out of it with `shard(batch, micro, grad_accum)`, then this process's part with
  `shard(part, rank, world)`. Tensors in what it returns are moved to the device.
- `loss_fn(model, batch, step)` returns a dict of 0-d tensors: "loss" is what is optimised (a
  mean over the batch, so that micro-batches and processes average to the global batch's
  loss); every other entry is a term to log. Every process must return the same keys at a
  given step. It runs inside the forward of a small module wrapping `model`, so DDP syncs its
  gradients and mixed precision autocasts it whatever methods of `model` it calls.

`fit` owns the rest: AdamW over `param_groups`, the warmup + cosine schedule `lr_at`, gradient
clipping and accumulation, mixed precision, a checkpoint every `save_every` steps that a
restarted run resumes from (log trimmed to match), `config.json` guarding the run directory,
`train_log.jsonl` and the final weights through the trainer's `save_model`.

Run directory: `config.json` (the trainer's fingerprint), `train_log.jsonl` (one JSON line per
logged step: step, lr, every term averaged over processes, micro-batches and the steps since the
last line, elapsed_s, and `val` where `evaluate` ran), `checkpoint/` (Accelerate's `save_state`:
safetensors weights, optimizer, RNG states, plus `state.json`), `state.json` (the step done),
and `model/` at the end.

Reproducibility: on the CPU a run is bit-identical to a rerun (and a killed run to the
uninterrupted one) at the same thread count, any count: `fit` trains under
`torch.use_deterministic_algorithms` (warn-only: an op without a deterministic kernel warns and
runs), which makes the CPU kernels that race with more than one thread, the accumulating
`index_put_` (the backward of `tensor[index]`) and `put_`, run serially. Another thread count
splits sums differently (weights agree to float rounding, not to the bit); so do GPUs, where `fit`
leaves the setting alone (CUDA's atomic adds).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from groundcam.errors import GroundcamWarning, InputError

Precision = Literal["fp32", "bf16", "fp16", "auto"]
BatchFn = Callable[[int, int, int, int], Any]
LossFn = Callable[[nn.Module, Any, int], dict[str, torch.Tensor]]

# Fingerprint keys a run may change on resume: where it lives and how a step is executed, not
# what a step computes (grad_accum=k gives the same global batch, so a resume after an
# out-of-memory error can raise it).
RESUMABLE = frozenset({"out", "grad_accum", "threads"})
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class LoopConfig:
    out: str | Path
    steps: int
    lr: float
    weight_decay: float = 0.02
    warmup: int = 0  # linear warmup steps, then cosine from lr to final_lr at `steps`
    final_lr: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm; None or 0: no clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: Precision = "fp32"  # "auto": bf16 where the GPU has it, else fp32
    seed: int = 0
    save_every: int = 200  # checkpoint every N steps (0: only at the end) and at the end
    log_every: int = 1
    eval_every: int = 0  # evaluate every N steps (0: only at the end), if `evaluate` is given
    threads: int | None = None  # torch CPU threads (None: leave as is)
    find_unused: bool = False  # DDP: some parameters get no gradient at some steps

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "grad_accum": self.grad_accum >= 1,
            "log_every": self.log_every >= 1,
            "warmup": self.warmup >= 0,
            "save_every": self.save_every >= 0,
            "eval_every": self.eval_every >= 0,
            "precision": self.precision in ("fp32", "bf16", "fp16", "auto"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"LoopConfig: bad {bad[0]}={getattr(self, bad[0])!r}")
        if self.steps < self.warmup:
            warnings.warn(
                f"--steps {self.steps} is below the warmup of {self.warmup} steps: the run ends "
                f"inside its warmup at lr {lr_at(self, self.steps - 1):.3g}, never reaching lr "
                f"{self.lr:.3g} nor its cosine decay",
                GroundcamWarning,
                stacklevel=3,
            )


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Learning rate of 0-based step `step`: linear warmup to lr, then cosine to final_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and kernels only.

    No decay for a parameter that is 1-d (biases, norm scales, scalars such as a temperature),
    named `*bias`, held by an `nn.Embedding` or a module whose class name contains "Norm"
    (LayerNorm, RMSNorm, BatchNorm2d, ...), or a bare parameter whose own name contains "embed"
    or "token" (positional tables, CLS/mask tokens). A tied parameter is decay-free if any of
    its owners says so. Frozen parameters are left out.
    """
    params: dict[int, tuple[nn.Parameter, bool]] = {}
    for module in model.modules():
        is_table = isinstance(module, nn.Embedding) or "Norm" in type(module).__name__
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            free = (
                p.ndim < 2
                or name.endswith("bias")
                or is_table
                or "embed" in name
                or "token" in name
            )
            params[id(p)] = (p, free or params.get(id(p), (p, False))[1])
    decay = [p for p, free in params.values() if not free]
    no_decay = [p for p, free in params.values() if free]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def shard(items, rank: int, world: int):
    """Part `rank` of `world` equal contiguous parts of `items` (a tensor, list, array, range)."""
    n = len(items)
    if n % world:
        raise InputError(f"a batch of {n} does not split into {world} equal parts")
    k = n // world
    return items[rank * k : (rank + 1) * k]


def main_process() -> bool:
    """Whether this is the main process (Accelerate's state, initialised as `fit` does)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def resolve_precision(precision: Precision) -> str:
    """Accelerate's `mixed_precision` for `precision` on this machine."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not cuda:
        raise InputError("precision fp16 needs a CUDA GPU; use bf16 or fp32")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


class _Objective(nn.Module):
    """The model with the trainer's loss as its forward (what DDP and autocast wrap)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, step: int) -> dict[str, torch.Tensor]:
        return self.loss_fn(self.model, batch, step)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_out(out: Path, fingerprint: dict, resumable: frozenset = RESUMABLE) -> None:
    """Refuse (one-line ValueError) a run directory written with another fingerprint (keys in
    `resumable` may differ)."""
    saved_path = out / "config.json"
    if saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            raise InputError(f"{saved_path} is not a training configuration; use a new --out")
        now = json.loads(json.dumps(fingerprint))
        keys = sorted((set(saved) | set(now)) - resumable)
        missing = "(none)"
        diff = [
            f"{k} was {_short(saved.get(k, missing))}, now {_short(now.get(k, missing))}"
            for k in keys
            if saved.get(k, missing) != now.get(k, missing)
        ]
        if diff:
            raise InputError(
                f"{out} was written with another configuration; use a new --out or delete it "
                f"to start fresh ({'; '.join(diff)})"
            )
    elif (out / "checkpoint").exists() or (out / "checkpoint.pt").exists():
        raise InputError(
            f"{out} holds a checkpoint without its config.json (another configuration, or an "
            "older groundcam); use a new --out or delete it to start fresh"
        )


def steps_done(out: Path) -> int:
    """The step of the checkpoint in `out` that a run resumes from (0 without one)."""
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def check_steps(out: Path, steps: int) -> None:
    """Refuse (one line) a total of `steps` below the steps the run in `out` has done."""
    done = steps_done(out)
    if steps < done:
        raise InputError(
            f"--steps {steps}: {out} has done {done} steps already; give --steps {done} or more "
            "to resume or extend it, or use a new --out"
        )


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _trim_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= `step` (the checkpoint resumed); drop torn lines."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


def _recover(out: Path) -> None:
    """Finish or undo a checkpoint swap that a kill interrupted."""
    ckpt, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if not ckpt.exists() and old.exists():
        old.rename(ckpt)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _save(accelerator, out: Path, progress: dict) -> None:
    """`save_state` into checkpoint.tmp, then swap it in for checkpoint/ (a kill leaves one)."""
    ckpt, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / "state.json", progress)
        if ckpt.exists():
            ckpt.rename(old)
        tmp.rename(ckpt)
        shutil.rmtree(old, ignore_errors=True)
        _write_json(out / "state.json", {"step": progress["step"]})
    accelerator.wait_for_everyone()


def _window_mean(window: list[dict[str, float]]) -> dict[str, float]:
    """Per term, the mean over the steps of the window that logged it."""
    keys = dict.fromkeys(k for terms in window for k in terms)
    return {
        k: math.fsum(t[k] for t in window if k in t) / sum(k in t for t in window) for k in keys
    }


def fit(
    model: nn.Module,
    cfg: LoopConfig,
    batch_fn: BatchFn,
    loss_fn: LossFn,
    *,
    fingerprint: dict,
    save_model: Callable[[nn.Module, Path], None],
    evaluate: Callable[[nn.Module, int], dict] | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    extendable: bool = False,
) -> Path:
    """Train (or resume) `model` in `cfg.out`; returns `out/model`, or `out` when `stop_at` ended it.

    `evaluate(model, step) -> dict` runs on the main process every `eval_every` steps and at the
    end; its result is the log line's `val`. `after_step(model, step)` runs under no_grad after
    each optimizer step (e.g. to clamp a temperature). `stop_at` ends the run after that step
    with a checkpoint, as a crash right after one would, without writing the model.
    `extendable`: a resume may change `cfg.steps` (not below the steps done), so a finished run
    trains on to a larger total; the steps done keep the schedule they had, the rest follow
    `lr_at` of the new total.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, send_to_device, set_seed

    out = Path(cfg.out)
    check_out(out, fingerprint, RESUMABLE | {"steps"} if extendable else RESUMABLE)
    if extendable:
        check_steps(out, cfg.steps)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.precision),
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused)],
    )
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    log_path = out / "train_log.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _recover(out)
        _write_json(out / "config.json", fingerprint)
    accelerator.wait_for_everyone()

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    objective, optimizer = accelerator.prepare(_Objective(model, loss_fn), optimizer)
    inner = accelerator.unwrap_model(objective).model
    step, elapsed0, window = 0, 0.0, []
    if (out / "checkpoint").is_dir():
        accelerator.load_state(str(out / "checkpoint"))
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        step, elapsed0, window = state["step"], state["elapsed_s"], state["window"]
        if main:
            print(f"resuming from step {step}", flush=True)
    if main:
        _trim_log(log_path, step)
    accelerator.wait_for_everyone()

    rank, world = accelerator.process_index, accelerator.num_processes
    last = cfg.steps if stop_at is None else max(step, min(stop_at, cfg.steps))
    t0 = time.time()
    log = log_path.open("a") if main else None
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="train",
        unit="step",
        mininterval=1,
        disable=not (progress and main),
    )
    objective.train()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if accelerator.device.type == "cpu" and not deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        while step < last:
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum):
                with accelerator.accumulate(objective):
                    batch = send_to_device(batch_fn(step, micro, rank, world), accelerator.device)
                    terms = objective(batch, step)
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients and cfg.grad_clip:
                        accelerator.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in terms.items():
                    v = torch.as_tensor(v).detach().to(accelerator.device, torch.float64)
                    sums[k] = sums[k] + v if k in sums else v
            step += 1
            if after_step is not None:
                with torch.no_grad():
                    after_step(inner, step)
            keys = sorted(sums)
            means = accelerator.reduce(torch.stack([sums[k] for k in keys]), "mean")
            terms = dict(zip(keys, (means / cfg.grad_accum).tolist(), strict=True))
            window.append(terms)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()}, refresh=False)
            evaluate_now = evaluate is not None and (
                step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
            )
            if step % cfg.log_every == 0 or step == cfg.steps or evaluate_now:
                record = {"step": step, "lr": lr, **_window_mean(window)}
                record["elapsed_s"] = round(elapsed0 + time.time() - t0, 1)
                window = []
                if evaluate_now:
                    if main:
                        record["val"] = evaluate(inner, step)
                        tqdm.write(json.dumps(record))
                    objective.train()
                    accelerator.wait_for_everyone()
                if main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if step == last or (cfg.save_every > 0 and step % cfg.save_every == 0):
                progress_state = {
                    "step": step,
                    "elapsed_s": elapsed0 + time.time() - t0,
                    "window": window,
                }
                _save(accelerator, out, progress_state)
    except _OOM as e:
        raise InputError(
            f"out of GPU memory at step {step + 1} ({cfg.grad_accum} micro-batch(es) a step): "
            "use a smaller --batch-size or a larger --grad-accum"
        ) from e
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        bar.close()
        if log is not None:
            log.close()
    if step < cfg.steps:
        return out
    inner.eval()
    if main:
        save_model(inner, out / "model")
    accelerator.wait_for_everyone()
    return out / "model"
