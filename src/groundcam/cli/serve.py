"""`groundcam serve`: the local web page."""

from __future__ import annotations

import click

from groundcam.cli.options import _device_option, _guard, main


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
def serve(models, host, port, device, **limits) -> None:
    """A local web page: upload an image, type phrases, see where each lands (needs groundcam[web])."""
    from groundcam.web import Limits
    from groundcam.web import serve as run

    limits = Limits(**limits)  # every --max-*, --workers, --cache-*, --files-mb and --sessions
    run(models, host=host, port=port, limits=limits, device=device, echo=click.echo)
