"""Training is bit-reproducible at more than one CPU thread, and `train amc` checks before it
works: its --out first, scenes rendered when drawn, a finished run extended to more --steps,
--steps below --warmup said, the box counts on the card."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from groundcam.errors import GroundcamWarning, InputError
from groundcam.train.loop import LoopConfig, fit, shard

ROWS, WIDTH, PICKS = 80, 1024, 640


class Table(nn.Module):
    """A table whose rows are gathered with repeats: the gather's backward accumulates many rows
    into the same rows, which two CPU threads do in a racing order unless told otherwise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rows = nn.Parameter(torch.randn(ROWS, WIDTH) * 0.1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows[idx]


def _table_run(out, threads: int) -> torch.Tensor:
    cfg = LoopConfig(out=out, steps=4, lr=1e-2, grad_clip=None, save_every=0, threads=threads)

    def batch_fn(step, micro, rank, world):
        g = torch.Generator().manual_seed(step)
        idx, target = (
            torch.randint(ROWS, (PICKS,), generator=g),
            torch.randn(PICKS, WIDTH, generator=g),
        )
        return shard(idx, rank, world), shard(target, rank, world)

    def loss_fn(model, batch, step):
        idx, target = batch
        return {"loss": ((model(idx) - target) ** 2).mean()}

    def save(model, path):
        path.mkdir(parents=True, exist_ok=True)
        torch.save(model.rows.detach().clone(), path / "rows.pt")

    final = fit(Table(), cfg, batch_fn, loss_fn, fingerprint={}, save_model=save, progress=False)
    return torch.load(final / "rows.pt", weights_only=True)


def test_two_threads_give_bit_identical_weights_run_after_run(tmp_path):
    before = torch.get_num_threads()
    try:
        runs = [_table_run(tmp_path / f"run{i}", threads=2) for i in range(3)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back


def test_the_loss_runs_under_deterministic_algorithms_on_the_cpu(tmp_path):
    seen = []

    def loss_fn(model, batch, step):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return {"loss": model(torch.tensor([0, 0, 1])).pow(2).mean()}

    cfg = LoopConfig(out=tmp_path, steps=2, lr=1e-2, threads=1)
    fit(
        Table(),
        cfg,
        lambda *a: None,
        loss_fn,
        fingerprint={},
        save_model=lambda m, p: None,
        progress=False,
    )
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def _amc(tmp_path, name, **kw):
    from groundcam.train.amc import AMCConfig

    opts = dict(steps=4, batch_size=4, pool=16, eval_every=0, eval_scenes=2, save_every=1)
    opts["warmup"] = 1
    return AMCConfig(out=str(tmp_path / name), **(opts | kw))


def _weights(model_dir) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def test_amc_at_two_threads_reruns_and_resumes_to_the_same_bits(tmp_path):
    from groundcam.train.amc import train

    before = torch.get_num_threads()
    try:
        a = _weights(train(_amc(tmp_path, "a"), threads=2))
        b = _weights(train(_amc(tmp_path, "b"), threads=2))
        cut = _amc(tmp_path, "cut")
        train(cut, threads=2, stop_at=2)
        c = _weights(train(cut, threads=2))
    finally:
        torch.set_num_threads(before)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_another_configuration_is_refused_before_the_model_or_scenes_load(tmp_path, monkeypatch):
    import groundcam.train.amc as amc

    amc.train(_amc(tmp_path, "run", steps=2), threads=1)

    def no_build(cfg, device=None):
        raise AssertionError("built before --out was checked")

    monkeypatch.setattr(amc, "build", no_build)
    with pytest.raises(InputError, match="another configuration.*lr was 0.0001, now 0.0003"):
        amc.train(_amc(tmp_path, "run", steps=2, lr=3e-4), threads=1)
    with pytest.raises(InputError, match="--steps 1: .* has done 2 steps already"):
        amc.train(_amc(tmp_path, "run", steps=1), threads=1)


def test_scenes_are_rendered_when_a_batch_draws_them_and_kept():
    from groundcam.train.amc import AMCConfig, build

    trainer = build(AMCConfig(out="unused", batch_size=5, pool=20000))
    assert trainer.pool.scenes == {}  # nothing rendered up front
    first = trainer.batch(0, 0, 0, 1)
    assert len(trainer.pool.scenes) == 5 and first["pixels"].shape[0] == 5
    again = trainer.batch(0, 0, 0, 1)
    assert torch.equal(first["pixels"], again["pixels"]) and len(trainer.pool.scenes) == 5
    trainer.batch(1, 0, 0, 1)
    assert 5 < len(trainer.pool.scenes) <= 10


def test_a_batch_larger_than_the_pool_is_one_line():
    from groundcam.train.amc import AMCConfig, build

    with pytest.raises(InputError, match="--batch-size 9 is more than the --pool of 8 scenes"):
        build(AMCConfig(out="unused", batch_size=9, pool=8))


def test_a_finished_run_is_extended_to_more_steps_on_the_new_schedule(tmp_path, capsys):
    from groundcam.train.amc import train
    from groundcam.train.loop import lr_at

    short = _weights(train(_amc(tmp_path, "run", steps=2, warmup=1), threads=1))
    longer = _weights(train(_amc(tmp_path, "run", steps=4, warmup=1), threads=1))
    assert "resuming from step 2" in capsys.readouterr().out
    assert any(not torch.equal(short[k], longer[k]) for k in short)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    old, new = (LoopConfig(out="x", steps=n, lr=1e-4, warmup=1, final_lr=1e-5) for n in (2, 4))
    assert [r["lr"] for r in log] == [lr_at(old, 0), lr_at(old, 1), lr_at(new, 2), lr_at(new, 3)]
    card = json.loads((tmp_path / "run" / "model" / "train_card.json").read_text())
    assert card["config"]["steps"] == 4
    with pytest.raises(InputError, match="--steps 3: .* has done 4 steps already"):
        train(_amc(tmp_path, "run", steps=3, warmup=1), threads=1)


def test_steps_below_warmup_warn_in_one_line_and_the_card_counts_the_boxes(tmp_path):
    from click.testing import CliRunner

    from groundcam.cli import main
    from groundcam.data.shapes import generate_scene

    with pytest.warns(GroundcamWarning, match="--steps 3 is below the warmup of 5 steps"):
        LoopConfig(out="x", steps=3, lr=1e-3, warmup=5)
    args = ["train", "amc", "--out", str(tmp_path / "run"), "--steps", "2", "--warmup", "3"]
    args += ["--batch-size", "3", "--pool", "3", "--eval-every", "0", "--threads", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    warned = [x for x in r.output.splitlines() if x.startswith("groundcam: warning:")]
    assert len(warned) == 1 and "--steps 2 is below the warmup of 3 steps" in warned[0]
    assert "at lr 6.67e-05, never reaching lr 0.0001" in warned[0]
    card = json.loads((tmp_path / "run" / "model" / "train_card.json").read_text())
    # the pool is the batch: both steps draw all 3 scenes, every phrase's boxes inside the image
    boxes = sum(len(p.boxes) for i in range(3) for p in generate_scene("train", i, 0, 128).phrases)
    assert card["boxes"] == {"boxes": boxes, "clipped": 0, "skipped": 0} and boxes > 3
