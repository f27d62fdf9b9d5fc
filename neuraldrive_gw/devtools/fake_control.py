"""The fake Ollama's control API under `/_fake/`, for tests that run it as a subprocess.

    GET    /_fake/requests   recorded requests (method, path, raw_path, headers, body as text,
                             json, at) in arrival order
    DELETE /_fake/requests   forget them
    GET    /_fake/faults     faults in force, `times` = applications left
    POST   /_fake/faults     add one: a JSON object of `Fault` fields (400 if invalid)
    DELETE /_fake/faults     clear them
    GET    /_fake/streams    {"active_streams": n, "disconnects": [monotonic times]}

These requests are never recorded and never faulted. The gateway cannot reach them: they
are not in its route table.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .fake_ollama import FakeOllama


async def control(fake: FakeOllama, request: web.Request) -> web.Response:
    from .fake_ollama import Fault  # deferred: fake_ollama imports this module

    route = (request.method, request.path)
    if route == ("GET", "/_fake/requests"):
        return web.json_response([r.to_json() for r in fake.requests])
    if route == ("DELETE", "/_fake/requests"):
        fake.requests.clear()
        return web.json_response({"cleared": True})
    if route == ("GET", "/_fake/faults"):
        return web.json_response([dataclasses.asdict(f) for f in fake.active_faults()])
    if route == ("POST", "/_fake/faults"):
        try:
            fault = Fault(**await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        fake.add_fault(fault)
        return web.json_response(dataclasses.asdict(fault), status=201)
    if route == ("DELETE", "/_fake/faults"):
        fake.clear_faults()
        return web.json_response({"cleared": True})
    if route == ("GET", "/_fake/streams"):
        return web.json_response({"active_streams": fake.active_streams,
                                  "disconnects": fake.disconnects})
    return web.Response(status=404, text="404 page not found")
