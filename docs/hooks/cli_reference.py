"""MkDocs hook: the CLI reference page is `groundcam <verb> --help` of every verb, at build time."""

from __future__ import annotations

import click

MARKER = "<!-- cli-reference -->"


def _commands(cmd: click.Command, path: list[str]):
    """Every command under `cmd`, depth first, with its full name."""
    yield path, cmd
    for name in sorted(getattr(cmd, "commands", {})):
        yield from _commands(cmd.commands[name], [*path, name])


def render() -> str:
    """One section per verb: its name and its `--help` text, as the terminal shows it."""
    from groundcam.cli import main

    parts = []
    for path, cmd in _commands(main, ["groundcam"]):
        ctx = click.Context(
            cmd, info_name=" ".join(path), terminal_width=100, max_content_width=100
        )
        parts.append(f"## `{' '.join(path)}`\n\n```text\n{cmd.get_help(ctx)}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace the marker on the CLI reference page with the generated help."""
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
