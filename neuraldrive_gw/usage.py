"""Token counts of an answer, and reading them from a non-streaming body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .framing import loads, tail_members

MAX_PARSED_BODY = 1 << 20     # a larger body is first read from its tail
_TAIL = 64 * 1024             # the tail of a larger body read for its counts


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one answer (prompt = input, completion = output)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---------------------------------------------------------------------------------------------
# Counts from parsed JSON: never raise on what upstream sends.

def token_count(value: object) -> int | None:
    """A token count: a non-negative int (bools excluded), else None."""
    return value if type(value) is int and value >= 0 else None


def usage_in(obj: object, prompt_key: str, completion_key: str | None) -> Usage | None:
    """Usage from a dict's count fields, absent or invalid counts being 0; None if no dict."""
    if not isinstance(obj, dict):
        return None
    completion = token_count(obj.get(completion_key)) if completion_key else 0
    return Usage(token_count(obj.get(prompt_key)) or 0, completion or 0)


# route → (where the counts are, prompt field, completion field)
_BODY_USAGE: dict[str, tuple[str | None, str, str | None]] = {
    "api_chat": (None, "prompt_eval_count", "eval_count"),
    "api_generate": (None, "prompt_eval_count", "eval_count"),
    "api_embed": (None, "prompt_eval_count", None),
    "v1_chat": ("usage", "prompt_tokens", "completion_tokens"),
    "v1_completions": ("usage", "prompt_tokens", "completion_tokens"),
    "v1_embeddings": ("usage", "prompt_tokens", None),
    "v1_responses": ("usage", "input_tokens", "output_tokens"),
    "v1_messages": ("usage", "input_tokens", "output_tokens"),
}


def usage_from_body(route: str, body: bytes) -> Usage | None:
    """Usage of a non-streaming answer; None when the route's answers carry no counts
    (`/api/embeddings`, `/api/show`, ...), for error bodies, and when the body isn't a
    JSON object. Counts that aren't non-negative ints count as absent (0).

    Bodies over 1 MiB (embedding batches, a `context` array) are not parsed whole if their
    counts can be read from the members after the last large value (Ollama writes them
    last): a multi-megabyte json.loads would stall the event loop.
    """
    where = _BODY_USAGE.get(route)
    if where is None:
        return None
    container, prompt_key, completion_key = where
    obj: Any = None
    if len(body) > MAX_PARSED_BODY:
        obj = tail_members(body[-_TAIL:])
        if (container or prompt_key) not in obj:
            obj = None
    if obj is None:
        obj = loads(body)
    if not isinstance(obj, dict) or obj.get("error"):
        return None
    return usage_in(obj.get(container) if container else obj, prompt_key, completion_key)
