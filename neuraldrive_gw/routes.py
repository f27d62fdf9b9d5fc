"""The route table and request-target canonicalisation (SPEC §4, §5).

Routing is decided here, on the raw request target, never by aiohttp's router: aiohttp
matches the raw path while Ollama's gin routes the percent-decoded one, so `/api%2Fpull`
would be "unknown" to one and the pull handler to the other. We refuse every target that
is not already canonical (no `%`, no dot segments, no `//`, ...), which makes the raw, the
decoded and the forwarded path one and the same string.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import MethodNotAllowed, NotCanonical, RouteNotFound


@dataclass(frozen=True, slots=True)
class Route:
    name: str                       # shaping/metering id, e.g. "api_chat"
    methods: tuple[str, ...]
    public: bool = False            # the gateway's own health routes: no key
    proxied: bool = True
    body: bool = False              # carries a JSON body to validate and re-serialise
    inference: bool = False         # takes a GPU slot (SPEC §8)
    streams: bool = False           # may answer with NDJSON/SSE, relayed frame by frame
    listing: str | None = None      # "tags" | "ps" | "models": filtered to the caller's models
    path_model: bool = False        # the model is the last path segment (/v1/models/{model})


_GET = ("GET", "HEAD")
_POST = ("POST",)

ROUTES: dict[str, Route] = {
    "/": Route("root", _GET),
    "/api/version": Route("api_version", _GET),
    "/api/tags": Route("api_tags", _GET, listing="tags"),
    "/api/ps": Route("api_ps", _GET, listing="ps"),
    "/api/show": Route("api_show", _POST, body=True),
    "/api/chat": Route("api_chat", _POST, body=True, inference=True, streams=True),
    "/api/generate": Route("api_generate", _POST, body=True, inference=True, streams=True),
    "/api/embed": Route("api_embed", _POST, body=True, inference=True),
    "/api/embeddings": Route("api_embeddings", _POST, body=True, inference=True),
    "/v1/models": Route("v1_models", _GET, listing="models"),
    "/v1/chat/completions": Route("v1_chat", _POST, body=True, inference=True,
                                  streams=True),
    "/v1/completions": Route("v1_completions", _POST, body=True, inference=True,
                                  streams=True),
    "/v1/embeddings": Route("v1_embeddings", _POST, body=True, inference=True),
    "/v1/responses": Route("v1_responses", _POST, body=True, inference=True,
                                  streams=True),
    "/v1/messages": Route("v1_messages", _POST, body=True, inference=True,
                                  streams=True),
    "/health": Route("health", _GET, public=True, proxied=False),
    "/healthz": Route("healthz", _GET, public=True, proxied=False),
}
MODEL_ROUTE = Route("v1_model", _GET, path_model=True)
MODEL_PREFIX = "/v1/models/"

# Model management happens on the appliance, never through the gateway: refused for
# every key (master included) and every method.
BLOCKED_EXACT = frozenset({
    "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
    "/api/me", "/api/signout", "/api/blobs", "/api/user", "/api/experimental",
})
BLOCKED_PREFIXES = ("/api/blobs/", "/api/user/", "/api/experimental/")

# One segment: RFC 3986 pchar minus "%" (no escapes at all) and ";" (path parameters).
_SEGMENT = r"[A-Za-z0-9._~:@!$&'()*+,=-]+"
_CANONICAL = re.compile(rf"/(?:{_SEGMENT}(?:/{_SEGMENT})*)?")


@dataclass(frozen=True, slots=True)
class Target:
    path: str
    route: Route | None             # None: a hard-blocked endpoint (403 once authenticated)
    model: str | None = None        # the path model of /v1/models/{model}


# Both are pure functions of strings, memoised: a client sends the same few targets.
@functools.lru_cache(maxsize=512)
def canonical_path(raw_target: str) -> str:
    """The path of a request target, or NotCanonical. The query string is dropped.

    Accepted paths are ASCII, start with `/`, and contain no `%`, `;`, `\\`, `#`, control
    bytes, empty segments (`//`, trailing `/`) or `.`/`..` segments. Absolute-form targets
    (`http://host/path`) and `*` are not canonical either.
    """
    path = raw_target.split("?", 1)[0]
    if not _CANONICAL.fullmatch(path):
        raise NotCanonical()
    if "." in path and any(seg in (".", "..") for seg in path.split("/")):
        raise NotCanonical()
    return path


@functools.lru_cache(maxsize=512)
def resolve(method: str, path: str) -> Target:
    """Map a canonical path and method to a Target, or raise RouteNotFound/MethodNotAllowed.

    Blocked endpoints resolve for every method (route None) so that they get 401 without
    a key and 403 with one, never a 404/405 that would differ by method.
    """
    route = ROUTES.get(path)
    model = None
    if route is None:
        if path in BLOCKED_EXACT or path.startswith(BLOCKED_PREFIXES):
            return Target(path, None)
        if path.startswith(MODEL_PREFIX) and "/" not in path[len(MODEL_PREFIX):]:
            route, model = MODEL_ROUTE, path[len(MODEL_PREFIX):]
        else:
            raise RouteNotFound()
    if method not in route.methods:
        raise MethodNotAllowed(route.methods)
    return Target(path, route, model)
