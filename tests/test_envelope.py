"""The one wire format: round trip, and every way bytes can fail to be an envelope."""

from __future__ import annotations

import contextlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.envelope import (
    _DEFAULTS,
    ENVELOPE_VERSION,
    Envelope,
    EnvelopeCodec,
    dumps_json,
    peek_id,
)
from appliance.errors import DecodeError, PayloadTooLarge

CODEC = EnvelopeCodec()
encode, decode = CODEC.encode, CODEC.decode


def test_round_trip_keeps_every_field() -> None:
    env = Envelope(
        id="abc", name="email.send", args={"to": "a@example.com", "n": [1, 2.5]},
        queue="email", priority=5, attempt=2, max_retries=4, enqueued_at=1.5,
        not_before=2.5, expires=3.5, meta={"requestId": "r1"}, headers={"h": "v"},
        parent_id="p", root_id="r",
    )  # fmt: skip
    assert decode(encode(env)) == env


def test_a_stored_message_leaves_out_the_fields_at_their_default() -> None:
    env = Envelope(id="abc", name="email.send", enqueued_at=1.5, meta={"who": "web"})
    stored = orjson.loads(encode(env))
    # Always there: what identifies the message, its arguments, and the version a later
    # major reader must see to refuse it.
    assert stored == {"id": "abc", "name": "email.send", "args": {}, "enqueued_at": 1.5,
                      "meta": {"who": "web"}, "version": ENVELOPE_VERSION}  # fmt: skip
    assert decode(encode(env)) == env
    # A retry writes the same compact form (with what the retry changed).
    retry = orjson.loads(CODEC.reencode(env.next_attempt(9.0)))
    assert retry == {**stored, "attempt": 1, "not_before": 9.0}


def test_a_value_equal_to_its_default_but_of_another_type_is_written() -> None:
    env = Envelope(id="abc", name="x", enqueued_at=0, previous=False)  # 0 is not 0.0
    stored = orjson.loads(encode(env))
    assert stored["enqueued_at"] == 0 and type(stored["enqueued_at"]) is int
    assert stored["previous"] is False
    assert decode(encode(env)) == env


def test_the_defaults_readers_fill_in_are_pinned() -> None:
    # Part of the wire format: a stored message leaves these out, so changing one would
    # change what every message already stored means. Change them only with a new
    # envelope version.
    assert _DEFAULTS == {
        "args": {}, "queue": "default", "priority": 0, "attempt": 0, "max_retries": 3,
        "enqueued_at": 0.0, "not_before": None, "expires": None, "meta": {}, "headers": {},
        "parent_id": None, "root_id": None, "version": ENVELOPE_VERSION, "previous": None,
        "flow": None, "rate": None, "sig": None, "then": None,
    }  # fmt: skip
    assert Envelope(id="a", name="b") == decode(b'{"id": "a", "name": "b"}')


def test_a_message_written_with_every_field_still_decodes() -> None:
    # What writers before the compact form stored (every field, defaults included).
    env = Envelope(id="abc", name="email.send", args={"n": 1}, enqueued_at=1.5)
    assert decode(orjson.dumps(env)) == env


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"[1, 2]", "expected an object"),
        (b'{"name": "x"}', "no 'id' field"),
        (b'{"id": "1"}', "no 'name' field"),
        (b'{"id": 1, "name": "x"}', "'id' has type int"),
        (b'{"id": "1", "name": "x", "args": []}', "'args' has type list"),
        (b'{"id": "1", "name": "x", "priority": true}', "'priority' has type bool"),
        (orjson.dumps({"id": "1", "name": "x", "version": ENVELOPE_VERSION + 1}), "newer"),
    ],
)
def test_bad_payloads_raise_decode_error_with_reason(payload: bytes, fragment: str) -> None:
    with pytest.raises(DecodeError, match=fragment) as info:
        decode(payload)
    assert info.value.data == payload


def test_unknown_fields_from_a_newer_minor_writer_are_ignored() -> None:
    assert decode(b'{"id": "1", "name": "x", "future_field": 1}').id == "1"


@pytest.mark.parametrize(
    "bad", [b"bytes", object(), {1: 2}, 2**70, float("nan"), float("inf"), {"x": [float("-inf")]}]
)
def test_non_json_args_are_refused(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match="JSON"):
        encode(Envelope(id="1", name="x", args={"value": bad}))


def test_peek_id_survives_a_wrong_shape() -> None:
    assert peek_id(b'{"id": "abc", "name": 3}') == "abc"
    assert peek_id(b"garbage") is None


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


def test_the_codec_refuses_a_payload_over_its_limit_and_says_what_to_do() -> None:
    small = EnvelopeCodec(max_payload_bytes=200)
    with pytest.raises(PayloadTooLarge, match="pass a reference"):
        small.encode(Envelope(id="1", name="x", args={"blob": "x" * 500}))


def test_reencode_is_for_envelopes_that_passed_once_and_skips_the_limit() -> None:
    small = EnvelopeCodec(max_payload_bytes=200)
    big = Envelope(id="1", name="x", args={"blob": "x" * 500}, attempt=1)
    assert small.decode(small.reencode(big)) == big  # a retry must never fail its settle


def test_peek_never_raises() -> None:
    assert CODEC.peek(b"{nope") is None
    assert CODEC.peek(CODEC.encode(Envelope(id="1", name="x"))) == Envelope(id="1", name="x")


def nested(depth: int, leaf: object = 1, kind: str = "dict") -> object:
    value = leaf
    for _ in range(depth):
        value = {"a": value} if kind == "dict" else [value]
    return value


@pytest.mark.parametrize("kind", ["dict", "list"])
@pytest.mark.parametrize("depth", [300, 10_000])
def test_arguments_nested_too_deep_are_the_same_type_error_at_any_depth(
    kind: str, depth: int
) -> None:
    # A regression: at 10,000 the NaN check recursed into a bare RecursionError, while
    # orjson's own depth limit gives this TypeError at 300.
    with pytest.raises(TypeError, match="not JSON-serialisable: Recursion limit reached"):
        encode(Envelope(id="1", name="x", args={"value": nested(depth, kind=kind)}))


def test_a_value_that_contains_itself_is_a_type_error() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="Recursion limit reached"):
        encode(Envelope(id="1", name="x", args={"value": loop}))


def test_nan_is_found_at_the_deepest_level_json_allows() -> None:
    assert decode(encode(Envelope(id="1", name="x", args={"v": nested(250)}))).args
    with pytest.raises(ValueError, match="has no JSON form"):
        encode(Envelope(id="1", name="x", args={"v": nested(250, float("nan"), "list")}))


def test_dumps_json_refuses_deep_values_with_a_type_error() -> None:
    with pytest.raises(TypeError, match="Recursion limit reached"):
        dumps_json(nested(10_000, None))
    with pytest.raises(ValueError, match="no JSON form"):
        dumps_json({"a": [1, {"b": float("inf")}]})


@pytest.mark.parametrize(
    "value",
    [
        {"value": float("nan"), "error": None},  # a NaN beside a top-level None
        {"value": None, "meta": {"x": float("inf")}},
        {"value": None, "meta": None, "data": [None, float("-inf")]},
        {"text": "null", "v": float("nan")},  # a "null" string does not excuse a NaN
    ],
)
def test_dumps_json_finds_a_nan_however_many_nones_sit_beside_it(value: object) -> None:
    with pytest.raises(ValueError, match="no JSON form"):
        dumps_json(value)


def test_dumps_json_keeps_nones_and_null_strings() -> None:
    value = {"value": None, "error": None, "text": "nullable", "nested": {"n": None}}
    assert orjson.loads(dumps_json(value)) == value
