"""Debian's real caddy in front of the gateway, configured by the shipped snippet, over TLS.

Client (curl, openai) ──HTTPS──▶ caddy (packaging/caddy/neuraldrive-gw.caddy) ──▶ gateway
──▶ fake Ollama, everything on loopback. Clients connect from 127.0.0.2 and up (all of
127.0.0.0/8 is local on Linux); caddy reaches the gateway from 127.0.0.1, the gateway's only
trusted proxy. The TLS chain comes from a throwaway CA made by trustme.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import trustme

from conftest import ALLOWED_MODEL, OTHER_MODEL, Gateway, GatewayFactory
from neuraldrive_gw.devtools.fake_ollama import Fault

CADDY = "/usr/bin/caddy"
CURL = "/usr/bin/curl"
SNIPPET = Path(__file__).resolve().parent.parent / "packaging" / "caddy" / "neuraldrive-gw.caddy"
BAD_KEY = "nd-" + "x" * 32
MESSAGES = [{"role": "user", "content": "hello"}]
T = TypeVar("T")
LIMIT_S = 20.0                   # bound on every wait; none of them is a timing assertion

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CADDY, os.X_OK),
                       reason=f"Debian's caddy is not installed ({CADDY}); `make test` "
                              "installs it with apt-get"),
    pytest.mark.skipif(not os.access(CURL, os.X_OK), reason=f"curl is not installed ({CURL})"),
]


@dataclass
class Front:
    """caddy on https://127.0.0.1:port in front of `gw`; `ca` verifies its certificate."""

    url: str
    gw: Gateway
    ca: Path
    log: Path                    # caddy's own output (stdout and stderr)
    access_log: Path             # the site's access log
    tmp: Path
    curls: list[asyncio.subprocess.Process] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def caddyfile(port: int, tmp: Path, cert: Path, key: Path, access_log: Path) -> str:
    """The appliance's main Caddyfile in miniature: imports the shipped snippet unchanged."""
    return f"""\
{{
	admin off
	auto_https off
	storage file_system {tmp / "caddy-data"}
	grace_period 5s
	# docs/caddy.md: slow clients are cut off, long answers are not (no `write`).
	servers {{
		timeouts {{
			read_header 10s
			read_body 30s
		}}
	}}
}}

import {SNIPPET}

:{port} {{
	bind 127.0.0.1
	tls {cert} {key}
	# What docs/caddy.md recommends when the site keeps an access log: Caddy blanks
	# Authorization itself, but logs x-api-key (Anthropic clients) in clear.
	log {{
		output file {access_log}
		format filter {{
			wrap json
			fields {{
				request>headers>X-Api-Key delete
			}}
		}}
	}}
	import neuraldrive-gw
	handle {{
		respond "not the gateway" 404
	}}
}}
"""


async def wait_for_port(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    """Poll until caddy accepts on the port (bounded); fail with its log if it exits."""
    deadline = asyncio.get_running_loop().time() + LIMIT_S
    while True:
        assert proc.returncode is None, f"caddy exited: {log.read_text()}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert asyncio.get_running_loop().time() < deadline, \
                f"caddy not listening within {LIMIT_S} s: {log.read_text()}"
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def within(awaitable: Awaitable[T], what: str) -> T:
    """`awaitable`'s result, or a test failure naming `what` after LIMIT_S seconds."""
    try:
        return await asyncio.wait_for(awaitable, LIMIT_S)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what}: not within {LIMIT_S} s") from None


async def stop(proc: asyncio.subprocess.Process) -> None:
    """End a process this test started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def front(make_gateway: GatewayFactory, tmp_path: Path) -> AsyncIterator[Front]:
    gw = await make_gateway(trusted_proxies=["127.0.0.1/32"])
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert_pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_pem))
    port = free_port()
    log, access_log = tmp_path / "caddy.log", tmp_path / "access.log"
    config = tmp_path / "Caddyfile"
    config.write_text(caddyfile(port, tmp_path, cert_pem, key_pem, access_log))
    home = tmp_path / "caddy-home"
    # Nothing outside tmp_path: caddy's data, config autosave and home all live there.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
           "XDG_CONFIG_HOME": str(home / "config"),
           "NEURALDRIVE_CADDY_GW_UPSTREAM": gw.url.split("://", 1)[1]}
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            CADDY, "run", "--config", str(config), "--adapter", "caddyfile",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    result = Front(f"https://127.0.0.1:{port}", gw, ca_pem, log, access_log, tmp_path)
    try:
        await wait_for_port(port, proc, log)
        yield result
    finally:
        for curl_proc in result.curls:
            await stop(curl_proc)
        await stop(proc)


# -- curl ------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def curl_args(front: Front, *, key: str | None, source: str | None,
              headers: dict[str, str] | None, data: bool) -> list[str]:
    """curl trusting only the test CA, from `source` (a loopback address) if given, posting
    JSON from its stdin if `data`."""
    args = [CURL, "--silent", "--show-error", "--noproxy", "*", "--cacert", str(front.ca),
            "--max-time", str(int(LIMIT_S)), "--path-as-is"]
    if source is not None:
        args += ["--interface", source]
    if key is not None:
        args += ["--header", f"Authorization: Bearer {key}"]
    for name, value in (headers or {}).items():
        args += ["--header", f"{name}: {value}"]
    if data:
        args += ["--header", "Content-Type: application/json", "--data-binary", "@-"]
    return args


async def curl(front: Front, path: str, *, key: str | None = None, source: str | None = None,
               headers: dict[str, str] | None = None, data: bytes | None = None) -> Reply:
    """One request with curl; the whole answer (curl exits 0 on any HTTP status)."""
    proc = await asyncio.create_subprocess_exec(
        *curl_args(front, key=key, source=source, headers=headers, data=data is not None),
        "--include", front.url + path, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await within(proc.communicate(data or b""), f"curl {path}")
    assert proc.returncode == 0, err.decode()
    head, _, body = out.partition(b"\r\n\r\n")
    while head.split(b" ", 2)[1].startswith(b"1"):      # 100 Continue: the answer follows
        head, _, body = body.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = [line.partition(":") for line in lines]
    return Reply(int(status_line.split()[1]),
                 {name.strip().lower(): value.strip() for name, _, value in fields}, body)


async def curl_stream(front: Front, path: str, body: dict[str, object],
                      key: str) -> asyncio.subprocess.Process:
    """curl --no-buffer (curl itself holds nothing back) streaming the answer to stdout."""
    proc = await asyncio.create_subprocess_exec(
        *curl_args(front, key=key, source="127.0.0.2", headers=None, data=True),
        "--no-buffer", front.url + path, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    front.curls.append(proc)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(body).encode())
    await proc.stdin.drain()
    proc.stdin.close()
    return proc


def audit_rows(gw: Gateway) -> list[sqlite3.Row]:
    conn = sqlite3.connect(gw.db_path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM audit ORDER BY id").fetchall()
    finally:
        conn.close()


# -- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, prefix", [
    ("/api/chat", {"model": ALLOWED_MODEL, "messages": MESSAGES}, b"{"),
    ("/v1/chat/completions", {"model": ALLOWED_MODEL, "messages": MESSAGES, "stream": True},
     b"data: {"),
])
async def test_curl_gets_frames_while_ollama_holds_the_rest_and_leaving_stops_ollama(
        front: Front, path: str, body: dict[str, object], prefix: bytes) -> None:
    fake = front.gw.fake
    fake.add_fault(Fault("hang", after_frames=2, path=path, times=1))
    proc = await curl_stream(front, path, body, front.gw.keys.acme)
    assert proc.stdout is not None
    first = await within(proc.stdout.readline(), "the first frame while Ollama holds the rest")
    # The first frame is here although Ollama has not sent its last one and will not until
    # the client goes: nothing between them (caddy included) waited for more data.
    assert first.startswith(prefix) and b'"done":true' not in first
    assert fake.active_streams == 1
    await stop(proc)
    # The client left: caddy drops its connection to the gateway, which closes Ollama's.
    await within(fake.wait_disconnect(LIMIT_S), "Ollama's connection closed after the client left")


async def test_openai_client_streams_over_https_through_caddy(front: Front) -> None:
    openai = pytest.importorskip("openai")
    gw = front.gw
    http_client = openai.DefaultAsyncHttpxClient(
        verify=ssl.create_default_context(cafile=str(front.ca)))
    client = openai.AsyncOpenAI(base_url=front.url + "/v1", api_key=gw.keys.acme,
                                max_retries=0, http_client=http_client)
    try:
        gw.fake.add_fault(Fault("hang", after_frames=2, path="/v1/chat/completions", times=1))
        held = await within(client.chat.completions.create(
            model=ALLOWED_MODEL, messages=MESSAGES, stream=True), "the stream's headers")
        first = await within(held.__aiter__().__anext__(), "the first chunk while Ollama holds")
        assert first.choices[0].delta.content and first.choices[0].finish_reason is None
        assert gw.fake.active_streams == 1
        await held.close()
        await within(gw.fake.wait_disconnect(LIMIT_S), "Ollama's connection closed")

        whole = await client.chat.completions.create(
            model=ALLOWED_MODEL, messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in whole]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] in ("stop", "length") and chunks[-1].usage is not None
    finally:
        await client.close()


# -- the client's address -------------------------------------------------------------------


async def test_auth_failures_count_against_the_address_caddy_saw(
        front: Front, caplog: pytest.LogCaptureFixture) -> None:
    gw = front.gw
    caplog.set_level(logging.INFO, logger="neuraldrive_gw.access")
    for _ in range(10):
        assert (await curl(front, "/api/tags", key=BAD_KEY, source="127.0.0.2")).status == 401
    refused = await curl(front, "/api/tags", key=gw.keys.acme, source="127.0.0.2")
    assert refused.status == 429 and "x-request-id" in refused.headers
    # Another client of the same caddy (the same TCP peer for the gateway) is unaffected.
    assert (await curl(front, "/api/tags", key=gw.keys.acme, source="127.0.0.3")).status == 200
    assert gw.pipeline.audit is not None
    await gw.pipeline.audit.flush()
    seen = [(row["client_ip"], row["status"]) for row in audit_rows(gw)]
    assert seen == [("127.0.0.2", 401)] * 10 + [("127.0.0.2", 429), ("127.0.0.3", 200)]
    access = [r.getMessage() for r in caplog.records if r.name == "neuraldrive_gw.access"]
    assert sum("ip=127.0.0.2 " in line and "status=429" in line for line in access) == 1
    assert sum("ip=127.0.0.3 " in line and "status=200" in line for line in access) == 1


async def test_a_client_sent_forwarded_for_is_not_believed(front: Front) -> None:
    gw = front.gw
    for n in range(10):
        spoofed = {"X-Forwarded-For": f"203.0.113.{n}"}
        reply = await curl(front, "/api/tags", key=BAD_KEY, source="127.0.0.4", headers=spoofed)
        assert reply.status == 401
    # A fresh made-up address does not get the client a fresh allowance.
    fresh = {"X-Forwarded-For": "203.0.113.99"}
    assert (await curl(front, "/api/tags", key=gw.keys.acme, source="127.0.0.4",
                       headers=fresh)).status == 429
    # A client whose own address the gateway trusts (a process on the appliance itself)
    # still cannot name another: caddy sends the gateway only the address it saw.
    local = await curl(front, "/api/tags", key=gw.keys.acme, source="127.0.0.1",
                       headers={"X-Forwarded-For": "203.0.113.7"})
    assert local.status == 200
    assert gw.pipeline.audit is not None
    await gw.pipeline.audit.flush()
    addresses = [row["client_ip"] for row in audit_rows(gw)]
    assert addresses == ["127.0.0.4"] * 11 + ["127.0.0.1"]


# -- what goes through, and what does not -----------------------------------------------------


async def test_keys_reach_the_gateway_and_only_it_answers_for_the_api(front: Front) -> None:
    gw = front.gw
    models = await curl(front, "/v1/models", key=gw.keys.acme, source="127.0.0.2")
    assert models.status == 200 and "x-request-id" in models.headers
    listed = models.json()
    assert isinstance(listed, dict)
    ids = {entry["id"] for entry in listed["data"]}
    assert ALLOWED_MODEL in ids and OTHER_MODEL not in ids
    anthropic_style = await curl(front, "/api/tags", source="127.0.0.2",
                                 headers={"x-api-key": gw.keys.acme})
    assert anthropic_style.status == 200
    # Without a key it is the gateway that refuses (its request id, its challenge).
    anonymous = await curl(front, "/v1/models", source="127.0.0.2")
    assert anonymous.status == 401 and "x-request-id" in anonymous.headers
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    # Caddy's access log keeps neither credential (Authorization blanked, x-api-key dropped).
    logged = front.access_log.read_text()
    assert "/v1/models" in logged
    leaked = gw.keys.acme in logged or gw.keys.acme in front.log.read_text()
    assert not leaked, "a key is in caddy's logs"      # (never print the key itself)


@pytest.mark.parametrize("path", ["/healthz", "/health", "/", "/apiary", "/v2/models"])
async def test_paths_outside_the_api_stay_with_the_site(front: Front, path: str) -> None:
    reply = await curl(front, path, key=front.gw.keys.acme, source="127.0.0.2")
    assert (reply.status, reply.body) == (404, b"not the gateway")
    assert "x-request-id" not in reply.headers


async def test_the_gateway_still_judges_what_caddy_forwards(front: Front) -> None:
    gw = front.gw
    # Caddy's path matcher decodes %75 and matches /api/*, but forwards the raw target:
    # the gateway refuses it as non-canonical, so nothing reaches Ollama.
    sneaky = await curl(front, "/api/p%75ll", key=gw.keys.acme, source="127.0.0.2",
                        data=b'{"model": "llama3.2:1b"}')
    assert sneaky.status == 400 and "x-request-id" in sneaky.headers
    # Caddy matches case-insensitively; the gateway's route table does not.
    shouting = await curl(front, "/API/tags", key=gw.keys.acme, source="127.0.0.2")
    assert shouting.status == 404 and "x-request-id" in shouting.headers
    # A body over the gateway's 256 KiB cap gets the gateway's own 413, in Ollama's shape.
    padding = "x" * (300 * 1024)
    big = json.dumps({"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": padding}],
                      "stream": False}).encode()
    too_big = await curl(front, "/api/chat", key=gw.keys.acme, source="127.0.0.2", data=big)
    assert too_big.status == 413 and "x-request-id" in too_big.headers
    assert "error" in json.loads(too_big.body)
    assert "/api/pull" not in gw.fake.paths() and "/api/chat" not in gw.fake.paths()
