"""The value rules of a stored envelope, beyond its field types: bytes read from a store
are hostile input (anyone who can write the store can write them).

`decode()` checks each field's type; `problem(raw)` then checks what the types let
through: priorities and counts in the ranges of `appliance.units`, names that are
printable text, epoch times the stores can hold, headers of bounded number and size,
and nesting that orjson can write back (a retry re-encodes the envelope). A message
with a problem is dead-lettered `undecodable` with the problem as its reason, instead of
crashing the supervisor later (an integer past 64 bits in an SQLite bind, a retry that
cannot be encoded).

`problem` is total: it never raises, whatever the dict holds, and a wrong type is a
problem too, so it is safe to call before or after the type check. It is on the hot
path (every claimed message), so the common case is a handful of comparisons.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from appliance.units import MAX_COUNT, MAX_NAME, PRIORITY_MAX, PRIORITY_MIN

# Headers are small strings (W3C traceparent is 55 characters, tracestate at most 512):
# bounded so a message cannot make every log line or trace export carry megabytes.
MAX_HEADERS = 64
MAX_HEADER_VALUE = 8192  # characters
# Epoch seconds: from 1970 to 2**33 (year 2242). Redis stores milliseconds in 64 bits
# and SQLite REAL columns hold any of these exactly enough.
MAX_EPOCH = float(2**33)
# orjson writes at most 254 levels of nesting (loads reads 1024): a message deeper
# than that decodes but could never be re-encoded for its retry.
MAX_DEPTH = 254

_NUMBER = (int, float)
_EMPTY: dict[str, Any] = {}
_OPTIONAL_NAMES = ("parent_id", "root_id")
_COUNTS = ("attempt", "max_retries")
_TIMES = ("not_before", "expires")


def problem(raw: Mapping[str, Any], data: bytes | None = None) -> str | None:
    """What is wrong with the values of a decoded envelope dict, or None if nothing.

    `data`, the payload `raw` was parsed from, makes the nesting check cheap: a payload
    with fewer brackets than the limit cannot nest that deep, so the walk is skipped."""
    if _plainly_valid(raw) and _depth_problem(raw, data) is None:
        return None  # the hot path: one pass of comparisons, no message built
    return _explain(raw) or _depth_problem(raw, data)


def _good_name(value: Any) -> bool:
    # The rule of `units.check_name`: " " is the one printable whitespace character.
    return (
        type(value) is str
        and 0 < len(value) <= MAX_NAME
        and value.isprintable()
        and value[0] != " "
        and value[-1] != " "
    )


def _good_time(value: Any) -> bool:
    return type(value) in _NUMBER and 0 <= value <= MAX_EPOCH


def _plainly_valid(raw: Mapping[str, Any]) -> bool:
    """True when `_explain` would find nothing; tested to agree with it on every input.
    Written for speed (measured): local lookups, one expression per group, calls only
    for fields that are often absent."""
    get = raw.get
    queue, priority, version = get("queue", "default"), get("priority", 0), get("version", 1)
    attempt, retries, enqueued = get("attempt", 0), get("max_retries", 0), get("enqueued_at", 0.0)
    if not (
        _good_name(get("id"))
        and _good_name(get("name"))
        and (queue == "default" or _good_name(queue))
        and type(priority) is int
        and PRIORITY_MIN <= priority <= PRIORITY_MAX
        and type(attempt) is int
        and 0 <= attempt <= MAX_COUNT
        and type(retries) is int
        and 0 <= retries <= MAX_COUNT
        and type(version) is int
        and version >= 1
        and type(enqueued) in _NUMBER
        and 0 <= enqueued <= MAX_EPOCH
        and type(get("args", _EMPTY)) is dict
        and type(get("meta", _EMPTY)) is dict
    ):
        return False
    parent, root, sig, headers = (
        get("parent_id"),
        get("root_id"),
        get("sig"),
        get("headers", _EMPTY),
    )
    not_before, expires = get("not_before"), get("expires")
    return (
        (not_before is None or _good_time(not_before))
        and (expires is None or _good_time(expires))
        and (parent is None or _good_name(parent))
        and (root is None or _good_name(root))
        and (sig is None or _good_sig(sig))
        and type(headers) is dict
        and (not headers or _headers_problem(headers) is None)
    )


def _good_sig(sig: Any) -> bool:
    return type(sig) is list and len(sig) == 2 and type(sig[0]) is str and type(sig[1]) is str


def _explain(raw: Mapping[str, Any]) -> str | None:
    """The first rule `raw` breaks, in words (the slow path: only for bad messages)."""
    for field in ("id", "name"):
        if (found := _name_problem(raw.get(field))) is not None:
            return f"envelope field {field!r} {found}"
    if (found := _name_problem(raw.get("queue", "default"))) is not None:
        return f"envelope field 'queue' {found}"
    for field in _OPTIONAL_NAMES:
        value = raw.get(field)
        if value is not None and (found := _name_problem(value)) is not None:
            return f"envelope field {field!r} {found}"
    priority = raw.get("priority", 0)
    if type(priority) is not int or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        return f"envelope field 'priority' must be an integer in [{PRIORITY_MIN}, {PRIORITY_MAX}]"
    for field in _COUNTS:
        value = raw.get(field, 0)
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            return f"envelope field {field!r} must be an integer in [0, {MAX_COUNT}]"
    return _explain_rest(raw)


def _explain_rest(raw: Mapping[str, Any]) -> str | None:
    if not _good_time(raw.get("enqueued_at", 0.0)):
        return f"envelope field 'enqueued_at' must be epoch seconds in [0, {MAX_EPOCH:.0f}]"
    for field in _TIMES:
        value = raw.get(field)
        if value is not None and not _good_time(value):
            return f"envelope field {field!r} must be null or epoch seconds in [0, {MAX_EPOCH:.0f}]"
    version = raw.get("version", 1)
    if type(version) is not int or version < 1:
        return "envelope field 'version' must be an integer >= 1"
    for field in ("args", "meta"):
        if type(raw.get(field, _EMPTY)) is not dict:
            return f"envelope field {field!r} must be an object"
    if (found := _headers_problem(raw.get("headers", _EMPTY))) is not None:
        return found
    sig = raw.get("sig")
    if sig is not None and not _good_sig(sig):
        return "envelope field 'sig' must be [key id, signature]"
    return None


def _name_problem(value: Any) -> str | None:
    """The rule of `units.check_name`, without building an exception on the good path."""
    if type(value) is not str:
        return "must be a string"
    if not 0 < len(value) <= MAX_NAME:
        return f"must be 1 to {MAX_NAME} characters"
    if not value.isprintable():
        return f"must be printable text, got {value[:40]!r}"
    if value != value.strip():
        return "must not start or end with spaces"
    return None


def headers_problem(headers: Any) -> str | None:
    """What is wrong with a headers mapping, or None: at most `MAX_HEADERS` entries,
    names that are printable text of at most `MAX_NAME` characters, string values of at
    most `MAX_HEADER_VALUE` characters. For producers too (enqueue), so that what they
    send is what workers accept."""
    return _headers_problem(headers)


def _headers_problem(headers: Any) -> str | None:
    if type(headers) is not dict:
        return "envelope field 'headers' must be an object"
    if not headers:
        return None
    if len(headers) > MAX_HEADERS:
        return f"headers: {len(headers)} entries, at most {MAX_HEADERS} are allowed"
    for name, value in headers.items():
        if (found := _name_problem(name)) is not None:
            return f"header name {found}"
        if type(value) is not str:
            return f"header {name!r} must have a string value, got {type(value).__name__}"
        if len(value) > MAX_HEADER_VALUE:
            return f"header {name!r} is {len(value)} characters, at most {MAX_HEADER_VALUE}"
    return None


def _depth_problem(raw: Mapping[str, Any], data: bytes | None) -> str | None:
    # Nesting deeper than MAX_DEPTH takes more than MAX_DEPTH opening brackets, and as
    # many closing ones: a payload too short or with too few brackets needs no walk.
    if data is not None and (
        len(data) <= 2 * MAX_DEPTH or data.count(b"{") + data.count(b"[") <= MAX_DEPTH
    ):
        return None
    level: list[Any] = [raw]
    for _ in range(MAX_DEPTH):
        below: list[Any] = []
        for item in level:
            if type(item) is dict:
                below.extend(v for v in item.values() if type(v) in (dict, list))
            elif type(item) is list:
                below.extend(v for v in item if type(v) in (dict, list))
        if not below:
            return None
        level = below
    return f"nested deeper than {MAX_DEPTH} levels (orjson could not encode its retry)"
