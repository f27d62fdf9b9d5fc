"""The `x-ratelimit-*` headers (SPEC §9), spelt as OpenAI spells them, from token buckets."""

from __future__ import annotations

import math

from .buckets import TokenBucket


def _remaining(level: float) -> str:
    return str(math.floor(level)) if level > 0 else "0"


def openai_duration(seconds: float) -> str:
    """A wait as OpenAI spells it in `x-ratelimit-reset-*`: "250ms", "1.5s", "6m0s", "1h0m0s"
    (Go duration syntax, rounded up to the millisecond so it never promises too early)."""
    millis = max(0, math.ceil(round(seconds * 1000, 3))) if math.isfinite(seconds) else 0
    if millis < 1000:
        return f"{millis}ms" if millis else "0s"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}s" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def ratelimit_headers(requests: TokenBucket | None, tokens: list[TokenBucket], *,
                      requests_read: bool = False, tokens_read: bool = False) -> dict[str, str]:
    """`x-ratelimit-*` for the key's request bucket and the tightest token bucket;
    a dimension without a limit (an unlimited key, the master key by default) has
    no headers. (Every admitted request pays for these: spelt out, no loops.)
    `*_read`: those buckets were read and debited just now; their levels are current."""
    headers: dict[str, str] = {}
    if requests is not None:
        level, until_full = requests.state() if requests_read else requests.headroom()
        headers["x-ratelimit-limit-requests"] = requests.capacity_text
        headers["x-ratelimit-remaining-requests"] = _remaining(level)
        headers["x-ratelimit-reset-requests"] = openai_duration(until_full)
    if tokens:
        bucket = tokens[0]
        level, until_full = bucket.state() if tokens_read else bucket.headroom()
        for other in tokens[1:]:
            state = other.state() if tokens_read else other.headroom()
            if state[0] < level:
                bucket, (level, until_full) = other, state
        headers["x-ratelimit-limit-tokens"] = bucket.capacity_text
        headers["x-ratelimit-remaining-tokens"] = _remaining(level)
        headers["x-ratelimit-reset-tokens"] = openai_duration(until_full)
    return headers
