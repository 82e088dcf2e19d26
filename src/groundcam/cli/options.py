"""Shared pieces of the command line: the root group, one-line errors and warnings, option
types and options."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import click

from groundcam.errors import GroundcamWarning

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


def _apply(fn, options):
    for option in reversed(options):
        fn = option(fn)
    return fn
