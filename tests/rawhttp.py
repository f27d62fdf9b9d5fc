"""A deliberately dumb HTTP/1.1 client over a raw socket, for requests no real client sends.

aiohttp/yarl normalise targets (`%75` → `u`, dot segments, fragments), which would hide
exactly the tricks the gateway must refuse; this sends the bytes we write.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]          # lower-cased names; the last value wins
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(base_url: str, method: str, target: str | bytes,
                      headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                      *, content_length: bool = True, timeout: float = 10.0) -> RawResponse:
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        target_bytes = target if isinstance(target, bytes) else target.encode("latin-1")
        lines = [method.encode() + b" " + target_bytes + b" HTTP/1.1",
                 f"Host: {parts.hostname}:{parts.port}".encode(), b"Connection: close"]
        for name, value in headers or []:
            lines.append(f"{name}: {value}".encode("latin-1"))
        if content_length and (body or method in ("POST", "PUT")):
            lines.append(f"Content-Length: {len(body)}".encode())
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(_read_response(reader, head_only=method == "HEAD"), timeout)
    finally:
        writer.close()
    return parse_response(data)


async def _read_response(reader: asyncio.StreamReader, head_only: bool) -> bytes:
    """Read one response: up to its Content-Length when it has one, else to EOF."""
    head = await reader.readuntil(b"\r\n\r\n")
    if head_only:
        return head
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return head + await reader.readexactly(int(value))
    return head + await reader.read()


def parse_response(data: bytes) -> RawResponse:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
    else:
        length = headers.get("content-length")
        body = rest[:int(length)] if length is not None and rest else rest
    return RawResponse(status, headers, body)
