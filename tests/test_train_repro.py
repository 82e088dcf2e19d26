"""Training is bit-reproducible at more than one CPU thread, and `train amc` checks before it
works: its --out first, scenes rendered when drawn, a finished run extended to more --steps,
--steps below --warmup said, the box counts on the card."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

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


def _table_run(out, threads: int) -> dict:
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

    opts = dict(steps=4, batch_size=4, pool=16, eval_every=0, save_every=1, warmup=1)
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
