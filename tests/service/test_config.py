"""Settings from defaults < TOML file < environment < flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, ServeConfig, load_config


def test_layers(tmp_path: Path) -> None:
    f = tmp_path / "cohortsim.toml"
    f.write_text('[serve]\nbatch_window_ms = 0.5\nmax_batch = 16\nmetrics_port = 9100\nlog_format = "json"\n')
    env = {"COHORTSIM_MAX_BATCH": "32", "COHORTSIM_METRICS_PORT": "", "PATH": "/bin"}
    cfg = load_config(f, env=env, flags={"batch_window_ms": 2.0, "max_queue": None})
    assert cfg.batch_window_ms == 2.0  # flag beats file
    assert cfg.max_batch == 32  # environment beats file
    assert cfg.metrics_port is None  # an empty variable unsets
    assert cfg.max_queue == ServeConfig().max_queue  # a flag not given keeps the default
    assert cfg.log_format == "json"
    kw = cfg.server_kwargs()
    assert kw["batch_window_ms"] == 2.0 and kw["max_batch"] == 32
    assert load_config(env={"COHORTSIM_BATCHING": "off"}).server_kwargs()["batch_window_ms"] is None


@pytest.mark.parametrize(
    ("text", "env", "match"),
    [
        ("batch_window_ms = 5\n", {}, "batch_window_ms.*\\[0, 2\\]"),
        ("no_such = 1\n", {}, "unknown setting 'no_such'"),
        ("max_batch = 'many'\n", {}, "max_batch"),
        ("max_batch = [\n", {}, "not valid TOML"),
        ("", {"COHORTSIM_MAX_QUEUE": "ten"}, "COHORTSIM_MAX_QUEUE"),
        ("", {"COHORTSIM_LOG_FORMAT": "xml"}, "log_format"),
    ],
)
def test_errors_name_the_setting(tmp_path: Path, text: str, env: dict[str, str], match: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f, env=env)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml", env={})


def test_options_split_keyword_settings_into_config_and_security(tmp_path: Path) -> None:
    from service.config import SecurityConfig, options

    config, security = options(
        port=0, device="cpu", batch_window_ms=None, store_dir=tmp_path, watch_interval=None,
        rate_limit=2.0, audit_log=tmp_path / "a.jsonl",
    )
    assert (config.port, config.device, config.batching, config.store) == (0, "cpu", False, tmp_path)
    assert config.watch_interval_s is None
    assert security == SecurityConfig(rate_limit=2.0, audit_log=tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match="unknown setting 'no_such'"):
        options(no_such=1)
    with pytest.raises(ConfigError, match="max_k"):
        options(max_k=0)
    assert load_config(env={"COHORTSIM_DECODE_BUDGET_MB": "256"}).decode_budget_mb == 256
