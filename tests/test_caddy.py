"""Debian's real Caddy with TLS in front of the gateway, using the shipped snippet
(packaging/caddy/neuraldrive-gw.caddy; issue 4, docs/caddy.md).

Caddy, the gateway and the fake Ollama all listen on 127.0.0.1; a test CA made with
openssl signs Caddy's certificate; curl and the official openai client talk HTTPS.
Clients use other loopback source addresses (127.0.0.2, 127.0.0.3) so that the per-client
auth-failure limit behind the proxy can be told apart per client.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sqlite3
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ALLOWED_MODEL, Gateway, GatewayFactory
from neuraldrive_gw.devtools.fake_ollama import Fault

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("caddy") is None or shutil.which("curl") is None
                                 or shutil.which("openssl") is None,
                                 reason="needs caddy, curl and openssl (apt-get install caddy)")]

SNIPPET = Path(__file__).resolve().parent.parent / "packaging" / "caddy" / "neuraldrive-gw.caddy"
BAD = "nd-" + "x" * 32


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a certificate for localhost / 127.0.0.1 signed by it."""
    ca_key, ca, key, csr, cert = (directory / n for n in
                                  ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n")
    for argv in (
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=neuraldrive-gw test CA", "-keyout", ca_key, "-out", ca],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", key, "-out", csr],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", cert],
    ):
        subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=60)
    return ca, cert, key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def caddy(make_gateway: GatewayFactory, tmp_path: Path
                ) -> AsyncIterator[tuple[Gateway, str, Path]]:
    """(gateway, https base URL, CA file): Caddy with the shipped snippet in front."""
    gw = await make_gateway(limits__key_defaults__requests_per_min=1000,
                            trusted_proxies=["127.0.0.1/32"])
    ca, cert, key = await asyncio.to_thread(make_certs, tmp_path)
    port = free_port()
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(
        "{\n\tadmin off\n\tauto_https off\n\tdefault_sni localhost\n"
        f"\tstorage file_system {tmp_path}/caddy-data\n}}\n"
        f"import {SNIPPET}\n"
        f"https://localhost:{port} {{\n\tbind 127.0.0.1\n\ttls {cert} {key}\n"
        "\timport neuraldrive_gw\n}\n")
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "PATH": "/usr/bin:/bin",
           "NEURALDRIVE_GW_UPSTREAM": gw.url.split("//", 1)[1]}
    log = open(tmp_path / "caddy.log", "w")
    proc = subprocess.Popen(["caddy", "run", "--config", str(caddyfile), "--adapter",
                             "caddyfile"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "caddy.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "caddy did not start"
                await asyncio.sleep(0.05)
        yield gw, f"https://localhost:{port}", ca
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def curl(ca: Path, url: str, *args: str, source: str = "127.0.0.2") -> tuple[int, str]:
    """curl over HTTPS from a given loopback source address: (status, body)."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    done = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "--cacert", str(ca), "--interface", source,
         "--resolve", f"localhost:{port}:127.0.0.1", "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    body, _, code = done.stdout.rpartition("\n")
    return int(code), body


def audit_ips(gw: Gateway) -> list[tuple[str, int]]:
    conn = sqlite3.connect(gw.db_path)
    try:
        return conn.execute("SELECT client_ip, status FROM audit ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_a_stream_arrives_frame_by_frame_through_caddy(
        caddy: tuple[Gateway, str, Path]) -> None:
    gw, url, ca = caddy
    gw.fake.add_fault(Fault("hang", after_frames=2, path="/api/chat", times=1))
    port = url.rsplit(":", 1)[1]
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sSN", "--cacert", str(ca), "--resolve", f"localhost:{port}:127.0.0.1",
        "-H", f"Authorization: Bearer {gw.keys.acme}", "-d",
        json.dumps({"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        url + "/api/chat", stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        # The upstream holds back everything after two frames: they can only be here now
        # if neither Caddy nor the gateway buffered the stream.
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
                 for _ in range(2)]
        assert [line["done"] for line in lines] == [False, False]
    finally:
        proc.kill()
        await proc.wait()


async def test_the_openai_client_streams_over_https(caddy: tuple[Gateway, str, Path]) -> None:
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    gw, url, ca = caddy

    def run() -> list[Any]:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http_client:
            client = openai.OpenAI(base_url=url + "/v1", api_key=gw.keys.acme,
                                   http_client=http_client)
            stream = client.chat.completions.create(
                model=ALLOWED_MODEL, stream=True,
                messages=[{"role": "user", "content": "hello"}])
            return list(stream)

    chunks = await asyncio.to_thread(run)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    models = await curl(ca, url + "/v1/models", "-H", f"Authorization: Bearer {gw.keys.acme}")
    assert models[0] == 200 and json.loads(models[1])["object"] == "list"


async def test_the_failure_limit_sees_each_client_behind_caddy_and_ignores_spoofing(
        caddy: tuple[Gateway, str, Path]) -> None:
    gw, url, ca = caddy
    bad = ("-H", f"Authorization: Bearer {BAD}")
    for _ in range(10):
        assert (await curl(ca, url + "/api/tags", *bad, source="127.0.0.2"))[0] == 401
    # 127.0.0.2 is now refused whatever it sends, also when it claims to be someone else.
    assert (await curl(ca, url + "/api/tags", *bad, source="127.0.0.2"))[0] == 429
    spoofed = await curl(ca, url + "/api/tags", "-H", f"Authorization: Bearer {gw.keys.acme}",
                         "-H", "X-Forwarded-For: 203.0.113.9", source="127.0.0.2")
    assert spoofed[0] == 429
    # Another client behind the same proxy is not affected.
    good = await curl(ca, url + "/api/tags", "-H", f"Authorization: Bearer {gw.keys.acme}",
                      source="127.0.0.3")
    assert good[0] == 200
    assert gw.pipeline.audit is not None
    await gw.pipeline.audit.flush()
    ips = audit_ips(gw)
    assert ips[:10] == [("127.0.0.2", 401)] * 10
    assert ips[10:] == [("127.0.0.2", 429), ("127.0.0.2", 429), ("127.0.0.3", 200)]
