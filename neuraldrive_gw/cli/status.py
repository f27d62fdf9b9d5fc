"""`neuraldrive-gw status`: the running gateway's state, read from its status socket."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..status_client import StatusUnavailable, get_status
from .common import config_options, emit_json, get_config
from .db import table

EXIT_READY, EXIT_DEGRADED, EXIT_UNREACHABLE = 0, 1, 3


@click.command("status")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Status socket (default: paths.status_socket from the config).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole status document.")
@config_options
def status(socket_path: str | None, as_json: bool, config_path: str | None,
           db_path: str | None) -> None:
    """Show whether the gateway is serving, and what it is doing.

    Exit status: 0 ready, 1 degraded (the reasons are printed), 3 the gateway could not be
    reached (not running, no permission on the socket).
    """
    path = socket_path or get_config(config_path, db_path).paths.status_socket
    try:
        data = get_status(path)
    except StatusUnavailable as exc:
        click.echo(f"neuraldrive-gw: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if as_json:
        emit_json(data)
    else:
        click.echo(summary(data))
    sys.exit(EXIT_READY if data["state"] == "ready" else EXIT_DEGRADED)


def summary(data: dict[str, Any]) -> str:
    up, db, requests = data["upstream"], data["database"], data["requests"]
    audit = db["audit"] or {}
    lines = [
        f"neuraldrive-gw {data['version']}: {data['state']} (up {_duration(data['uptime_s'])})",
        *(f"  problem: {p}" for p in data["problems"]),
        f"upstream:   {up['url']} — " + (f"reachable, {up['latency_ms']} ms"
                                         if up["reachable"] else "UNREACHABLE"),
        f"models:     {', '.join(data['models']) or '-'}",
        f"master key: {'enabled' if data['master_key']['enabled'] else 'DISABLED: ' + str(data['master_key']['problem'])}",
        f"database:   keys {'fresh' if db['key_store_fresh'] else 'STALE'} "
        f"({db['keys_loaded']} loaded), audit log "
        f"{'ok' if audit.get('healthy') else 'FAILING'} ({audit.get('queued', 0)} queued)",
        f"requests:   {requests['in_flight']} in flight, {requests['queued']} queued, "
        f"model slots {requests['model_slots']['in_use']}/{requests['model_slots']['max']}",
        "by status:  " + (", ".join(f"{k}: {v}" for k, v in requests["by_status"].items())
                          or "-"),
    ]
    if data["keys"]:
        lines.append("")
        lines.append(table(("KEY", "IN FLIGHT", "QUEUED", "REQ/MIN LEFT", "TOKENS/MIN LEFT",
                            "BUDGET LEFT"),
                           [(key, k["in_flight"], k["queued"], _bucket(k["requests_bucket"]),
                             _bucket(k["tokens_bucket"]),
                             None if k["budget"] is None else
                             f"{k['budget']['left']}/{k['budget']['budget']} per "
                             f"{k['budget']['period']}")
                            for key, k in data["keys"].items()]))
    return "\n".join(lines)


def _bucket(bucket: dict[str, float] | None) -> str:
    if bucket is None:
        return "unlimited"
    return f"{int(bucket['level'])}/{int(bucket['capacity'])}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
