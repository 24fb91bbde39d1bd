"""Settings from `stem.toml`, overridden by `STEM_*` variables, overridden by CLI flags.

Every setting is declared once in `FIELDS` with its TOML place, its environment name and
its parser, so the three sources cannot drift apart. A bad value fails at start with
the source (file path, variable or flag), the key and the reason.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from appliance.errors import ConfigError
from appliance.redaction import redact_url
from appliance.signals import parse_names
from appliance.signing import SigningConfig
from appliance.units import (
    DEFAULT_NAMESPACE,
    MAX_COUNT,
    MAX_MESSAGE_BYTES,
    check_name,
    check_namespace,
    parse_bytes,
    parse_seconds,
)

DEFAULT_BROKER_URL = "sqlite:///./var/stem.db"
DEFAULT_MAX_RESULT_BYTES = 2**20  # 1 MiB
# A config file is a few KiB; reading stops here so that `--config /dev/zero` fails.
MAX_CONFIG_BYTES = 2**20
# Children beat every 0.5 s (worker/child.py BEAT_INTERVAL): a timeout shorter than
# three beats kills healthy children in a loop on a busy host.
MIN_HEARTBEAT_TIMEOUT = 1.5
# Children per pool: each is a whole process (tens of MB, a fork at start); past this,
# no host is served better by more of them (use async tasks for I/O-bound work).
MAX_CONCURRENCY = 1024
# `concurrency_warning` speaks up above this many children per CPU, all pools together.
CHILDREN_PER_CPU = 8
# An envelope's own fields take a few hundred bytes: a smaller limit refuses every task.
MIN_PAYLOAD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """One pool of worker children with its own queues, size and limits."""

    name: str = "default"
    queues: tuple[str, ...] = ("default",)
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    # At most this many messages queued to a child behind the one it runs, and never
    # more than ~10 ms of work at the pool's average task time: enough to keep children
    # busy across one group commit; slow pools (>= 10 ms per task) get no prefetch. The
    # count only binds tasks under 40 us: 256 let a no-op drain's rounds settle ~3x more
    # tasks per commit than 64 did (SQLite drain medians +13 % and +23 %, same runs).
    prefetch: int = 256
    max_tasks_per_child: int = 0  # 0 = never recycle for this reason
    max_memory_per_child: int | None = None  # bytes
    shutdown_grace: float = 30.0  # warm shutdown: seconds to let running tasks finish
    heartbeat_timeout: float = 10.0  # a child silent this long is killed


@dataclass(frozen=True, slots=True)
class Settings:
    broker_url: str = DEFAULT_BROKER_URL
    result_backend_url: str | None = None  # None: follow the broker
    # Separates environments on one host: a prefix of every Redis key, and on SQLite a
    # database file of its own for any namespace but the default (see stores/sqlite/db.py).
    namespace: str = DEFAULT_NAMESPACE
    max_payload_bytes: int = 256 * 1024
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES  # a task returning more fails
    result_ttl: float = 86400.0
    sqlite_synchronous: str = "FULL"  # FULL survives power loss; NORMAL survives crashes
    log_format: str = "text"
    log_level: str = "INFO"
    pools: tuple[PoolSettings, ...] = (PoolSettings(),)
    signals_enabled: tuple[str, ...] = ()  # empty: every signal
    signals_disabled: tuple[str, ...] = ()
    # None: OpenTelemetry stays off (and unimported). Out of repr, as the headers: a URL
    # can carry credentials, the (name, value) header pairs API keys.
    otlp_endpoint: str | None = field(default=None, repr=False)
    otlp_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    otlp_metrics_interval: float = 60.0
    beat_enabled: bool = False  # run Beat inside the supervisor (`stem worker run --beat`)
    beat_lease: float = 10.0  # seconds: the leader lease of Beat instances
    beat_grace: float = 60.0  # seconds a slot counts as on time (beyond: catch_up decides)
    # `[[schedules]]` tables, checked (`beat.spec.entries_from_config`); a tuple of
    # ScheduleEntry, typed loosely so this module need not import Beat.
    schedules: tuple[Any, ...] = ()
    # From STEM_SIGNING_* only (keys never belong in a config file); None: unsigned.
    signing: SigningConfig | None = field(default=None, repr=False)
    source: str = "defaults"  # the config file used, for messages

    @property
    def backend_url(self) -> str:
        return self.result_backend_url or self.broker_url

    def __repr__(self) -> str:
        # The generated repr would show the URLs' passwords: every field, URLs redacted,
        # the secret-bearing ones (OTLP endpoint and headers, signing) by name only.
        shown = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in _SECRET_FIELDS:
                text = "(set)" if value else repr(value)
            elif item.name in _URL_FIELDS and isinstance(value, str):
                text = repr(redact_url(value))
            else:
                text = repr(value)
            shown.append(f"{item.name}={text}")
        return f"Settings({', '.join(shown)})"


_URL_FIELDS = frozenset({"broker_url", "result_backend_url"})
_SECRET_FIELDS = frozenset({"otlp_endpoint", "otlp_headers", "signing"})


def concurrency_warning(pools: Sequence[PoolSettings], cpus: int) -> str | None:
    """What the supervisor should log when its pools ask for more children than this
    host can run well (`CHILDREN_PER_CPU` per CPU, all pools together), or None."""
    total = sum(p.concurrency for p in pools)
    cpus = max(1, cpus)
    if total <= CHILDREN_PER_CPU * cpus:
        return None
    return (
        f"{total} worker children on {cpus} CPU(s) is more than {CHILDREN_PER_CPU} per CPU: "
        "each child is a process of its own (memory, a fork at start, a share of the CPUs), "
        "so start-up is slow and tasks wait for CPU time; lower concurrency, or use async "
        "tasks for I/O-bound work"
    )


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip()
        match = next((a for a in allowed if a.lower() == text.lower()), None)
        if match is None:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return match

    return parse


def _flag(value: Any) -> bool:
    """A boolean: TOML true/false, or the text an environment variable holds."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    if not value.isprintable():  # a NUL or a newline in a URL or a prefix is never meant
        raise ValueError(f"must be printable text, got {value!r}")
    return value.strip()


def _namespace(value: Any) -> str:
    text = _text(value)
    try:
        return check_namespace(text)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _url(value: Any) -> str:
    text = _text(value)
    try:
        urlsplit(text)  # the stores split it again; a bad one must fail here, as config
    except ValueError as exc:  # e.g. "redis://[::1": Invalid IPv6 URL
        raise ValueError(f"not a URL ({exc}): {text!r}") from None
    return text


def _optional_url(value: Any) -> str | None:
    return None if value in (None, "") else _url(value)


def _name(value: Any) -> str:
    text = _text(value)
    try:
        return check_name(text, "the name")
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _int_between(low: int, high: int, why: str = "") -> Callable[[Any], int]:
    """A parser for an integer in [low, high], from a TOML integer or its text (the
    environment); floats are refused in both, so "2.5" and 2.5 fail alike."""

    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be an integer, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"must be an integer, got {value!r}") from None
        if number < low:
            raise ValueError(f"must be >= {low}, got {value!r}")
        if number > high:
            raise ValueError(f"must be <= {high}{why}, got {value!r}")
        return number

    return parse


def _seconds_between(low: float, why: str = "") -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        seconds = parse_seconds(value)
        if seconds < low:
            raise ValueError(f"must be at least {low:g}s{why}, got {value!r}")
        return seconds

    return parse


def _message_bytes(why: str) -> Callable[[Any], int]:
    """A size limit for one message or result: from `MIN_PAYLOAD_BYTES` to 512 MiB."""

    def parse(value: Any) -> int:
        size = parse_bytes(value)
        if size < MIN_PAYLOAD_BYTES:
            raise ValueError(f"must be at least {MIN_PAYLOAD_BYTES} bytes{why}, got {value!r}")
        if size > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"must be at most {MAX_MESSAGE_BYTES} bytes (512 MiB: Redis refuses bigger "
                f"values, and nothing that big belongs in a queue), got {value!r}"
            )
        return size

    return parse


def _queues(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str | list | tuple):
        raise ValueError(f"must be a list of queue names, got {value!r}")
    items = value.split(",") if isinstance(value, str) and value.strip() else value
    if not items or isinstance(items, str):  # [], "" or only spaces
        raise ValueError("must name at least one queue")
    names = []
    for item in items:
        # An empty item ("a,,b", a trailing comma) is refused, not dropped: it is a typo
        # the operator should see, never a queue to consume.
        name = item.strip() if isinstance(item, str) else item
        try:
            names.append(check_name(name, "a queue name"))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    return tuple(names)


def _signal_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str | list | tuple):
        raise ValueError(f"must be a list of signal names, got {value!r}")
    return parse_names(value)


def _otlp_headers(value: Any) -> tuple[tuple[str, str], ...]:
    # Errors name the entry's position and never echo it: the values are credentials.
    if isinstance(value, dict):
        return tuple((str(k), str(v)) for k, v in value.items())
    if not isinstance(value, str):
        raise ValueError("must be a string of key=value pairs separated by commas")
    pairs = []
    for index, item in enumerate(value.split(","), 1):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"entry {index} must be key=value (values are not shown)")
        pairs.append((key.strip(), unquote(raw.strip())))  # percent-encoded, as OTEL_*'s
    return tuple(pairs)


def _positive_seconds(value: Any) -> float:
    seconds = parse_seconds(value)
    if seconds <= 0:
        raise ValueError(f"must be more than 0 seconds, got {value!r}")
    return seconds


def _optional_bytes(value: Any) -> int | None:
    if value in (None, ""):
        return None
    size = parse_bytes(value)
    return size or None  # 0 in any spelling ("0", "0B", 0.0) means no limit


@dataclass(frozen=True, slots=True)
class Field:
    """One setting: where it lives in TOML, its STEM_* variable, and its parser."""

    attr: str
    section: str  # "stem" | "sqlite" | "log" | "signals" | "telemetry" | "worker"
    key: str
    env: str
    parse: Callable[[Any], Any]


_TINY_PAYLOAD = " (an envelope alone takes a few hundred)"
_TINY_RESULT = " (a result is a JSON document; use ignore_result=True to keep none)"

FIELDS: tuple[Field, ...] = (
    Field("broker_url", "stem", "broker_url", "STEM_BROKER_URL", _url),
    Field("result_backend_url", "stem", "result_backend_url", "STEM_RESULT_BACKEND_URL",
          _optional_url),
    Field("namespace", "stem", "namespace", "STEM_NAMESPACE", _namespace),
    Field("max_payload_bytes", "stem", "max_payload_bytes", "STEM_MAX_PAYLOAD_BYTES",
          _message_bytes(_TINY_PAYLOAD)),
    Field("max_result_bytes", "stem", "max_result_bytes", "STEM_MAX_RESULT_BYTES",
          _message_bytes(_TINY_RESULT)),
    Field("result_ttl", "stem", "result_ttl", "STEM_RESULT_TTL",
          _seconds_between(1.0, " (results kept shorter are gone before anyone reads them)")),
    Field("sqlite_synchronous", "sqlite", "synchronous", "STEM_SQLITE_SYNCHRONOUS",
          _choice("FULL", "NORMAL")),
    Field("log_format", "log", "format", "STEM_LOG_FORMAT", _choice("text", "json")),
    Field("log_level", "log", "level", "STEM_LOG_LEVEL",
          _choice("DEBUG", "INFO", "WARNING", "ERROR")),
    Field("signals_enabled", "signals", "enabled", "STEM_SIGNALS_ENABLED", _signal_names),
    Field("signals_disabled", "signals", "disabled", "STEM_SIGNALS_DISABLED", _signal_names),
    Field("otlp_endpoint", "telemetry", "otlp_endpoint", "STEM_OTLP_ENDPOINT", _optional_url),
    Field("otlp_headers", "telemetry", "otlp_headers", "STEM_OTLP_HEADERS", _otlp_headers),
    Field("otlp_metrics_interval", "telemetry", "otlp_metrics_interval",
          "STEM_OTLP_METRICS_INTERVAL", _positive_seconds),
    Field("beat_enabled", "beat", "enabled", "STEM_BEAT_ENABLED", _flag),
    Field("beat_lease", "beat", "lease", "STEM_BEAT_LEASE",
          _seconds_between(1.0, " (the leader renews it at a third of this)")),
    Field("beat_grace", "beat", "grace", "STEM_BEAT_GRACE",
          _seconds_between(2.0, " (at least two leader leases: a hand-over must fit)")),
)  # fmt: skip

POOL_FIELDS: tuple[Field, ...] = (
    Field("queues", "worker", "queues", "STEM_QUEUES", _queues),
    Field("concurrency", "worker", "concurrency", "STEM_CONCURRENCY",
          _int_between(1, MAX_CONCURRENCY, " (each child is a process of its own)")),
    Field("prefetch", "worker", "prefetch", "STEM_PREFETCH", _int_between(0, MAX_COUNT)),
    Field("max_tasks_per_child", "worker", "max_tasks_per_child", "STEM_MAX_TASKS_PER_CHILD",
          _int_between(0, MAX_COUNT)),
    Field("max_memory_per_child", "worker", "max_memory_per_child",
          "STEM_MAX_MEMORY_PER_CHILD", _optional_bytes),
    Field("shutdown_grace", "worker", "shutdown_grace", "STEM_SHUTDOWN_GRACE", parse_seconds),
    Field("heartbeat_timeout", "worker", "heartbeat_timeout", "STEM_HEARTBEAT_TIMEOUT",
          _seconds_between(MIN_HEARTBEAT_TIMEOUT,
                           " (children beat every 0.5s; shorter kills healthy children)")),
)  # fmt: skip

_POOL_NAME = Field("name", "pools", "name", "", _name)  # in [[pools]] or `--pool`
_SECTIONS = {"stem", "sqlite", "log", "signals", "telemetry", "worker", "beat", "pools",
             "schedules"}  # fmt: skip


def load_settings(
    config_file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    pool: str | None = None,
) -> Settings:
    """Build `Settings`: defaults < TOML file < environment < `overrides` (CLI flags).

    `config_file` defaults to `$STEM_CONFIG`; with neither, only env and flags apply.
    `overrides` keys are `Settings`/`PoolSettings` attribute names; None values are
    ignored (a flag that was not given). `pool` selects one declared pool by name.
    """
    env = os.environ if env is None else env
    path = config_file or env.get("STEM_CONFIG") or None
    document = _read_toml(Path(path)) if path else {}
    source = str(path) if path else "defaults"
    values: dict[str, Any] = {}
    worker_values: dict[str, Any] = {}  # [worker] in the file: each [[pools]] table wins
    pool_values: dict[str, Any] = {}  # env and flags: win over every pool's file values
    for spec in FIELDS + POOL_FIELDS:
        in_file, explicit = (values, values) if spec in FIELDS else (worker_values, pool_values)
        section = document.get(spec.section, {})
        if spec.key in section:
            in_file[spec.attr] = _parse(spec, section[spec.key], f"{source}: [{spec.section}]")
        if spec.env in env:
            explicit[spec.attr] = _parse(spec, env[spec.env], f"environment {spec.env}")
    for attr, value in (overrides or {}).items():
        if value is None:
            continue
        flag = next((f for f in FIELDS + POOL_FIELDS if f.attr == attr), None)
        if flag is None:
            raise ConfigError("command line", attr, "unknown setting")
        target = values if flag in FIELDS else pool_values
        target[attr] = _parse(flag, value, "command line")
    if pool is not None:
        pool = _parse(replace(_POOL_NAME, key="--pool"), pool, "command line")
    pools = _pools(document.get("pools", []), source, worker_values, pool_values, pool)
    schedules = _schedules(document.get("schedules"), source)
    signing = SigningConfig.from_env(env)
    return replace(
        Settings(**values), pools=pools, schedules=schedules, signing=signing, source=source
    )


def _schedules(tables: Any, source: str) -> tuple[Any, ...]:
    """The `[[schedules]]` entries, all checked before any is used (Beat is imported
    only when the file has some: its calendar libraries cost time at every start)."""
    if tables is None:
        return ()
    from appliance.beat.spec import entries_from_config

    return entries_from_config(tables, source)


def _parse(spec: Field, raw: Any, where: str) -> Any:
    try:
        return spec.parse(raw)
    except ValueError as exc:
        raise ConfigError(where, spec.key, str(exc)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", str(exc)) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(str(path), "(syntax)", f"{type(exc).__name__}: {exc}") from None
    unknown = sorted(set(document) - _SECTIONS)
    if unknown:
        raise ConfigError(str(path), unknown[0], f"unknown section; known: {sorted(_SECTIONS)}")
    for section in _SECTIONS - {"pools", "schedules"}:
        known = {f.key for f in FIELDS + POOL_FIELDS if f.section == section}
        extra = sorted(set(document.get(section, {})) - known)
        if extra:
            raise ConfigError(str(path), f"[{section}] {extra[0]}", "unknown key")
    return document


def _read_text(path: Path) -> str:
    """The file's text, or a ConfigError saying why it cannot be read (a directory, no
    permission, not UTF-8, too big, a NUL in the name) instead of the OSError."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(str(path), "(file)", "config file not found") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "(file)", "is a directory, not a config file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL or a lone surrogate in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(path), "(file)", f"cannot read the config file: {reason}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            str(path), "(file)", f"larger than {MAX_CONFIG_BYTES} bytes: not a config file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "(file)", f"not UTF-8 text (TOML is UTF-8): {exc}") from None


def _pools(
    declared: Any,
    source: str,
    worker_values: dict[str, Any],
    pool_values: dict[str, Any],
    selected: str | None,
) -> tuple[PoolSettings, ...]:
    """The `[[pools]]` tables on top of `[worker]`, under env/flag values; or one pool."""
    base = PoolSettings(**(worker_values | pool_values))
    if not isinstance(declared, list):
        raise ConfigError(source, "pools", "must be an array of tables ([[pools]])")
    pools = [base] if not declared else []
    pool_keys = {f.key: f for f in POOL_FIELDS}
    for index, table in enumerate(declared):
        where = f"{source}: [[pools]] #{index + 1}"
        if not isinstance(table, dict) or "name" not in table:
            raise ConfigError(where, "name", "every pool needs a name")
        own: dict[str, Any] = {"name": _parse(_POOL_NAME, table["name"], where)}
        for key, raw in table.items():
            if key == "name":
                continue
            if key not in pool_keys:
                raise ConfigError(where, key, "unknown pool key")
            own[pool_keys[key].attr] = _parse(pool_keys[key], raw, where)
        # Flags and env given explicitly win over each pool's file values.
        pools.append(replace(base, **(own | pool_values)))
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ConfigError(source, "pools", f"pool names must be unique: {names}")
    if selected is not None:
        chosen = [p for p in pools if p.name == selected]
        if not chosen and declared:
            raise ConfigError(source, "pools", f"no pool named {selected!r}; have {names}")
        return tuple(chosen) or (replace(base, name=selected),)
    return tuple(pools)


def settings_fields() -> list[str]:
    """Names of every setting (for docs and `--help`)."""
    return [f.name for f in fields(Settings)]
