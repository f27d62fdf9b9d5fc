"""A small client for the gateway's status socket, for the appliance TUI and scripts.

Standard library only, so the TUI (Textual + httpx) can import it without pulling in the
gateway's dependencies:

    from neuraldrive_gw.status_client import StatusUnavailable, get_status, fetch_status

    try:
        status = get_status()                     # blocking, e.g. in a worker thread
        status = await fetch_status()             # or from the TUI's event loop
    except StatusUnavailable as exc:
        show(f"gateway: {exc}")                   # not running, no permission, timeout

httpx users may also talk to the socket directly with
`httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path), base_url="http://gw")`.
Fields are documented in docs/status.md. Reading needs membership of the socket's group
(`neuraldrive-api`) or root.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from typing import Any

DEFAULT_SOCKET = "/run/neuraldrive-gw/status.sock"
DEFAULT_TIMEOUT_S = 2.0


class StatusUnavailable(Exception):
    """The status could not be read; the message says why in operator's terms."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _why(path: str, exc: BaseException) -> StatusUnavailable:
    if isinstance(exc, FileNotFoundError):
        return StatusUnavailable(f"no status socket at {path}: is neuraldrive-gw running?")
    if isinstance(exc, PermissionError):
        return StatusUnavailable(f"permission denied on {path}: join group neuraldrive-api")
    if isinstance(exc, ConnectionRefusedError):
        return StatusUnavailable(f"nothing listens on {path}: neuraldrive-gw is not running")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return StatusUnavailable(f"no answer from {path} in time: the gateway may be stuck")
    return StatusUnavailable(f"cannot read {path}: {exc}")


def get(path_on_socket: str, socket_path: str = DEFAULT_SOCKET,
        timeout: float = DEFAULT_TIMEOUT_S) -> bytes:
    """GET a path over the socket, blocking; the body of a 200 answer."""
    conn = _UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request("GET", path_on_socket)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise _why(socket_path, exc) from None
    finally:
        conn.close()
    if response.status != 200:
        raise StatusUnavailable(f"{path_on_socket} answered {response.status}")
    return body


def get_status(socket_path: str = DEFAULT_SOCKET,
               timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The /status document (blocking)."""
    data = json.loads(get("/status", socket_path, timeout))
    if not isinstance(data, dict):
        raise StatusUnavailable("/status did not answer a JSON object")
    return data


def get_metrics(socket_path: str = DEFAULT_SOCKET, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The /metrics text (blocking)."""
    return get("/metrics", socket_path, timeout).decode()


async def fetch(path_on_socket: str, socket_path: str = DEFAULT_SOCKET,
                timeout: float = DEFAULT_TIMEOUT_S) -> bytes:
    """GET a path over the socket from an asyncio loop; the body of a 200 answer."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(socket_path)
            try:
                writer.write(f"GET {path_on_socket} HTTP/1.1\r\nHost: localhost\r\n"
                             "Connection: close\r\n\r\n".encode())
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
                await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        raise _why(socket_path, exc) from None
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or status_line[1] != b"200":
        raise StatusUnavailable(f"{path_on_socket} answered {status_line[1:2]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return body


async def fetch_status(socket_path: str = DEFAULT_SOCKET,
                       timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    data = json.loads(await fetch("/status", socket_path, timeout))
    if not isinstance(data, dict):
        raise StatusUnavailable("/status did not answer a JSON object")
    return data


async def fetch_metrics(socket_path: str = DEFAULT_SOCKET,
                        timeout: float = DEFAULT_TIMEOUT_S) -> str:
    return (await fetch("/metrics", socket_path, timeout)).decode()


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)
