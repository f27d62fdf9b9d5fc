"""The status socket, its client and `neuraldrive-gw status` (SPEC §11; status.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import ALLOWED_MODEL, MASTER_KEY, Gateway, cli_runner
from neuraldrive_gw import keys as keyfmt
from neuraldrive_gw import status as status_module
from neuraldrive_gw import status_client
from neuraldrive_gw.cli.status import status as status_command
from neuraldrive_gw.devtools.fake_ollama import Fault

DOCS = Path(__file__).resolve().parent.parent / "docs" / "status.md"
CHAT = {"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "the secret plan"}]}


@pytest.fixture
async def sock(gw: Gateway, tmp_path: Path) -> AsyncIterator[str]:
    """The status app of `gw` on a Unix socket, as the daemon serves it."""
    path = str(tmp_path / "status.sock")
    status_module.prepare_socket_path(path)
    runner = web.AppRunner(status_module.create_status_app(gw.pipeline))
    await runner.setup()
    await web.UnixSite(runner, path).start()
    status_module.finish_socket(path)
    yield path
    await runner.cleanup()


async def read_status(path: str) -> dict[str, Any]:
    return await status_client.fetch_status(path)


async def test_status_reports_requests_keys_and_verifications(
        gw: Gateway, sock: str, http: aiohttp.ClientSession) -> None:
    before = await read_status(sock)
    assert before["state"] == "ready" and before["problems"] == []
    assert before["upstream"]["reachable"] is True and before["upstream"]["latency_ms"] > 0
    assert ALLOWED_MODEL in before["models"]
    assert before["master_key"] == {"enabled": True, "problem": None}
    for _ in range(2):
        async with http.get(gw.url + "/api/tags", headers=gw.auth()) as r:
            assert r.status == 200
    gw.fake.add_fault(Fault("hang", after_frames=1, path="/api/chat", times=1))
    held = await http.post(gw.url + "/api/chat", json=CHAT, headers=gw.auth())
    try:
        await held.content.readline()
        during = await read_status(sock)
    finally:
        held.close()
    key_id = keyfmt.key_id(gw.keys.acme) or ""
    assert during["auth"]["argon2_verifications"] == before["auth"]["argon2_verifications"] + 1
    assert during["requests"]["by_status"]["200"] == 2
    assert during["requests"]["in_flight"] == 1
    assert during["requests"]["model_slots"] == {"max": 1, "in_use": 1}
    assert during["keys"][key_id]["in_flight"] == 1
    assert during["keys"][key_id]["requests_bucket"]["capacity"] == 60
    assert during["tenants"]["acme"]["in_flight"] == 1
    for _ in range(200):                                  # bounded: the slot is released
        if (await read_status(sock))["requests"]["in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    after = await read_status(sock)
    assert after["requests"]["in_flight"] == 0 and after["keys"][key_id]["in_flight"] == 0


async def test_status_says_degraded_and_why(gw: Gateway, sock: str) -> None:
    gw.fake.add_fault(Fault("status", status=500, path="/api/tags"))
    gw.clock.advance(121)                                 # discovery is now stale
    data = await read_status(sock)
    assert data["state"] == "degraded"
    assert data["problems"] == ["upstream discovery stale"]
    assert data["upstream"]["reachable"] is False and data["models"] == []


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*"'
                         r'(,[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*")*)?\})? (?P<value>\S+)$')


def parse_metrics(text: str) -> dict[str, list[float]]:
    """A strict reading of the Prometheus text format: HELP and TYPE before samples."""
    assert text.endswith("\n")
    declared: dict[str, str] = {}
    samples: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in declared, f"{name} declared twice"
            declared[name] = ""
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name in declared and kind in ("gauge", "counter")
            declared[name] = kind
        else:
            match = METRIC_LINE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            assert declared.get(name), f"{name} has no TYPE"
            samples.setdefault(name, []).append(float(match.group("value")))
    return samples


async def test_metrics_are_valid_prometheus_text(gw: Gateway, sock: str,
                                                 http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/api/tags", headers=gw.auth()) as r:
        assert r.status == 200
    text = await status_client.fetch_metrics(sock)
    samples = parse_metrics(text)
    assert samples["neuraldrive_gw_up"] == [1.0]
    assert samples["neuraldrive_gw_requests_total"] == [1.0]
    assert samples["neuraldrive_gw_argon2_verifications_total"] == [1.0]
    assert 'neuraldrive_gw_requests_total{status="200"} 1' in text


async def test_nothing_secret_is_ever_shown(gw: Gateway, sock: str,
                                            http: aiohttp.ClientSession) -> None:
    for key in (gw.keys.acme, gw.keys.master, "nd-" + "Q" * 32):
        async with http.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                             headers=gw.auth(key)) as r:
            await r.read()
    everything = json.dumps(await read_status(sock)) + await status_client.fetch_metrics(sock)
    for secret in (gw.keys.acme, gw.keys.all_models, MASTER_KEY, "the secret plan",
                   "$argon2", gw.keys.acme[11:]):
        assert secret not in everything


async def test_socket_mode_and_paths(tmp_path: Path, sock: str) -> None:
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    stale = str(tmp_path / "stale.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(stale)
    listener.close()                                      # a socket file nobody serves
    status_module.prepare_socket_path(stale)
    assert not os.path.exists(stale)
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    with pytest.raises(status_module.SocketPathError):
        status_module.prepare_socket_path(str(regular))
    assert regular.read_text() == "keep me"


async def test_other_paths_and_methods(sock: str) -> None:
    with pytest.raises(status_client.StatusUnavailable, match="404"):
        await status_client.fetch("/nope", sock)
    connector = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post("http://gw/status") as r:
            assert r.status == 405


async def test_the_sync_client_and_a_missing_socket(sock: str, tmp_path: Path) -> None:
    data = await asyncio.to_thread(status_client.get_status, sock)
    assert data["state"] == "ready"
    with pytest.raises(status_client.StatusUnavailable, match="is neuraldrive-gw running"):
        status_client.get_status(str(tmp_path / "missing.sock"))
    with pytest.raises(status_client.StatusUnavailable, match="is neuraldrive-gw running"):
        await status_client.fetch_status(str(tmp_path / "missing.sock"))


async def test_the_status_command(gw: Gateway, sock: str, tmp_path: Path) -> None:
    def run(*args: str) -> Any:
        return cli_runner().invoke(status_command, [*args, "--db", gw.db_path])
    human = await asyncio.to_thread(run, "--socket", sock)
    assert human.exit_code == 0, human.output
    assert "ready" in human.stdout and "upstream:" in human.stdout
    as_json = await asyncio.to_thread(run, "--socket", sock, "--json")
    assert json.loads(as_json.stdout)["state"] == "ready"
    missing = await asyncio.to_thread(run, "--socket", str(tmp_path / "missing.sock"))
    assert missing.exit_code == 3 and "is neuraldrive-gw running" in missing.stderr
    gw.fake.add_fault(Fault("status", status=500, path="/api/tags"))
    gw.clock.advance(121)
    degraded = await asyncio.to_thread(run, "--socket", sock)
    assert degraded.exit_code == 1 and "problem: upstream discovery stale" in degraded.stdout


def _paths(value: Any, prefix: str = "") -> set[str]:
    """Dotted field paths of a status document, per-key and per-tenant maps generalised."""
    out: set[str] = set()
    if isinstance(value, dict):
        for name, child in value.items():
            generic = {"keys.": "KEY_ID", "tenants.": "TENANT", "requests.by_status.": "STATUS"}
            label = generic.get(prefix, name)
            out.add(prefix + label)
            out |= _paths(child, prefix + label + ".")
    return out


async def test_every_field_and_metric_is_documented(gw: Gateway, sock: str,
                                                    http: aiohttp.ClientSession) -> None:
    async with http.post(gw.url + "/api/chat", json={**CHAT, "stream": False},
                         headers=gw.auth()) as r:
        await r.read()
    docs = DOCS.read_text()
    for path in sorted(_paths(await read_status(sock))):
        assert f"`{path}`" in docs, f"{path} is not documented in docs/status.md"
    for name in parse_metrics(await status_client.fetch_metrics(sock)):
        assert f"`{name}`" in docs, f"metric {name} is not documented in docs/status.md"
