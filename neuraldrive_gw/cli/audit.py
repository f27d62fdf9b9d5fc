"""`neuraldrive-gw audit …` (tail, verify, prune) and `neuraldrive-gw usage`."""

from __future__ import annotations

import time

import click

from ..auditchain import prune as prune_chain
from ..auditchain import verify as verify_chain
from ..auditreport import iso_ms, parse_time, tail as tail_rows, usage as usage_totals
from .common import config_options, emit_json, fail, get_config
from .db import errors_to_exit, open_store, table


@click.group()
def audit() -> None:
    """Read, check and prune the audit log (one hash-chained row per request)."""


@audit.command("tail")
@click.option("-n", "count", type=click.IntRange(min=1), default=20, show_default=True,
              metavar="N", help="How many of the latest rows.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, oldest first.")
@config_options
def tail(count: int, as_json: bool, config_path: str | None, db_path: str | None) -> None:
    """Show the latest rows of the audit log, oldest first."""
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        entries = tail_rows(conn, count)
    if as_json:
        emit_json([entry.to_json() for entry in entries])
        return
    if not entries:
        click.echo("no audit rows")
        return
    click.echo(table(("ID", "TIME", "KEY", "TENANT", "CLIENT", "METHOD", "ROUTE", "MODEL",
                      "STATUS", "TOKENS", "METERING", "MS", "OUTCOME"),
                     [(e.id, iso_ms(r.at), r.key_id, r.tenant, r.client_ip, r.method,
                       r.route + (" (stream)" if r.stream else ""), r.model, r.status,
                       f"{r.prompt_tokens}+{r.completion_tokens}", r.metering,
                       int(r.duration_ms), r.outcome)
                      for e in entries for r in (e.record,)]))


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@config_options
def verify(as_json: bool, config_path: str | None, db_path: str | None) -> None:
    """Check the hash chain: any edited, deleted, inserted or moved row fails it.

    Exit status 0 when the chain is whole, 1 naming the first bad row. The head printed on
    success is worth recording elsewhere: a later run must show the same row with the
    same hash, which exposes even a rewrite of the whole chain.
    """
    config = get_config(config_path, db_path)
    with open_store(config) as conn:
        result = verify_chain(conn)
    if as_json:
        emit_json(result.to_json())
        if not result.ok:
            raise SystemExit(1)
        return
    if not result.ok:
        fail(f"audit chain broken at row {result.first_bad_id}: {result.reason} "
             f"({result.rows_checked} rows before it verified)")
    start = f" (pruned up to row {result.anchor_id})" if result.anchor_id else ""
    if result.head_id is None:
        click.echo(f"audit chain ok: no rows{start}")
    else:
        click.echo(f"audit chain ok: {result.rows_checked} rows{start}, "
                   f"head row {result.head_id} {result.head_hash}")


@audit.command("prune")
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="Delete rows older than this: 90d, 12h, 2w, or a UTC date/time.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@config_options
def prune(older_than: str, as_json: bool, config_path: str | None,
          db_path: str | None) -> None:
    """Delete the oldest rows, keeping the rest verifiable.

    Every row is verified before it is deleted; a broken chain stops the prune at the bad
    row (exit 1), so pruning cannot hide tampering. Safe while the gateway runs.
    """
    config = get_config(config_path, db_path)
    with errors_to_exit():
        cutoff = parse_time(older_than, time.time())
    with open_store(config) as conn:
        result = prune_chain(conn, cutoff)
    if as_json:
        emit_json(result.to_json())
    elif result.deleted:
        click.echo(f"pruned {result.deleted} rows older than {iso_ms(cutoff)}; the chain "
                   f"now starts after row {result.anchor_id}")
    else:
        click.echo(f"nothing to prune: no rows older than {iso_ms(cutoff)}")


@click.command("usage")
@click.option("--tenant", metavar="NAME", help="Only this tenant's requests.")
@click.option("--key", "key_id", metavar="KEY_ID", help="Only this key's requests.")
@click.option("--since", metavar="WHEN",
              help="Only requests since: 7d, 12h, 2026-11-01, 2026-11-01T12:00:00Z.")
@click.option("--json", "as_json", is_flag=True, help="Print the totals as JSON.")
@config_options
def usage(tenant: str | None, key_id: str | None, since: str | None, as_json: bool,
          config_path: str | None, db_path: str | None) -> None:
    """Requests and tokens per key and per tenant, from the audit log."""
    config = get_config(config_path, db_path)
    with errors_to_exit():
        since_ts = None if since is None else parse_time(since, time.time())
    with open_store(config) as conn:
        report = usage_totals(conn, tenant=tenant, key=key_id, since=since_ts)
    if as_json:
        emit_json(report.to_json())
        return
    period = "all time" if since_ts is None else f"since {iso_ms(since_ts)}"
    if not report.keys:
        click.echo(f"no requests ({period})")
        return
    headers = ("REQUESTS", "PROMPT", "COMPLETION", "TOTAL", "ESTIMATED")
    click.echo(f"per key ({period}):")
    click.echo(table(("KEY", "TENANT", *headers),
                     [(t.name, t.tenant, t.requests, t.prompt_tokens, t.completion_tokens,
                       t.total_tokens, t.estimated) for t in report.keys]))
    click.echo("")
    click.echo(f"per tenant ({period}):")
    click.echo(table(("TENANT", *headers),
                     [(t.name, t.requests, t.prompt_tokens, t.completion_tokens,
                       t.total_tokens, t.estimated) for t in report.tenants]))
