"""`groundcam` command line: a thin face over the Python API."""

from __future__ import annotations

import glob
import json
import math
import pickle
import re
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import click

from groundcam.errors import GroundcamWarning
from groundcam.eval.datasets import DATASETS, DatasetSpec
from groundcam.eval.pointing import PROTOCOLS, pointing_game

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class UserError(click.ClickException):
    """A one-line message for bad input; exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"groundcam: error: {self.message}", err=True)


def _guard(fn):
    """Turn the library's bad-input errors into one clear line instead of a traceback."""
    import functools

    from PIL import Image

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (
            ValueError,
            OSError,
            pickle.UnpicklingError,
            Image.DecompressionBombError,
        ) as e:  # bad input; bugs keep their traceback
            raise UserError(_one_line_text(str(e))) from None

    return wrapper


def _one_line_text(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _usage_line(e: click.UsageError) -> UserError:
    """Click's usage errors (a value out of range, a missing option, an unknown command) as the
    same one line as every other bad input, naming the command's --help."""
    where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
    return UserError(_one_line_text(e.format_message()) + where)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr: `groundcam: warning: <message>`."""
    text = _one_line_text(str(message))
    if not issubclass(category, GroundcamWarning):
        text = f"{category.__name__}: {text}"
    click.echo(f"groundcam: warning: {text}", err=True)


class _Main(click.Group):
    """The root group: every usage error is one line (exit 2) and every warning one line, for
    the command line only (the library's warnings stay ordinary warnings elsewhere)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _usage_line(e) from None

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except click.exceptions.NoArgsIsHelpError:
                raise
            except click.UsageError as e:
                raise _usage_line(e) from None


class OutDir(click.ParamType):
    """An output directory: it may not exist yet, but it may not be a file."""

    name = "DIR"

    def convert(self, value, param, ctx):
        path = Path(value)
        if path.exists() and not path.is_dir():
            option = param.opts[0] if param is not None and param.opts else "--out"
            raise UserError(f"{option} {value} exists and is not a directory")
        return path


class Device(click.ParamType):
    """A torch device that exists on this machine: cpu, cuda, cuda:N, mps (checked here, so a
    missing GPU is one line before any model is loaded)."""

    name = "DEVICE"

    def convert(self, value, param, ctx):
        import torch

        text = str(value).strip()
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise UserError(
                f"--device {text}: not a device; use cpu, cuda, cuda:N or mps"
            ) from None
        from groundcam.api import device_problem

        problem = device_problem(device)
        if problem:
            raise UserError(f"--device {text}: {problem}")
        return text


class LayerOrRange(click.ParamType):
    """A layer number, or a range "A-B" (both included: the mean of those layers' maps, for
    generative VLMs); a range is passed on as the string and checked by the explainer."""

    name = "LAYER"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if re.fullmatch(r"\d+\s*-\s*\d+", text):
            return text
        raise UserError(f"--layer {value!r}: expected a layer number or a range A-B (e.g. 10-14)")


_LAYER_HELP = (
    "Layer, or a range A-B on a generative VLM (the mean of its layers' maps); "
    "default: the family's."
)


def _device_option(help_extra: str = ""):
    return click.option(
        "--device",
        default=None,
        type=Device(),
        help="cpu, cuda, cuda:N or mps; a device this machine does not have is refused "
        f"(default: {help_extra or 'cpu'}).",
    )


_MODEL_HELP = "A built-in name (groundcam models), a hub id, a saved directory or an ALBEF .pth."

_METHOD_HELP = (
    "attention, rollout, gradcam, attn-gradcam or relevance (default: the family's: "
    "attn-gradcam for ALBEF/BLIP ITM, gradcam for CLIP, attention for OCR models)."
)


@click.group(cls=_Main, name="groundcam", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="groundcam")
def main() -> None:
    """Where does a vision-language model find this text? Heatmaps, pointing game, training."""


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
@click.option(
    "--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores)."
)
@_loop_options
@_guard
def train_albef(
    out, steps, batch_size, lr, seed, pool, eval_every, threads, grad_accum, precision
) -> None:
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
        grad_accum=grad_accum,
        precision=precision,
    )
    _model_written(run(cfg, threads=threads))


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
@click.option(
    "--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores)."
)
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
@click.option(
    "--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores)."
)
@_loop_options
@_guard
def train_trocr(
    out, steps, batch_size, lr, aux_weight, seed, pool, eval_every, threads, grad_accum, precision
) -> None:
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
        grad_accum=grad_accum,
        precision=precision,
    )
    _model_written(run(cfg, threads=threads))


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
    "--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores)."
)
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
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(8))
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
@click.option(
    "--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores)."
)
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
@click.option(
    "--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores)."
)
@_loop_options
@_guard
def train_scan(threads, **opts) -> None:
    """SCAN (stacked cross attention) on shapes scenes: its own region proposals pooled from a
    small CNN, hinge loss with the hardest negatives. Resumes from --out."""
    from groundcam.train.scan import TrainConfig
    from groundcam.train.scan import train as run

    opts["out"] = str(opts["out"])
    _model_written(run(TrainConfig(**opts), threads=threads))


@main.group("data")
def data_() -> None:
    """Write groundcam's synthetic datasets to disk."""


@data_.command("shapes-captions")
@click.option("--out", required=True, type=OutDir(), help="Folder for images/ and the json.")
@click.option("--train", "n_train", default=4000, show_default=True, type=click.IntRange(0))
@click.option("--val", "n_val", default=200, show_default=True, type=click.IntRange(0))
@click.option("--test", "n_test", default=200, show_default=True, type=click.IntRange(0))
@click.option("--compositional", "n_comp", default=0, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True)
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(48))
@_guard
def data_shapes_captions(out, n_train, n_val, n_test, n_comp, seed, image_size) -> None:
    """Shapes scenes captioned left to right, each colour and shape word grounded to its box
    (Karpathy layout: OUT/dataset_shapes.json and OUT/images/)."""
    from groundcam.data.shapes_captions import write_dataset

    splits = {"train": n_train, "val": n_val, "test": n_test, "compositional": n_comp}
    path = write_dataset(out, {k: v for k, v in splits.items() if v}, seed, image_size)
    click.echo(f"wrote {sum(splits.values())} scenes: {path}")


@main.command()
@click.option("--out", default="groundcam-demo", show_default=True, type=OutDir())
@click.option(
    "--model",
    help="Built-in name, saved dir or hub id; any family (captioning and OCR models generate). "
    "Default: albef-tiny-shapes-amc beside albef-tiny-shapes.",
)
@click.option(
    "--scenes",
    default=4,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Shapes scenes to explain (text lines for OCR models).",
)
@_device_option()
@_guard
def demo(out, model, scenes, device) -> None:
    """Explain a few synthetic scenes with every method a model supports; by default the
    AMC-trained built-in beside the model it was trained from (offline)."""
    from groundcam.demo import run_demo

    result = run_demo(out, model=model, scenes=scenes, device=device)
    beside = result.baseline_accuracy or {}
    if beside:
        click.echo(f"{result.model}, beside {result.baseline}:")
    for method, (hits, n) in result.accuracy.items():
        rate = f"{hits / n:6.1%}" if n else "   n/a"
        line = f"pointing accuracy {method:>12}: {rate} ({hits}/{n} {result.unit})"
        if method in beside:
            h, m = beside[method]
            line += f"; {result.baseline}: {h / m:6.1%} ({h}/{m})" if m else ""
        click.echo(line)
    for method, (hits, n) in (result.word_accuracy or {}).items():
        if n:
            click.echo(f"captioner word pointing {method:>9}: {hits / n:6.1%} ({hits}/{n} words)")
    click.echo(f"wrote {result.html} ({result.seconds:.1f} s)")


def _image_paths(spec: str) -> tuple[list[Path], bool]:
    """The images IMAGE names and whether it named several: a file (as given; reading it gives
    the clear error), a folder (its image files, sorted), or a glob pattern ("shots/*.jpg")."""
    path = Path(spec)
    if path.is_dir():
        paths = sorted(
            f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise UserError(f"IMAGE folder {spec} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    elif path.exists() or not any(c in spec for c in "*?["):
        return [path], False
    else:
        matches = sorted(Path(f) for f in glob.glob(spec, recursive=True))
        paths = [f for f in matches if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise UserError(f"IMAGE {spec!r}: no image file matches the pattern")
    by_stem: dict[str, Path] = {}
    for f in paths:
        if f.stem in by_stem:
            raise UserError(
                f"images {by_stem[f.stem]} and {f} share the name {f.stem!r}: each image is "
                "written to --out/<name>; rename one or give them separately"
            )
        by_stem[f.stem] = f
    return paths, True


def _read(path: Path):
    """`groundcam.io.read_image`, with any refusal of the image as one line naming it."""
    from PIL import Image

    from groundcam.io import read_image

    try:
        return read_image(path)
    except Image.DecompressionBombError as e:
        raise UserError(f"cannot read image {path}: {_one_line_text(str(e))}") from None


def _images(paths: list[Path], failed: list[dict]):
    """(path, image) for each readable image of several; an unreadable one is recorded in
    `failed` (and reported at the end) while the others go on."""
    for path in paths:
        try:
            picture = _read(path)
        except UserError as e:
            failed.append({"image": str(path), "error": e.message})
        except (ValueError, OSError) as e:
            failed.append({"image": str(path), "error": _one_line_text(str(e))})
        else:
            yield path, picture


def _finish(model, out, results: list[dict], failed: list[dict], n: int, as_json: bool):
    """--json's document (results, and the images that could not be read); then, if some
    could not be read, the one error line (exit 2) saying so."""
    if as_json:
        doc = {"model": str(model), "out": str(out), "results": results, "errors": failed}
        click.echo(json.dumps(doc))
    if failed:
        done = f"; {n - len(failed)} written to {out}" if n > len(failed) else ""
        raise UserError(
            f"{len(failed)} of {n} images could not be read, e.g. {failed[0]['error']}{done}"
        )


def _written(directory: Path, count: int, grid: bool = False) -> list[str]:
    """The files an explanation's save wrote to `directory` (for --json)."""
    names = {"maps.npz", "meta.json"} | ({"tokens.png"} if grid else set())
    files = []
    for f in sorted(directory.iterdir()):
        m = re.match(r"(\d{3})_.*\.png$", f.name)
        if f.name in names or (m and int(m.group(1)) < count):
            files.append(str(f))
    return files


def _output_options(fn):
    options = [
        click.option(
            "--cmap",
            default=None,
            callback=_check_cmap,
            help="Matplotlib colour map of the overlays, e.g. inferno, viridis, jet, turbo "
            "(default: the overlay's own).",
        ),
        click.option(
            "--alpha",
            default=None,
            type=click.FloatRange(0, 1),
            help="Opacity of the heatmap over the image, 0 to 1 (default: the overlay's own).",
        ),
        _device_option(),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print the results as JSON on stdout (scores, phrases or tokens, the files "
            "written; the same fields as meta.json) and nothing else.",
        ),
    ]
    return _apply(fn, options)


def _apply(fn, options):
    for option in reversed(options):
        fn = option(fn)
    return fn


def _check_cmap(ctx, param, value):
    if value is None:
        return None
    import matplotlib

    if value not in matplotlib.colormaps:
        raise UserError(
            f"--cmap {value!r}: not a matplotlib colour map; e.g. inferno, viridis, jet, turbo"
        )
    return value


def _save_kwargs(cmap, alpha) -> dict:
    return {k: v for k, v in (("cmap", cmap), ("alpha", alpha)) if v is not None}


def _figure_options(fn):
    """--format, --dpi, --style and --full-res: the paper figure and the maps at image size."""
    options = [
        click.option(
            "--format",
            "fmt",
            default=None,
            type=click.Choice(["png", "pdf", "svg"]),
            help="Also write the paper figure, figure.FORMAT (default png when another figure "
            "option asks for one).",
        ),
        click.option(
            "--dpi",
            default=150,
            show_default=True,
            type=click.IntRange(30, 1200),
            help="Resolution of the figure (PNG records it).",
        ),
        click.option(
            "--style",
            default="heat",
            show_default=True,
            type=click.Choice(["heat", "contour"]),
            help="The figure's maps as heat over the photo or as outlined contour lines (visible "
            "over red and yellow objects).",
        ),
        click.option(
            "--full-res",
            is_flag=True,
            help="maps.npz also holds the maps at image size, as the pointing game sees them.",
        ),
    ]
    return _apply(fn, options)


def _layer_option(value: str | None):
    """--layer: a layer number, or 'all' (one figure column per layer)."""
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--layer {value!r}: expected a layer number or 'all'") from None


def _box(ctx, param, values):
    """--box x0,y0,x1,y1 (image pixels, x1 > x0 and y1 > y0) as a list of 4 floats each."""
    boxes = []
    for value in values:
        try:
            box = [float(v) for v in value.split(",")]
        except ValueError:
            box = []
        if (
            len(box) != 4
            or not all(map(math.isfinite, box))
            or box[2] <= box[0]
            or box[3] <= box[1]
        ):
            raise UserError(f"--box {value!r}: expected x0,y0,x1,y1 with x1 > x0 and y1 > y0")
        boxes.append(box)
    return boxes or None


def _explanations(explainer, picture, phrases, method, layer, target, prompt=None) -> dict:
    """The explanations the figure compares, by column label: one per supported method
    (--method all; a method this model cannot run is left out with a warning), one per
    layer (--layer all), or the one asked for."""
    from groundcam.explainer import supported_methods

    kwargs = {"target": target}
    if prompt is not None:  # generative VLMs: the text each phrase follows
        kwargs["prompt"] = prompt
    if method == "all":
        found = {}
        for name in supported_methods(explainer.adapter):
            try:
                found[name] = explainer.explain(
                    picture, phrases, method=name, layer=layer, **kwargs
                )
            except ValueError as e:
                click.echo(
                    f"groundcam: warning: method {name} left out: {_one_line_text(str(e))}",
                    err=True,
                )
        if not found:
            raise UserError(f"--method all: no method runs on {explainer.name}")
        return found
    method = method or None
    if layer == "all":
        layers = explainer.layers(method, target)
        if not layers:
            raise UserError(
                f"--layer all: method {method or explainer.default_method(target)} "
                "reads every layer at once"
            )
        return {
            f"layer {n}": explainer.explain(picture, phrases, method=method, layer=n, **kwargs)
            for n in layers
        }
    ex = explainer.explain(picture, phrases, method=method, layer=layer, **kwargs)
    return {ex.method: ex}


@main.command()
@click.argument("image")
@click.argument("phrases", nargs=-1)
@click.option("--model", default="albef-tiny-shapes", show_default=True, help=_MODEL_HELP)
@click.option(
    "--method",
    default=None,
    help=_METHOD_HELP + " 'all': one figure column per method the model supports.",
)
@click.option(
    "--layer", default=None, help="Layer (default: the family's); 'all': one figure column each."
)
@click.option("--target", default=None, help="itm or similarity (default: the family's).")
@click.option(
    "--prompt",
    default=None,
    help="Generative VLMs: the text each phrase follows (default: the family's template).",
)
@click.option(
    "--out",
    default="groundcam-out",
    show_default=True,
    type=OutDir(),
    help="Output directory; with several images, one subfolder per image (its file name).",
)
@click.option(
    "--box",
    multiple=True,
    callback=_box,
    help="Ground-truth box x0,y0,x1,y1 (image pixels; repeatable): every figure cell is scored "
    "by the pointing game.",
)
@click.option(
    "--protocol",
    default="amc",
    show_default=True,
    type=click.Choice(["amc", "mg", "torchray"]),
    help="Pointing-game protocol of --box.",
)
@click.option(
    "--triptych", is_flag=True, help="The figure shows image, heatmap and overlay per phrase."
)
@_figure_options
@_output_options
@_guard
def explain(
    image,
    phrases,
    model,
    method,
    layer,
    target,
    prompt,
    out,
    box,
    protocol,
    triptych,
    fmt,
    dpi,
    style,
    full_res,
    cmap,
    alpha,
    device,
    as_json,
):
    """Write overlays, maps.npz and meta.json for PHRASES over IMAGE.

    IMAGE is a file, a folder of images or a quoted glob ('shots/*.jpg'); with several images
    every phrase is explained on each, the model is loaded once and each image's files go to
    OUT/<image name without extension>/.

    --method all (or --layer all) writes one figure, figure.FORMAT: the image, then one column
    per method (or layer), one row per phrase, scored when --box is given; each method's (or
    layer's) files go to OUT/<method or layer>/.
    """
    from groundcam.api import load

    layer = _layer_option(layer)
    compare = method == "all" or layer == "all"
    fmt = fmt or ("png" if compare or box or triptych or style != "heat" else None)
    if not phrases:
        raise UserError('no phrases given: groundcam explain IMAGE "a phrase" [...]')
    for phrase in phrases:
        if Path(phrase).suffix.lower() in IMAGE_SUFFIXES and Path(phrase).is_file():
            raise UserError(
                f"phrase {phrase!r} is an image file: quote a glob ('shots/*.jpg') so the "
                "shell does not expand it, or give the folder"
            )
    paths, many = _image_paths(image)
    # one image is read (or refused) before the model loads; several are read one by one
    failed: list[dict] = []
    pictures = _images(paths, failed) if many else [(paths[0], _read(paths[0]))]
    explainer = load(model, device=device)
    results = []
    for path, picture in pictures:
        where = out / path.stem if many else out
        found = _explanations(explainer, picture, list(phrases), method, layer, target, prompt)
        ex = next(iter(found.values()))
        save = _save_kwargs(cmap, alpha) | ({"full_res": True} if full_res else {})
        folders = [where / label.replace(" ", "-") for label in found] if compare else [where]
        written = [each.save(f, **save) for each, f in zip(found.values(), folders, strict=True)][0]
        figure = None
        if fmt:
            from groundcam.viz.figures import explanation_figure, save_figure

            scored = None
            if box is not None:
                hw = (picture.height, picture.width)
                scored = {
                    label: [pointing_game(m, box, protocol, image_size=hw) for m in each.maps]
                    for label, each in found.items()
                }
            fig = explanation_figure(
                found,
                boxes=box,
                scored=scored,
                triptych=triptych,
                style=style,
                **_save_kwargs(cmap, alpha),
            )
            figure = str(save_figure(fig, Path(where) / f"figure.{fmt}", dpi))
        meta = json.loads((Path(written) / "meta.json").read_text())
        files = _written(Path(written), len(ex))
        files += [str(f) for f in folders[1:]] + ([figure] if figure else [])
        results.append({"image": str(path), "out": str(written), "files": files} | meta)
        if as_json:
            continue
        if many:
            click.echo(f"{path}:")
        if figure:
            click.echo(f"figure: {figure} ({', '.join(found)})")
        if ex.score_kind is not None and len(results) == 1:
            click.echo(f"score: {ex.score_kind.name} - {ex.score_kind.description}")
        for i, (phrase, score) in enumerate(zip(ex.phrases, ex.scores.tolist(), strict=True)):
            click.echo(f"{score:.3f}  {phrase}{_phrase_marks(ex, i)}")
        into = f"each of {len(found)} folders under {where}" if compare else written
        click.echo(f"wrote {len(ex)} overlays, maps.npz and meta.json to {into}")
    _finish(model, out, results, failed, len(paths), as_json)


def _phrase_marks(ex, i: int) -> str:
    """What a person must know beside phrase i's score: words the model read as unknown, a map
    that ignores the text (the same for every phrase)."""
    marks = []
    if ex.unknown_words and ex.unknown_words[i]:
        marks.append(f"unknown words: {', '.join(ex.unknown_words[i])}")
    if not ex.text_conditioned:
        marks.append(f"image-only map: {ex.method} does not read the text")
    return f"  [{'; '.join(marks)}]" if marks else ""


@main.command()
@click.argument("image", nargs=-1, required=True)
@click.option(
    "--model", required=True, help="A captioning/OCR model: built-in name, hub id or dir."
)
@click.option("--method", default=None, help=_METHOD_HELP)
@click.option("--layer", default=None, type=LayerOrRange(), help=_LAYER_HELP)
@click.option(
    "--max-new-tokens",
    default=None,
    type=click.IntRange(1, 512),
    help="Most tokens to generate (default: the model's own generation config decides).",
)
@click.option(
    "--text",
    default=None,
    help="Explain this text (as if generated) instead of generating; not empty.",
)
@click.option(
    "--beam",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Beam width (1: greedy).",
)
@click.option(
    "--prompt",
    default=None,
    help="Text before the answer, for models that take one (generative VLMs, BLIP captioning).",
)
@click.option(
    "--out",
    default="groundcam-caption",
    show_default=True,
    type=OutDir(),
    help="Output directory; with several images, one subfolder per image (its file name).",
)
@_figure_options
@_output_options
@_guard
def caption(
    image,
    model,
    method,
    layer,
    max_new_tokens,
    text,
    beam,
    prompt,
    out,
    fmt,
    dpi,
    style,
    full_res,
    cmap,
    alpha,
    device,
    as_json,
):
    """Generate text for IMAGE and write one map per generated token (tokens.png + overlays).

    IMAGE is a file, a folder of images or a quoted glob ('lines/*.png'); with several images
    the model is loaded once and each image's files go to OUT/<image name without extension>/.
    Several IMAGE files are the images of one prompt (generative VLMs that read several):
    OUT holds the maps over the first, OUT/image2/, OUT/image3/, ... those over the others.
    """
    from groundcam.api import load

    if text is not None and not text.strip():
        raise UserError("--text is empty: give the text to explain, or leave --text out")
    failed: list[dict] = []
    if len(image) > 1:  # several files: one generation reads them all
        paths, many = [Path(f) for f in image], False
        pictures = [(paths[0], [_read(f) for f in paths])]
    else:
        paths, many = _image_paths(image[0])
        pictures = _images(paths, failed) if many else [(paths[0], _read(paths[0]))]
    explainer = load(model, device=device)
    kwargs = {"layer": layer, "text": text}
    kwargs |= {"beam": beam} if beam > 1 else {}
    kwargs |= {"prompt": prompt} if prompt is not None else {}
    kwargs |= {"method": method} if method else {}
    kwargs |= {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}
    results = []
    for path, picture in pictures:
        gen = explainer.explain_generation(picture, **kwargs)
        save = _save_kwargs(cmap, alpha) | ({"full_res": True} if full_res else {})
        written = gen.save(out / path.stem if many else out, **save)
        meta = json.loads((Path(written) / "meta.json").read_text())
        files = _written(Path(written), len(gen), grid=True)
        if fmt or style != "heat":
            from groundcam.viz.figures import save_figure

            fig = gen.figure(style=style, **_save_kwargs(cmap, alpha))
            files.append(str(save_figure(fig, Path(written) / f"figure.{fmt or 'png'}", dpi)))
        for i, other in enumerate(picture[1:] if isinstance(picture, list) else [], 2):
            maps = gen.image_maps[i - 1]
            one = replace(gen, image=other, maps=maps, raw_maps=maps, image_maps=None)
            folder = one.save(Path(written) / f"image{i}", **_save_kwargs(cmap, alpha))
            files += _written(folder, len(gen), grid=True)
        shown = [str(f) for f in paths] if isinstance(picture, list) else str(path)
        results.append({"image": shown, "out": str(written), "files": files} | meta)
        if as_json:
            continue
        if many:
            click.echo(f"{path}:")
        click.echo(gen.text)
        if gen.score_kind is not None and len(results) == 1:
            click.echo(f"score: {gen.score_kind.name} - {gen.score_kind.description}")
        if gen.unknown_words:
            click.echo(f"unknown words (read as unknown tokens): {', '.join(gen.unknown_words)}")
        if not gen.text_conditioned:
            click.echo(f"image-only maps: {gen.method} does not read the text")
        click.echo(
            "  ".join(f"{t}:{p:.2f}" for t, p in zip(gen.tokens, gen.scores.tolist(), strict=True))
        )
        click.echo(f"wrote tokens.png, {len(gen)} overlays, maps.npz and meta.json to {written}")
    _finish(model, out, results, failed, len(paths), as_json)


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
        from groundcam.eval.sweep import sweep

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

    command.__doc__ = _eval_help(spec, "Pointing accuracy at every layer", "val") + (
        "One resumable evaluation per layer in --out/layer-<k>/, then sweep.json and sweep.tsv "
        "(the best layer is the most accurate, the lower one on a tie). Methods that read "
        "every layer at once (rollout, relevance) have nothing to sweep."
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
@click.option("--dataset", default="shapes", show_default=True, type=click.Choice(["shapes"]))
@click.option("--scenes", default=20, show_default=True, type=click.IntRange(1))
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
    config = {"model": model, "dataset": dataset, "scenes": scenes, "seed": seed}
    config |= {"methods": names, "variants": asked, "data_model": data_model}
    summary = sanity.run_sanity(
        explainer,
        sanity.shapes_samples(scenes, seed),
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

    report = None
    if dataset == "file":
        if not captions or not images:
            raise UserError("--dataset file needs --captions FILE and --images DIR")
        if metrics:
            raise UserError("--metrics needs object masks: use --dataset shapes")
        split, report = file_split(captions, split), ReadReport()
        samples = file_samples(captions, images, split=split, report=report)
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
    if report is not None:
        summary["reader"] = {
            "skipped_rows": report.skipped_rows,
            "skipped_samples": report.skipped_samples,
            "repaired_rows": report.repaired_rows,
            "errors": report.errors[:20],
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


@main.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    help="A model to offer besides the built-ins (repeatable): built-in name, hub id, saved "
    "directory or ALBEF .pth; loaded at start-up. The page never loads a path typed into it.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(0, min_open=True)
)
@click.option("--max-phrases", default=16, show_default=True, type=click.IntRange(1))
@click.option(
    "--max-tokens",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Text tokens per request.",
)
@click.option(
    "--max-new-tokens",
    default=40,
    show_default=True,
    type=click.IntRange(1),
    help="Generated tokens per request.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Model requests run at once.",
)
@click.option(
    "--cache-mb",
    default=256.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Results kept in memory for all sessions together; the least recently used dropped.",
)
@click.option(
    "--cache-ttl",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds a result, an upload or a served file is kept unused.",
)
@click.option(
    "--files-mb",
    default=512.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Uploads and served files kept on disk, and as much for saved results; the oldest "
    "deleted beyond.",
)
@click.option(
    "--sessions",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Sessions whose page state is kept (about 100 KB each); the oldest dropped.",
)
@_device_option()
@_guard
def serve(
    models,
    host,
    port,
    max_upload_mb,
    max_phrases,
    max_tokens,
    max_new_tokens,
    workers,
    cache_mb,
    cache_ttl,
    files_mb,
    sessions,
    device,
) -> None:
    """A local web page: upload an image, type phrases, see where each lands (needs groundcam[web])."""
    from groundcam.web import Limits
    from groundcam.web import serve as run

    limits = Limits(
        max_upload_mb=max_upload_mb,
        max_phrases=max_phrases,
        max_tokens=max_tokens,
        max_new_tokens=max_new_tokens,
        workers=workers,
        cache_mb=cache_mb,
        cache_ttl=cache_ttl,
        files_mb=files_mb,
        sessions=sessions,
    )
    run(models, host=host, port=port, limits=limits, device=device, echo=click.echo)


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
    width = max(14, *(len(n) + 2 for n in names))  # columns stay apart (relative-attention)
    click.echo(f"  {'':<24}" + "".join(f"{n:>{width}}" for n in names))
    for family, supported in matrix.items():
        marks = "".join(f"{'+' if n in supported else '-':>{width}}" for n in names)
        click.echo(f"  {family:<24}{marks}")
    from groundcam.api import score_kinds

    click.echo("scores (the number beside each phrase or token), per family and target:")
    for family, kinds in score_kinds().items():
        for target, kind in kinds.items():
            click.echo(f"  {family:<24}{target:<12}{kind.name}: {kind.description}")


if __name__ == "__main__":
    sys.exit(main())
