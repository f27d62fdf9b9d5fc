"""Every error path's exact body, in each dialect (SPEC §9). The request id is normalised."""

from __future__ import annotations

import json
import uuid

import pytest

from conftest import ALLOWED_MODEL, OTHER_MODEL, Gateway
from neuraldrive_gw.devtools.fake_ollama import Fault
from neuraldrive_gw.pipeline import new_request_id
from rawhttp import raw_request

CHAT = json.dumps({"model": ALLOWED_MODEL, "messages": [], "stream": False})
DENIED = json.dumps({"model": OTHER_MODEL, "messages": [], "stream": False, "max_tokens": 5})


def ollama(message: str) -> dict:
    return {"error": f"{message} (request id: RID)"}


def openai(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": f"{message} (request id: RID)", "type": type_, "param": None,
                      "code": code}}


def anthropic(message: str, type_: str) -> dict:
    return {"type": "error", "error": {"type": type_, "message": f"{message} (request id: RID)"},
            "request_id": "RID"}


CASES = [
    # id, method, target, key?, extra headers, body, status, expected body
    ("ollama-400-target", "GET", "/api/%74ags", True, [], "", 400,
     ollama("request target is not in canonical form")),
    ("ollama-400-json", "POST", "/api/chat", True, [], "{", 400, None),
    ("ollama-400-two-credentials", "GET", "/api/tags", True, [("x-api-key", "k")], "", 400,
     ollama("more than one credential supplied; send exactly one")),
    ("ollama-401", "GET", "/api/tags", False, [], "", 401, ollama("invalid or missing API key")),
    ("ollama-403-blocked", "POST", "/api/pull", True, [], "{}", 403,
     ollama("this endpoint is not available through the gateway")),
    ("ollama-403-model", "POST", "/api/chat", True, [], DENIED, 403,
     ollama("model not available for this key")),
    ("ollama-404", "GET", "/api/nothing", False, [], "", 404, ollama("not found")),
    ("ollama-405", "GET", "/api/chat", False, [], "", 405, ollama("method not allowed")),
    ("ollama-413", "POST", "/api/chat", True, [("Content-Length", "99999999")], "", 413,
     ollama("request body too large")),
    ("ollama-415", "POST", "/api/chat", True, [("Content-Encoding", "gzip")], CHAT, 415,
     ollama("Content-Encoding is not supported; send the body uncompressed")),
    ("openai-401", "GET", "/v1/models", False, [], "", 401,
     openai("invalid or missing API key", "invalid_request_error", "invalid_api_key")),
    ("openai-403-model", "POST", "/v1/chat/completions", True, [], DENIED, 403,
     openai("model not available for this key", "permission_error", "model_not_allowed")),
    ("openai-404", "GET", "/v1/nothing", False, [], "", 404,
     openai("not found", "invalid_request_error", "unknown_url")),
    ("openai-405", "GET", "/v1/chat/completions", False, [], "", 405,
     openai("method not allowed", "invalid_request_error", "method_not_allowed")),
    ("openai-400-key-case", "POST", "/v1/chat/completions", True, [],
     '{"model":"%s","messages":[],"Model":"x"}' % ALLOWED_MODEL, 400, None),
    ("anthropic-401", "POST", "/v1/messages", False, [], DENIED, 401,
     anthropic("invalid or missing API key", "authentication_error")),
    ("anthropic-403-model", "POST", "/v1/messages", True, [], DENIED, 403,
     anthropic("model not available for this key", "permission_error")),
    ("anthropic-404", "POST", "/v1/messages/count_tokens", False, [], "{}", 404,
     anthropic("not found", "not_found_error")),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_error_bodies(gw: Gateway, case: tuple) -> None:
    _, method, target, with_key, headers, body, status, expected = case
    sent = list(headers) + ([("Authorization", f"Bearer {gw.keys.acme}")] if with_key else [])
    length = not any(name == "Content-Length" for name, _ in headers)
    response = await raw_request(gw.url, method, target, sent, body.encode(), content_length=length)
    assert response.status == status
    assert response.headers["content-type"].startswith("application/json")
    rid = response.headers["x-request-id"]
    assert uuid.UUID(rid).version == 4 and str(uuid.UUID(rid)) == rid      # SPEC §3 step 1
    data = json.loads(response.body.decode().replace(rid, "RID"))
    if expected is None:        # a parser message: pin the shape and the id, not the wording
        message = data["error"] if isinstance(data["error"], str) else data["error"]["message"]
        assert message.endswith("(request id: RID)") and "invalid" in message
    else:
        assert data == expected
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert response.headers["allow"]


async def test_upstream_failures(make_gateway) -> None:
    gw = await make_gateway(upstream__read_timeout_s=0.5)
    key = [("Authorization", f"Bearer {gw.keys.acme}")]
    expectations = [
        (Fault("status", status=500, path="/api/chat", times=1), 502,
         ollama("the model server returned an error")),
        (Fault("status", status=503, path="/api/chat", times=1), 503,
         ollama("the model server is busy; try again later")),
        (Fault("status", status=400, path="/api/chat", times=1), 400,
         ollama("the model server rejected the request")),
        (Fault("status", status=404, path="/api/chat", times=1), 403,
         ollama("model not available for this key")),
        (Fault("redirect", path="/api/chat", times=1), 502,
         ollama("the model server returned an error")),
        (Fault("hang_before_headers", path="/api/chat", times=1), 504,
         ollama("the model server did not answer in time")),
    ]
    for fault, status, expected in expectations:
        gw.fake.add_fault(fault)
        response = await raw_request(gw.url, "POST", "/api/chat", key, CHAT.encode())
        assert response.status == status, fault
        data = json.loads(response.body.decode().replace(response.headers["x-request-id"], "RID"))
        assert data == expected, fault
        if status == 503:
            assert response.headers["retry-after"]


async def test_body_timeout(make_gateway) -> None:
    gw = await make_gateway(limits__body_timeout_s=0.2)
    response = await raw_request(
        gw.url, "POST", "/api/chat",
        [("Authorization", f"Bearer {gw.keys.acme}"), ("Content-Length", "100")], b"{",
        content_length=False)
    assert response.status == 408
    data = json.loads(response.body.decode().replace(response.headers["x-request-id"], "RID"))
    assert data == ollama("request body not received in time")


def test_request_ids_are_distinct_uuid4s() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for rid in list(ids)[:500]:
        parsed = uuid.UUID(rid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == rid
