"""Configuration loading: defaults, YAML, environment, validation (SPEC §12)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neuraldrive_gw.config import Config, ConfigError, config_from_mapping, load_config, _leaf_paths

REPO = Path(__file__).resolve().parent.parent


def test_defaults_need_no_file(tmp_path: Path) -> None:
    config = config_from_mapping({}, env={})
    assert config == Config()
    assert config.listen.host == "127.0.0.1" and config.listen.port == 3002
    assert config.limits.max_body_bytes == 256 * 1024 and config.limits.num_predict_cap == 4096


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("listen:\n  port: 4000\nlimits:\n  max_body_bytes: 1000\n")
    env = {"NEURALDRIVE_GW_LIMITS_MAX_BODY_BYTES": "2000",
           "NEURALDRIVE_GW_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2",
           "NEURALDRIVE_GW_LIMITS_KEY_DEFAULTS_REQUESTS_PER_MIN": "7",
           "NEURALDRIVE_GW_ALLOW_CLOUD_MODELS": "true"}
    config = load_config(str(path), env=env, overrides={"listen.host": "::1"})
    assert config.listen == type(config.listen)(host="::1", port=4000)
    assert config.limits.max_body_bytes == 2000
    assert config.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    assert config.limits.key_defaults.requests_per_min == 7
    assert config.allow_cloud_models is True


@pytest.mark.parametrize("data,env,message", [
    ({"listen": {"prot": 1}}, {}, "listen.prot: unknown setting"),
    ({"nonsense": 1}, {}, "nonsense: unknown setting"),
    ({"limits": {"key_defaults": {"rpm": 1}}}, {}, "limits.key_defaults.rpm: unknown setting"),
    ({"listen": {"port": "3002"}}, {}, "listen.port: must be an integer"),
    ({"listen": {"port": True}}, {}, "listen.port: must be an integer"),
    ({"listen": {"port": 70000}}, {}, "listen.port"),
    ({"listen": 5}, {}, "listen: must be a mapping"),
    ({"upstream": {"url": "https://x:1"}}, {}, "upstream.url"),
    ({"upstream": {"url": "http://x:1/api"}}, {}, "upstream.url"),
    ({"upstream": {"url": "http://u:p@x:1"}}, {}, "upstream.url"),
    ({"limits": {"max_body_bytes": 0}}, {}, "limits.max_body_bytes: must be greater than 0"),
    ({"limits": {"key_defaults": {"budget_period": "week"}}}, {}, "budget_period"),
    ({"limits": {"master": {"requests_per_min": 0}}}, {},
     "limits.master.requests_per_min: must be greater than 0 (or null)"),
    ({"limits": {"master": {"token_budget": -1}}}, {}, "limits.master.token_budget"),
    ({"limits": {"master": {"max_concurrent": "2"}}}, {},
     "limits.master.max_concurrent: must be an integer"),
    ({"limits": {"master": {"budget_period": "week"}}}, {},
     "limits.master.budget_period: must be day or month"),
    ({}, {"NEURALDRIVE_GW_LIMITS_MASTER_TOKENS_PER_MIN": "0"},
     "limits.master.tokens_per_min: must be greater than 0"),
    ({"trusted_proxies": ["not-an-ip"]}, {}, "trusted_proxies[0]"),
    ({"allow_cloud_models": "yes"}, {}, "allow_cloud_models: must be true or false"),
    ({}, {"NEURALDRIVE_GW_LISTEN_PROT": "1"}, "NEURALDRIVE_GW_LISTEN_PROT: unknown setting"),
    ({}, {"NEURALDRIVE_GW_LISTEN_PORT": "abc"}, "listen.port: must be an integer"),
])
def test_invalid_config_is_refused_with_the_dotted_path(data, env, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_mapping(data, env=env)


def test_master_limits_default_to_none_and_come_from_yaml_or_env() -> None:
    master = config_from_mapping({}, env={}).limits.master
    assert (master.requests_per_min, master.tokens_per_min, master.token_budget,
            master.max_concurrent, master.budget_period) == (None, None, None, None, "day")
    env = {"NEURALDRIVE_GW_LIMITS_MASTER_REQUESTS_PER_MIN": "30",
           "NEURALDRIVE_GW_LIMITS_MASTER_BUDGET_PERIOD": "month",
           "NEURALDRIVE_GW_LIMITS_MASTER_MAX_CONCURRENT": "null"}
    master = config_from_mapping({"limits": {"master": {"max_concurrent": 2,
                                                        "token_budget": 9}}},
                                 env=env).limits.master
    assert (master.requests_per_min, master.budget_period, master.max_concurrent,
            master.token_budget) == (30, "month", None, 9)      # the environment wins


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.yaml"), env={})


def test_bad_yaml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("listen: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path), env={})


def test_the_shipped_config_takes_command_line_and_environment_overrides() -> None:
    """Its sections have every line commented out (YAML null): `--db` and NEURALDRIVE_GW_*
    must still reach into them (the package's postinst runs `init-db --db ...` with it)."""
    shipped = str(REPO / "etc" / "gw.yaml")
    config = load_config(shipped, env={"NEURALDRIVE_GW_LIMITS_MAX_BODY_BYTES": "1024"},
                         overrides={"paths.database": "/tmp/x.db"})
    assert config.paths.database == "/tmp/x.db" and config.limits.max_body_bytes == 1024
    assert config.paths.status_socket == Config().paths.status_socket


def test_shipped_config_documents_every_key_and_loads() -> None:
    """etc/gw.yaml lists every setting (commented out at its default) and is itself valid."""
    text = (REPO / "etc" / "gw.yaml").read_text()
    assert load_config(str(REPO / "etc" / "gw.yaml"), env={}) == Config()
    for dotted in _leaf_paths(Config):
        leaf = dotted.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*#?\s*{leaf}:", text, re.M), f"{dotted} is not documented in etc/gw.yaml"
    for dotted in _leaf_paths(Config):
        assert f"`{dotted}`" in (REPO / "docs" / "configuration.md").read_text(), dotted
