"""Reading a request body: identity encoding only, a size cap, a timeout (SPEC §5 headers).

The body is read as raw bytes from the socket; aiohttp's own helpers are avoided because
they decode with the declared charset and transparently gunzip, which would make the
gateway see a different body than Ollama (which ignores Content-Type and never gunzips).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .errors import BodyTimeout, BodyTooLarge, ClientDisconnected, UnsupportedEncoding

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def read_body(request: web.BaseRequest, *, max_bytes: int, timeout_s: float) -> bytes:
    """The raw body, or 415 (any Content-Encoding but identity), 413 (over the cap), 408."""
    headers = request.headers
    if "Content-Encoding" in headers:
        for value in headers.getall("Content-Encoding"):
            if value.strip().lower() not in ("", "identity"):
                raise UnsupportedEncoding()
    content = request.content
    if content.is_eof():
        # The whole body came with the headers (the usual case for a chat request):
        # take it without a timer or a wait. (A client that sends its body at once does
        # not wait for a 100 Continue either.)
        body = content.read_nowait()
        if len(body) > max_bytes:
            raise BodyTooLarge()
        return body
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge()          # before reading, and without a 100 Continue
    if headers.get("Expect", "").lower() == "100-continue" and \
            request.version >= (1, 1) and request.transport is not None:
        # We told aiohttp not to answer Expect itself (see app.py), so the client only
        # sends the body once we know it is acceptable.
        request.transport.write(_CONTINUE)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise BodyTooLarge()
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout() from None
    except ConnectionResetError:
        raise ClientDisconnected() from None
    return b"".join(chunks)
