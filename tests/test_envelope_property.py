"""Bytes from the store are hostile input: whatever JSON object a message holds, the
decoder gives a valid `Envelope` or raises `DecodeError`, never anything else.

`decode()` checks field types, then `envelope_rules.problem()` the values the types let
through; `decode_with_rules` also runs the rules over the whole parsed dict, unknown
fields included.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.envelope import Envelope, EnvelopeCodec, decode
from appliance.envelope_rules import (
    MAX_DEPTH,
    MAX_EPOCH,
    MAX_HEADER_VALUE,
    MAX_HEADERS,
    _explain,
    _plainly_valid,
    headers_problem,
    problem,
)
from appliance.errors import DecodeError
from appliance.units import MAX_COUNT, PRIORITY_MAX, PRIORITY_MIN, check_name

# --- strategies ---------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson.loads can give
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    value: Any = 0
    for index in range(depth):
        value = [value] if index % 2 else {"k": value}
    return value


DEEP = st.integers(min_value=MAX_DEPTH - 4, max_value=MAX_DEPTH + 40).map(nested)
NAMES = (
    st.sampled_from(["email.send", "default", "a" * 200, "a" * 201, "", " x", "x ", "é", "x\ny"])
    | st.text(max_size=20)  # control characters included
    | JSON
)
PRIORITIES = (
    st.sampled_from(
        [
            0,
            -1,
            7,
            PRIORITY_MIN,
            PRIORITY_MAX,
            PRIORITY_MIN - 1,
            PRIORITY_MAX + 1,
            2**64 - 1,
            "5",
            5.0,
        ]
    )
    | JSON
)
COUNTS = st.sampled_from([0, 1, MAX_COUNT, MAX_COUNT + 1, -1, "3", 3.0, False, None]) | JSON
TIMES = (
    st.sampled_from([None, 0, 1.7e9, MAX_EPOCH, MAX_EPOCH + 1, -1.0, -0.0, 1e300, "1.7e9"])
    | st.floats(allow_nan=False, allow_infinity=False)
    | JSON
)
HEADERS = (
    st.dictionaries(st.text(max_size=12), st.text(max_size=20), max_size=3)
    | st.dictionaries(st.text(max_size=12), JSON, max_size=3)
    | st.integers(MAX_HEADERS - 1, MAX_HEADERS + 2).map(lambda n: {f"h{i}": "v" for i in range(n)})
    | st.integers(MAX_HEADER_VALUE - 1, MAX_HEADER_VALUE + 1).map(lambda n: {"h": "x" * n})
    | JSON
)
OBJECTS = (
    st.dictionaries(st.text(max_size=8), JSON, max_size=4) | DEEP.map(lambda v: {"x": v}) | JSON
)

FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": NAMES,
    "name": NAMES,
    "queue": NAMES,
    "parent_id": st.none() | NAMES,
    "root_id": st.none() | NAMES,
    "priority": PRIORITIES,
    "attempt": COUNTS,
    "max_retries": COUNTS,
    "enqueued_at": TIMES,
    "not_before": TIMES,
    "expires": TIMES,
    "version": st.sampled_from([1, 0, -1, 2, "1", 1.0, None]),
    "args": OBJECTS,
    "meta": OBJECTS,
    "headers": HEADERS,
    "previous": JSON | DEEP,
    "flow": st.none() | OBJECTS,
    "rate": st.none() | JSON,
    "sig": st.none() | st.lists(st.text(max_size=8), max_size=3) | JSON,
    "future_field": JSON,
}
VALID = {"id": "0190abc", "name": "email.send"}


@st.composite
def envelope_like(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed, with a few fields drawn from anything (wrong types, bad
    ranges, deep nesting) and some left out."""
    raw: dict[str, Any] = dict(VALID)
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=6)):
        raw[name] = draw(FIELDS[name])
    for name in draw(st.lists(st.sampled_from(["id", "name"]), unique=True, max_size=1)):
        if draw(st.integers(0, 9)) == 0:
            raw.pop(name)
    return raw


def payload(raw: Any) -> bytes:
    """The JSON of `raw` as a hostile writer could store it: the stdlib encoder, which
    writes nesting orjson refuses to (orjson.loads still reads it, up to 1024 levels)."""
    return json.dumps(raw).encode()


def decode_with_rules(data: bytes) -> Envelope:
    """What `decode()` does once `problem()` is wired in: the type checks, then the rules."""
    envelope = decode(data)
    found = problem(orjson.loads(data), data)
    if found is not None:
        raise DecodeError(found, data)
    return envelope


def assert_valid(envelope: Envelope) -> None:
    """Everything a broker, a retry and a log line rely on."""
    for name in (envelope.id, envelope.name, envelope.queue):
        check_name(name, "name")
    for optional in (envelope.parent_id, envelope.root_id):
        assert optional is None or check_name(optional, "id")
    assert PRIORITY_MIN <= envelope.priority <= PRIORITY_MAX
    assert 0 <= envelope.attempt <= MAX_COUNT and 0 <= envelope.max_retries <= MAX_COUNT
    for at in (envelope.enqueued_at, envelope.not_before, envelope.expires):
        assert at is None or (math.isfinite(at) and 0 <= at <= MAX_EPOCH)
    assert len(envelope.headers) <= MAX_HEADERS
    assert all(type(k) is str and type(v) is str for k, v in envelope.headers.items())
    # A retry re-encodes it: that must work and give the same envelope back.
    assert decode(orjson.dumps(envelope)) == envelope


# --- properties -----------------------------------------------------------------------------

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(envelope_like())
def test_decode_gives_an_envelope_or_a_decode_error(raw: dict[str, Any]) -> None:
    data = payload(raw)
    try:
        decode(data)
    except DecodeError as exc:
        assert exc.data == data


@PROPERTY
@given(envelope_like())
def test_with_the_rules_whatever_decodes_is_valid(raw: dict[str, Any]) -> None:
    data = payload(raw)
    try:
        envelope = decode_with_rules(data)
    except DecodeError as exc:
        assert exc.data == data and str(exc)
        return
    assert_valid(envelope)


@PROPERTY
@given(envelope_like() | st.dictionaries(st.text(max_size=8), JSON, max_size=6))
def test_problem_never_raises_and_its_fast_path_agrees_with_its_words(raw: dict[str, Any]) -> None:
    data = payload(raw)
    verdict = problem(raw, data)
    assert verdict is None or (isinstance(verdict, str) and verdict)
    assert problem(raw) == verdict  # the bracket count only skips work, never decides
    assert _plainly_valid(raw) == (_explain(raw) is None)


@PROPERTY
@given(st.builds(
    Envelope,
    id=st.just("0190abc"),
    name=st.from_regex(r"[a-z][a-z0-9_.]{0,40}", fullmatch=True),
    args=st.dictionaries(st.text(max_size=8), JSON, max_size=4),
    queue=st.sampled_from(["default", "email", "q-1"]),
    priority=st.integers(PRIORITY_MIN, PRIORITY_MAX),
    attempt=st.integers(0, MAX_COUNT),
    max_retries=st.integers(0, MAX_COUNT),
    enqueued_at=st.floats(0, 2e9),
    not_before=st.none() | st.floats(0, 2e9),
    expires=st.none() | st.floats(0, 2e9),
    meta=st.dictionaries(st.text(max_size=8), JSON, max_size=4),
    headers=st.dictionaries(st.from_regex(r"[a-z-]{1,20}", fullmatch=True), st.text(max_size=60),
                            max_size=4),
    parent_id=st.none() | st.just("0190abd"),
))  # fmt: skip
def test_every_envelope_a_producer_can_build_passes(envelope: Envelope) -> None:
    # In the stored (compact) form and with every field written (older writers).
    for data in (EnvelopeCodec().encode(envelope), orjson.dumps(envelope)):
        assert problem(orjson.loads(data), data) is None
        assert decode_with_rules(data) == envelope


# --- hostile examples, through decode() itself ------------------------------------------------

BASE = {"id": "0190abc", "name": "email.send"}
HOSTILE = {
    "string attempt": {**BASE, "attempt": "3"},  # a type: decode refuses it already
    "negative attempt": {**BASE, "attempt": -1},
    "negative priority past 32 bits": {**BASE, "priority": PRIORITY_MIN - 1},
    "priority past 64 bits": {**BASE, "priority": 2**64 - 1},
    "list args": {**BASE, "args": [1, 2]},  # a type: decode refuses it already
    "huge header": {**BASE, "headers": {"h": "x" * (MAX_HEADER_VALUE + 1)}},
    "too many headers": {**BASE, "headers": {f"h{i}": "v" for i in range(MAX_HEADERS + 1)}},
    "header of a number": {**BASE, "headers": {"h": 1}},
    "control character in the name": {**BASE, "name": "email.send\x1b[2J"},
    "newline in the queue": {**BASE, "queue": "default\nINFO forged log line"},
    "empty id": {**BASE, "id": ""},
    "time past 2242": {**BASE, "not_before": MAX_EPOCH * 2},
    "negative enqueue time": {**BASE, "enqueued_at": -5.0},
    "nested too deep to re-encode": {**BASE, "args": {"x": nested(MAX_DEPTH)}},
    "version 0": {**BASE, "version": 0},
    "a sig that is not a pair": {**BASE, "sig": ["k1"]},
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_decode_refuses_each_hostile_message(name: str) -> None:
    data = payload(HOSTILE[name])
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_message_has_a_problem_in_words(name: str) -> None:
    data = payload(HOSTILE[name])
    with pytest.raises(DecodeError) as info:
        decode_with_rules(data)
    assert str(info.value)


def test_the_depth_limit_is_orjsons() -> None:
    """At the limit orjson writes the envelope back (a retry works); one level deeper it
    refuses, and so do the rules."""
    at_limit = orjson.loads(_deep_json(MAX_DEPTH))
    orjson.dumps(at_limit)
    assert problem(at_limit) is None and problem(at_limit, _deep_json(MAX_DEPTH)) is None
    beyond = orjson.loads(_deep_json(MAX_DEPTH + 1))
    with pytest.raises(TypeError):
        orjson.dumps(beyond)
    assert problem(beyond) is not None
    assert problem(beyond, _deep_json(MAX_DEPTH + 1)) is not None


def _deep_json(depth: int) -> bytes:
    """An envelope object whose total nesting (itself included) is `depth`."""
    inner = b"[" * (depth - 2) + b"]" * (depth - 2)
    return b'{"id":"0190abc","name":"email.send","args":{"x":' + inner + b"}}"


def test_headers_problem_is_the_producers_check_too() -> None:
    assert headers_problem({"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}) is None
    assert headers_problem({"h": 1}) is not None
    assert headers_problem({"": "v"}) is not None
