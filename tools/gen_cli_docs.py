"""Generate docs/cli.md from the click command tree (`make docs`; a test keeps it current)."""

from __future__ import annotations

import sys

import click

from neuraldrive_gw.cli import main


def render() -> str:
    out = ["# `neuraldrive-gw` command reference", "",
           "Generated from `--help` by `make docs`; do not edit by hand.", ""]

    def walk(command: click.Command, path: list[str]) -> None:
        with click.Context(command, info_name=" ".join(path), terminal_width=100) as ctx:
            out.extend([f"## `{' '.join(path)}`", "", "```", command.get_help(ctx).rstrip(), "```", ""])
            if isinstance(command, click.Group):
                for name in command.list_commands(ctx):
                    sub = command.get_command(ctx, name)
                    if sub is not None:
                        walk(sub, [*path, name])

    walk(main, ["neuraldrive-gw"])
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
