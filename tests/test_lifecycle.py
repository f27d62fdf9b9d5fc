"""The real daemon under a fake systemd: SIGHUP reload with sd_notify (SPEC §11).

`neuraldrive-gw serve` runs as a subprocess with NOTIFY_SOCKET pointing at a datagram
socket the test reads, the way systemd's notify socket works.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ALLOWED_MODEL, write_key_file
from test_process import cli, env, free_port, get, read_line_matching, stop, wait_until

pytestmark = pytest.mark.slow

MASTER = "nd-" + "H" * 32


class NotifySocket:
    """What systemd would receive on its notify socket."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(10)
        self.seen: list[str] = []

    def expect(self, field: str) -> list[str]:
        """Messages up to and including the first one with `field` (e.g. "READY=1")."""
        got = []
        while True:
            message = self.sock.recv(4096).decode()     # socket.timeout fails the test
            got.append(message)
            self.seen.append(message)
            if field in message.split("\n"):
                return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def post(url: str, body: dict[str, object], key: str = MASTER) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sighup_applies_a_new_config_and_keeps_the_old_one_if_invalid(
        tmp_path: Path, notify: NotifySocket) -> None:
    fake = subprocess.Popen([sys.executable, "-m", "neuraldrive_gw.devtools.fake_ollama",
                             "--host", "127.0.0.1", "--port", "0"], env=env(),
                            stdout=subprocess.PIPE, text=True)
    gateway = None
    try:
        upstream = read_line_matching(fake, r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        db, key_file, config = tmp_path / "gw.db", tmp_path / "api.key", tmp_path / "gw.yaml"
        write_key_file(str(key_file), MASTER + "\n")
        assert cli("init-db", "--db", str(db)).returncode == 0
        port = free_port()
        base = (f"listen:\n  port: {port}\nupstream:\n  url: {upstream}\n"
                f"paths:\n  database: {db}\n  master_key_file: {key_file}\n"
                f"  status_socket: {tmp_path}/status.sock\n")
        config.write_text(base)
        with open(tmp_path / "gateway.log", "w") as log:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "neuraldrive_gw", "serve", "--config", str(config)],
                env={**env(), "NOTIFY_SOCKET": notify.path}, stdout=subprocess.DEVNULL,
                stderr=log, text=True)
        notify.expect("READY=1")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(url + "/healthz") == 200, 30, "models discovered")
        chat = {"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "hi " * 40}],
                "stream": False}
        assert post(url + "/api/chat", chat) == 200

        config.write_text(base + "limits:\n  max_body_bytes: 64\n")
        gateway.send_signal(signal.SIGHUP)
        reloading = [m for m in notify.expect("READY=1") if not m.startswith("STATUS=")]
        assert reloading[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert post(url + "/api/chat", chat) == 413           # the new limit is live

        config.write_text(base + "limits:\n  max_body_bytes: -5\n")     # invalid: refused
        gateway.send_signal(signal.SIGHUP)
        assert [m for m in notify.expect("READY=1")
                if not m.startswith("STATUS=")][0].startswith("RELOADING=1")
        assert post(url + "/api/chat", chat) == 413            # still the last good one
        assert gateway.poll() is None

        gateway.send_signal(signal.SIGTERM)
        notify.expect("STOPPING=1")
        assert gateway.wait(20) == 0
        log_text = (tmp_path / "gateway.log").read_text()
        assert "configuration reloaded" in log_text
        assert "reload refused, the running configuration stays: limits.max_body_bytes" \
            in log_text
        assert MASTER not in log_text
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        stop(fake)


def test_ready_watchdog_status_and_stop_under_a_fake_systemd(
        tmp_path: Path, notify: NotifySocket) -> None:
    """READY=1 only once both listeners answer; WATCHDOG=1 at half of WATCHDOG_USEC from
    the event loop; STATUS= lines; SIGTERM → STOPPING=1, exit 0, socket removed. Ollama is
    not running at all: the gateway is ready anyway and says it is degraded."""
    db, key_file = tmp_path / "gw.db", tmp_path / "api.key"
    sock = tmp_path / "status.sock"
    write_key_file(str(key_file), MASTER + "\n")
    assert cli("init-db", "--db", str(db)).returncode == 0
    port = free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(f"listen:\n  port: {port}\nupstream:\n  url: http://127.0.0.1:{free_port()}\n"
                      f"paths:\n  database: {db}\n  master_key_file: {key_file}\n"
                      f"  status_socket: {sock}\n")
    with open(tmp_path / "gateway.log", "w") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "neuraldrive_gw", "serve", "--config", str(config)],
            env={**env(), "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"},
            stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        ready = notify.expect("READY=1")[-1]
        # Both listeners were up before READY=1 was sent.
        assert get(f"http://127.0.0.1:{port}/health") == 200
        assert sock.is_socket() and oct(sock.stat().st_mode & 0o777) == "0o660"
        assert "STATUS=degraded: upstream unreachable" in ready
        pings = 0
        while pings < 3:
            pings += notify.expect("WATCHDOG=1").count("WATCHDOG=1")
        gateway.send_signal(signal.SIGTERM)
        notify.expect("STOPPING=1")
        assert gateway.wait(20) == 0
        assert not sock.exists()
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def test_a_status_socket_path_taken_by_a_file_fails_the_start_before_ready(
        tmp_path: Path, notify: NotifySocket) -> None:
    db = tmp_path / "gw.db"
    assert cli("init-db", "--db", str(db)).returncode == 0
    taken = tmp_path / "status.sock"
    taken.write_text("not a socket")
    result = subprocess.run(
        [sys.executable, "-m", "neuraldrive_gw", "serve", "--db", str(db),
         "--listen", f"127.0.0.1:{free_port()}"],
        env={**env(), "NOTIFY_SOCKET": notify.path,
             "NEURALDRIVE_GW_PATHS_STATUS_SOCKET": str(taken),
             "NEURALDRIVE_GW_PATHS_MASTER_KEY_FILE": str(tmp_path / "none")},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "start-up failed: status socket" in result.stderr and "is not a socket" in result.stderr
    assert taken.read_text() == "not a socket"
    notify.sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        notify.expect("READY=1")
