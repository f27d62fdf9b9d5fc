"""Real processes: `neuraldrive-gw serve`, the fake Ollama, the CLI in another process, the demo.

These start subprocesses on 127.0.0.1, talk to them with the synchronous official clients
and curl, as an operator or user would, and end only the processes they started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ALLOWED_MODEL, OTHER_MODEL, write_key_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MASTER = "nd-" + "P" * 32


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("NEURALDRIVE_GW_")}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neuraldrive_gw", *args], env=env(),
                          capture_output=True, text=True, timeout=60)


def read_line_matching(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> re.Match[str]:
    """Read the process's stdout until a line matches (the process prints it when ready)."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} in {seen!r}")


def stop(proc: subprocess.Popen[str]) -> int:
    """SIGTERM a process we started, wait for it, close its pipes; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return proc.returncode


def get(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError):
        return 0                      # not listening (yet)


def wait_until(check, limit_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < limit_s, f"{what} not within {limit_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A fake Ollama process and a `neuraldrive-gw serve` process on free loopback ports."""
    workdir = tmp_path_factory.mktemp("stack")
    fake = subprocess.Popen([sys.executable, "-m", "neuraldrive_gw.devtools.fake_ollama",
                             "--host", "127.0.0.1", "--port", "0"], env=env(),
                            stdout=subprocess.PIPE, text=True)
    gateway = None
    try:
        upstream = read_line_matching(fake, r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        db = str(workdir / "gw.db")
        key_file = str(workdir / "api.key")
        write_key_file(key_file, MASTER + "\n")
        assert cli("init-db", "--db", db).returncode == 0
        assert cli("tenants", "create", "acme", "--model", ALLOWED_MODEL, "--db", db).returncode == 0
        created = cli("keys", "create", "--tenant", "acme", "--print-key", "--db", db)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        port = free_port()
        config = workdir / "gw.yaml"
        # The module's tests share this daemon and its per-IP failure limit; they poll with
        # keys that are not valid yet, which counts (test_authfailures.py tests the limit).
        config.write_text(f"paths:\n  database: {db}\n  master_key_file: {key_file}\n"
                          f"  status_socket: {workdir}/status.sock\n"
                          "limits:\n  auth_failures_per_ip_per_min: 10000\n")
        log = open(workdir / "gateway.log", "w")      # a file: a pipe nobody reads would fill up
        gateway = subprocess.Popen(
            [sys.executable, "-m", "neuraldrive_gw", "serve", "--config", str(config),
             "--listen", f"127.0.0.1:{port}", "--upstream", upstream],
            env=env(), stdout=subprocess.DEVNULL, stderr=log, text=True)
        log.close()
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(url + "/healthz") == 200, 30, "gateway ready")
        yield {"url": url, "key": key, "db": db, "key_file": key_file, "upstream": upstream,
               "config": str(config), "log": str(workdir / "gateway.log")}
    finally:
        if gateway is not None:
            assert stop(gateway) == 0
        stop(fake)


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sync_official_clients_against_the_daemon(stack: dict[str, str]) -> None:
    ollama = pytest.importorskip("ollama")
    openai = pytest.importorskip("openai")
    with ollama.Client(host=stack["url"],
                       headers={"Authorization": f"Bearer {stack['key']}"}) as client:
        assert client.chat(model=ALLOWED_MODEL, messages=[{"role": "user", "content": "hi"}]).done
        with pytest.raises(ollama.ResponseError) as denied:
            client.chat(model=OTHER_MODEL, messages=[{"role": "user", "content": "hi"}])
        assert denied.value.status_code == 403
    with openai.OpenAI(base_url=stack["url"] + "/v1", api_key=stack["key"], max_retries=0) as oai:
        with oai.chat.completions.create(model=ALLOWED_MODEL, stream=True,
                                         messages=[{"role": "user", "content": "hi"}]) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_cli_revocation_reaches_the_running_daemon_within_a_second(stack: dict[str, str]) -> None:
    created = cli("keys", "create", "--tenant", "acme", "--print-key", "--db", stack["db"])
    key = created.stdout.strip().splitlines()[-1]
    wait_until(lambda: get(stack["url"] + "/api/tags", key) == 200, 2, "new key usable")
    revoked = cli("keys", "revoke", key[3:11], "--db", stack["db"])
    assert revoked.returncode == 0, revoked.stderr
    committed = time.monotonic()
    wait_until(lambda: get(stack["url"] + "/api/tags", key) == 401, 1.0, "revocation")
    assert time.monotonic() - committed < 1.0


def test_master_key_file_rewrite_is_picked_up_within_two_seconds(stack: dict[str, str]) -> None:
    assert get(stack["url"] + "/api/tags", MASTER) == 200
    new = "nd-" + "R" * 32
    write_key_file(stack["key_file"], new + "\n")
    wait_until(lambda: get(stack["url"] + "/api/tags", MASTER) == 401, 2.0, "master key rotation")
    assert get(stack["url"] + "/api/tags", new) == 200
    write_key_file(stack["key_file"], MASTER + "\n")


def test_each_request_is_one_access_line_on_stderr_while_the_daemon_runs(
        stack: dict[str, str]) -> None:
    """SPEC §11: one structured line per request on stderr. The daemon writes them in
    batches (logsink.py): the line must still appear while it runs, never hold the key."""
    assert get(stack["url"] + "/api/version", stack["key"]) == 200
    lines: list[str] = []

    def logged() -> bool:
        with open(stack["log"]) as log:
            lines[:] = [line for line in log if "neuraldrive_gw.access:" in line
                        and "path=/api/version status=200" in line]
        return bool(lines)
    wait_until(logged, 2.0, "the access line on stderr")
    assert lines[-1].startswith("INFO neuraldrive_gw.access: rid=")
    assert f"key={stack['key'][3:11]} " in lines[-1]
    with open(stack["log"]) as log:
        assert stack["key"] not in log.read()


def test_check_config(stack: dict[str, str], tmp_path: Path) -> None:
    good = cli("check-config", "--config", stack["config"])
    assert good.returncode == 0, good.stderr
    assert "max_body_bytes: 262144" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_body_bytez: 1\n")
    refused = cli("check-config", "--config", str(bad))
    assert refused.returncode == 2 and "limits.max_body_bytez: unknown setting" in refused.stderr


def test_serve_refuses_a_missing_database(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "neuraldrive_gw", "serve", "--db", str(tmp_path / "missing.db"),
         "--listen", f"127.0.0.1:{free_port()}"], env=env(), capture_output=True, text=True,
        timeout=30)
    assert result.returncode != 0
    assert "init-db" in result.stderr
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_demo_commands_work_when_pasted() -> None:
    demo = subprocess.Popen([sys.executable, "-m", "neuraldrive_gw", "demo", "--port", "0"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        read_line_matching(demo, r"Paste any of these")
        commands = []
        assert demo.stdout is not None
        while len(commands) < 5:
            line = demo.stdout.readline()
            assert line, "demo ended early"
            if line.startswith("curl "):
                commands.append(line.strip())
        outputs = [subprocess.run(["bash", "-c", c], capture_output=True, text=True, timeout=30)
                   for c in commands]
        assert all(o.returncode == 0 for o in outputs), outputs
        ndjson = [json.loads(line) for line in outputs[0].stdout.splitlines()]
        assert ndjson[-1]["done"] is True and len(ndjson) > 2
        assert outputs[1].stdout.rstrip().endswith("data: [DONE]")
        assert sorted(m["id"] for m in json.loads(outputs[2].stdout)["data"]) == \
            sorted([ALLOWED_MODEL, OTHER_MODEL])
        assert outputs[3].stdout.startswith("HTTP/1.1 401")
        assert outputs[4].stdout.startswith("HTTP/1.1 403")
    finally:
        assert stop(demo) == 0
