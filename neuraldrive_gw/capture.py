"""The answer text a client received, reconstructed from any dialect (for the prompt log).

Fed the exact bytes the gateway sent to the client — NDJSON lines, SSE events, or one
buffered JSON body — it keeps only the generated text, up to `max_chars`:

    api_chat         message.content            api_generate    response
    v1_chat          choices[].delta.content    (buffered: choices[].message.content)
    v1_completions   choices[].text
    v1_responses     response.output_text.delta events (buffered: output[].content[].text)
    v1_messages      content_block_delta text_delta (buffered: content[].text)

Embeddings have no text. Used only for keys that opted in, so other requests pay nothing.
Lines are buffered up to a bound; anything unparsable is skipped, never an error.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE = 1 << 20


class TextCapture:
    def __init__(self, route: str, max_chars: int):
        self.route = route
        self.max_chars = max_chars
        self.truncated = False
        self._parts: list[str] = []
        self._size = 0
        self._pending = b""

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, data: bytes) -> None:
        """Streamed bytes (NDJSON or SSE), in any chunking."""
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        if len(self._pending) > MAX_LINE:
            self._pending = b""
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:"):
                line = line[5:].strip()
            if line.startswith(b"{"):
                self._frame(line, streamed=True)

    def body(self, data: bytes) -> None:
        """A non-streamed answer."""
        self._frame(data, streamed=False)

    def _frame(self, raw: bytes, *, streamed: bool) -> None:
        try:
            obj = json.loads(raw)
        except ValueError:
            return
        if isinstance(obj, dict):
            for piece in _texts(self.route, obj, streamed):
                self._add(piece)

    def _add(self, piece: str) -> None:
        room = self.max_chars - self._size
        if room <= 0:
            self.truncated = self.truncated or bool(piece)
            return
        if len(piece) > room:
            piece, self.truncated = piece[:room], True
        self._parts.append(piece)
        self._size += len(piece)


def _texts(route: str, obj: dict[str, Any], streamed: bool) -> list[str]:
    out: list[Any] = []
    if route == "api_chat":
        out.append(_get(obj, "message", "content"))
    elif route == "api_generate":
        out.append(obj.get("response"))
    elif route in ("v1_chat", "v1_completions"):
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict):
                out.append(choice.get("text") if route == "v1_completions" else
                           _get(choice, "delta" if streamed else "message", "content"))
    elif route == "v1_responses":
        if obj.get("type") == "response.output_text.delta":
            out.append(obj.get("delta"))
        elif not streamed:
            for item in obj.get("output") or []:
                for part in (item.get("content") or []) if isinstance(item, dict) else []:
                    if isinstance(part, dict) and part.get("type") == "output_text":
                        out.append(part.get("text"))
    elif route == "v1_messages":
        if obj.get("type") == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                out.append(delta.get("text"))
        elif not streamed:
            for block in obj.get("content") or []:
                if isinstance(block, dict) and block.get("type") == "text":
                    out.append(block.get("text"))
    return [piece for piece in out if isinstance(piece, str) and piece]


def _get(obj: dict[str, Any], outer: str, inner: str) -> Any:
    value = obj.get(outer)
    return value.get(inner) if isinstance(value, dict) else None
