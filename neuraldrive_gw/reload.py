"""Applying a reloaded configuration to the running gateway (SIGHUP, SPEC §11).

The new file is loaded and validated as a whole first; an invalid one changes nothing.
Most settings then take effect at once for new requests: limits and key defaults, the
master key's limits, model policy, upstream URL and timeouts, discovery timing,
`upstream.max_parallel`, trusted proxies and the shutdown grace (the daemon sets the
log level). Sections
bound to resources opened at start-up — the listening address, the files, the audit
writer, the prompt log — keep their running values until a restart, and the reload
says so in the log.
"""

from __future__ import annotations

import dataclasses
import logging

from .config import Config
from .pipeline import Pipeline

log = logging.getLogger(__name__)

# Sections of Config that only a restart can change: the listener, every path (database,
# master key file, status socket), the audit writer's connection settings and the prompt
# log (its redaction hook is imported once, at start-up).
RESTART_ONLY = ("listen", "paths", "audit", "prompt_logging")


def apply(pipeline: Pipeline, new: Config) -> list[str]:
    """Make `new` the running configuration, except RESTART_ONLY sections, which keep
    their running values. Returns the names of the sections that changed but were kept."""
    old = pipeline.config
    kept = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    effective = dataclasses.replace(new, **{name: getattr(old, name) for name in RESTART_ONLY})
    pipeline.reconfigure(effective)
    if kept:
        log.warning("reload: changes to %s need a restart; running with the old values",
                    ", ".join(kept))
    return kept
