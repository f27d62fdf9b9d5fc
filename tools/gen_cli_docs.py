"""Generate docs/cli.md from the click command tree (`make docs`; a test keeps it current)."""

from __future__ import annotations

import sys

import click

from neuraldrive_gw.cli import main


def render() -> str:
    out = ["# `neuraldrive-gw` command reference", "",
           "Generated from `--help` by `make docs`; do not edit by hand.", ""]

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        # Contexts built as click builds them (context_settings, parent chain), so that
        # help_option_names and widths do not depend on what ran before.
        with click.Context(command, info_name=path[-1], parent=parent, terminal_width=100,
                           max_content_width=100, **command.context_settings) as ctx:
            out.extend([f"## `{' '.join(path)}`", "", "```", command.get_help(ctx).rstrip(), "```", ""])
            if isinstance(command, click.Group):
                for name in command.list_commands(ctx):
                    sub = command.get_command(ctx, name)
                    if sub is not None:
                        walk(sub, [*path, name], ctx)

    walk(main, ["neuraldrive-gw"], None)
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
