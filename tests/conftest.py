"""Shared fixtures: a real fake-Ollama server, a real SQLite file, the real gateway app.

(aiohttp test servers listen on 127.0.0.1 by default; Debian's pytest-aiohttp 1.0.4 must
not be given `host=`, which it would pass on to the request handler.)

Everything listens on 127.0.0.1 (pytest-aiohttp's test servers). Time that matters to the
gateway (expiry, TTLs) comes from a FakeClock the tests move; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import click
import pytest
from click.testing import CliRunner

import faults

from neuraldrive_gw import admin, store
from neuraldrive_gw.app import SERVER_OPTIONS, create_app
from neuraldrive_gw.appkeys import pipeline_of
from neuraldrive_gw.config import config_from_mapping
from neuraldrive_gw.devtools.fake_ollama import FakeOllama
from neuraldrive_gw.pipeline import Pipeline

MASTER_KEY = "nd-" + "M" * 32
ALLOWED_MODEL = "llama3.2:1b"        # on tenant "acme"'s allowlist
OTHER_MODEL = "qwen2.5:0.5b"         # installed, not on acme's allowlist
EMBED_MODEL = "nomic-embed-text:latest"


def pytest_report_header() -> list[str]:
    return [f"aiohttp {aiohttp.__version__} from {os.path.dirname(aiohttp.__file__)}"]


def cli_runner() -> CliRunner:
    """A CliRunner keeping stderr apart: click 8.1 mixes it into stdout unless told not
    to; 8.2+ always keeps both (and has no mix_stderr argument)."""
    try:
        return CliRunner(mix_stderr=False)      # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


class FakeClock:
    """Starts at the real time and only moves when a test says so."""

    def __init__(self) -> None:
        self._mono = 1000.0
        self._wall = time.time()

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += seconds


@dataclass
class Keys:
    acme: str            # tenant "acme": allowlist [ALLOWED_MODEL, EMBED_MODEL]
    all_models: str      # tenant "open": allow_all_models
    master: str = MASTER_KEY


@dataclass
class Gateway:
    url: str
    pipeline: Pipeline
    fake: FakeOllama
    keys: Keys
    db_path: str
    key_file: str
    clock: FakeClock
    fake_url: str = ""

    @property
    def fake_host(self) -> str:
        return self.fake_url.split("://", 1)[1]

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.keys.acme}"}


def make_db(path: str) -> Keys:
    store.init_db(path)
    conn = store.open_db(path)
    try:
        admin.create_tenant(conn, "acme", models=[ALLOWED_MODEL, EMBED_MODEL])
        admin.create_tenant(conn, "open", allow_all_models=True)
        acme, _ = admin.create_key(conn, "acme", label="acme test key")
        everything, _ = admin.create_key(conn, "open", label="all models")
    finally:
        conn.close()
    return Keys(acme=acme, all_models=everything)


def write_key_file(path: str, content: str, mode: int = 0o600) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only, else skipped), unmounted afterwards whatever happened."""
    with faults.size_capped_tmpfs(tmp_path) as mnt:
        yield mnt


@pytest.fixture
async def fake(aiohttp_server: Any) -> AsyncIterator[tuple[FakeOllama, str]]:
    fake = FakeOllama()
    server = await aiohttp_server(fake.app)
    yield fake, str(server.make_url("")).rstrip("/")


@pytest.fixture(scope="session")
def keys_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Keys]:
    """One DB with Argon2 hashes made once per session (hashing is deliberately slow)."""
    path = str(tmp_path_factory.mktemp("db") / "template.db")
    return path, make_db(path)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(aiohttp_server: Any, fake: tuple[FakeOllama, str], tmp_path: Any,
                       keys_db: tuple[str, Keys]) -> GatewayFactory:
    fake_app, fake_url = fake

    async def factory(**overrides: Any) -> Gateway:
        template, keys = keys_db
        db_path = str(tmp_path / "gw.db")
        if not os.path.exists(db_path):
            with open(template, "rb") as src, open(db_path, "wb") as dst:
                dst.write(src.read())
        key_file = str(tmp_path / "api.key")
        if not os.path.exists(key_file):
            write_key_file(key_file, MASTER_KEY + "\n")
        data: dict[str, Any] = {
            "upstream": {"url": fake_url},
            "paths": {"database": db_path, "master_key_file": key_file,
                      "status_socket": str(tmp_path / "status.sock")},
        }
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split("__")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = value
        clock = FakeClock()
        app = create_app(config_from_mapping(data, env={}), clock=clock)
        server = await aiohttp_server(app, **SERVER_OPTIONS)
        pipeline = pipeline_of(app)
        await asyncio.wait_for(pipeline.policy.catalog.discovered.wait(), 10)
        return Gateway(str(server.make_url("")).rstrip("/"), pipeline, fake_app, keys,
                       db_path, key_file, clock, fake_url)

    return factory


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def run_cli(gw: Gateway, command: click.Command, *args: str) -> None:
    """Run the CLI on the gateway's database, as an operator would, and wait (bounded)
    until the daemon has loaded the change (it polls the auth revision every 0.25 s)."""
    before = gw.pipeline.auth.verifier.snapshot.revision
    result = await asyncio.to_thread(cli_runner().invoke, command, [*args, "--db", gw.db_path])
    assert result.exit_code == 0, result.output
    deadline = time.monotonic() + 2
    while gw.pipeline.auth.verifier.snapshot.revision == before:
        assert time.monotonic() < deadline, "the change did not reach the gateway"
        await asyncio.sleep(0.02)

