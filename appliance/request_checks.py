"""The checks of an enqueue request's options, before an envelope is built: headers,
countdown, eta and expires as epoch times, and the lock key of a unique task. Pure
functions of what the caller gave (`Stem._envelope` is their one user); each refuses a
bad value with its own words."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from appliance.units import MAX_SECONDS, check_seconds

if TYPE_CHECKING:
    from appliance.envelope import Envelope
    from appliance.tasks import TaskOptions


def unique_guard(envelope: Envelope) -> tuple[str, float] | None:
    """The lock (key, seconds) a unique task's enqueue takes, if it is one."""
    flow = envelope.flow
    if flow is None or "unique" not in flow:
        return None
    key, ttl = flow["unique"]
    return str(key), float(ttl)


def unique_key(name: str, queue: str, args: dict[str, Any], options: TaskOptions) -> str:
    """The lock of a unique task: its name, queue and the canonical JSON of its args (or
    what `unique_key` makes of them), hashed. Never the headers: trace context differs
    between identical calls."""
    custom = options.unique_key
    if custom is None:
        basis = orjson.dumps(args, option=orjson.OPT_SORT_KEYS)
    else:
        try:
            made = custom(args) if callable(custom) else custom.format(**args)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"unique_key of task {name!r} does not fit the args: {exc}") from exc
        if not isinstance(made, str):
            raise TypeError(f"unique_key of task {name!r} returned {type(made).__name__}, not str")
        basis = made.encode()
    digest = hashlib.sha256(basis).hexdigest()[:32]
    return f"unique:{name}:{queue}:{digest}"


_MAX_HEADERS, _MAX_HEADER_BYTES = 64, 8192


def check_headers(given: Mapping[str, str] | None) -> dict[str, str]:
    """Headers as given, checked: string keys and values, at most 64 of them and 8 KiB
    in all (they ride in every message and every log context)."""
    headers = dict(given or {})
    if len(headers) > _MAX_HEADERS:
        raise ValueError(f"at most {_MAX_HEADERS} headers, got {len(headers)}")
    size = 0
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"headers must map strings to strings, got {key!r}: {value!r}")
        size += len(key) + len(value)
    if size > _MAX_HEADER_BYTES:
        raise ValueError(f"headers hold {size} characters, above the {_MAX_HEADER_BYTES} limit")
    return headers


def seconds(value: Any, what: str) -> float:
    """A countdown or relative expiry: a number of seconds in [0, ten years]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return float(check_seconds(value, what))


def timestamp(value: datetime | float, now: float, what: str) -> float:
    """An eta or absolute expiry as epoch seconds, at most ten years from `now`."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"{what} must be a timezone-aware datetime (naive times are ambiguous across "
                f"hosts); got {value!r}: use datetime.now(UTC) or tzinfo=ZoneInfo(...)"
            )
        epoch = value.timestamp()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a datetime or epoch seconds, got {value!r}")
    else:
        try:
            epoch = float(value)
        except OverflowError:  # an int past the doubles
            epoch = math.inf
    if not math.isfinite(epoch):
        raise ValueError(f"{what} must be a finite time, got {value!r}")
    if epoch - now > MAX_SECONDS:
        raise ValueError(f"{what} must be at most 10 years from now, got {value!r}")
    return epoch


def not_before_of(
    now: float, countdown: float | None, eta: datetime | float | None
) -> float | None:
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    if countdown is not None:
        return now + seconds(countdown, "countdown")
    return timestamp(eta, now, "eta") if eta is not None else None


def expires_at(now: float, expires: datetime | float | None) -> float | None:
    if expires is None:
        return None
    if not isinstance(expires, datetime) and isinstance(expires, int | float) and expires < 1e9:
        if expires == 0:
            raise ValueError("expires=0 would cancel the task before it could run")
        return now + seconds(expires, "expires")  # small numbers mean "seconds from now"
    epoch = timestamp(expires, now, "expires")
    if epoch <= now:
        raise ValueError(f"expires is in the past ({expires!r}): the task could never run")
    return epoch
