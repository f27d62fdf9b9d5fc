"""The docs are checked: the CLI reference is what `--help` says."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import gen_cli_docs  # noqa: E402


def test_cli_reference_is_current() -> None:
    assert (REPO / "docs" / "cli.md").read_text() == gen_cli_docs.render(), \
        "docs/cli.md is stale: run `make docs`"
