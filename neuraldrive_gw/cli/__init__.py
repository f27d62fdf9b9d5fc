"""The `neuraldrive-gw` command: serving, configuration, keys and tenants, audit, prompt log,
the demo."""

from __future__ import annotations

import click

from .. import __version__
from .audit import audit, usage
from .db import init_db
from .keys import keys
from .prompts import prompts
from .serve import check_config, serve
from .status import status
from .demo import demo
from .tenants import tenants


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="neuraldrive-gw")
def main() -> None:
    """NeuralDrive API gateway: authenticated, policy-enforcing proxy in front of Ollama."""


for command in (serve, check_config, init_db, tenants, keys, audit, usage, prompts, status,
                demo):
    main.add_command(command)
