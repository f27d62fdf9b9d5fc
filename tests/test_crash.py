"""`kill -9` of the real daemon under load (SPEC §10 durability; issue 3).

A `neuraldrive-gw serve` process answers a bounded load of streamed and non-streamed
requests from several threads and is SIGKILLed in the middle of it. Afterwards the
database passes `integrity_check`, `audit verify` passes, and a restarted gateway's budget
spend — rebuilt from the audit log at start — equals the sum of the audit rows, twice in a
row (nothing reset, nothing double-counted). Then it serves again and the chain goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from conftest import ALLOWED_MODEL, write_key_file
from neuraldrive_gw.app import create_app
from neuraldrive_gw.appkeys import pipeline_of
from neuraldrive_gw.config import load_config
from neuraldrive_gw.quotas.budgets import period_key
from test_process import cli, env, free_port, get, read_line_matching, stop, wait_until

pytestmark = pytest.mark.slow

MASTER = "nd-" + "K" * 32
THREADS = 6
MAX_REQUESTS = 2000         # the load stops by itself even if the kill never comes
KILL_AFTER = 600            # answers completed before SIGKILL
# SPEC §10: a row is handed to SQLite within 50 ms of its request ending, so SIGKILL loses
# at most that window (measured: rows answered up to ~30 ms before the kill go missing).
# The bound checked here is ten times that, so a loaded CI machine does not make it flaky.
LOSS_WINDOW_S = 0.5


@pytest.fixture
def fake_ollama() -> Iterator[str]:
    fake = subprocess.Popen([sys.executable, "-m", "neuraldrive_gw.devtools.fake_ollama",
                             "--host", "127.0.0.1", "--port", "0"], env=env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        yield read_line_matching(fake, r"listening on (http://127\.0\.0\.1:\d+)").group(1)
    finally:
        stop(fake)


Answer = tuple[float, int, str]        # (monotonic time, status, X-Request-ID)


def request(url: str, key: str, n: int) -> Answer:
    """One chat request, streamed or not, native or OpenAI; reads the whole answer."""
    path, body = (("/api/chat", {"model": ALLOWED_MODEL, "stream": n % 2 == 0,
                                 "messages": [{"role": "user", "content": f"hi {n}"}]})
                  if n % 3 else
                  ("/v1/chat/completions", {"model": ALLOWED_MODEL, "stream": n % 2 == 0,
                                            "messages": [{"role": "user", "content": "yo"}]}))
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as response:
        response.read()
        return time.monotonic(), int(response.status), response.headers["X-Request-ID"]


def load(url: str, key: str, kill: threading.Event,
         answered: list[Answer]) -> list[threading.Thread]:
    counter = iter(range(MAX_REQUESTS))
    lock = threading.Lock()

    def worker() -> None:
        while not kill.is_set():
            with lock:
                n = next(counter, None)
            if n is None:
                return
            try:
                answer = request(url, key, n)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
                return                   # the gateway is gone (mid-answer: a broken chunk)
            with lock:
                answered.append(answer)
                if len(answered) >= KILL_AFTER:
                    kill.set()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    return threads


def rebuilt_spend(config_path: str, key_id: str) -> tuple[int, int]:
    """Start the gateway app (in this process, with its real start-up) on the same files,
    and read the spend it rebuilt for the key and its tenant today."""
    async def run() -> tuple[int, int]:
        app = create_app(load_config(config_path, env={}))
        runner = web.AppRunner(app)
        await runner.setup()           # runs every cleanup context's start-up
        try:
            ledger = pipeline_of(app).admission.ledger
            today = period_key("day", time.time())
            return (ledger.spent(("key", key_id), today),
                    ledger.spent(("tenant", "acme"), today))
        finally:
            await runner.cleanup()
    # In a thread of its own: asyncio.run() in this thread would replace (and drop) the
    # event loop an earlier async test left set here, which aiohttp 3.8's world then
    # reports as an unclosed socket during this test.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def audit_totals(db: str, key_id: str) -> tuple[set[str], int, int]:
    """(the key's request ids, its tokens, its tenant's tokens) from an intact database."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {row[0] for row in conn.execute("SELECT request_id FROM audit WHERE key_id = ?",
                                              (key_id,))}
        tokens = conn.execute(
            "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM audit "
            "WHERE key_id = ?", (key_id,)).fetchone()[0]
        tenant_tokens = conn.execute(
            "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM audit "
            "WHERE tenant = 'acme'").fetchone()[0]
    finally:
        conn.close()
    return ids, tokens, tenant_tokens


def test_sigkill_under_load_leaves_a_consistent_database(tmp_path: Path, fake_ollama: str) -> None:
    db, key_file, config = str(tmp_path / "gw.db"), str(tmp_path / "api.key"), tmp_path / "gw.yaml"
    write_key_file(key_file, MASTER + "\n")
    assert cli("init-db", "--db", db).returncode == 0
    assert cli("tenants", "create", "acme", "--model", ALLOWED_MODEL, "--db", db).returncode == 0
    created = cli("keys", "create", "--tenant", "acme", "--print-key", "--db", db)
    key = created.stdout.strip().splitlines()[-1]
    key_id = key[3:11]
    port = free_port()
    # A budget on every key, so the ledger tracks spend; limits high enough not to refuse.
    config.write_text(
        f"listen:\n  port: {port}\nupstream:\n  url: {fake_ollama}\n  max_parallel: 4\n"
        f"paths:\n  database: {db}\n  master_key_file: {key_file}\n"
        f"  status_socket: {tmp_path}/status.sock\n"
        "limits:\n  key_defaults:\n    requests_per_min: 100000\n    tokens_per_min: 100000000\n"
        "    max_concurrent: 64\n    token_budget: 100000000\n")
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "gateway.log", "w") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "neuraldrive_gw", "serve",
                                    "--config", str(config)], env=env(),
                                   stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        wait_until(lambda: get(url + "/healthz") == 200, 30, "gateway ready")
        kill, answered = threading.Event(), list[Answer]()
        threads = load(url, key, kill, answered)
        assert kill.wait(60), f"load did not reach {KILL_AFTER} answers: {len(answered)}"
        gateway.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        gateway.wait(10)
        for thread in threads:
            thread.join(15)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    assert gateway.returncode == -signal.SIGKILL
    assert {status for _, status, _ in answered} == {200}

    ids, tokens, tenant_tokens = audit_totals(db, key_id)
    lost = sorted(killed_at - at for at, _, rid in answered if rid not in ids)
    assert not [ago for ago in lost if ago > LOSS_WINDOW_S], \
        f"rows lost for requests answered long before the kill (s before): {lost}"
    assert len(ids) <= len(answered) + THREADS and tokens > 0     # in flight: may be there
    verified = cli("audit", "verify", "--db", db)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for _ in range(2):       # a restart neither resets nor double-counts spend
        assert rebuilt_spend(str(config), key_id) == (tokens, tenant_tokens)

    with open(tmp_path / "gateway2.log", "w") as log:
        again = subprocess.Popen([sys.executable, "-m", "neuraldrive_gw", "serve",
                                  "--config", str(config)], env=env(),
                                 stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        wait_until(lambda: get(url + "/healthz") == 200, 30, "gateway ready again")
        assert request(url, key, 1)[1] == 200
    finally:
        assert stop(again) == 0
    assert len(audit_totals(db, key_id)[0]) == len(ids) + 1
    verified = cli("audit", "verify", "--db", db)
    assert verified.returncode == 0, verified.stdout + verified.stderr
