"""The docs are checked: the CLI reference is what `--help` says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current() -> None:
    # A fresh interpreter: click (>= 8.1.8) caches each command's help option when first
    # built, so rendering inside a test process would depend on which tests ran before.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    rendered = subprocess.run([sys.executable, str(REPO / "tools" / "gen_cli_docs.py")],
                              env=env, capture_output=True, text=True, check=True,
                              timeout=60).stdout
    assert (REPO / "docs" / "cli.md").read_text() == rendered, \
        "docs/cli.md is stale: run `make docs`"
