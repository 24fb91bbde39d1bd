"""Configuration: the example file, precedence (defaults < file < env < flags), and a
clear error naming the source, key and reason for every bad value."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cli.common import UsageError, build_settings
from appliance.cli.main import build_parser
from appliance.config import (
    FIELDS,
    POOL_FIELDS,
    Field,
    PoolSettings,
    Settings,
    concurrency_warning,
    load_settings,
)
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


# --- the same bound for the same key, wherever the value comes from ----------------------

PARSER = build_parser()  # parse_args leaves it as it was, and building one takes ms
# How a person gives each setting on the command line, where a flag exists.
FLAGS = {
    "broker_url": "--broker",
    "result_backend_url": "--result-backend",
    "concurrency": "--concurrency",
    "queues": "--queues",
}
NUMBER = re.compile(r"^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$|^[+-]?(nan|inf)$")
EDGE_TEXTS = [
    "0", "1", "2", "-1", "0.5", "1.5", "2.0", "1e3", "1e4", "1e308", "-1e308", "nan", "inf",
    "-inf", str(2**31), str(2**70), "1024", "1025", "5000", "1_000", "+5", " 7 ", "٣",
    "", " ", "true", "1ms", "1.4s", "1.5s", "2s", "10d", "3650d", "3651d", "0B", "0.0",
    "1KiB", "1023", "512MiB", "513MiB", "2PiB", "1e3KB", "a", "a,b", " a , b ", "a,,b", "a,",
    "a\x00b", "a\nb", "\x1b[2J", "x" * 201, "FULL", "normal", "json", "DEBUG", "sqlite:///x.db",
    "redis://[::1", "redis://h:1/0", "nope://x", "00", "01.5",
]  # fmt: skip


def setting_of(settings: Settings, attr: str) -> Any:
    if attr in {f.attr for f in FIELDS}:
        return getattr(settings, attr)
    [pool] = settings.pools
    return getattr(pool, attr)


def toml_string(text: str) -> str:
    # A TOML basic string: JSON's escapes are TOML's, and DEL must be escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def is_toml_number(text: str) -> bool:
    """A number in TOML's own syntax: "00" or "01.5" read as numbers elsewhere, but a file
    holding them is not TOML at all (leading zeros) and is refused as such."""
    if not NUMBER.match(text):
        return False
    try:
        tomllib.loads(f"x = {text}")
    except tomllib.TOMLDecodeError:
        return False
    return True


def is_numeric(attr: str) -> bool:
    declared = {f.name: str(f.type) for f in dataclass_fields(Settings)} | {
        f.name: str(f.type) for f in dataclass_fields(PoolSettings)
    }
    return "int" in declared[attr] or "float" in declared[attr]


def outcome(build: Callable[[], Settings], attr: str) -> tuple[str, Any]:
    """("ok", the value) or ("refused", the error type), the way `stem` would see it."""
    try:
        return "ok", setting_of(build(), attr)
    except (ConfigError, UsageError) as exc:
        return "refused", type(exc).__name__


def sources(tmp: Path, spec: Field, text: str) -> dict[str, Callable[[], Settings]]:
    """The ways one value reaches `stem worker run`: as TOML (a string, and a number when
    the text is one and the setting is numeric), as STEM_*, and as its flag."""

    def through_cli(*argv: str) -> Callable[[], Settings]:
        def build() -> Settings:
            args = PARSER.parse_args(["worker", "run", "--app", "m:s", *argv])
            return build_settings(args, pool=None, concurrency=args.concurrency, queues=args.queues)

        return build

    def toml(literal: str) -> Callable[[], Settings]:
        path = tmp / f"{spec.attr}-{len(literal)}-{abs(hash(literal))}.toml"
        path.write_text(f"[{spec.section}]\n{spec.key} = {literal}\n", encoding="utf-8")
        return through_cli("--config", str(path))

    ways = {"toml string": toml(toml_string(text))}
    if is_numeric(spec.attr) and is_toml_number(text.strip()):
        ways["toml number"] = toml(text.strip())
    if "\x00" not in text:  # no environment can hold a NUL
        ways["environment"] = lambda: _with_env(spec.env, text, through_cli())
    if spec.attr in FLAGS:
        ways["flag"] = through_cli(f"{FLAGS[spec.attr]}={text}")
    return ways


def _with_env(name: str, value: str, build: Callable[[], Settings]) -> Settings:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        return build()
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


@pytest.fixture
def no_stem_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("STEM_")]:
        monkeypatch.delenv(name)


def assert_agree(tmp: Path, spec: Field, text: str) -> None:
    seen = {way: outcome(build, spec.attr) for way, build in sources(tmp, spec, text).items()}
    verdicts = {verdict for verdict, _ in seen.values()}
    assert len(verdicts) == 1, (spec.attr, text, seen)
    if verdicts == {"ok"}:
        values = [value for _, value in seen.values()]
        assert all(v == values[0] or v != v for v in values), (spec.attr, text, seen)


ALL_SPECS = FIELDS + POOL_FIELDS


@pytest.mark.usefixtures("no_stem_env")
@pytest.mark.parametrize("spec", ALL_SPECS, ids=[f.attr for f in ALL_SPECS])
def test_toml_environment_and_flag_accept_and_refuse_the_same_values(
    tmp_path: Path, spec: Field
) -> None:
    # A regression: TOML took 0.5 for prefetch and max_tasks_per_child (as 0, ">= 0")
    # and inf for durations, where the environment refused them; 1e308 and inf reached
    # int() in one and failed with an OverflowError traceback.
    for text in EDGE_TEXTS:
        assert_agree(tmp_path, spec, text)


@pytest.mark.usefixtures("no_stem_env")
@pytest.mark.parametrize("spec", ALL_SPECS, ids=[f.attr for f in ALL_SPECS])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.one_of(
        st.integers().map(str),
        st.floats().map(repr),
        st.text(max_size=12),
        st.builds(
            "{}{}".format,
            st.floats(0, 1e7).map(lambda f: f"{f:g}"),
            st.sampled_from(["", "ms", "s", "m", "h", "d", "B", "KiB", "MB", "GiB", "x"]),
        ),
    )
)
def test_generated_values_agree_across_toml_environment_and_flag(
    tmp_path: Path, spec: Field, text: str
) -> None:
    assert_agree(tmp_path, spec, text)


# --- bounds with a reason -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["1ms", "0", "1.4s", "0.5"])
def test_a_heartbeat_timeout_shorter_than_three_beats_is_refused_with_the_reason(
    tmp_path: Path, value: str
) -> None:
    # A regression: STEM_HEARTBEAT_TIMEOUT=1ms was accepted, and children were killed
    # in a loop.
    for source in (
        lambda: load_settings(env={"STEM_HEARTBEAT_TIMEOUT": value}),
        lambda: load_settings(
            write(tmp_path, f'[worker]\nheartbeat_timeout = "{value}"\n'), env={}
        ),
    ):
        with pytest.raises(ConfigError, match=r"at least 1\.5s \(children beat every 0\.5s"):
            source()
    assert load_settings(env={"STEM_HEARTBEAT_TIMEOUT": "1.5s"}).pools[0].heartbeat_timeout == 1.5


def test_concurrency_has_a_hard_maximum_per_pool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be <= 1024"):
        load_settings(env={"STEM_CONCURRENCY": "5000"})
    with pytest.raises(ConfigError, match=r"\[\[pools\]\] #1: concurrency: must be <= 1024"):
        load_settings(write(tmp_path, "[[pools]]\nname = 'a'\nconcurrency = 1025\n"), env={})
    assert load_settings(env={"STEM_CONCURRENCY": "1024"}).pools[0].concurrency == 1024


def test_concurrency_warning_speaks_above_eight_children_per_cpu() -> None:
    def pools(*sizes: int) -> tuple[PoolSettings, ...]:
        return tuple(PoolSettings(name=f"p{i}", concurrency=n) for i, n in enumerate(sizes))

    assert concurrency_warning(pools(16), cpus=2) is None
    assert concurrency_warning(pools(8, 8), cpus=2) is None
    warning = concurrency_warning(pools(8, 9), cpus=2)
    assert warning is not None and "17 worker children on 2 CPU(s)" in warning
    assert "more than 8 per CPU" in warning
    assert concurrency_warning(pools(5000), cpus=2) is not None
    assert concurrency_warning(pools(9), cpus=0) is not None  # os.cpu_count() may be None


def test_max_result_bytes_defaults_to_one_mebibyte_and_takes_sizes(tmp_path: Path) -> None:
    assert Settings().max_result_bytes == load_settings(env={}).max_result_bytes == 2**20
    assert load_settings(env={"STEM_MAX_RESULT_BYTES": "10KiB"}).max_result_bytes == 10240
    path = write(tmp_path, '[stem]\nmax_result_bytes = "2MB"\n')
    assert load_settings(path, env={}).max_result_bytes == 2 * 10**6
    with pytest.raises(ConfigError, match="max_result_bytes: must be at least 1024 bytes"):
        load_settings(env={"STEM_MAX_RESULT_BYTES": "10"})
    with pytest.raises(ConfigError, match="max_result_bytes: must be at most"):
        load_settings(env={"STEM_MAX_RESULT_BYTES": "1GiB"})


@pytest.mark.parametrize("text", ["0", "0B", "0.0", ""])
def test_no_memory_limit_has_one_meaning_in_every_spelling(text: str) -> None:
    assert (
        load_settings(env={"STEM_MAX_MEMORY_PER_CHILD": text}).pools[0].max_memory_per_child is None
    )


@pytest.mark.parametrize(
    ("queues", "reason"),
    [
        ("a,,b", "a queue name must not be empty"),
        ("a,b,", "a queue name must not be empty"),
        ("a,\x01", "printable"),
        ("x" * 201, "at most 200 characters"),
    ],
)
def test_bad_queue_names_in_the_config_are_refused_not_dropped(
    tmp_path: Path, queues: str, reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_settings(env={"STEM_QUEUES": queues})
    with pytest.raises(ConfigError, match=reason):
        load_settings(
            write(tmp_path, f"[worker]\nqueues = {json.dumps(queues.split(','))}\n"), env={}
        )


def test_a_queue_name_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a queue name must be a string"):
        load_settings(write(tmp_path, "[worker]\nqueues = [1, 2]\n"), env={})


def test_a_pool_name_given_on_the_command_line_is_checked() -> None:
    with pytest.raises(ConfigError, match="command line: --pool: must be a non-empty string"):
        load_settings(env={}, pool="")


# --- the config file itself -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: tmp, "is a directory, not a config file"),
        (lambda tmp: Path("/proc/self/mem"), "cannot read the config file: Input/output error"),
        (lambda tmp: Path("/dev/zero"), "larger than 1048576 bytes"),
        (lambda tmp: Path("/proc/nope/stem.toml"), "config file not found"),
        (lambda tmp: Path(str(tmp) + "/a\x00b"), "cannot read the config file: embedded null"),
        (lambda tmp: tmp / ("x" * 300), "cannot read the config file: File name too long"),
        (lambda tmp: write(tmp, "").parent / "stem.toml/x", "cannot read the config file: Not a"),
    ],
)
def test_a_config_path_that_is_not_a_readable_file_is_a_config_error(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    # A regression: --config /tmp was an IsADirectoryError traceback (exit 70).
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert (caught.value.source, caught.value.key) == (str(path), "(file)")
    assert reason in caught.value.reason


def test_a_config_file_that_is_not_utf8_or_has_a_giant_integer_is_a_config_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[stem]\nnamespace = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match=r"\(syntax\)"):
        load_settings(write(tmp_path, f"[worker]\nprefetch = {'9' * 5000}\n"), env={})
