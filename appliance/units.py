"""Parsing and checking of the values people write: sizes ("200MB"), durations ("30s"),
names of tasks and queues, and the bounds every layer (config, task options, enqueue,
the CLI) applies to them, so that each value is refused the same way wherever it enters.

Every bound is documented in docs/limits.md, with its reason.
"""

from __future__ import annotations

import math
import re
from typing import Any

_NUMBER = r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
_SIZE = re.compile(rf"^\s*{_NUMBER}\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20, "mi": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40,
}  # fmt: skip
_DURATION = re.compile(rf"^\s*{_NUMBER}\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# Ten years: the longest any duration, countdown, eta or expiry may reach. Far beyond any
# real schedule, and far inside what every store can represent (Redis expiries are 64-bit
# milliseconds, SQLite REAL columns and datetime stop at year 9999).
MAX_SECONDS = 10 * 365 * 86400.0
# Any size: 1 PiB is beyond every host's memory and disk, and exact as a double.
MAX_BYTES = 2**50
# A message or a result: Redis refuses bulk strings above 512 MiB (proto-max-bulk-len),
# and nothing that big belongs in a queue.
MAX_MESSAGE_BYTES = 512 * 2**20
# Task priorities are 32-bit signed integers: they sort in SQLite and Redis alike and
# survive JSON readers that use doubles (orjson refuses integers past 64 bits anyway).
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
# Counts with no natural limit (retries, tasks per child, prefetch, CLI pages): 32-bit,
# so that any product of two of them still fits SQLite's 64-bit integers.
MAX_COUNT = 2**31 - 1
# Task names, queue names and task ids: they are keys in both stores and appear in every
# log line, so they are short, printable text.
MAX_NAME = 200
# A namespace is a Redis key prefix (before a ':') and part of an SQLite file name, so
# it is a plain word: no ':' (that would let "a" and "a:q" see each other's keys), no
# '/' (a path), no leading '.' (a hidden file, '..').
DEFAULT_NAMESPACE = "stem"
MAX_NAMESPACE = 64
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string such as "200MB", "1.5GiB", "4096"; at most 1 PiB."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"not a size: {value!r} (use bytes or a unit: 200MB, 1GiB)")
        number, unit = match.groups()
        amount: float = float(number) * _SIZE_UNITS[(unit or "").lower()]
    else:
        amount = _as_float(value)
    if not math.isfinite(amount) or math.copysign(1.0, amount) < 0:  # -0.0 too, as text
        raise ValueError(f"size must be a finite number >= 0, got {value!r}")
    if amount > MAX_BYTES:
        raise ValueError(f"size must be at most {MAX_BYTES} bytes (1 PiB), got {value!r}")
    return int(amount)


def parse_seconds(value: int | float | str) -> float:
    """Seconds from a number or a string such as "30s", "500ms", "5m"; at most 10 years."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use seconds or 500ms, 30s, 5m, 1h)")
        number, unit = match.groups()
        seconds = float(number) * _DURATION_UNITS[unit]
    else:
        seconds = _as_float(value)
    if math.isnan(seconds) or math.copysign(1.0, seconds) < 0:  # -0.0 too, as text
        raise ValueError(f"duration must not be negative or NaN: {value!r}")
    return check_seconds(seconds, "duration")


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int past the doubles: beyond every bound anyway
        return math.inf if value > 0 else -math.inf


def check_seconds(seconds: float, what: str) -> float:
    """`seconds` if it is at most `MAX_SECONDS` (ten years); else a ValueError naming `what`."""
    if not seconds <= MAX_SECONDS:  # also refuses NaN
        raise ValueError(
            f"{what} must be at most {MAX_SECONDS:.0f} seconds (10 years), got {seconds!r}"
        )
    return seconds


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """`value` if it is an int (not a bool) within [low, high]; else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{what} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{what} must be <= {high}, got {value}")
    return value


def check_priority(value: Any) -> int:
    """A task priority: an int within the 32-bit signed range."""
    return check_int(value, "priority", PRIORITY_MIN, PRIORITY_MAX)


def check_name(value: Any, what: str) -> str:
    """`value` if it is a usable task name, queue name or task id: non-empty text of at
    most `MAX_NAME` printable characters, without surrounding spaces; else ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_NAME:
        raise ValueError(f"{what} must be at most {MAX_NAME} characters, got {len(value)}")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise ValueError(f"{what} must be printable text, got {value[:40]!r} (it contains {bad!r})")
    if value != value.strip():
        raise ValueError(f"{what} must not start or end with spaces, got {value!r}")
    return value


def check_namespace(value: Any) -> str:
    """`value` if it is a usable namespace: 1 to `MAX_NAMESPACE` letters, digits, '.',
    '_' or '-', starting with a letter or digit; else ValueError (TypeError: not text)."""
    if not isinstance(value, str):
        raise TypeError(f"namespace must be a string, got {type(value).__name__}")
    if not 0 < len(value) <= MAX_NAMESPACE or not _NAMESPACE.fullmatch(value):
        shown = f"{value[:40]!r}" + ("..." if len(value) > 40 else "")
        raise ValueError(
            f"namespace must be 1 to {MAX_NAMESPACE} letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit (it names Redis keys and SQLite files), got {shown}"
        )
    return value
