"""`groundcam` command line: a thin face over the Python API."""

from __future__ import annotations

import pickle
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
        except (ValueError, OSError, pickle.UnpicklingError) as e:  # bad input; bugs keep
            raise UserError(str(e)) from None  # their traceback

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


@train.command("trocr")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--steps", default=16000, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option(
    "--aux-weight",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Start weight of the per-column encoder loss (decays to 0 by mid-training; 0 = off).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--pool", default=50000, show_default=True, help="Training lines rendered.")
@click.option("--eval-every", default=500, show_default=True)
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@_guard
def train_trocr(out, steps, batch_size, lr, aux_weight, seed, pool, eval_every, threads) -> None:
    """trocr-tiny-glyphs (ViT + TrOCR decoder) on synthetic text lines. Resumes from --out."""
    from groundcam.train.trocr_glyphs import TrainConfig
    from groundcam.train.trocr_glyphs import train as run

    cfg = TrainConfig(
        out=str(out),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        aux_weight=aux_weight,
        seed=seed,
        pool=pool,
        eval_every=eval_every,
    )
    final = run(cfg, threads=threads)
    click.echo(f"model written to {final}")


@main.command()
@click.option("--out", default="groundcam-demo", show_default=True, type=click.Path())
@click.option("--model", default="albef-tiny-shapes", show_default=True)
@click.option("--scenes", default=4, show_default=True, type=click.IntRange(1, 100))
@_guard
def demo(out, model, scenes) -> None:
    """Explain a few synthetic scenes with every method on a built-in model (offline)."""
    from groundcam.demo import run_demo

    result = run_demo(out, model=model, scenes=scenes)
    for method, (hits, n) in result.accuracy.items():
        click.echo(f"pointing accuracy {method:>12}: {hits / n:6.1%} ({hits}/{n} phrases)")
    click.echo(f"wrote {result.html} ({result.seconds:.1f} s)")


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("phrases", nargs=-1)
@click.option("--model", default="albef-tiny-shapes", show_default=True)
@click.option("--method", default="attn-gradcam", show_default=True)
@click.option("--layer", default=None, type=int, help="Layer (default: the family's).")
@click.option("--target", default=None, help="itm or similarity (default: the family's).")
@click.option("--out", default="groundcam-out", show_default=True, type=click.Path())
@_guard
def explain(image, phrases, model, method, layer, target, out) -> None:
    """Write overlays, maps.npz and meta.json for PHRASES over IMAGE."""
    from groundcam.api import load
    from groundcam.io import read_image

    if not phrases:
        raise UserError('no phrases given: groundcam explain IMAGE "a phrase" [...]')
    picture = read_image(image)
    ex = load(model).explain(picture, list(phrases), method=method, layer=layer, target=target)
    path = ex.save(out)
    for phrase, score in zip(ex.phrases, ex.scores.tolist(), strict=True):
        click.echo(f"{score:.3f}  {phrase}")
    click.echo(f"wrote {len(ex)} overlays, maps.npz and meta.json to {path}")


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option(
    "--model", required=True, help="A captioning/OCR model: built-in name, hub id or dir."
)
@click.option("--method", default="gradcam", show_default=True)
@click.option("--layer", default=None, type=int, help="Layer (default: the family's).")
@click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(1, 512))
@click.option("--text", default=None, help="Explain this text instead of generating.")
@click.option("--out", default="groundcam-caption", show_default=True, type=click.Path())
@_guard
def caption(image, model, method, layer, max_new_tokens, text, out) -> None:
    """Generate text for IMAGE and write one map per generated token (tokens.png + overlays)."""
    from groundcam.api import load
    from groundcam.io import read_image

    gen = load(model).explain_generation(
        read_image(image), method=method, layer=layer, max_new_tokens=max_new_tokens, text=text
    )
    path = gen.save(out)
    click.echo(gen.text)
    click.echo(
        "  ".join(f"{t}:{p:.2f}" for t, p in zip(gen.tokens, gen.scores.tolist(), strict=True))
    )
    click.echo(f"wrote tokens.png, {len(gen)} overlays, maps.npz and meta.json to {path}")


@main.group("eval")
def eval_() -> None:
    """Pointing-game evaluation on a dataset."""


def _write_records(stream, out: Path, desc: str, unit: str) -> list[dict]:
    """Write each record to `out/results.jsonl` as it comes (with a progress bar); return them."""
    import json

    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    records = []
    with (out / "results.jsonl").open("w") as f:
        for rec in tqdm(stream, desc=desc, unit=unit):
            records.append(rec)
            f.write(json.dumps(rec) + "\n")
    return records


def _write_summary(out: Path, summary: dict) -> None:
    import json

    (out / "summary.json").write_text(json.dumps(summary, indent=1))


_EVAL_DATASETS = ("flickr30k-entities", "refcoco", "refcoco+", "refcocog", "shapes")


def _eval_options(fn):
    """Options every dataset evaluation shares (see `groundcam eval DATASET --help`)."""
    options = [
        click.option("--root", type=click.Path(), help="Dataset annotation directory."),
        click.option("--images", type=click.Path(), help="Image directory (default per dataset)."),
        click.option("--split", default=None, help="Split(s), comma-separated."),
        click.option("--model", default="albef-tiny-shapes", show_default=True),
        click.option("--method", default="attn-gradcam", show_default=True),
        click.option("--layer", default=None, type=int, help="Layer (default: the family's)."),
        click.option("--target", default=None, help="itm or similarity (default: the family's)."),
        click.option(
            "--protocol", default="amc", show_default=True, help="amc, mg, torchray, albef-boxes."
        ),
        click.option(
            "--metrics",
            default="pointing",
            show_default=True,
            help="pointing[,deletion][,insertion]",
        ),
        click.option("--steps", default=16, show_default=True, help="Deletion/insertion steps."),
        click.option("--dets", type=click.Path(), help="dets.json proposals (albef-boxes)."),
        click.option("--limit", type=click.IntRange(1), help="First N images of each split."),
        click.option(
            "--scenes",
            default=500,
            show_default=True,
            type=click.IntRange(1),
            help="shapes: scenes per split.",
        ),
        click.option("--seed", default=0, show_default=True, help="shapes: scene seed."),
        click.option(
            "--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"])
        ),
        click.option(
            "--threads", default=None, type=click.IntRange(1), help="CPU threads per process."
        ),
        click.option(
            "--batch-images",
            default=None,
            type=click.IntRange(1),
            help="Images per forward, all their phrases together (default 8; ViLT 1).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _eval_run_setup(dataset: str, opts: dict, default_split: str | None = None):
    """Processes, work units, the loaded model and the EvalConfig of an evaluation (reader
    problems summed up in one line rather than one warning each)."""
    import warnings

    import torch

    from groundcam.api import load
    from groundcam.eval.datasets import dataset_spec, open_units, parse_splits
    from groundcam.eval.runner import EvalConfig, Processes

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    procs = Processes.from_environment()
    splits = parse_splits(dataset_spec(dataset), opts["split"] or default_split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        units = open_units(
            dataset,
            splits,
            opts["root"],
            opts["images"],
            opts["scenes"],
            opts["seed"],
            opts["limit"],
        )
    if procs.is_main:
        for name, report in units.reports.items():
            if report.errors:
                click.echo(
                    f"{dataset}/{name}: {len(report.errors)} reader problem(s), e.g. "
                    f"{report.errors[0]} (all in summary.json 'reader')",
                    err=True,
                )
    cfg = EvalConfig(
        dataset=dataset,
        splits=tuple(splits),
        model=str(opts["model"]),
        method=opts["method"],
        layer=opts.get("layer"),
        target=opts["target"],
        protocol=opts["protocol"],
        metrics=tuple(m.strip() for m in opts["metrics"].split(",") if m.strip()),
        steps=opts["steps"],
        precision=opts["precision"],
        seed=opts["seed"] if dataset == "shapes" else 0,
        dets=str(opts["dets"]) if opts["dets"] else None,
        batch_images=opts["batch_images"],
    )
    return procs, units, load(opts["model"], device=procs.device), cfg


def _percent(block: dict) -> str:
    if block["accuracy"] is None:
        return "n/a"
    lo, hi = block["ci95"]
    return f"{block['accuracy']:.2%} [{lo:.1%}-{hi:.1%}]"


def _make_eval_command(dataset: str):
    @eval_.command(dataset)
    @_eval_options
    @click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False),
        help="Results directory (resumes).",
    )
    @click.option("--report", is_flag=True, help="Also write report.html.")
    @click.option(
        "--examples", default=8, show_default=True, help="Best/worst examples in the report."
    )
    @_guard
    def command(out, report, examples, **opts):
        from groundcam.eval.runner import run_eval

        procs, units, explainer, cfg = _eval_run_setup(dataset, opts)
        result = run_eval(
            cfg,
            units,
            explainer,
            out,
            procs,
            progress=procs.is_main,
            report=report,
            report_examples=examples,
        )
        if result.summary is None:
            return
        s, c = result.summary, result.summary["config"]
        click.echo(
            f"accuracy {_percent(s)} (n={s['n']}) on {dataset}/{','.join(cfg.splits)}, "
            f"{c['method']} layer {c['layer']}, protocol {c['protocol']}"
        )
        for name in ("deletion_auc", "insertion_auc"):
            if s.get(name) is not None:
                click.echo(f"{name} {s[name]:.4f}")
        if s["skipped"]:
            click.echo(f"{s['skipped']} phrase(s) skipped by protocol {cfg.protocol}")
        if s["errors"]:
            click.echo(
                f"{s['errors']} phrase(s) not scored, e.g. {s['error_examples'][0]}", err=True
            )
        if result.resumed:
            click.echo(f"resumed: {result.resumed} phrase(s) were already done in {out}")
        click.echo(f"wrote {Path(out) / 'summary.json'} and results.jsonl")
        if report:
            click.echo(f"wrote {Path(out) / 'report.html'}")

    command.__doc__ = (
        f"Pointing accuracy on {dataset}: results.jsonl, summary.json; resumes from --out. "
        "Runs sharded under `accelerate launch -m groundcam eval ...`."
    )
    return command


for _name in _EVAL_DATASETS:
    _make_eval_command(_name)


def _layer_list(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise UserError(f"--layers {value!r}: expected comma-separated layer numbers") from None


@main.command("sweep-layers")
@click.argument("dataset", type=click.Choice(_EVAL_DATASETS))
@_eval_options
@click.option(
    "--layers", default=None, help="Comma-separated layers (default: all of the method's source)."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Sweep directory (resumes)."
)
@_guard
def sweep_layers(dataset, layers, out, **opts):
    """Pointing accuracy per layer on a validation split (default val): a table (sweep.json,
    sweep.tsv) to choose a layer from evidence."""
    from groundcam.eval.sweep import sweep

    if opts.pop("layer") is not None:
        raise UserError("sweep-layers tries every layer: use --layers, not --layer")
    wanted = _layer_list(layers)
    procs, units, explainer, cfg = _eval_run_setup(dataset, opts, default_split="val")
    table = sweep(cfg, units, explainer, out, wanted, procs, progress=procs.is_main)
    if table is None:
        return
    click.echo(f"{'layer':>5}  {'accuracy':>24}  {'n':>6}")
    for row in table["layers"]:
        mark = "  <- best" if row["layer"] == table["best_layer"] else ""
        click.echo(f"{row['layer']:>5}  {_percent(row):>24}  {row['n']:>6}{mark}")
    click.echo(f"wrote {Path(out) / 'sweep.json'} and sweep.tsv")


@eval_.command("glyphs")
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--lines", default=300, show_default=True, type=click.IntRange(1))
@click.option("--model", default="trocr-tiny-glyphs", show_default=True)
@click.option("--method", default="gradcam", show_default=True)
@click.option("--layer", default=None, type=int)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@_guard
def eval_glyphs(split, lines, model, method, layer, seed, out) -> None:
    """Character accuracy and token pointing (does each generated character's map peak on its
    glyph?) on rendered text lines."""
    from groundcam.api import load
    from groundcam.eval.glyphs import glyph_records, summarize_glyphs

    out = Path(out)
    stream = glyph_records(load(model), split, lines, method, layer, seed)
    records = _write_records(stream, out, f"glyphs/{split}", "token")
    summary = summarize_glyphs(records)
    summary |= {"method": method, "layer": records[0]["layer"] if records else layer}
    summary |= {"model": model, "split": split, "lines": lines, "seed": seed, "protocol": "amc"}
    _write_summary(out, summary)
    click.echo(
        f"token pointing {summary['token_pointing']:.2%} (n={summary['n_tokens']}), "
        f"char accuracy {summary['char_accuracy']:.2%} on glyphs/{split}, {method}"
    )
    click.echo(f"wrote {out / 'summary.json'}")


@main.command()
def models() -> None:
    """List built-in models and supported families with their methods."""
    from groundcam.api import builtin_models, families

    click.echo("built-in models:")
    for name, info in builtin_models().items():
        click.echo(f"  {name:<20} {info['family']:<8} {info['description']}")
    from groundcam.methods import METHODS

    matrix = families()
    names = sorted(METHODS)
    click.echo("families x methods (+ supported, - not defined for the family):")
    click.echo(f"  {'':<24}" + "".join(f"{n:>14}" for n in names))
    for family, supported in matrix.items():
        marks = "".join(f"{'+' if n in supported else '-':>14}" for n in names)
        click.echo(f"  {family:<24}{marks}")


if __name__ == "__main__":
    sys.exit(main())
