"""`groundcam explain` and `groundcam caption`: maps for one's own images, and the helpers
they share."""

from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import click

from groundcam.cli.options import (
    _LAYER_HELP,
    _METHOD_HELP,
    _MODEL_HELP,
    IMAGE_SUFFIXES,
    LayerOrRange,
    OutDir,
    UserError,
    _apply,
    _device_option,
    _guard,
    _one_line_text,
    main,
)
from groundcam.eval.pointing import pointing_game


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
            type=click.Choice(["heat", "muted", "contour"]),
            help="The figure's maps as heat over the photo, heat over a grey copy of the photo "
            "(muted), or outlined contour lines (both visible over red and yellow objects).",
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
@click.argument("image", nargs=-1)
@click.option(
    "--model", required=True, help="A captioning/OCR model: built-in name, hub id or dir."
)
@click.option(
    "--video",
    default=None,
    help="A video instead of IMAGE (Qwen2/2.5/3-VL, LLaVA-OneVision): an animated GIF/WebP/PNG "
    "or a folder of frames sorted by name; maps are one per frame, side by side.",
)
@click.option(
    "--frames",
    default=None,
    type=click.IntRange(1),
    help="With --video: keep N frames spread evenly over the clip (default: all).",
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
    video,
    frames,
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
    --video PATH instead of IMAGE: one map per frame (tokens.png shows the frames side by side).
    """
    from groundcam.api import load

    if text is not None and not text.strip():
        raise UserError("--text is empty: give the text to explain, or leave --text out")
    if (video is None) == (not image):
        raise UserError("give IMAGE (a file, folder or glob) or --video PATH, one of the two")
    if frames is not None and video is None:
        raise UserError("--frames is for --video: it keeps N frames of the video")
    failed: list[dict] = []
    if video is not None:  # the frames of one video: one generation reads them all
        from groundcam.video import Video

        paths, many = [Path(video)], False
        pictures = [(paths[0], Video(video, frames=frames))]
    elif len(image) > 1:  # several files: one generation reads them all
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
