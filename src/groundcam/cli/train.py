"""`groundcam train ...`: groundcam's own training recipes."""

from __future__ import annotations

import click

from groundcam.cli.options import OutDir, _guard, main


@main.group()
def train() -> None:
    """Train models with groundcam's own recipes."""


_TRAIN_LOOP_OPTIONS = [
    click.option(
        "--grad-accum",
        default=1,
        show_default=True,
        type=click.IntRange(1),
        help="Micro-batches per optimizer step (the same numbers with less memory).",
    ),
    click.option(
        "--precision",
        default="fp32",
        show_default=True,
        type=click.Choice(["fp32", "bf16", "fp16", "auto"]),
        help="Mixed precision on GPUs (auto: bf16 where the GPU has it).",
    ),
]


_threads_option = click.option(
    "--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores)."
)


def _loop_options(fn):
    for option in reversed(_TRAIN_LOOP_OPTIONS):
        fn = option(fn)
    return fn


def _model_written(final) -> None:
    """Print where the model went, once (every process under `accelerate launch` returns)."""
    from groundcam.train.loop import main_process

    if main_process():
        click.echo(f"model written to {final}")


@train.command("albef")
@click.option("--out", required=True, type=OutDir(), help="Run directory.")
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=5e-4, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--pool",
    default=20000,
    show_default=True,
    type=click.IntRange(1),
    help="Training scenes rendered.",
)
@click.option("--eval-every", default=500, show_default=True, type=click.IntRange(1))
@_threads_option
@_loop_options
@_guard
def train_albef(out, threads, **opts) -> None:
    """ALBEF from scratch on the shapes train split, ITC + ITM (no boxes). Resumes from --out."""
    from groundcam.train.albef_shapes import TrainConfig
    from groundcam.train.albef_shapes import train as run

    _model_written(run(TrainConfig(out=str(out), **opts), threads=threads))


@train.command("amc")
@click.option("--out", required=True, type=OutDir(), help="Run directory (resumes).")
@click.option(
    "--model",
    default="albef-tiny-shapes",
    show_default=True,
    help="Start model: built-in, saved directory or official ALBEF .pth (e.g. ALBEF_4M.pth).",
)
@click.option(
    "--data",
    default="shapes",
    show_default=True,
    type=click.Choice(["shapes", "vg", "flickr30k-entities", "refcoco+"]),
    help="Box data: shapes (built in), Visual Genome regions, Flickr30k Entities, RefCOCO+.",
)
@click.option("--root", type=click.Path(), help="Annotation files of --data (not for shapes).")
@click.option("--images", type=click.Path(), help="Image directory of --data.")
@click.option("--split", default="train", show_default=True, help="Split to train on.")
@click.option("--tokenizer", default=None, help="Tokenizer for an official .pth (dir or hub id).")
@click.option(
    "--steps",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Total steps; run again with more to extend a finished run.",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Per step: scenes (shapes, all their phrases) or (image, phrase) pairs.",
)
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--final-lr", default=1e-5, show_default=True, type=click.FloatRange(0))
@click.option("--warmup", default=50, show_default=True, type=click.IntRange(0))
@click.option("--weight-decay", default=0.02, show_default=True, type=click.FloatRange(0))
@click.option(
    "--map-method",
    default="attn-gradcam",
    show_default=True,
    type=click.Choice(["attn-gradcam", "gradcam"]),
    help="The map the AMC term trains.",
)
@click.option("--layer", default=None, type=int, help="Layer of the map (default: the family's).")
@click.option("--no-amc", is_flag=True, help="The control: the same run without the AMC term.")
@click.option("--mean-weight", default=0.2, show_default=True, type=click.FloatRange(0))
@click.option("--max-weight", default=0.8, show_default=True, type=click.FloatRange(0))
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "bf16", "fp16", "auto"]),
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--pool",
    default=20000,
    show_default=True,
    type=click.IntRange(1),
    help="shapes: training scenes rendered.",
)
@click.option(
    "--eval-every",
    default=250,
    show_default=True,
    type=click.IntRange(0),
    help="shapes: val pointing accuracy every N steps.",
)
@click.option("--save-every", default=200, show_default=True, type=click.IntRange(0))
@_threads_option
@_guard
def train_amc(out, no_amc, threads, **opts) -> None:
    """Attention Map Consistency fine-tuning (Yang et al. 2023): ITC + ITM with hard negatives,
    plus the AMC loss that pushes each positive phrase's map inside its boxes. Runs under
    `accelerate launch -m groundcam train amc ...` on many GPUs; resumes from --out."""
    from groundcam.train.amc import AMCConfig
    from groundcam.train.amc import train as run

    cfg = AMCConfig(out=str(out), amc=not no_amc, **opts)
    _model_written(run(cfg, threads=threads))


@train.command("trocr")
@click.option("--out", required=True, type=OutDir(), help="Run directory.")
@click.option("--steps", default=16000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option(
    "--aux-weight",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Start weight of the per-column encoder loss (decays to 0 by mid-training; 0 = off).",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--pool",
    default=50000,
    show_default=True,
    type=click.IntRange(1),
    help="Training lines rendered.",
)
@click.option("--eval-every", default=500, show_default=True, type=click.IntRange(1))
@_threads_option
@_loop_options
@_guard
def train_trocr(out, threads, **opts) -> None:
    """trocr-tiny-glyphs (ViT + TrOCR decoder) on synthetic text lines. Resumes from --out."""
    from groundcam.train.trocr_glyphs import TrainConfig
    from groundcam.train.trocr_glyphs import train as run

    _model_written(run(TrainConfig(out=str(out), **opts), threads=threads))


@train.command("captioner")
@click.option(
    "--captions",
    required=True,
    type=click.Path(exists=True),
    help="Captions: captions.txt, results.csv, *.token or a Karpathy dataset_*.json.",
)
@click.option(
    "--images", required=True, type=click.Path(exists=True), help="Folder of the image files."
)
@click.option("--out", required=True, type=OutDir(), help="Run directory.")
@click.option(
    "--encoder",
    default="resnet-tiny",
    show_default=True,
    help="resnet-tiny (built from a config), or a ResNet hub id / local directory "
    "(microsoft/resnet-50: 7x7 regions at 224 px).",
)
@click.option(
    "--freeze-encoder/--finetune-encoder",
    default=None,
    help="Default: frozen for a pretrained encoder, trained for resnet-tiny.",
)
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(32))
@click.option("--embed-dim", default=512, show_default=True, type=click.IntRange(1))
@click.option("--attention-dim", default=512, show_default=True, type=click.IntRange(1))
@click.option("--decoder-dim", default=512, show_default=True, type=click.IntRange(1))
@click.option("--dropout", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option(
    "--attention-regularizer",
    default=0.005,
    show_default=True,
    type=click.FloatRange(0),
    help="lambda of lambda * sum_i (1 - sum_t alpha_ti)^2 (a sum over regions: 1/R times the "
    "mean form's lambda).",
)
@click.option(
    "--min-word-count",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="Words seen fewer times become <UNK>.",
)
@click.option("--max-words", default=30, show_default=True, type=click.IntRange(1))
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=4e-4, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--beam",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Beam width of the validation captions (1: greedy).",
)
@click.option("--val-images", default=500, show_default=True, type=click.IntRange(1))
@click.option(
    "--sample-every",
    default=100,
    show_default=True,
    type=click.IntRange(0),
    help="Print a caption of one validation image every N steps (0: never).",
)
@click.option(
    "--ground",
    type=click.Choice(["none", "attention", "amc"]),
    default="none",
    show_default=True,
    help="Grounding supervision from the captions' 'grounding' (Karpathy layout): attention "
    "correctness on the decoder's weights (Liu et al. 2017), or AMC on each word's Grad-CAM map.",
)
@click.option("--ground-weight", default=1.0, show_default=True, type=click.FloatRange(0))
@click.option(
    "--randomise-labels",
    is_flag=True,
    help="Permute the training captions across images (fixed by --seed): the model for "
    "`eval sanity --data-model`.",
)
@_threads_option
@_loop_options
@_guard
def train_captioner(threads, **opts) -> None:
    """A show-attend-tell captioner (CNN grid + LSTM with soft attention). Resumes from --out;
    validates (BLEU-1..4, CIDEr-D) every epoch."""
    from groundcam.train.captioner import TrainConfig
    from groundcam.train.captioner import train as run

    opts["captions"], opts["images"], opts["out"] = (
        str(opts["captions"]),
        str(opts["images"]),
        str(opts["out"]),
    )
    _model_written(run(TrainConfig(**opts), threads=threads))


@train.command("vlm")
@click.option("--out", required=True, type=OutDir(), help="Run directory.")
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--pool", default=4000, show_default=True, type=click.IntRange(1), help="Training scenes."
)
@click.option("--scene-size", default=128, show_default=True, type=click.IntRange(48))
@click.option(
    "--image-size",
    default=None,
    type=click.IntRange(8),
    help="Model input size [64]; with --init: resize the init's grid to it (positions resized).",
)
@click.option("--patch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--vision-hidden", default=64, show_default=True, type=click.IntRange(1))
@click.option("--vision-layers", default=2, show_default=True, type=click.IntRange(1))
@click.option("--hidden", default=128, show_default=True, type=click.IntRange(1))
@click.option("--layers", default=3, show_default=True, type=click.IntRange(1))
@click.option("--heads", default=4, show_default=True, type=click.IntRange(1))
@click.option(
    "--caption-share",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of rows that are captions (the rest: referring questions).",
)
@click.option("--val-scenes", default=100, show_default=True, type=click.IntRange(1))
@click.option("--eval-every", default=500, show_default=True, type=click.IntRange(1))
@click.option("--save-every", default=200, show_default=True, type=click.IntRange(0))
@click.option(
    "--init", default=None, help="Fine-tune this saved model (built-in name or folder) instead."
)
@click.option(
    "--ground",
    default="none",
    show_default=True,
    type=click.Choice(["none", "attention"]),
    help="attention: attention correctness on the object words' image attention (Liu et al.).",
)
@click.option("--ground-weight", default=1.0, show_default=True, type=click.FloatRange(0))
@click.option(
    "--ground-layers",
    default=None,
    help="LM layers supervised, e.g. 1 or 0,1 (default: the family's default layer).",
)
@_threads_option
@_loop_options
@_guard
def train_vlm(threads, out, ground_layers, **opts) -> None:
    """vlm-tiny-shapes: a tiny LLaVA (CLIP tower + Llama) from scratch (or --init) on shapes
    captions and referring questions; loads with groundcam.load. Resumes from --out."""
    from groundcam.train.vlm_shapes import TrainConfig, parse_layers
    from groundcam.train.vlm_shapes import train as run

    layers = parse_layers(ground_layers)
    _model_written(run(TrainConfig(out=str(out), ground_layers=layers, **opts), threads=threads))


@train.command("scan")
@click.option("--out", required=True, type=OutDir(), help="Run directory (resumes).")
@click.option("--steps", default=1500, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(2))
@click.option(
    "--lr",
    default=5e-4,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="The built-in's; the paper used 2e-4 for its full-size model.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--pool", default=5000, show_default=True, type=click.IntRange(2), help="Scenes rendered."
)
@click.option("--eval-every", default=500, show_default=True, type=click.IntRange(1))
@click.option("--save-every", default=200, show_default=True, type=click.IntRange(1))
@click.option(
    "--all-negatives-steps",
    default=500,
    show_default=True,
    type=click.IntRange(0),
    help="First steps sum the hinge over every negative (a warm start), then the hardest.",
)
@_threads_option
@_loop_options
@_guard
def train_scan(threads, **opts) -> None:
    """SCAN (stacked cross attention) on shapes scenes: its own region proposals pooled from a
    small CNN, hinge loss with the hardest negatives. Resumes from --out."""
    from groundcam.train.scan import TrainConfig
    from groundcam.train.scan import train as run

    opts["out"] = str(opts["out"])
    _model_written(run(TrainConfig(**opts), threads=threads))
