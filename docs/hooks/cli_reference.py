"""MkDocs hook: the CLI reference page is `groundcam <verb> --help` of every verb, at build time."""

from __future__ import annotations

import click

MARKER = "<!-- cli-reference -->"


def _commands(cmd: click.Command, name: str, parent: click.Context | None = None):
    """Every command under `cmd`, depth first, each with its context (its parents' settings)."""
    settings = {"terminal_width": 100, "max_content_width": 100, **cmd.context_settings}
    ctx = click.Context(cmd, info_name=name, parent=parent, **settings)
    yield ctx
    for sub in sorted(getattr(cmd, "commands", {})):
        yield from _commands(cmd.commands[sub], sub, ctx)


def render() -> str:
    """One section per verb: its name and its `--help` text, as the terminal shows it."""
    from groundcam.cli import main

    parts = []
    for ctx in _commands(main, "groundcam"):
        parts.append(f"## `{ctx.command_path}`\n\n```text\n{ctx.get_help()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace the marker on the CLI reference page with the generated help."""
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
