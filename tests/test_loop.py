"""The shared training loop: schedule, decay groups, accumulation, kill-and-resume, processes."""

from __future__ import annotations

import json
import math
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from groundcam.train.loop import LoopConfig, fit, lr_at, param_groups, shard

ROOT = Path(__file__).resolve().parents[1]

# A toy regression trainer, run in-process (through runpy) and as a script in subprocesses:
# `python job.py OUT [--kill-at N] [--grad-accum K] [--steps S]`.
JOB = """
import argparse, os, signal, sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from groundcam.train.loop import LoopConfig, fit, shard

BATCH, DIM = 16, 6


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 1))


def global_batch(seed, step):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    x = torch.randn(BATCH, DIM, generator=g)
    y = x @ torch.linspace(-1, 1, DIM)[:, None] + 0.1 * torch.randn(BATCH, 1, generator=g)
    return x, y


def make_batch_fn(cfg, kill_at=None):
    def batch_fn(step, micro, rank, world):
        if kill_at is not None and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = global_batch(cfg.seed, step)
        part = [shard(shard(t, micro, cfg.grad_accum), rank, world) for t in (x, y)]
        return tuple(part)
    return batch_fn


def loss_fn(model, batch, step):
    x, y = batch
    err = model(x) - y
    return {"loss": (err ** 2).mean(), "mae": err.abs().mean()}


def save(model, path):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")


def run(out, steps=8, grad_accum=1, kill_at=None, stop_at=None, **kw):
    cfg = LoopConfig(out=out, steps=steps, lr=3e-2, warmup=2, grad_accum=grad_accum,
                     save_every=3, log_every=1, threads=1, **kw)
    fingerprint = {"steps": steps, "lr": cfg.lr, "grad_accum": grad_accum}
    return fit(make_model(), cfg, make_batch_fn(cfg, kill_at), loss_fn,
               fingerprint=fingerprint, save_model=save, stop_at=stop_at, progress=False)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    run(a.out, steps=a.steps, grad_accum=a.grad_accum, kill_at=a.kill_at)
"""


@pytest.fixture
def job(tmp_path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB)
    return path


@pytest.fixture
def toy(job):
    return runpy.run_path(str(job))


def _env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ""}


def _weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def _without_time(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in log]


def test_schedule_warms_up_then_follows_the_cosine_to_final_lr():
    cfg = LoopConfig(out="x", steps=110, lr=1e-3, warmup=10, final_lr=1e-4)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)  # (step + 1) / warmup
    assert lr_at(cfg, 4) == pytest.approx(5e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)  # the last warmup step reaches the peak
    assert lr_at(cfg, 10) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(cfg, 60) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way down
    assert lr_at(cfg, 35) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(cfg, 110) == pytest.approx(1e-4) and lr_at(cfg, 500) == pytest.approx(1e-4)
    flat = LoopConfig(out="x", steps=4, lr=0.1)
    assert lr_at(flat, 0) == pytest.approx(0.1) and lr_at(flat, 2) == pytest.approx(0.05)


def test_param_groups_leave_biases_norms_and_embeddings_undecayed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.proj = nn.Linear(4, 4)
            self.conv = nn.Conv2d(3, 4, 2)
            self.norm = nn.LayerNorm(4)
            self.bn = nn.BatchNorm2d(4)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # tied: the embedding's rule wins
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    net = Net()
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    assert ids == {id(net.proj.weight), id(net.conv.weight)}
    expected = [net.embed.weight, net.pos_embed, net.cls_token, net.proj.bias, net.conv.bias]
    expected += [net.norm.weight, net.norm.bias, net.bn.weight, net.bn.bias, net.temp]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}
    assert len(no_decay["params"]) == len(expected)  # the tied weight once, frozen ones left out


def test_shard_splits_evenly_or_refuses():
    assert shard(list(range(6)), 1, 3) == [2, 3]
    assert torch.equal(shard(torch.arange(8), 0, 2), torch.arange(4))
    with pytest.raises(ValueError, match="does not split into 3 equal parts"):
        shard(list(range(7)), 0, 3)


def test_grad_accum_equals_one_batch_twice_as_big(toy, tmp_path):
    one = toy["run"](tmp_path / "one", steps=5, grad_accum=1)
    two = toy["run"](tmp_path / "two", steps=5, grad_accum=2)
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    for r1, r2 in zip(_log(tmp_path / "one"), _log(tmp_path / "two"), strict=True):
        assert r1["step"] == r2["step"] and r1["lr"] == r2["lr"]
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["mae"] == pytest.approx(r1["mae"], rel=1e-5)


def test_killed_run_resumes_to_the_same_weights_and_log(job, toy, tmp_path):
    straight = toy["run"](tmp_path / "straight")
    cut = tmp_path / "cut"
    victim = subprocess.run(
        [sys.executable, str(job), str(cut), "--kill-at", "5"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-2000:]
    assert json.loads((cut / "state.json").read_text())["step"] == 3  # save_every=3
    assert [r["step"] for r in _log(cut)] == [1, 2, 3, 4, 5]  # 4 and 5 will be redone
    assert not (cut / "model").exists()
    resumed = toy["run"](cut)
    assert [r["step"] for r in _log(cut)] == list(range(1, 9))
    assert _without_time(_log(cut)) == _without_time(_log(tmp_path / "straight"))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cut / "state.json").read_text())["step"] == 8
    assert (cut / "checkpoint" / "model.safetensors").exists()
    # Running a finished run again changes nothing.
    again = toy["run"](cut)
    assert _without_time(_log(cut)) == _without_time(_log(tmp_path / "straight"))
    c = _weights(again)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_stop_at_ends_with_a_checkpoint_and_an_evaluation_lands_in_the_log(toy, tmp_path):
    cfg = LoopConfig(out=tmp_path, steps=4, lr=1e-2, save_every=0, eval_every=2, threads=1)
    seen = []

    def evaluate(model, step):
        seen.append((step, model.training))
        return {"n": step}

    def run(stop_at=None):
        return fit(
            toy["make_model"](),
            cfg,
            toy["make_batch_fn"](cfg),
            toy["loss_fn"],
            fingerprint={"toy": 1},
            save_model=toy["save"],
            evaluate=evaluate,
            stop_at=stop_at,
            progress=False,
        )

    assert run(stop_at=1) == tmp_path
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 1
    assert run() == tmp_path / "model"
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r.get("val") for r in log] == [None, {"n": 2}, None, {"n": 4}]
    assert seen == [(2, True), (4, True)]  # called with the model in training mode


def test_another_configuration_is_refused_and_nothing_is_touched(toy, tmp_path):
    out = tmp_path / "run"
    toy["run"](out, steps=3)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError) as info:
        toy["run"](out, steps=4)
    message = str(info.value)
    assert "\n" not in message and "delete it to start fresh" in message
    assert "another configuration; use a new --out" in message
    assert "steps was 3, now 4" in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # grad_accum only changes how a step is executed: a resume may change it.
    assert toy["run"](out, steps=3, grad_accum=2) == out / "model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_accelerate_processes_follow_the_single_process_loss_curve(job, toy, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = subprocess.run(
        [*launch, str(job), str(tmp_path / "two"), "--grad-accum", "2"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoint" / "random_states_1.pkl").exists()  # two processes
    one = toy["run"](tmp_path / "one", grad_accum=2)
    log1, log2 = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == list(range(1, 9))
    for r1, r2 in zip(log1, log2, strict=True):
        assert r2["lr"] == r1["lr"]
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5, abs=1e-6)
        assert r2["mae"] == pytest.approx(r1["mae"], rel=1e-5, abs=1e-6)
    a, b = _weights(one), _weights(tmp_path / "two" / "model")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_out_of_memory_is_one_line_naming_the_remedies(toy, tmp_path):
    def oom(model, batch, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\n...")

    cfg = LoopConfig(out=tmp_path, steps=2, lr=1e-2, threads=1)
    batch_fn = toy["make_batch_fn"](cfg)
    with pytest.raises(ValueError) as info:
        fit(toy["make_model"](), cfg, batch_fn, oom, fingerprint={}, save_model=toy["save"])
    message = str(info.value)
    assert "\n" not in message and "out of GPU memory at step 1" in message
    assert "--batch-size" in message and "--grad-accum" in message


def test_a_kill_between_the_checkpoint_swaps_resumes_from_the_previous_one(toy, tmp_path):
    straight = toy["run"](tmp_path / "straight")
    out = tmp_path / "run"
    assert toy["run"](out, stop_at=3) == out
    # As a kill right after `checkpoint -> checkpoint.old` leaves it, with a torn checkpoint.tmp.
    (out / "checkpoint").rename(out / "checkpoint.old")
    (out / "checkpoint.tmp").mkdir()
    resumed = toy["run"](out)
    assert not (out / "checkpoint.old").exists() and not (out / "checkpoint.tmp").exists()
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _without_time(_log(out)) == _without_time(_log(tmp_path / "straight"))
