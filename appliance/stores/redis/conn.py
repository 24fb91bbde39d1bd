"""Redis clients from `redis://` / `rediss://` URLs, error mapping and outage logging.

One place decides how the appliance talks to Redis: timeouts, the retry policy for
transient errors, TLS settings from the URL, how a lost server becomes
`BrokerUnavailable`, and the startup check that warns when acknowledged enqueues could
be lost (no AOF) or evicted (an evicting `maxmemory-policy`).

URL form: `redis[s]://[[user]:password@]host[:port][/db][?param=value&...]` with params
`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs` (none|optional|required),
`ssl_check_hostname` (true|false), `socket_timeout`, `socket_connect_timeout` (seconds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import ConstantBackoff, ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from appliance.errors import BrokerError, BrokerFull, BrokerUnavailable, ConfigError
from appliance.redaction import redact_url

log = logging.getLogger("stem.redis")

# Connection refused / reset is retried with jittered backoff: base 50 ms doubling to a
# 500 ms cap, 10 times, about 2 s in all (full jitter halves the sum on average). Then the
# caller gets BrokerUnavailable and decides (the supervisor keeps tasks running and
# settles later). Timeouts are not retried: a stalled server would multiply them, and a
# write that timed out may have been applied.
RETRIES = 10
BACKOFF_BASE = 0.05
BACKOFF_CAP = 0.5
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
QUICK_TIMEOUT = 1.0  # the supervisor's calls (see `connect(quick=True)`)

_TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_PARAMS = (*_TLS_PARAMS, "socket_timeout", "socket_connect_timeout")
_EVICTING_OK = "noeviction"


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _cert_reqs(value: str) -> str:
    if value not in ("none", "optional", "required"):
        raise ValueError(f"must be none, optional or required, got {value!r}")
    return value


_PARSERS: dict[str, Callable[[str], Any]] = {
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_check_hostname": _bool,
    "socket_timeout": float,
    "socket_connect_timeout": float,
}


def client_options(url: str) -> dict[str, Any]:
    """The `redis.Redis` keyword arguments a URL asks for; `ConfigError` names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError("url", redact(url), "scheme must be redis:// or rediss://")
    options: dict[str, Any] = {
        "host": parts.hostname or "localhost",
        "port": _port(url),
        "db": _db(parts.path, url),
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "ssl": parts.scheme == "rediss",
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
    }
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _PARAMS:
            raise ConfigError("url", key, f"unknown parameter; known: {', '.join(_PARAMS)}")
        if key in _TLS_PARAMS and not options["ssl"]:
            raise ConfigError("url", key, "TLS parameters need a rediss:// URL")
        try:
            options[key] = _PARSERS[key](value)
        except ValueError as exc:
            raise ConfigError("url", key, str(exc)) from None
    return options


def _port(url: str) -> int:
    try:
        return urlsplit(url).port or 6379
    except ValueError as exc:
        raise ConfigError("url", redact(url), f"bad port: {exc}") from None


def _db(path: str, url: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise ConfigError("url", redact(url), f"database must be a number, got {text!r}")
    return int(text)


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages; never raises (a URL
    whose port does not parse is what a ConfigError quotes)."""
    return redact_url(url)


def connect(url: str, *, retry: bool = True, quick: bool = False) -> redis.Redis:
    """A client for `url` (lazy: nothing is sent until the first command).

    `retry=False` fails at once: for the wake-up subscriber, which must never stall the
    supervisor's select loop (it is re-established on the next claim instead).
    `quick=True` is the supervisor's own client: one retry after 20 ms for a dropped
    connection, and at most `QUICK_TIMEOUT` seconds a call. Its loop backs off by itself,
    and must keep enforcing time limits (and pinging systemd) through an outage rather
    than sit two seconds in every call.
    """
    options = client_options(url)
    if not retry:
        policy = Retry(NoBackoff(), 0)
    elif quick:
        policy = Retry(ConstantBackoff(0.02), 1, supported_errors=(redis.ConnectionError,))
        for key in ("socket_timeout", "socket_connect_timeout"):
            if options[key] == client_options_default(key):  # unless the URL chose one
                options[key] = QUICK_TIMEOUT
    else:
        policy = Retry(ExponentialWithJitterBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE),
                       RETRIES, supported_errors=(redis.ConnectionError,))  # fmt: skip
    return redis.Redis(**options, retry=policy, decode_responses=False, health_check_interval=0)


def client_options_default(key: str) -> float:
    return {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}[key]


class OutageLog:
    """Logs the first failure of an outage and the recovery, nothing in between.

    A supervisor retrying every second through a ten-minute outage would otherwise write
    600 identical lines and bury the one that matters: when it started and ended.
    """

    def __init__(self, where: str, logger: logging.Logger = log) -> None:
        self.where = where
        self.logger = logger
        self.down_since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.logger.warning(
                "Redis at %s is unreachable (%s); retrying with backoff, "
                "further failures are not logged until it is back",
                self.where, exc,
            )  # fmt: skip

    def ok(self) -> None:
        if self.down_since is not None:
            down = time.monotonic() - self.down_since
            self.down_since = None
            self.logger.warning("Redis at %s is reachable again after %.1f s", self.where, down)


@contextmanager
def guarded(outage: OutageLog, what: str) -> Iterator[None]:
    """Map redis-py errors raised inside to the appliance's error hierarchy."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        outage.failed(exc)
        raise BrokerUnavailable(
            f"Redis at {outage.where} is unreachable ({what}): {exc}; check that "
            "redis-server is running and the URL, password and TLS settings are right"
        ) from exc
    except redis.ResponseError as exc:
        raise _response_error(exc, outage.where, what) from exc
    outage.ok()


def _response_error(exc: redis.ResponseError, where: str, what: str) -> BrokerError:
    text = str(exc)
    # redis-py strips the "OOM" code into the exception class (OutOfMemoryError).
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or text.startswith("OOM"):
        return BrokerFull(
            f"Redis at {where} is out of memory ({what}): {text}; raise maxmemory or "
            "drain queues; nothing was written"
        )
    if text.startswith(("MISCONF", "READONLY")):
        return BrokerUnavailable(f"Redis at {where} refuses writes ({what}): {text}")
    return BrokerError(f"Redis at {where} failed {what}: {text}")


def durability_warnings(client: redis.Redis) -> list[str]:
    """Why acknowledged enqueues could be lost on this server (empty: nothing found).

    Tolerates an ACL that denies CONFIG (a least-privilege user): that gives one warning
    saying the settings could not be checked, never an error.
    """
    try:
        appendonly = _config(client, "appendonly")
        policy = _config(client, "maxmemory-policy")
    except redis.ResponseError as exc:
        return [
            f"could not check Redis persistence (CONFIG GET denied: {exc}); make sure "
            "appendonly is yes and maxmemory-policy is noeviction"
        ]
    warnings = []
    if appendonly != "yes":
        warnings.append(
            "Redis appendonly is off: a redis-server crash loses every task enqueued "
            "since the last snapshot; set appendonly yes"
        )
    if policy and policy != _EVICTING_OK:
        warnings.append(
            f"Redis maxmemory-policy is {policy}: under memory pressure Redis may evict "
            "queued tasks or results; set maxmemory-policy noeviction"
        )
    return warnings


def _config(client: redis.Redis, name: str) -> str:
    reply: dict[Any, Any] = client.config_get(name)
    for key, value in reply.items():
        text_key = key.decode() if isinstance(key, bytes) else str(key)
        if text_key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""
