"""The one wire format: round trip, and every way bytes can fail to be an envelope."""

from __future__ import annotations

import contextlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.envelope import ENVELOPE_VERSION, Envelope, EnvelopeCodec, peek_id
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
