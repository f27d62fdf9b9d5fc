"""`demo`: the whole gateway on loopback with a built-in fake Ollama, a temp DB and a demo key."""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import sys
import tempfile

import click

from .. import admin, store
from ..app import create_app
from ..appkeys import pipeline_of
from ..config import config_from_mapping
from ..daemon import setup_logging, start, wait_for_stop_signal
from ..devtools.fake_ollama import start_fake

DEMO_MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest")


def curl_commands(base: str, key: str) -> list[tuple[str, str]]:
    """The ready-to-paste commands the demo prints: (what it shows, shell command)."""
    auth = shlex.quote(f"Authorization: Bearer {key}")
    bad = shlex.quote("Authorization: Bearer nd-" + "x" * 32)
    chat = '{"model":"llama3.2:1b","messages":[{"role":"user","content":"Hello!"}]}'
    sse = ('{"model":"llama3.2:1b","stream":true,'
           '"messages":[{"role":"user","content":"Hello!"}]}')
    return [
        ("Native Ollama chat, streamed as NDJSON",
         f"curl -sN {base}/api/chat -H {auth} -d {shlex.quote(chat)}"),
        ("OpenAI-compatible chat, streamed as server-sent events",
         f"curl -sN {base}/v1/chat/completions -H {auth} -H 'Content-Type: application/json' "
         f"-d {shlex.quote(sse)}"),
        ("The models this key may use",
         f"curl -s {base}/v1/models -H {auth}"),
        ("A wrong key: 401",
         f"curl -si {base}/api/tags -H {bad}"),
        ("Model management is blocked for every key: 403",
         f"curl -si -X POST {base}/api/pull -H {auth} -d '{{\"model\":\"llama3.2:1b\"}}'"),
    ]


async def _run(port: int, workdir: str) -> int:
    fake, fake_runner, upstream_url = await start_fake(models=DEMO_MODELS)
    db_path = os.path.join(workdir, "gw.db")
    key_file = os.path.join(workdir, "api.key")
    store.init_db(db_path)
    conn = store.open_db(db_path)
    try:
        admin.create_tenant(conn, "demo", models=DEMO_MODELS[:2])
        key, _ = admin.create_key(conn, "demo", label="demo key")
    finally:
        conn.close()
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("nd-" + secrets.token_hex(16) + "\n")   # a master key nobody is shown
    config = config_from_mapping({
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream_url},
        "paths": {"database": db_path, "master_key_file": key_file,
                  "status_socket": os.path.join(workdir, "status.sock")},
    }, env={})
    app = create_app(config)
    try:
        runner = await start(app, "127.0.0.1", port, grace_s=1.0)
    except OSError as exc:
        await fake_runner.cleanup()
        click.echo(f"neuraldrive-gw demo: cannot listen on 127.0.0.1:{port} ({exc.strerror}); "
                   "try --port", err=True)
        return 1
    try:
        await asyncio.wait_for(pipeline_of(app).policy.catalog.discovered.wait(), 10)
        bound = runner.addresses[0][1]
        base = f"http://127.0.0.1:{bound}"
        click.echo(f"neuraldrive-gw demo: gateway {base} → fake Ollama {upstream_url}")
        click.echo(f"Demo key (tenant 'demo', models {', '.join(DEMO_MODELS[:2])}):\n  {key}\n")
        click.echo("Paste any of these into another terminal:\n")
        for title, command in curl_commands(base, key):
            click.echo(f"# {title}\n{command}\n")
        click.echo("Press Ctrl-C to stop.", err=True)
        sys.stdout.flush()
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()
        await fake_runner.cleanup()
    return 0


@click.command()
@click.option("--port", default=3002, show_default=True, help="Gateway port on 127.0.0.1 (0: any free port).")
def demo(port: int) -> None:
    """Run the gateway against a built-in fake Ollama and print ready-to-paste curl commands.

    Everything lives in a temporary directory that is removed on exit; nothing is installed
    and no model is downloaded.
    """
    setup_logging("warning")
    with tempfile.TemporaryDirectory(prefix="neuraldrive-demo-") as workdir:
        sys.exit(asyncio.run(_run(port, workdir)))
