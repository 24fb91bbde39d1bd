"""Global rate limits: the `rate_limit="N/s"` option and the scheduling rule the stores
apply where messages are claimed.

The rule is GCRA (the generic cell rate algorithm) without burst: each limiter key has a
theoretical arrival time `tat`, the earliest moment its next run may start. A claim that
meets a limited message at time `now` either runs it (`tat <= now`) or books it the slot
at `tat`; either way `tat` moves one interval on. A booked message goes back to the
delayed set with `not_before = tat` and no limiter (it holds its slot), is not counted
as an attempt, and runs when its slot comes, so the claim goes on to the other messages
(no head-of-line blocking) and the store never churns through the same limited
messages on every claim. SQLite keeps `tat` in the `rate_limits` table and applies the
rule inside the claim transaction (`stores/sqlite/broker.py`); Redis keeps it in one
hash and applies it inside the claim script (`stores/redis/scripts.py`).
"""

from __future__ import annotations

import re

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_PERIOD = {"s": 1.0, "m": 60.0, "h": 3600.0}
# One run a day is the slowest limit worth a limiter; 100,000 a second the fastest that
# means anything (a claim takes about 10 µs per message).
MIN_INTERVAL_S, MAX_INTERVAL_S = 1e-5, 86400.0


def parse_rate(text: object) -> float:
    """The seconds between runs that `text` ("10/s", "600/m", "1.5/h") allows, or
    ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise TypeError(f"rate_limit must be a string such as '10/s', got {text!r}")
    match = _RATE.match(text)
    if not match:
        raise ValueError(
            f"rate_limit {text!r} is not N/s, N/m or N/h (for example '10/s', '100/m')"
        )
    count, unit = float(match.group(1)), match.group(2)
    if count <= 0:
        raise ValueError(f"rate_limit {text!r} allows nothing; use a count above 0")
    interval = _PERIOD[unit] / count
    if not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
        raise ValueError(
            f"rate_limit {text!r} must allow between one run a day and 100000 a second"
        )
    return interval


def limiter_key(name: str, key_header: str | None, headers: dict[str, str]) -> str:
    """The limiter a message of task `name` counts against: the task's own, or one per
    value of the header `key_header` (`rate_limit_key="tenant"`)."""
    if key_header is None:
        return name
    return f"{name}\x1f{headers.get(key_header, '')}"


def book(tat: float | None, now: float, interval: float) -> tuple[float, float]:
    """(when the message may start, the key's next tat): now if its slot has come, else
    the slot at `tat` it is booked into."""
    start = now if tat is None or tat <= now else tat
    return start, start + interval
