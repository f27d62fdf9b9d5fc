"""A reloaded configuration takes effect on the running gateway (SPEC §11; reload.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp

from conftest import ALLOWED_MODEL, Gateway
from neuraldrive_gw import reload
from neuraldrive_gw.config import Config
from neuraldrive_gw.devtools.fake_ollama import FakeOllama

CHAT = {"model": ALLOWED_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}


def changed(config: Config, **sections: dict[str, Any]) -> Config:
    """`config` with some fields of some sections replaced: changed(c, limits={...})."""
    return dataclasses.replace(config, **{
        name: dataclasses.replace(getattr(config, name), **fields)
        for name, fields in sections.items()})


async def chat(http: aiohttp.ClientSession, gw: Gateway, body: dict[str, Any] = CHAT) -> int:
    async with http.post(gw.url + "/api/chat", json=body, headers=gw.auth()) as r:
        await r.read()
        return r.status


async def test_limits_and_key_defaults_apply_to_the_next_request(
        gw: Gateway, http: aiohttp.ClientSession) -> None:
    assert await chat(http, gw) == 200
    old = gw.pipeline.config
    defaults = dataclasses.replace(old.limits.key_defaults, requests_per_min=2)
    assert reload.apply(gw.pipeline, changed(old, limits={"key_defaults": defaults,
                                                           "num_predict_cap": 7})) == []
    assert await chat(http, gw) == 200     # the minute's first request was already used
    forwarded = [r for r in gw.fake.requests if r.path == "/api/chat"][-1]
    assert forwarded.json["options"]["num_predict"] == 7
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=gw.auth()) as r:
        assert r.status == 429 and r.headers["x-ratelimit-limit-requests"] == "2"


async def test_a_new_upstream_is_used_at_once(gw: Gateway, http: aiohttp.ClientSession,
                                              aiohttp_server: Any) -> None:
    other = FakeOllama()
    server = await aiohttp_server(other.app)
    url = str(server.make_url("")).rstrip("/")
    reload.apply(gw.pipeline, changed(gw.pipeline.config, upstream={"url": url}))
    assert await chat(http, gw) == 200
    assert [r.path for r in other.requests] == ["/api/chat"]
    assert not [r for r in gw.fake.requests if r.path == "/api/chat"]


async def test_a_lower_auth_failure_limit_keeps_the_failures_counted(
        gw: Gateway, http: aiohttp.ClientSession) -> None:
    bad = {"Authorization": "Bearer nd-" + "x" * 32}
    for _ in range(3):
        async with http.get(gw.url + "/api/tags", headers=bad) as r:
            assert r.status == 401
    reload.apply(gw.pipeline, changed(gw.pipeline.config,
                                      limits={"auth_failures_per_ip_per_min": 3}))
    async with http.get(gw.url + "/api/tags", headers=gw.auth()) as r:
        assert r.status == 429


async def test_cloud_models_and_more_model_slots(gw: Gateway) -> None:
    config = dataclasses.replace(gw.pipeline.config, allow_cloud_models=True)
    reload.apply(gw.pipeline, changed(config, upstream={"max_parallel": 5,
                                                        "discovery_ttl_s": 600.0}))
    assert gw.pipeline.policy.allow_cloud_models is True
    assert gw.pipeline.admission.queue.max_parallel == 5
    assert gw.pipeline.policy.catalog.ttl_s == 600.0


async def test_sections_bound_to_open_resources_keep_their_running_values(
        gw: Gateway, http: aiohttp.ClientSession) -> None:
    old = gw.pipeline.config
    new = changed(old, listen={"port": 1}, paths={"database": "/nonexistent.db"},
                  audit={"max_queued": 5}, prompt_logging={"redact_hook": "x:y"},
                  limits={"max_body_bytes": 10})
    assert reload.apply(gw.pipeline, new) == ["listen", "paths", "audit", "prompt_logging"]
    running = gw.pipeline.config
    assert (running.listen, running.paths, running.audit) == (old.listen, old.paths, old.audit)
    assert running.limits.max_body_bytes == 10                  # the rest did change
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=gw.auth()) as r:
        assert r.status == 413
