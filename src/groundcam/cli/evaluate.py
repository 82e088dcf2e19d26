"""`groundcam eval ...` and `groundcam sweep-layers ...`: pointing, captions, glyphs, retrieval
and sanity evaluations."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from groundcam.cli.options import (
    _METHOD_HELP,
    _MODEL_HELP,
    OutDir,
    UserError,
    _apply,
    _device_option,
    _guard,
    _show_warning,
    main,
)
from groundcam.errors import GroundcamWarning
from groundcam.eval.datasets import DATASETS, DatasetSpec
from groundcam.eval.pointing import PROTOCOLS


@main.group("eval", short_help="Pointing accuracy on a dataset; glyphs for OCR models.")
def eval_() -> None:
    """Pointing-game evaluation on a dataset: `groundcam eval DATASET --help` says what each
    dataset reads, its splits and its options."""


def _write_records(stream, out: Path, desc: str, unit: str) -> list[dict]:
    """Write each record to `out/results.jsonl` as it comes (with a progress bar); return them."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    records = []
    with (out / "results.jsonl").open("w") as f:
        for rec in tqdm(stream, desc=desc, unit=unit):
            records.append(rec)
            f.write(json.dumps(rec) + "\n")
    return records


def _write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


_EVAL_DATASETS = tuple(DATASETS)

_PROTOCOL_HELP = (
    "amc: bicubic to image size, first maximum, strict inside test; "
    "mg: bilinear, inclusive, raw 1-based boxes, phrases under 5% of the image skipped; "
    "torchray: a ground-truth pixel within 15 px; "
    "albef-boxes: ranks the --dets proposals by sum / sqrt(area), IoU >= 0.5."
)


def _dataset_options(spec: DatasetSpec):
    """The options that read dataset `spec`: only those that apply to it."""
    splits = ", ".join(spec.splits)
    options = []
    if spec.needs_root:
        options.append(
            click.option("--root", type=click.Path(), help=f"Required: {spec.root_help}.")
        )
        options.append(
            click.option(
                "--images", type=click.Path(), help=f"Image directory: {spec.images_help}."
            )
        )
    options.append(
        click.option("--split", default=None, help=f"Split(s), comma-separated, of {splits}.")
    )
    if spec.needs_root:
        options.append(
            click.option("--limit", type=click.IntRange(1), help="First N images of each split.")
        )
    else:
        options.append(
            click.option(
                "--scenes",
                default=500,
                show_default=True,
                type=click.IntRange(1),
                help="Scenes per split.",
            )
        )
        options.append(
            click.option(
                "--seed", default=0, show_default=True, help="Scene seed (same seed, same scenes)."
            )
        )
    return options


def _model_options(single_layer: bool):
    """The options of the model, method and scoring every dataset evaluation shares."""
    options = [
        click.option("--model", default="albef-tiny-shapes", show_default=True, help=_MODEL_HELP),
        click.option("--method", default=None, help=_METHOD_HELP),
    ]
    if single_layer:
        options.append(
            click.option("--layer", default=None, type=int, help="Layer (default: the family's).")
        )
    options += [
        click.option("--target", default=None, help="itm or similarity (default: the family's)."),
        click.option(
            "--protocol",
            default="amc",
            show_default=True,
            type=click.Choice(list(PROTOCOLS)),
            help=_PROTOCOL_HELP,
        ),
        click.option(
            "--metrics",
            default="pointing",
            show_default=True,
            help="pointing[,deletion][,insertion]: deletion/insertion remove/add patches in the "
            "map's order and re-score the pair.",
        ),
        click.option(
            "--steps",
            default=16,
            show_default=True,
            type=click.IntRange(1),
            help="Deletion/insertion curve steps (only used with those --metrics).",
        ),
        click.option(
            "--dets",
            type=click.Path(),
            help="dets.json detector proposals; only used by (and required for) "
            "--protocol albef-boxes.",
        ),
        click.option(
            "--precision",
            default="fp32",
            show_default=True,
            type=click.Choice(["fp32", "bf16"]),
            help="bf16 autocasts on GPUs.",
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
        _device_option("cuda when there is one, else cpu; under accelerate, its own"),
    ]
    return options


def _eval_help(spec: DatasetSpec, what: str, default_split: str) -> str:
    """A dataset command's help: what it computes, what the dataset is, what --root holds."""
    paragraphs = [f"{what} on {spec.title}.", spec.about]
    if spec.needs_root:
        paragraphs.append(f"--root is {spec.root_help}; --images is {spec.images_help}.")
    paragraphs.append(f"Splits: {', '.join(spec.splits)} (default {default_split}).")
    return "\n\n".join(paragraphs) + "\n\n"


def _eval_run_setup(dataset: str, opts: dict, default_split: str | None = None):
    """Processes, work units, the loaded model and the EvalConfig of an evaluation (reader
    problems summed up in one line rather than one warning each)."""
    import torch

    from groundcam.api import load
    from groundcam.eval.datasets import dataset_spec, open_units, parse_splits
    from groundcam.eval.runner import EvalConfig, Processes

    if opts.get("dets") and opts["protocol"] != "albef-boxes":
        raise UserError(
            f"--dets is only used by --protocol albef-boxes (this run: --protocol "
            f"{opts['protocol']})"
        )
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    procs = Processes.from_environment()
    if opts.get("device"):
        if procs.world > 1:
            raise UserError(
                "--device: under accelerate launch each process uses the device accelerate "
                "gives it; leave --device out"
            )
        procs.device = torch.device(opts["device"])
    splits = parse_splits(dataset_spec(dataset), opts["split"] or default_split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        units = open_units(
            dataset,
            splits,
            opts.get("root"),
            opts.get("images"),
            opts.get("scenes", 500),
            opts.get("seed", 0),
            opts.get("limit"),
        )
    if procs.is_main:
        for name, report in units.reports.items():
            if report.errors:
                click.echo(
                    f"{dataset}/{name}: {len(report.errors)} reader problem(s), e.g. "
                    f"{report.errors[0]} (all in summary.json 'reader')",
                    err=True,
                )
    explainer = load(opts["model"], device=procs.device)
    cfg = EvalConfig(
        dataset=dataset,
        splits=tuple(splits),
        model=str(opts["model"]),
        method=opts["method"],  # None: the family's (the runner records the resolved name)
        layer=opts.get("layer"),
        target=opts["target"],
        protocol=opts["protocol"],
        metrics=tuple(m.strip() for m in opts["metrics"].split(",") if m.strip()),
        steps=opts["steps"],
        precision=opts["precision"],
        seed=opts.get("seed", 0),
        dets=str(opts["dets"]) if opts.get("dets") else None,
        batch_images=opts["batch_images"],
    )
    return procs, units, explainer, cfg


def _percent(block: dict) -> str:
    if block["accuracy"] is None:
        return "n/a"
    lo, hi = block["ci95"]
    return f"{block['accuracy']:.2%} [{lo:.1%}-{hi:.1%}]"


def _make_eval_command(spec: DatasetSpec):
    dataset = spec.name

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
        if s.get("flat"):
            click.echo(f"{s['flat']} map(s) were flat (no point): counted as misses")
        if result.text_warnings:
            _show_warning(
                f"{len(result.text_warnings)} phrase(s) warned while tokenising, e.g. "
                f"{result.text_warnings[0]}",
                GroundcamWarning,
                "",
                0,
            )
        if s.get("unknown_words"):
            click.echo(
                f"{s['unknown_words']} phrase(s) have words unknown to the tokenizer "
                "(records: 'unknown_words')"
            )
        if result.text_conditioned is False:
            _show_warning(
                f"method {c['method']!r} does not read the text on this model: every phrase "
                "of an image got the same image-only map",
                GroundcamWarning,
                "",
                0,
            )
        if result.resumed:
            click.echo(f"resumed: {result.resumed} phrase(s) were already done in {out}")
        click.echo(f"wrote {Path(out) / 'summary.json'} and results.jsonl")
        if report:
            click.echo(f"wrote {Path(out) / 'report.html'}")

    command.__doc__ = _eval_help(spec, "Pointing accuracy", spec.default_split) + (
        "Writes results.jsonl (one line per phrase) and summary.json (accuracy with a Wilson "
        "95% interval, per split and phrase type) to --out, and resumes from it. Runs sharded "
        "under `accelerate launch -m groundcam eval ...`."
    )
    options = _dataset_options(spec) + _model_options(single_layer=True)
    options += [
        click.option("--out", required=True, type=OutDir(), help="Results directory (resumes)."),
        click.option("--report", is_flag=True, help="Also write report.html."),
        click.option(
            "--examples",
            default=8,
            show_default=True,
            type=click.IntRange(0),
            help="Best/worst examples in the report.",
        ),
    ]
    command = _guard(command)
    return eval_.command(dataset, short_help=f"Pointing accuracy on {spec.title}.")(
        _apply(command, options)
    )


for _spec in DATASETS.values():
    _make_eval_command(_spec)


def _layer_list(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise UserError(f"--layers {value!r}: expected comma-separated layer numbers") from None


@main.group("sweep-layers", short_help="Pointing accuracy at every layer, to choose one.")
def sweep_layers_() -> None:
    """Pointing accuracy per layer on a validation split (default val): a table (sweep.json,
    sweep.tsv) to choose a layer from evidence. `groundcam sweep-layers DATASET --help` for a
    dataset's options."""


def _make_sweep_command(spec: DatasetSpec):
    dataset = spec.name

    def command(layers, out, **opts):
        from groundcam.eval.sweep import layer_mark, sweep

        wanted = _layer_list(layers)
        procs, units, explainer, cfg = _eval_run_setup(dataset, opts, default_split="val")
        table = sweep(cfg, units, explainer, out, wanted, procs, progress=procs.is_main)
        if table is None:
            return
        click.echo(f"{'layer':>5}  {'accuracy':>24}  {'n':>6}")
        for row in table["layers"]:
            mark = layer_mark(table, row["layer"])
            click.echo(f"{row['layer']:>5}  {_percent(row):>24}  {row['n']:>6}  {mark}".rstrip())
        if table["tied"]:
            click.echo("no best layer: the 95% intervals of the tied layers overlap")
        click.echo(f"wrote {Path(out) / 'sweep.json'} and sweep.tsv")

    command.__doc__ = _eval_help(spec, "Pointing accuracy at every layer", "val") + (
        "One resumable evaluation per layer in --out/layer-<k>/, then sweep.json and sweep.tsv "
        "(the best layer is the most accurate, marked only when its 95% interval lies above the "
        "next one's; otherwise the layers whose intervals overlap it are marked tied). Methods "
        "that read every layer at once (rollout, relevance) have nothing to sweep."
    )
    options = _dataset_options(spec) + _model_options(single_layer=False)
    options += [
        click.option(
            "--layers",
            default=None,
            help="Comma-separated layers (default: every layer of the method's source).",
        ),
        click.option("--out", required=True, type=OutDir(), help="Sweep directory (resumes)."),
    ]
    command = _guard(command)
    return sweep_layers_.command(dataset, short_help=f"Layer sweep on {spec.title}.")(
        _apply(command, options)
    )


for _spec in DATASETS.values():
    _make_sweep_command(_spec)


@eval_.command("sanity", short_help="Do the maps change when the model is randomised?")
@click.option("--model", default="albef-tiny-shapes-amc", show_default=True, help=_MODEL_HELP)
@click.option(
    "--dataset",
    default=None,
    type=click.Choice(["shapes", "glyphs"]),
    help="shapes phrases, or glyph lines read as written (default: glyphs for OCR models).",
)
@click.option("--scenes", default=20, show_default=True, type=click.IntRange(1), help="Or lines.")
@click.option("--seed", default=0, show_default=True, help="Scene and init seed.")
@click.option("--methods", default=None, help="Comma-separated (default: every one the model has).")
@click.option(
    "--variants",
    default="cascading,independent",
    show_default=True,
    help="cascading and/or independent layer randomisation.",
)
@click.option("--data-model", default=None, help="The model trained on permuted labels, if any.")
@_device_option()
@click.option("--out", required=True, type=OutDir(), help="Results directory (resumes).")
@_guard
def eval_sanity(model, dataset, scenes, seed, methods, variants, data_model, device, out) -> None:
    """Sanity checks (Adebayo et al. 2018): re-initialise the model's layers from the top down
    (cascading) or one at a time (independent), on a copy, and compare each map with the
    original by Spearman rank correlation and SSIM. A method whose maps survive the
    randomisation of every layer (mean |Spearman| > 0.5) is flagged. With --data-model, also
    the maps of a model trained on permuted labels. Writes results.jsonl as it goes (a rerun
    resumes), summary.json, and prints the table."""
    from tqdm import tqdm

    from groundcam.api import load
    from groundcam.eval import sanity

    asked = [v.strip() for v in variants.split(",") if v.strip()]
    if not asked or set(asked) - {"cascading", "independent"}:
        raise UserError(f"--variants {variants!r}: expected cascading and/or independent")
    explainer = load(model, device=device)
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    names = sanity.check_methods(explainer, names)
    other = load(data_model, device=device) if data_model else None
    dataset = dataset or ("shapes" if explainer.adapter.reads_phrases else "glyphs")
    pick = sanity.shapes_samples if dataset == "shapes" else sanity.glyph_samples
    config = {"model": model, "dataset": dataset, "scenes": scenes, "seed": seed}
    config |= {"methods": names, "variants": asked, "data_model": data_model}
    summary = sanity.run_sanity(
        explainer,
        pick(scenes, seed),
        names,
        out,
        config,
        seed,
        asked,
        other,
        progress=lambda it: tqdm(it, desc="sanity", unit="map"),
    )
    click.echo(sanity.table(summary))
    click.echo(f"wrote {out / 'summary.json'}")


@eval_.command("glyphs", short_help="Character accuracy and token pointing on text lines.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--lines", default=300, show_default=True, type=click.IntRange(1))
@click.option("--model", default="trocr-tiny-glyphs", show_default=True)
@click.option("--method", default=None, help=_METHOD_HELP)
@click.option("--layer", default=None, type=int, help="Layer (default: the family's).")
@click.option("--seed", default=0, show_default=True, help="Line seed (same seed, same lines).")
@_device_option()
@click.option("--out", required=True, type=OutDir(), help="Results directory.")
@_guard
def eval_glyphs(split, lines, model, method, layer, seed, device, out) -> None:
    """Character accuracy and token pointing (does each generated character's map peak on its
    glyph?) on rendered text lines.

    The lines are rendered on the fly from (--seed, split, index) with the box of every glyph:
    no files needed. For an OCR model (VisionEncoderDecoder, e.g. trocr-tiny-glyphs): each
    line is read by the model, and each generated character's map is scored (protocol amc)
    against the boxes of that character in the true text. Writes results.jsonl (one line per
    generated token) and summary.json.
    """
    from groundcam.api import load
    from groundcam.eval.glyphs import glyph_records, summarize_glyphs

    explainer = load(model, device=device)
    method = method or explainer.default_method("token")
    stream = glyph_records(explainer, split, lines, method, layer, seed)
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


@eval_.command("captions", short_help="BLEU/CIDEr-D and word pointing of a captioning model.")
@click.option("--model", required=True, help="A captioning or OCR model (name, dir, hub id).")
@click.option(
    "--dataset",
    default="shapes",
    show_default=True,
    type=click.Choice(["shapes", "file"]),
    help="shapes: scenes generated from --seed; file: --captions and --images.",
)
@click.option(
    "--split",
    default=None,
    help="shapes: train, val, test (default) or compositional. A Karpathy dataset_*.json: train, "
    "val, test (default), restval or all. A captions.txt/results.csv/*.token file has no splits: "
    "all (default), val (the 5% of images, by a hash of the file name, that train captioner "
    "validates on) or train (the others).",
)
@click.option("--scenes", default=500, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, help="Scene seed (shapes).")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(48))
@click.option("--captions", type=click.Path(exists=True), help="Captions file (--dataset file).")
@click.option("--images", type=click.Path(exists=True), help="Image folder (--dataset file).")
@click.option("--method", default=None, help=_METHOD_HELP)
@click.option("--layer", default=None, type=int, help="Layer (default: the family's).")
@click.option("--beam", default=1, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=None, type=click.IntRange(1))
@click.option(
    "--metrics",
    is_flag=True,
    help="Also TAM's Obj-IoU / Func-IoU / F1-IoU of the generated words (shapes: exact masks) "
    "and the energy-based pointing game (the map's mass share in the boxes) of every word.",
)
@_device_option()
@click.option("--out", required=True, type=OutDir(), help="Results directory (resumes).")
@click.option("--report", is_flag=True, help="Also write report.html.")
@click.option(
    "--examples",
    default=8,
    show_default=True,
    type=click.IntRange(0),
    help="Best/worst examples in the report.",
)
@_guard
def eval_captions(
    model,
    dataset,
    split,
    scenes,
    seed,
    image_size,
    captions,
    images,
    method,
    layer,
    beam,
    max_new_tokens,
    metrics,
    device,
    out,
    report,
    examples,
) -> None:
    """Caption metrics (BLEU-1..4, CIDEr-D, as the COCO caption evaluation) and word pointing
    (protocol amc) of a captioning model: the grounded words of the reference captions,
    teacher-forced, and, where the dataset grounds them (shapes), the object words of the
    model's own captions. Writes results.jsonl (one line per image, as it goes; a rerun resumes)
    and summary.json, with the chance and image-centre baselines."""
    from groundcam.api import load
    from groundcam.data.sample import ReadReport
    from groundcam.eval.caption_pointing import (
        caption_records,
        file_samples,
        file_split,
        shapes_samples,
        summarize_captions,
    )

    reader = None
    if dataset == "file":
        if not captions or not images:
            raise UserError("--dataset file needs --captions FILE and --images DIR")
        if metrics:
            raise UserError("--metrics needs object masks: use --dataset shapes")
        split, reader = file_split(captions, split), ReadReport()
        samples = file_samples(captions, images, split=split, report=reader)
        n = len(samples)
        if not n:
            raise UserError(f"--captions {captions}: no {split} images found under {images}")
    else:
        split = split or "test"
        samples, n = shapes_samples(split, scenes, seed, image_size), scenes
    explainer = load(model, device=device)
    if "token" not in explainer.targets:
        raise UserError(f"--model {model}: a {explainer.family} model does not write captions")
    method = method or explainer.default_method("token")
    run = {
        "model": model,
        "dataset": dataset,
        "split": split,
        "scenes": scenes,
        "seed": seed,
        "image_size": image_size,
        "captions_file": captions,
        "method": method,
        "layer": layer,
        "beam": beam,
        "max_new_tokens": max_new_tokens,
    }
    if metrics:  # only then, so that earlier runs' directories still resume
        run["metrics"] = True
    done = _resume(out, run)
    todo = (s for s in samples if s.image_id not in done)
    stream = caption_records(explainer, todo, method, layer, beam, max_new_tokens, metrics)
    records = list(done.values()) + _append_records(stream, out, f"captions/{split}", n - len(done))
    summary = summarize_captions(records) | {"protocol": "amc", **run}
    if reader is not None:
        summary["reader"] = {
            "skipped_rows": reader.skipped_rows,
            "skipped_samples": reader.skipped_samples,
            "repaired_rows": reader.repaired_rows,
            "errors": reader.errors[:20],
        }
    _write_summary(out, summary)
    for key in ("reference", "generated"):
        block = summary.get(f"{key}_word_pointing")
        if block and block["n"]:
            energy = f", energy {block['energy']:.1%}" if "energy" in block else ""
            click.echo(
                f"{key} word pointing {_percent(block)} (n={block['n']}; chance "
                f"{block['chance']:.1%}, centre {block['centre']:.1%}{energy}), {method}"
            )
    loc = summary.get("word_localisation")
    if loc:
        click.echo(
            "Obj-IoU {}, Func-IoU {}, F1-IoU {} ({} objects, {} function words), {}".format(
                *(_maybe(loc[k]) for k in ("Obj-IoU", "Func-IoU", "F1-IoU")),
                loc["objects"],
                loc["function_words"],
                method,
            )
        )
    c = summary.get("captions")
    if c:
        cider = "n/a" if c["cider_d"] is None else f"{c['cider_d']:.3f}"
        click.echo(f"BLEU-4 {c['bleu4']:.3f}, CIDEr-D {cider} on {summary['images']} images")
    if summary["errors"]:
        click.echo(f"{summary['errors']} images could not be read (see results.jsonl)")
    click.echo(f"wrote {out / 'summary.json'}")
    if report:
        from groundcam.eval.caption_report import write_caption_report

        unset = {p.name: p.default for p in click.get_current_context().command.params}
        again = samples if dataset == "file" else shapes_samples(split, scenes, seed, image_size)
        args = (summary, records, explainer, again, examples, unset | {"captions_file": None})
        click.echo(f"wrote {write_caption_report(out, *args)}")


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


@eval_.command("retrieval", short_help="Image-text retrieval R@1/5/10 and rsum, as published.")
@click.option("--model", required=True, help=_MODEL_HELP)
@click.option(
    "--dataset",
    required=True,
    type=click.Choice(["flickr30k", "coco", "shapes"]),
    help="flickr30k (1K test) or coco (5K test and 1K five folds) from a Karpathy split file; "
    "shapes: scenes generated from --seed, each with its generator caption.",
)
@click.option(
    "--captions", type=click.Path(), help="Karpathy split file (dataset_flickr30k.json, ...)."
)
@click.option("--images", type=click.Path(), help="Image folder of the split file.")
@click.option("--split", default="test", show_default=True, help="Split of the file or scenes.")
@click.option("--limit", type=click.IntRange(1), help="First N images of the split.")
@click.option("--scenes", default=200, show_default=True, type=click.IntRange(2))
@click.option("--seed", default=0, show_default=True, help="Scene seed (shapes).")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(48))
@click.option(
    "--k-test",
    default=None,
    type=click.IntRange(1),
    help="Candidates per query re-ranked by ITM (default as ALBEF/BLIP: 128 flickr30k and "
    "shapes, 256 coco).",
)
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads per process.")
@_device_option("cuda when there is one, else cpu; under accelerate, its own")
@click.option("--out", required=True, type=OutDir(), help="Results directory (resumes).")
@_guard
def eval_retrieval(
    model,
    dataset,
    captions,
    images,
    split,
    limit,
    scenes,
    seed,
    image_size,
    k_test,
    batch,
    threads,
    device,
    out,
) -> None:
    """Image->text and text->image retrieval, R@1/5/10 and rsum, as SCAN's and ALBEF's/BLIP's
    evaluations compute them: every image against every caption by the model's similarity
    (CLIP, SigLIP: their cosine; ALBEF, BLIP: ITC), then, for models with an ITM head, each
    query's top --k-test re-ranked by ITM logit + ITC (both reported). Writes summary.json and
    the similarity matrices (.npy) to --out as it goes; a rerun resumes; runs sharded under
    `accelerate launch -m groundcam eval retrieval ...`."""
    import torch

    from groundcam.api import load
    from groundcam.eval.retrieval import karpathy_set, run_retrieval, shapes_set
    from groundcam.eval.runner import Processes

    if threads:
        torch.set_num_threads(threads)
    if dataset == "shapes":
        data = shapes_set(split, scenes, seed, image_size)
    else:
        if not captions or not images:
            raise UserError(
                f"--dataset {dataset} needs --captions dataset_{dataset}.json and --images DIR"
            )
        data = karpathy_set(captions, images, split, limit)
    procs = Processes.from_environment()
    if device:
        procs.device = torch.device(device)
    explainer = load(model, device=procs.device)
    config = {"model": model, "dataset": dataset, "split": split, "set": data.name}
    config |= (
        {"scenes": scenes, "seed": seed, "image_size": image_size}
        if dataset == "shapes"
        else {"limit": limit}
    )
    summary = run_retrieval(
        explainer, data, out, config, k_test, batch, procs, procs.is_main, dataset
    )
    if summary is None:
        return
    for name in ("itc", "itm", "itc_1k_5fold", "itm_1k_5fold"):
        if name in summary:
            click.echo(f"{name}: {_recall_line(summary[name])}")
    if summary["dropped_images"]:
        click.echo(
            f"{len(summary['dropped_images'])} image(s) left out, e.g. "
            f"{summary['dropped_images'][0]} (summary.json 'dropped_images')",
            err=True,
        )
    click.echo(f"wrote {Path(out) / 'summary.json'} and the similarity matrices")


def _recall_line(r: dict) -> str:
    i2t = " ".join(f"{k} {v:.1f}" for k, v in r["i2t"].items())
    t2i = " ".join(f"{k} {v:.1f}" for k, v in r["t2i"].items())
    return f"i2t {i2t} | t2i {t2i} | rsum {r['rsum']:.1f} ({r['images']} images)"


def _resume(out: Path, run: dict) -> dict[str, dict]:
    """Records of an earlier run of the same evaluation in `out` (by image id); another
    evaluation's directory is refused."""
    saved = out / "run.json"
    if saved.exists():
        try:
            before = json.loads(saved.read_text())
        except ValueError:
            before = None
        if before != json.loads(json.dumps(run)):
            raise UserError(f"--out {out} holds another evaluation; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(run, indent=1))
    done: dict[str, dict] = {}
    path = out / "results.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["image_id"]] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a kill
        path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    return done


def _append_records(stream, out: Path, desc: str, total: int) -> list[dict]:
    from tqdm import tqdm

    records = []
    with (out / "results.jsonl").open("a") as f:
        for rec in tqdm(stream, desc=desc, unit="image", total=total):
            records.append(rec)
            f.write(json.dumps(rec) + "\n")
            f.flush()
    return records
