"""Configuration: the example file, precedence (defaults < file < env < flags), and a
clear error naming the source, key and reason for every bad value."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from appliance.config import FIELDS, POOL_FIELDS, PoolSettings, Settings, load_settings
from appliance.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "stem.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stem.toml"
    path.write_text(text)
    return path


# --- the example file -----------------------------------------------------------------


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE, env={})
    assert settings.source == str(EXAMPLE)
    assert settings.broker_url == "sqlite:///./var/stem.db"
    assert settings.result_backend_url is None  # "" means: follow the broker
    assert settings.max_payload_bytes == 256 * 1024
    assert settings.result_ttl == 86400.0
    assert settings.sqlite_synchronous == "FULL"
    assert (settings.log_format, settings.log_level) == ("text", "INFO")
    [pool] = settings.pools
    assert pool == PoolSettings(name="default", queues=("default",), concurrency=2)


def test_example_config_sets_every_key_in_its_section() -> None:
    document = tomllib.loads(EXAMPLE.read_text())
    for spec in FIELDS + POOL_FIELDS:
        assert spec.key in document.get(spec.section, {}), f"[{spec.section}] {spec.key}"


def test_example_config_documents_every_environment_variable() -> None:
    text = EXAMPLE.read_text()
    for spec in FIELDS + POOL_FIELDS:
        assert spec.env in text, spec.env


def test_example_pools_block_loads_once_uncommented(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [[pools]]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    settings = load_settings(write(tmp_path, "\n".join(lines + block) + "\n"), env={})
    [pool] = settings.pools
    assert pool.name == "email"
    assert pool.queues == ("email", "notifications")
    assert pool.concurrency == 4
    assert pool.max_memory_per_child == 200 * 10**6
    assert pool.max_tasks_per_child == 1000
    assert pool.shutdown_grace == 30.0  # from [worker]


# --- precedence -----------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    settings = load_settings(env={})
    assert settings.source == "defaults"
    assert settings.broker_url == Settings().broker_url
    assert settings.pools == (PoolSettings(),)


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[stem]\nnamespace = "file"\nresult_ttl = "1h"\nmax_payload_bytes = "1KiB"\n'
        "[worker]\nconcurrency = 3\nprefetch = 5\nheartbeat_timeout = 7\n",
    )
    env = {
        "STEM_NAMESPACE": "env",
        "STEM_RESULT_TTL": "2h",
        "STEM_CONCURRENCY": "4",
        "STEM_PREFETCH": "6",
    }
    flags = {"namespace": "flag", "concurrency": 5}
    settings = load_settings(path, env=env, overrides=flags)
    assert settings.namespace == "flag"  # flag > env > file
    assert settings.result_ttl == 7200.0  # env > file
    assert settings.max_payload_bytes == 1024  # file > default
    assert settings.log_level == "INFO"  # default
    [pool] = settings.pools
    assert (pool.concurrency, pool.prefetch, pool.heartbeat_timeout) == (5, 6, 7.0)


def test_stem_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nformat = "json"\n')
    settings = load_settings(env={"STEM_CONFIG": str(path)})
    assert settings.log_format == "json"
    assert settings.source == str(path)


def test_flags_given_as_none_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, '[stem]\nbroker_url = "sqlite:///file.db"\n')
    settings = load_settings(path, env={}, overrides={"broker_url": None, "queues": None})
    assert settings.broker_url == "sqlite:///file.db"


def test_queues_from_env_and_flag_take_commas() -> None:
    assert load_settings(env={"STEM_QUEUES": "a, b"}).pools[0].queues == ("a", "b")
    assert load_settings(env={}, overrides={"queues": "c"}).pools[0].queues == ("c",)


# --- bad values name the source, the key and the reason -------------------------------

BAD_FILE_VALUES = [
    ("stem", "broker_url", '""', "non-empty string"),
    ("stem", "max_payload_bytes", '"lots"', "not a size"),
    ("stem", "result_ttl", '"soon"', "not a duration"),
    ("sqlite", "synchronous", '"OFF"', "must be one of FULL, NORMAL"),
    ("log", "format", '"xml"', "must be one of text, json"),
    ("log", "level", '"LOUD"', "must be one of"),
    ("worker", "queues", "[]", "at least one queue"),
    ("worker", "concurrency", "0", "must be >= 1"),
    ("worker", "prefetch", "-1", "must be >= 0"),
    ("worker", "max_tasks_per_child", '"many"', "must be an integer"),
    ("worker", "max_memory_per_child", '"big"', "not a size"),
    ("worker", "shutdown_grace", "-5", "must not be negative"),
    ("worker", "heartbeat_timeout", "true", "not a duration"),
]


@pytest.mark.parametrize(("section", "key", "value", "reason"), BAD_FILE_VALUES)
def test_bad_file_value_names_file_key_and_reason(
    tmp_path: Path, section: str, key: str, value: str, reason: str
) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    error = caught.value
    assert error.source == f"{path}: [{section}]"
    assert error.key == key
    assert reason in error.reason
    assert str(path) in str(error) and key in str(error)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("STEM_LOG_FORMAT", "xml", "must be one of text, json"),
        ("STEM_CONCURRENCY", "two", "must be an integer"),
        ("STEM_RESULT_TTL", "forever", "not a duration"),
        ("STEM_MAX_PAYLOAD_BYTES", "-1", "not a size"),
        ("STEM_SQLITE_SYNCHRONOUS", "EXTRA", "must be one of"),
    ],
)
def test_bad_environment_value_names_the_variable(variable: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={variable: value})
    assert caught.value.source == f"environment {variable}"
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("flags", "key", "reason"),
    [
        ({"concurrency": 0}, "concurrency", "must be >= 1"),
        ({"queues": ""}, "queues", "at least one queue"),
        ({"broker_url": "  "}, "broker_url", "non-empty string"),
        ({"colour": "blue"}, "colour", "unknown setting"),
    ],
)
def test_bad_flag_value_names_the_command_line(
    flags: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, overrides=flags)
    assert (caught.value.source, caught.value.key) == ("command line", key)
    assert reason in caught.value.reason


def test_bad_value_in_file_fails_even_when_env_overrides_it(tmp_path: Path) -> None:
    # Fail at start on any bad value, not only on the one that ends up used.
    path = write(tmp_path, "[worker]\nconcurrency = 0\n")
    with pytest.raises(ConfigError, match="concurrency"):
        load_settings(path, env={"STEM_CONCURRENCY": "2"})


# --- the file's shape -------------------------------------------------------------------


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "[brokers]\nurl = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert (caught.value.source, caught.value.key) == (str(path), "brokers")
    assert "unknown section" in caught.value.reason


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "[worker]\nconcurency = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert caught.value.key == "[worker] concurency"
    assert caught.value.reason == "unknown key"


def test_key_in_the_wrong_section_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, '[stem]\nlevel = "INFO"\n')
    with pytest.raises(ConfigError, match=r"\[stem\] level: unknown key"):
        load_settings(path, env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "nope.toml", env={})
    assert caught.value.reason == "config file not found"
    assert str(tmp_path / "nope.toml") in str(caught.value)


def test_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[stem\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert (caught.value.source, caught.value.key) == (str(path), "(syntax)")


# --- pools ------------------------------------------------------------------------------

POOLS = """
[worker]
concurrency = 2
shutdown_grace = "5s"

[[pools]]
name = "fast"
queues = ["default"]
concurrency = 8

[[pools]]
name = "email"
queues = ["email"]
max_memory_per_child = "100MB"
"""


def test_pools_inherit_worker_values(tmp_path: Path) -> None:
    fast, email = load_settings(write(tmp_path, POOLS), env={}).pools
    assert (fast.name, fast.queues, fast.concurrency, fast.shutdown_grace) == (
        "fast",
        ("default",),
        8,
        5.0,
    )
    assert (email.name, email.queues, email.concurrency) == ("email", ("email",), 2)
    assert email.max_memory_per_child == 100 * 10**6


def test_pool_selected_by_name(tmp_path: Path) -> None:
    [email] = load_settings(write(tmp_path, POOLS), env={}, pool="email").pools
    assert email.name == "email"


def test_flags_override_every_pool(tmp_path: Path) -> None:
    pools = load_settings(write(tmp_path, POOLS), env={}, overrides={"concurrency": 3}).pools
    assert [p.concurrency for p in pools] == [3, 3]


def test_unknown_pool_selected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no pool named 'bulk'"):
        load_settings(write(tmp_path, POOLS), env={}, pool="bulk")


def test_pool_name_without_declared_pools_names_the_single_pool() -> None:
    [pool] = load_settings(env={}, pool="solo").pools
    assert pool.name == "solo"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[[pools]]\nqueues = ['a']\n", "name", "every pool needs a name"),
        ("[[pools]]\nname = 'a'\nthreads = 2\n", "threads", "unknown pool key"),
        ("[[pools]]\nname = 'a'\nconcurrency = 0\n", "concurrency", "must be >= 1"),
        ("[[pools]]\nname = 'a'\n[[pools]]\nname = 'a'\n", "pools", "must be unique"),
        ("pools = 3\n", "pools", "array of tables"),
    ],
)
def test_bad_pool_names_the_pool(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert str(path) in caught.value.source
    assert caught.value.key == key
    assert reason in caught.value.reason
