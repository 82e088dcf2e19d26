"""`groundcam demo`: a few synthetic scenes explained with every method, offline."""

from __future__ import annotations

import click

from groundcam.cli.options import OutDir, _device_option, _guard, main


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
    for shown, found in (result.word_accuracy or {}).items():
        for method, (hits, n) in found.items():
            if n:
                rate = f"{hits / n:6.1%} ({hits}/{n} words)"
                click.echo(f"{shown} word pointing {method:>12}: {rate}")
    click.echo(f"wrote {result.html} ({result.seconds:.1f} s)")
