"""The admin CLI (init-db, tenants, keys) through click's CliRunner, plus one real process."""

from __future__ import annotations

import calendar
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from conftest import cli_runner

from neuraldrive_gw import keys as keyfmt
from neuraldrive_gw import store
from neuraldrive_gw.cli.db import init_db
from neuraldrive_gw.cli.keys import keys
from neuraldrive_gw.cli.tenants import tenants

LLAMA = "registry.ollama.ai/library/llama3:latest"
QWEN = "registry.ollama.ai/library/qwen2.5:0.5b"
CLOUD = "registry.ollama.ai/library/gpt-oss:120b-cloud"
TOKEN = re.compile(r"nd-[A-Za-z0-9]{32}")


@dataclass
class Cli:
    tmp: Path
    db: str
    config: str
    runner: CliRunner = field(default_factory=cli_runner)
    results: list[Result] = field(default_factory=list)

    def __call__(self, command: click.Command, *args: str, code: int = 0,
                 config: str | None = None) -> Result:
        result = self.runner.invoke(command, [*args, "--config", config or self.config],
                                    catch_exceptions=False)
        self.results.append(result)
        assert result.exit_code == code, (result.stdout, result.stderr)
        if code == 1:       # our own failures; 2 is also click's multi-line usage error
            assert result.stdout == ""
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert result.stderr.startswith("neuraldrive-gw: ")
        assert "Traceback" not in result.stdout + result.stderr
        return result

    def json(self, command: click.Command, *args: str) -> Any:
        return json.loads(self(command, *args, "--json").stdout)

    def fails(self, command: click.Command, *args: str) -> str:
        return str(self(command, *args, code=1).stderr.strip())

    def stored_hash(self, key_id: str) -> str:
        conn = sqlite3.connect(self.db)
        try:
            return str(conn.execute("SELECT hash FROM keys WHERE key_id = ?",
                                    (key_id,)).fetchone()[0])
        finally:
            conn.close()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    for name in list(os.environ):
        if name.startswith("NEURALDRIVE_GW_"):
            monkeypatch.delenv(name)
    db = str(tmp_path / "gw.db")
    config = tmp_path / "gw.yaml"
    config.write_text(f"paths:\n  database: {db}\n")
    runner = Cli(tmp_path, db, str(config))
    runner(init_db)
    yield runner
    # Whatever a test did: no output ever contained a hash, and no key id ever appeared as
    # part of a printed key except where a key was created or rotated.
    everything = "".join(r.stdout + r.stderr for r in runner.results)
    assert "$argon2" not in everything


# -- init-db --------------------------------------------------------------------------------


def test_init_db_creates_then_is_idempotent(cli: Cli) -> None:
    assert cli.results[0].stdout == f"{cli.db}: schema version {store.SCHEMA_VERSION}\n"
    assert cli(init_db).stdout == cli.results[0].stdout
    other = str(cli.tmp / "other.db")
    assert cli(init_db, "--db", other).stdout.startswith(f"{other}: schema version")
    assert os.stat(other).st_mode & 0o077 == 0


def test_init_db_errors(cli: Cli) -> None:
    assert "cannot create database" in cli.fails(init_db, "--db", str(cli.tmp / "no/dir/x.db"))
    conn = sqlite3.connect(cli.db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    assert cli.fails(init_db).endswith("database schema version 99 is newer than this "
                                       f"neuraldrive-gw ({store.SCHEMA_VERSION})")


def test_commands_refuse_a_missing_database_without_creating_it(cli: Cli) -> None:
    missing = str(cli.tmp / "missing.db")
    message = f"neuraldrive-gw: database {missing} does not exist; run `neuraldrive-gw init-db`"
    assert cli.fails(tenants, "list", "--db", missing) == message
    assert cli.fails(keys, "list", "--db", missing) == message
    assert not os.path.exists(missing)


def test_bad_config_exits_2(cli: Cli) -> None:
    bad = cli.tmp / "bad.yaml"
    bad.write_text("no_such_section: 1\n")
    result = cli(tenants, "list", code=2, config=str(bad))
    assert result.stderr.startswith("neuraldrive-gw: config error:")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


# -- tenants --------------------------------------------------------------------------------


def test_tenant_lifecycle(cli: Cli) -> None:
    created = cli.json(tenants, "create", "acme", "--model", "llama3", "--model",
                       "Qwen2.5:0.5b", "--weight", "2")
    assert created["name"] == "acme" and created["models"] == [LLAMA, QWEN]
    assert created["allow_all_models"] is False and created["weight"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created["created_at"])
    human = cli(tenants, "create", "open", "--allow-all-models").stdout
    assert "created tenant open" in human and "allow all models:  yes" in human

    listing = cli.json(tenants, "list")
    assert [t["name"] for t in listing] == ["acme", "open"]
    lines = cli(tenants, "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODELS", "WEIGHT", "KEYS", "CREATED"]
    assert [line.index(re.findall(r"\d{4}-", line)[0]) for line in lines[1:]] == \
        [lines[0].index("CREATED")] * 2                      # aligned columns
    assert lines[2].split()[1] == "all"

    shown = cli.json(tenants, "show", "acme")
    assert shown == {**created, "keys": 0, "active_keys": 0}
    human = cli(tenants, "show", "acme").stdout
    assert LLAMA in human and QWEN in human and "weight:            2" in human

    cli(tenants, "delete", "open")
    assert [t["name"] for t in cli.json(tenants, "list")] == ["acme"]


def test_empty_lists(cli: Cli) -> None:
    assert cli(tenants, "list").stdout == "no tenants\n"
    assert cli.json(tenants, "list") == []
    assert cli(keys, "list").stdout == "no keys\n"
    assert cli.json(keys, "list") == []


def test_set_models(cli: Cli) -> None:
    cli(tenants, "create", "acme", "--model", "llama3")
    assert cli.json(tenants, "set-models", "acme", "--add", "qwen2.5:0.5b")["models"] == \
        [LLAMA, QWEN]
    assert cli.json(tenants, "set-models", "acme", "--remove", "LLAMA3:latest")["models"] == \
        [QWEN]
    assert cli.json(tenants, "set-models", "acme", "--set", "llama3", "--set",
                    "library/llama3")["models"] == [LLAMA]
    flags = cli.json(tenants, "set-models", "acme", "--allow-all-models")
    assert flags["allow_all_models"] is True and flags["models"] == [LLAMA]
    cleared = cli.json(tenants, "set-models", "acme", "--no-allow-all-models", "--clear")
    assert cleared == {**flags, "allow_all_models": False, "models": []}
    assert "updated tenant acme" in cli(tenants, "set-models", "acme", "--add", "llama3").stdout


def test_set_models_errors(cli: Cli) -> None:
    cli(tenants, "create", "acme", "--model", "llama3")
    assert "does not list registry.ollama.ai/library/mistral:latest" in \
        cli.fails(tenants, "set-models", "acme", "--remove", "mistral")
    assert "nothing to change" in cli.fails(tenants, "set-models", "acme")
    assert "cannot be combined" in cli.fails(tenants, "set-models", "acme", "--set", "a",
                                             "--add", "b")
    assert "cannot be combined" in cli.fails(tenants, "set-models", "acme", "--set", "a",
                                             "--clear")
    assert "invalid model name 'bad model'" in cli.fails(tenants, "set-models", "acme",
                                                         "--add", "bad model")
    assert "no tenant named nobody" in cli.fails(tenants, "set-models", "nobody", "--add", "x")
    assert cli.json(tenants, "show", "acme")["models"] == [LLAMA]      # nothing half-applied


def test_tenant_errors(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    assert cli.fails(tenants, "create", "acme") == "neuraldrive-gw: tenant acme already exists"
    assert "invalid tenant name" in cli.fails(tenants, "create", ".bad")
    assert "invalid tenant name" in cli.fails(tenants, "create", "a" * 65)
    assert "invalid tenant name" in cli.fails(tenants, "create", "a b")
    assert "invalid model name '../etc'" in cli.fails(tenants, "create", "x", "--model", "../etc")
    assert "no tenant named nobody" in cli.fails(tenants, "show", "nobody")
    assert "no tenant named nobody" in cli.fails(tenants, "delete", "nobody")
    assert cli(tenants, "create", "x", "--weight", "0", code=2).exit_code == 2   # click usage
    pasted = keyfmt.generate_key()
    message = cli.fails(tenants, "show", pasted)
    assert "looks like an API key" in message and pasted not in message


def test_cloud_models_are_flagged(cli: Cli) -> None:
    result = cli(tenants, "create", "acme", "--model", "gpt-oss:120b-cloud", "--model", "llama3")
    assert "note: gpt-oss:120b-cloud is a cloud model" in result.stderr
    shown = cli.json(tenants, "show", "acme")
    assert shown["models"] == [CLOUD, LLAMA] and shown["cloud_models"] == [CLOUD]
    human = cli(tenants, "show", "acme").stdout
    assert f"{CLOUD}  (cloud model: denied unless allow_cloud_models is set)" in human
    allowing = cli.tmp / "cloud.yaml"
    allowing.write_text(f"paths:\n  database: {cli.db}\nallow_cloud_models: true\n")
    human = cli(tenants, "show", "acme", config=str(allowing)).stdout
    assert "(cloud model: allowed: allow_cloud_models is set)" in human


def test_delete_tenant_with_keys_needs_force(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    cli(keys, "create", "--tenant", "acme", "--print-key")
    assert "has 1 key(s)" in cli.fails(tenants, "delete", "acme")
    assert cli(tenants, "delete", "acme", "--force").stdout == \
        "deleted tenant acme and its 1 key(s)\n"
    assert cli.json(keys, "list") == []


# -- keys -----------------------------------------------------------------------------------


def test_create_prints_the_key_once_with_a_warning(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    result = cli(keys, "create", "--tenant", "acme", "--label", "ci runner")
    lines = result.stdout.splitlines()
    token = lines[-1]                                       # scripts: the last line
    assert TOKEN.fullmatch(token)
    assert result.stdout.count(token) == 1 and len(TOKEN.findall(result.stdout)) == 1
    assert "shown only once" in result.stderr
    key_id = keyfmt.key_id(token)
    assert key_id and f"created key {key_id} for tenant acme" in lines[0]
    assert keyfmt.verify_key(cli.stored_hash(key_id), token)

    for command in (["list"], ["list", "--json"], ["show", key_id], ["show", key_id, "--json"]):
        out = cli(keys, *command).stdout
        assert key_id in out and token not in out and not TOKEN.search(out)


def test_create_print_key_and_json(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    bare = cli(keys, "create", "--tenant", "acme", "--print-key")
    assert TOKEN.fullmatch(bare.stdout.rstrip("\n")) and bare.stderr == ""
    data = cli.json(keys, "create", "--tenant", "acme", "--no-all-models", "--expires", "30d")
    assert TOKEN.fullmatch(data["key"]) and data["key_id"] == keyfmt.key_id(data["key"])
    assert set(data) == {"key", "key_id", "tenant", "label", "status", "created_at",
                         "expires_at", "revoked_at", "last_used_at", "allow_all_models",
                         "requests_per_min", "tokens_per_min", "token_budget",
                         "budget_period", "max_concurrent", "log_prompts", "effective"}
    assert data["effective"] == {"requests_per_min": 60, "tokens_per_min": 100000,
                                 "token_budget": "unlimited", "max_concurrent": 4,
                                 "budget_period": "day"}       # limits.key_defaults
    assert data["status"] == "active" and data["allow_all_models"] is False
    expires = calendar.timegm(time.strptime(data["expires_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(expires - (time.time() + 30 * 86400)) < 60
    assert "cannot be combined" in cli.fails(keys, "create", "--tenant", "acme", "--json",
                                             "--print-key")


def test_create_options(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    everything = cli.json(keys, "create", "--tenant", "acme", "--all-models",
                          "--expires", "2099-01-01T00:00:00Z", "--label", "x")
    assert everything["allow_all_models"] is True
    assert everything["expires_at"] == "2099-01-01T00:00:00Z" and everything["label"] == "x"
    inherit = cli.json(keys, "create", "--tenant", "acme")
    assert inherit["allow_all_models"] is None and inherit["expires_at"] is None
    assert "ALL MODELS" in cli(keys, "list").stdout and "inherit" in cli(keys, "list").stdout


def test_create_errors(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    assert "no tenant named nobody" in cli.fails(keys, "create", "--tenant", "nobody")
    assert "invalid expiry 'soon'" in cli.fails(keys, "create", "--tenant", "acme",
                                                "--expires", "soon")
    assert "expiry is in the past" in cli.fails(keys, "create", "--tenant", "acme",
                                                "--expires", "2001-01-01T00:00:00Z")
    assert "must be positive" in cli.fails(keys, "create", "--tenant", "acme", "--expires", "0d")
    assert "printable" in cli.fails(keys, "create", "--tenant", "acme", "--label", "a\x1b[2Jb")
    assert cli.json(keys, "list") == []


def test_list_show_filter(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    cli(tenants, "create", "beta")
    a = cli.json(keys, "create", "--tenant", "acme", "--label", "first")
    b = cli.json(keys, "create", "--tenant", "beta")
    assert [k["key_id"] for k in cli.json(keys, "list")] == [a["key_id"], b["key_id"]]
    assert [k["key_id"] for k in cli.json(keys, "list", "--tenant", "beta")] == [b["key_id"]]
    lines = cli(keys, "list").stdout.splitlines()
    assert lines[0].split()[:3] == ["KEY", "ID", "TENANT"]
    assert lines[1].index("acme") == lines[2].index("beta") == lines[0].index("TENANT")
    shown = cli.json(keys, "show", a["key_id"])
    assert shown == {k: v for k, v in a.items() if k != "key"}
    assert "label:               first" in cli(keys, "show", a["key_id"]).stdout
    # A whole key pasted by mistake is understood, and never echoed back.
    assert cli.json(keys, "show", a["key"])["key_id"] == a["key_id"]
    assert cli.json(tenants, "show", "acme")["active_keys"] == 1
    assert "no tenant named nobody" in cli.fails(keys, "list", "--tenant", "nobody")


def test_show_errors_never_echo_a_key(cli: Cli) -> None:
    assert cli.fails(keys, "show", "ZZZZZZZZ") == "neuraldrive-gw: no key with id ZZZZZZZZ"
    almost = "nd-" + "A" * 31 + "!"
    message = cli.fails(keys, "show", almost)
    assert "invalid key id" in message and almost not in message
    cli.fails(keys, "revoke", "short")
    cli.fails(keys, "rotate", "short")


def test_revoke(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    data = cli.json(keys, "create", "--tenant", "acme")
    out = cli(keys, "revoke", data["key_id"]).stdout
    assert out.startswith(f"revoked key {data['key_id']} (tenant acme) at ")
    revoked = cli.json(keys, "show", data["key_id"])
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    again = cli.json(keys, "revoke", data["key_id"])              # idempotent, same time
    assert again["revoked_at"] == revoked["revoked_at"]
    assert "is revoked; create a new key" in cli.fails(keys, "rotate", data["key_id"])
    assert cli.json(tenants, "show", "acme")["active_keys"] == 0
    assert "no key with id" in cli.fails(keys, "revoke", "ZZZZZZZZ")


def test_rotate(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    old = cli.json(keys, "create", "--tenant", "acme", "--label", "svc")
    key_id = old["key_id"]
    result = cli(keys, "rotate", key_id)
    new = result.stdout.splitlines()[-1]
    assert TOKEN.fullmatch(new) and keyfmt.key_id(new) == key_id and new != old["key"]
    assert result.stdout.count(new) == 1 and "shown only once" in result.stderr
    stored = cli.stored_hash(key_id)
    assert keyfmt.verify_key(stored, new) and not keyfmt.verify_key(stored, old["key"])
    scripted = cli(keys, "rotate", key_id, "--print-key").stdout.rstrip("\n")
    assert TOKEN.fullmatch(scripted) and keyfmt.key_id(scripted) == key_id
    data = cli.json(keys, "rotate", key_id)
    assert data["key_id"] == key_id and data["label"] == "svc" and data["status"] == "active"
    assert keyfmt.verify_key(cli.stored_hash(key_id), data["key"])
    assert not keyfmt.verify_key(cli.stored_hash(key_id), scripted)


def test_help_lists_every_subcommand(cli: Cli) -> None:
    assert init_db.name == "init-db"
    tenant_help = cli.runner.invoke(tenants, ["--help"]).output
    key_help = cli.runner.invoke(keys, ["--help"]).output
    for name in ("create", "list", "show", "set-models", "delete"):
        assert name in tenant_help
    for name in ("create", "list", "show", "revoke", "rotate"):
        assert name in key_help


# -- one real process -----------------------------------------------------------------------


@pytest.mark.slow
def test_real_process(tmp_path: Path) -> None:
    """`python -m neuraldrive_gw`: the script path, with nothing from click's test runner."""
    db = str(tmp_path / "gw.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURALDRIVE_GW_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "neuraldrive_gw", *args, "--db", db],
                              capture_output=True, text=True, env=env, timeout=60,
                              check=False)

    missing = run("tenants", "list")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert not os.path.exists(db)
    assert run("init-db").returncode == 0
    assert run("tenants", "create", "acme", "--model", "llama3").returncode == 0
    created = run("keys", "create", "--tenant", "acme", "--print-key")
    assert created.returncode == 0, created.stderr
    token = created.stdout.splitlines()[-1]
    assert TOKEN.fullmatch(token)
    listed = run("keys", "list", "--json")
    assert [k["key_id"] for k in json.loads(listed.stdout)] == [keyfmt.key_id(token)]
    assert token not in listed.stdout + listed.stderr
    assert stat_mode(db) == 0o600


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


# -- limits ---------------------------------------------------------------------------------


def test_keys_limits_on_create_and_set_limits(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    created = cli.json(keys, "create", "--tenant", "acme", "--requests-per-min", "unlimited",
                       "--token-budget", "5000", "--budget-period", "month", "--log-prompts")
    assert (created["requests_per_min"], created["tokens_per_min"], created["token_budget"],
            created["budget_period"], created["log_prompts"]) == (
        "unlimited", None, 5000, "month", True)
    key_id = created["key_id"]
    shown = cli(keys, "show", key_id).stdout
    assert "requests per minute: unlimited\n" in shown
    assert "tokens per minute:   100000 (default)\n" in shown     # limits.key_defaults
    assert "token budget:        5000\n" in shown and "budget period:       month\n" in shown
    changed = cli.json(keys, "set-limits", key_id, "--requests-per-min", "default",
                       "--max-concurrent", "2", "--no-log-prompts")
    assert (changed["requests_per_min"], changed["max_concurrent"], changed["log_prompts"],
            changed["token_budget"]) == (None, 2, False, 5000)     # the rest is untouched
    assert "requests per minute: 60 (default)\n" in cli(keys, "show", key_id).stdout


@pytest.mark.parametrize("args", [
    (), ("--max-concurrent", "0"), ("--tokens-per-min", "-5"), ("--token-budget", "lots"),
    ("--budget-period", "week"),
])
def test_keys_set_limits_refuses_nothing_and_non_limits(cli: Cli, args: tuple[str, ...]) -> None:
    cli(tenants, "create", "acme")
    key_id = cli.json(keys, "create", "--tenant", "acme")["key_id"]
    result = cli(keys, "set-limits", key_id, *args, code=2)
    assert ("nothing to change" if not args else "Invalid value") in result.stderr
    assert cli.json(keys, "show", key_id)["max_concurrent"] is None


def test_set_limits_on_an_unknown_key_or_tenant(cli: Cli) -> None:
    assert cli.fails(keys, "set-limits", "ABCDEFGH", "--max-concurrent", "1") == \
        "neuraldrive-gw: no key with id ABCDEFGH"
    assert cli.fails(tenants, "set-limits", "nobody", "--weight", "2") == \
        "neuraldrive-gw: no tenant named nobody"


def test_tenants_limits_on_create_and_set_limits(cli: Cli) -> None:
    created = cli.json(tenants, "create", "acme", "--tokens-per-min", "9000",
                       "--max-concurrent", "3", "--weight", "2")
    assert (created["tokens_per_min"], created["max_concurrent"], created["weight"],
            created["token_budget"]) == (9000, 3, 2, None)
    changed = cli.json(tenants, "set-limits", "acme", "--tokens-per-min", "unlimited",
                       "--token-budget", "100000", "--budget-period", "month", "--weight", "5")
    assert (changed["tokens_per_min"], changed["token_budget"], changed["budget_period"],
            changed["weight"], changed["max_concurrent"]) == (None, 100000, "month", 5, 3)
    shown = cli(tenants, "show", "acme").stdout
    assert "tokens per minute: unlimited\n" in shown
    assert "token budget:      100000 per month\n" in shown
    cli(tenants, "create", "beta", "--token-budget", "700")
    assert "token budget:      700 per day (default period)\n" in \
        cli(tenants, "show", "beta").stdout               # limits.key_defaults.budget_period
    # 'default' is a key-only word: tenants have no defaults to go back to.
    assert "Invalid value" in cli(tenants, "set-limits", "acme", "--max-concurrent",
                                  "default", code=2).stderr


@pytest.mark.parametrize("value", ["²", "١٢", "99999999999999999999999", "1e3", "1_000", "0x10"])
def test_limit_values_that_are_not_plain_numbers_are_usage_errors(cli: Cli, value: str) -> None:
    """Exit 2 with click's message, never a traceback or an overflow in SQLite."""
    cli(tenants, "create", "acme")
    key_id = cli.json(keys, "create", "--tenant", "acme")["key_id"]
    assert "is not a limit" in cli(keys, "set-limits", key_id, "--token-budget", value,
                                   code=2).stderr
    assert "is not a limit" in cli(tenants, "set-limits", "acme", "--tokens-per-min", value,
                                   code=2).stderr
    assert "Invalid value for '--weight'" in cli(tenants, "create", "big", "--weight",
                                                 "99999999999999999999999", code=2).stderr
    assert cli.json(keys, "show", key_id)["token_budget"] is None
    assert [t["name"] for t in cli.json(tenants, "list")] == ["acme"]


def test_show_json_has_the_limits_in_force(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    key_id = cli.json(keys, "create", "--tenant", "acme", "--tokens-per-min", "unlimited",
                      "--max-concurrent", "9")["key_id"]
    limited = cli.tmp / "limited.yaml"
    limited.write_text(f"paths:\n  database: {cli.db}\nlimits:\n  key_defaults:\n"
                       "    requests_per_min: 5\n    token_budget: 700\n"
                       "    budget_period: month\n")
    shown = json.loads(cli(keys, "show", key_id, "--json", config=str(limited)).stdout)
    assert (shown["requests_per_min"], shown["tokens_per_min"], shown["max_concurrent"]) == \
        (None, "unlimited", 9)
    assert shown["effective"] == {"requests_per_min": 5, "tokens_per_min": "unlimited",
                                  "token_budget": 700, "max_concurrent": 9,
                                  "budget_period": "month"}
    human = cli(keys, "show", key_id, config=str(limited)).stdout
    assert "token budget:        700 (default)\n" in human
    assert "budget period:       month (default)\n" in human
    assert [k["effective"]["requests_per_min"] for k in cli.json(keys, "list")] == [60]


def test_set_limits_on_a_revoked_key_is_stored_with_a_note(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    key_id = cli.json(keys, "create", "--tenant", "acme")["key_id"]
    cli(keys, "revoke", key_id)
    result = cli(keys, "set-limits", key_id, "--max-concurrent", "1")
    assert f"note: key {key_id} is revoked" in result.stderr
    assert "max concurrent:      1\n" in result.stdout
    assert cli.json(keys, "show", key_id)["max_concurrent"] == 1
    assert "note:" not in cli(keys, "set-limits", cli.json(keys, "create", "--tenant", "acme")
                              ["key_id"], "--max-concurrent", "1").stderr


def test_tenants_set_limits_with_nothing_names_the_options(cli: Cli) -> None:
    cli(tenants, "create", "acme")
    message = cli(tenants, "set-limits", "acme", code=2).stderr
    for option in ("--tokens-per-min", "--token-budget", "--budget-period", "--max-concurrent",
                   "--weight"):
        assert option in message
