"""`groundcam models`: built-in models, families, methods and scores."""

from __future__ import annotations

import click

from groundcam.cli.options import main


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
