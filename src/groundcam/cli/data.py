"""`groundcam data ...`: groundcam's synthetic datasets written to disk."""

from __future__ import annotations

import click

from groundcam.cli.options import OutDir, _guard, main


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
