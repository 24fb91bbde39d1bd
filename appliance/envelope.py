"""The one wire format: a frozen, versioned `Envelope` and its orjson codec.

Never pickle: an envelope is JSON, so a worker can decode a message without running
anything it carries. A stored message leaves out the fields at their default (`to_raw`).
Unknown fields from a newer minor writer are ignored; a newer *major* version is refused
with a clear error (and the message dead-lettered).
"""

from __future__ import annotations

import math
import operator
import os
import random
import time
from dataclasses import MISSING, field, replace
from typing import TYPE_CHECKING, Any

import orjson

from appliance import envelope_rules
from appliance.errors import ConfigError, DecodeError, PayloadTooLarge
from appliance.records import record

if TYPE_CHECKING:
    from appliance.signing import Signer, SigningConfig, Verifier

ENVELOPE_VERSION = 1
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024

JsonDict = dict[str, Any]


# Our own generator, seeded from os.urandom and again in every forked child, so ids
# stay unique across the process tree; private, so a task that seeds the global
# `random` (reproducible runs) cannot make two processes draw the same ids. An id is a
# name, not a secret, and getrandbits costs a tenth of the urandom syscall per id.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_task_id() -> str:
    """A UUIDv7 as 32 hex digits: time-ordered, so ids inserted together land on the same
    index pages (measured +40% enqueue and drain on SQLite against random uuid4)."""
    millis = time.time_ns() // 1_000_000
    rand = _ids.getrandbits(80)
    value = (
        (millis & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76  # version 7
        | (rand >> 68) << 64  # 12 random bits
        | 0b10 << 62  # RFC 4122 variant
        | (rand & ((1 << 62) - 1))
    )
    return f"{value:032x}"


@record
class Envelope:
    """One task message. Everything a worker needs to run and retry the task."""

    id: str
    name: str
    args: JsonDict = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    attempt: int = 0  # 0-based: 0 is the first run, 1 the first retry
    max_retries: int = 3
    enqueued_at: float = 0.0  # wall clock, epoch seconds
    not_before: float | None = None  # epoch seconds; None = now
    expires: float | None = None  # epoch seconds after which a delivery is cancelled
    meta: JsonDict = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    parent_id: str | None = None
    root_id: str | None = None
    version: int = ENVELOPE_VERSION
    # Optional since 1.1; a 1.0 reader ignores them (unknown fields are ignored).
    previous: Any = None  # the result of the task before this one (links, chains)
    flow: JsonDict | None = None  # canvas and link bookkeeping (`appliance.flow`)
    rate: list[Any] | None = None  # [limiter key, seconds between runs] (`rate_limit`)
    sig: list[str] | None = None  # [key id, signature] (`appliance.signing`)
    then: list[JsonDict] | None = None  # a chain's later steps, each pre-built and sealed

    def next_attempt(self, not_before: float) -> Envelope:
        """The envelope of the retry that follows this attempt."""
        return replace(self, attempt=self.attempt + 1, not_before=not_before)

    def for_replay(self, queue: str | None = None) -> Envelope:
        """A fresh first attempt of the same task id (DLQ replay)."""
        return replace(self, attempt=0, not_before=None, queue=queue or self.queue)


_FIELDS = frozenset(Envelope.__dataclass_fields__)
_ORDER = tuple(Envelope.__dataclass_fields__)
if _ORDER[:3] != ("id", "name", "args"):  # what `EnvelopeTemplate` cuts around
    raise ImportError("Envelope must start with its id, name and args fields")
_AFTER_ARGS = _ORDER[3:]
_IN_ORDER = operator.itemgetter(*_ORDER)
_REQUIRED = ("id", "name")
_NONE: type = type(None)
_NUMBER: frozenset[type] = frozenset({int, float})
_OPTIONAL_NUMBER: frozenset[type] = frozenset({int, float, _NONE})
_OPTIONAL_TEXT: frozenset[type] = frozenset({str, _NONE})
# Exact types: orjson only produces these, and `bool` must not pass for `int`.
_TYPES: dict[str, frozenset[type]] = {
    "id": frozenset({str}),
    "name": frozenset({str}),
    "args": frozenset({dict}),
    "queue": frozenset({str}),
    "priority": frozenset({int}),
    "attempt": frozenset({int}),
    "max_retries": frozenset({int}),
    "enqueued_at": _NUMBER,
    "not_before": _OPTIONAL_NUMBER,
    "expires": _OPTIONAL_NUMBER,
    "meta": frozenset({dict}),
    "headers": frozenset({dict}),
    "parent_id": _OPTIONAL_TEXT,
    "root_id": _OPTIONAL_TEXT,
    "version": frozenset({int}),
    "previous": frozenset({dict, list, str, int, float, bool, _NONE}),  # any JSON value
    "flow": frozenset({dict, _NONE}),
    "rate": frozenset({list, _NONE}),
    "sig": frozenset({list, _NONE}),
    "then": frozenset({list, _NONE}),
}


def _encode(envelope: Envelope) -> bytes:
    """Serialise an envelope. Raises `TypeError` for arguments that are not plain JSON."""
    # orjson writes NaN/inf as null without a word: refuse them where users put values.
    _reject_non_finite(envelope.args)
    _reject_non_finite(envelope.meta)
    try:
        return orjson.dumps(to_raw(envelope))
    except TypeError as exc:
        raise _not_json(exc) from exc


def _not_json(exc: TypeError) -> TypeError:
    return TypeError(f"task arguments are not JSON-serialisable: {exc}")


def _args_json(args: JsonDict) -> bytes:
    """The JSON of a task's arguments, refused exactly as `_encode` refuses them (the
    same errors, in the same order: a NaN or infinity first, then a non-JSON value).
    orjson writes NaN/inf as null, so the walk is only needed where a null came out."""
    try:
        data = orjson.dumps(args)
    except TypeError as exc:
        _reject_non_finite(args)  # `_encode` looks for these first
        raise _not_json(exc) from exc
    if b"null" in data:
        _reject_non_finite(args)
    return data


class EnvelopeTemplate:
    """The encoding of envelopes that are `envelope` but for their id and args: the
    batch path of `Stem.enqueue_many` splices the bytes of each copy around its id and
    the JSON of its args, instead of building and serialising an `Envelope` per task.

    The pieces are cut from orjson's own encoding of `envelope` and checked to put it
    back together byte for byte, so a copy is exactly what `EnvelopeCodec.encode` would
    store for the same envelope (tested against it on every store)."""

    __slots__ = ("_head", "_mid", "_tail", "envelope")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        rest = to_raw(envelope)
        del rest["id"], rest["name"], rest["args"]  # never empty: `version` is always there
        self._head = b'{"id":'
        self._mid = b',"name":' + orjson.dumps(envelope.name) + b',"args":'
        self._tail = b"," + orjson.dumps(rest)[1:]  # the object's fields after args
        # `_encode` also refuses what the copies share (a NaN in meta, a non-JSON value).
        if self.encode(envelope.id, orjson.dumps(envelope.args)) != _encode(envelope):
            raise ValueError("orjson encodes this envelope in a way the template cannot cut")

    def encode(self, task_id: str, args_json: bytes) -> bytes:
        return b"".join((self._head, orjson.dumps(task_id), self._mid, args_json, self._tail))


class EnvelopeCodec:
    """The one way an `Envelope` becomes bytes and back, owned by a `Stem` and handed to
    its stores: every payload a broker stores went through `encode` or `reencode`, and
    every payload a worker runs went through `decode`. The size limit and signing live
    here: with a `SigningConfig`, `encode` and `seal` sign (`appliance.signing`) and
    `decode` verifies, so no other module handles keys or signatures."""

    def __init__(
        self,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        signing: SigningConfig | None = None,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.signing = signing
        self.signer: Signer | None = signing.signer() if signing and signing.can_sign else None
        self.verifier: Verifier | None = (
            signing.verifier() if signing and signing.can_verify else None
        )

    def encode(self, envelope: Envelope) -> bytes:
        """A new message from a producer: sealed (signed when configured), JSON-checked
        (non-JSON values and NaN are a `TypeError`/`ValueError`), refused above the size
        limit with a message saying what to do (`PayloadTooLarge`)."""
        data = _encode(self.seal(envelope))
        if len(data) > self.max_payload_bytes:
            raise self._too_large(envelope.name, len(data))
        return data

    def template(self, envelope: Envelope) -> EnvelopeTemplate | None:
        """A template of `envelope` for `encode_copy`, or None where every message must
        go through `encode` (signing: the signature covers each one's id and args)."""
        if self.signing is not None:
            return None
        try:
            return EnvelopeTemplate(envelope)
        except (TypeError, ValueError):
            return None  # let `encode` say what is wrong with it, per message

    def encode_copy(self, template: EnvelopeTemplate, task_id: str, args: JsonDict) -> bytes:
        """What `encode` makes of the template's envelope with this id and these args,
        refused by the same checks with the same errors (JSON, NaN, the size limit)."""
        data = template.encode(task_id, _args_json(args))
        if len(data) > self.max_payload_bytes:
            raise self._too_large(template.envelope.name, len(data))
        return data

    def _too_large(self, name: str, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"task {name!r}: encoded payload is {size} bytes, above the "
            f"{self.max_payload_bytes}-byte limit; store the data elsewhere (a file, an "
            "object store, a database row) and pass a reference to it"
        )

    def seal(self, envelope: Envelope) -> Envelope:
        """The envelope as it will be stored, signed when signing is configured; also for
        envelopes built now and enqueued later by a worker (links, chain steps, a chord's
        callback), which ride inside another message until then. A process configured to
        verify but not to sign (an Ed25519 worker) refuses: a message it wrote unsigned
        would only be dead-lettered by every worker."""
        if self.signer is not None:
            _reject_non_finite(envelope.args)  # the signature covers the canonical JSON
            try:
                return replace(envelope, sig=self.signer.sign_envelope(envelope))
            except (TypeError, orjson.JSONEncodeError) as exc:
                raise TypeError(f"task arguments are not JSON-serialisable: {exc}") from exc
        if self.signing is not None:
            raise ConfigError(
                "environment", "STEM_SIGNING_PRIVATE_KEY", "this process verifies signed "
                "messages but holds no key to sign the ones it enqueues; give it the "
                "private key (or enqueue from a producer that has it)",
            )  # fmt: skip
        return envelope

    def reencode(self, envelope: Envelope) -> bytes:
        """The next attempt of a message that passed `encode` once (a retry, a replay, a
        follow-up the producer sealed): its values came out of `decode`, so they are JSON
        already; the size limit is not applied again (a settle must never fail on it),
        and its signature is kept (it covers none of what a retry changes)."""
        return orjson.dumps(to_raw(envelope))

    def decode(self, data: bytes, *, verify: bool = True) -> Envelope:
        """The envelope a worker may run, or `DecodeError` saying what is wrong; with
        signing, `SignatureInvalid` (a `DecodeError`) unless a known key signed it.
        `verify=False` leaves the signature to a later `verify` (the supervisor decodes
        what a child will verify before it runs it)."""
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"payload is not JSON: {exc}", data) from exc
        envelope = from_raw(raw, data)
        if verify and self.verifier is not None:
            self.verifier.verify(raw, data)  # the parsed dict: its fields were checked
        return envelope

    def verify(self, data: bytes) -> None:
        """Raise `SignatureInvalid` unless a known key signed `data` (a payload that
        decodes); nothing to check without signing configured."""
        if self.verifier is not None:
            self.verifier.verify(orjson.loads(data), data)

    def peek(self, data: bytes) -> Envelope | None:
        """The envelope for display (observation, DLQ records), or None if it does not
        decode; never raises, never verifies."""
        try:
            return decode(data)
        except DecodeError:
            return None


def dumps_json(value: Any) -> bytes:
    """orjson with the checks it lacks: NaN/inf become null silently there, so refuse them."""
    try:
        out = orjson.dumps(value)
    except TypeError as exc:
        raise TypeError(f"value is not JSON-serialisable: {exc}") from exc
    if b"null" in out and not _nulls_are_top_level_nones(value, out):
        _reject_non_finite(value)  # a null may be where orjson hid a NaN or inf
    return out


def _nulls_are_top_level_nones(value: Any, out: bytes) -> bool:
    """Whether every null in `out` is one of the dict `value`'s own None values, so that
    none can be a hidden NaN: each such None writes exactly one null, and anything else
    (a NaN, a nested None, "null" inside a string) only adds to the count. A result's
    record has several None fields; walking it whole was 7.5 % of a Redis supervisor."""
    if type(value) is not dict:
        return False
    nones = 0
    for item in value.values():
        if item is None:
            nones += 1
    return out.count(b"null") == nones


# orjson refuses values nested deeper than 254 containers with a TypeError ("Recursion
# limit reached"), so nothing below this depth is ever stored and the walk stops here.
_WALK_DEPTH = 256


def _reject_non_finite(value: Any) -> None:
    """Raise ValueError for a NaN or infinity anywhere in `value`.

    One level at a time, not recursive: a value nested 10,000 deep (or one that contains
    itself) must end in orjson's TypeError, as at depth 300, not in a RecursionError."""
    if not value:
        return  # the common meta={} and args={}
    level = [value]
    for _ in range(_WALK_DEPTH + 1):
        below: list[Any] = []
        for item in level:
            if isinstance(item, float):
                if not math.isfinite(item):
                    raise ValueError(f"value is not JSON-serialisable: {item!r} has no JSON form")
            elif isinstance(item, dict):
                below.extend(item.values())
            elif isinstance(item, list | tuple):
                below.extend(item)
        if not below:
            return
        level = below


def decode(data: bytes) -> Envelope:
    """Parse bytes into an `Envelope`, or raise `DecodeError` saying what is wrong."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"payload is not JSON: {exc}", data) from exc
    return from_raw(raw, data)


# A stored message leaves out every field at its default, so the defaults below are
# part of the wire format: a reader fills them in, and changing one would change what
# every stored message means (pinned by tests/test_envelope.py). id, name and args are
# always written (what `EnvelopeTemplate` cuts around, and what a DLQ view shows), and so
# is version: a later major version must never mistake an old message for one of its own.
_ALWAYS = frozenset({"id", "name", "args", "version"})
_DEFAULTS: dict[str, Any] = {
    name: {} if f.default is MISSING else f.default  # args, meta, headers: an empty {}
    for name, f in Envelope.__dataclass_fields__.items()
    if name not in ("id", "name")
}
_KEEP = object()  # the "default" of a field that is always written
_LATER: tuple[tuple[str, Any], ...] = tuple(
    (name, _KEEP if name in _ALWAYS else _DEFAULTS[name]) for name in _AFTER_ARGS
)
_VALUES_AFTER_ARGS = operator.attrgetter(*_AFTER_ARGS)


def to_raw(envelope: Envelope) -> JsonDict:
    """The envelope as the JSON object a store keeps: its fields in their order, those at
    their default left out (a no-op task's message: 131 bytes instead of 330, and parsed
    in 7 us instead of 10 by the supervisor and again by the child). Also how a
    pre-built envelope rides inside another (a link, a chain's next step)."""
    raw: JsonDict = {"id": envelope.id, "name": envelope.name, "args": envelope.args}
    for (name, default), value in zip(_LATER, _VALUES_AFTER_ARGS(envelope), strict=True):
        # The type too: 0 is not 0.0, and a signature covers the value as written.
        if value is default or (type(value) is type(default) and value == default):
            continue
        raw[name] = value
    return raw


def from_raw(raw: Any, data: bytes = b"") -> Envelope:
    """An `Envelope` from a decoded JSON object, or `DecodeError` saying what is wrong."""
    if not isinstance(raw, dict):
        raise DecodeError(f"payload is JSON {type(raw).__name__}, expected an object", data)
    version = raw.get("version", ENVELOPE_VERSION)
    if not isinstance(version, int) or version > ENVELOPE_VERSION:
        raise DecodeError(
            f"envelope version {version!r} is newer than this worker understands "
            f"({ENVELOPE_VERSION}); upgrade the worker",
            data,
        )
    for name in _REQUIRED:
        if name not in raw:
            raise DecodeError(f"envelope has no {name!r} field", data)
    values = raw if raw.keys() <= _FIELDS else {k: v for k, v in raw.items() if k in _FIELDS}
    for name, value in values.items():
        if type(value) not in _TYPES[name]:
            raise DecodeError(f"envelope field {name!r} has type {type(value).__name__}", data)
    found = envelope_rules.problem(values, data or None)
    if found is not None:
        raise DecodeError(found, data)
    if len(values) == len(_ORDER):
        # Every field present (what writers before the compact form stored): passed by
        # position, 1.3 us against 4.5 us for 20 keywords.
        return Envelope(*_IN_ORDER(values))
    return Envelope(**values)  # fields left out take their defaults


def peek_id(data: bytes) -> str | None:
    """The task id of a payload that may not decode, for DLQ records."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None
