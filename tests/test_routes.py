"""Route table and target canonicalisation, as pure functions (SPEC §4, §5)."""

from __future__ import annotations

import pytest

from neuraldrive_gw.errors import MethodNotAllowed, NotCanonical, RouteNotFound
from neuraldrive_gw.routes import ROUTES, canonical_path, resolve


@pytest.mark.parametrize("target,path", [
    ("/", "/"),
    ("/api/chat", "/api/chat"),
    ("/api/chat?stream=false", "/api/chat"),
    ("/v1/models/llama3.2:1b", "/v1/models/llama3.2:1b"),
    ("/v1/models/hf.co", "/v1/models/hf.co"),
])
def test_canonical_targets(target: str, path: str) -> None:
    assert canonical_path(target) == path


@pytest.mark.parametrize("target", [
    "", "*", "api/chat", "//api/chat", "/api//chat", "/api/chat/", "/api/./chat", "/api/../pull",
    "/..", "/.", "/api/%70ull", "/api%2Fpull", "/api/pull;x", "/api\\pull", "/api/pull#x",
    "/api/ch\u00e4t", "/api/chat\x00", "/api/chat\t", "/api/ chat", "http://h/api/chat",
    "/api/chat\x7f", "/api/\"chat", "/api/<chat>", "/api/{chat}", "/api/ch|at",
])
def test_non_canonical_targets(target: str) -> None:
    with pytest.raises(NotCanonical):
        canonical_path(target)


def test_every_get_route_answers_head() -> None:
    for path, route in ROUTES.items():
        if "GET" in route.methods:
            assert "HEAD" in route.methods, path


@pytest.mark.parametrize("path", [
    "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/me",
    "/api/signout", "/api/blobs/sha256:00", "/api/user/keys/k", "/api/experimental/web_fetch",
])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "HEAD", "OPTIONS"])
def test_blocked_for_every_method(path: str, method: str) -> None:
    assert resolve(method, path).route is None


def test_wrong_method_lists_allowed_ones() -> None:
    with pytest.raises(MethodNotAllowed) as caught:
        resolve("OPTIONS", "/api/tags")
    assert caught.value.headers == {"Allow": "GET, HEAD"}


@pytest.mark.parametrize("path", ["/api/status", "/v1/images/generations", "/v1/models/a/b",
                                  "/v1/messages/count_tokens", "/API/CHAT", "/v1/audio/transcriptions"])
def test_unknown_routes(path: str) -> None:
    with pytest.raises(RouteNotFound):
        resolve("POST", path)


def test_model_route_takes_the_last_segment() -> None:
    target = resolve("GET", "/v1/models/llama3:latest")
    assert target.route is not None and target.route.path_model and target.model == "llama3:latest"


def test_exactly_the_generating_routes_stream() -> None:
    streaming = {route.name for route in ROUTES.values() if route.streams}
    assert streaming == {"api_chat", "api_generate", "v1_chat", "v1_completions",
                         "v1_responses", "v1_messages"}
