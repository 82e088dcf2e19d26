"""`groundcam` command line: a thin face over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path

import click


class UserError(click.ClickException):
    """A one-line message for bad input; exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"groundcam: error: {self.message}", err=True)


def _guard(fn):
    """Turn the library's bad-input errors into one clear line instead of a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, TypeError, KeyError, OSError) as e:
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            raise UserError(msg) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="groundcam")
def main() -> None:
    """Where does a vision-language model find this text? Heatmaps, pointing game, training."""


@main.group()
def train() -> None:
    """Train models with groundcam's own recipes."""


@train.command("albef")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--steps", default=3000, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--pool", default=20000, show_default=True, help="Training scenes rendered.")
@click.option("--eval-every", default=500, show_default=True)
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@_guard
def train_albef(out, steps, batch_size, lr, seed, pool, eval_every, threads) -> None:
    """ALBEF from scratch on the shapes train split, ITC + ITM (no boxes). Resumes from --out."""
    from groundcam.train.albef_shapes import TrainConfig
    from groundcam.train.albef_shapes import train as run

    cfg = TrainConfig(
        out=str(out),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        pool=pool,
        eval_every=eval_every,
    )
    final = run(cfg, threads=threads)
    click.echo(f"model written to {final}")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "UserError", "Path"]
