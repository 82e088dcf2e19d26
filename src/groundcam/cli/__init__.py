"""`groundcam` command line: a thin face over the Python API, one module per verb group over
the shared options of `options`."""

# Importing each verb group's module registers its verbs on `main`.
from groundcam.cli import data, demo, evaluate, explain, models, serve, train  # noqa: F401
from groundcam.cli.options import main

__all__ = ["main"]
