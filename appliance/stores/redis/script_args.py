"""The arguments of the Redis broker's scripts, built from envelopes and settlements:
what each script reads from ARGV, in its order (see the Lua in `scripts.py`, whose
comments name each block). Pure encoding: nothing here talks to Redis."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import orjson

from appliance.broker.protocol import Copies, Settlement
from appliance.envelope import Envelope, EnvelopeCodec
from appliance.flow import RECORD_TTL_S, FollowUps, canvas_of
from appliance.states import SettleKind
from appliance.stores.redis import keys as rk
from appliance.stores.redis.records import dead_record

RECORD_TTL_MS = int(RECORD_TTL_S * 1000)


def record_args(envelopes: Sequence[Envelope]) -> list[Any]:
    """The record arguments (see `add_record`) of the envelopes with lineage or a canvas
    place; none for plain enqueues."""
    args: list[Any] = []
    for envelope in envelopes:
        args += copy_record_args(envelope, (envelope.id,))
    return args


def _due(envelope: Envelope, now: float) -> bool:
    """Whether the message waits in the delayed set (else it is ready now)."""
    return envelope.not_before is not None and envelope.not_before > now


def _has_record(envelope: Envelope) -> bool:
    """Whether the message gets a task record: lineage or a canvas place."""
    return envelope.parent_id is not None or envelope.flow is not None


def copy_record_args(envelope: Envelope, ids: Sequence[str]) -> list[Any]:
    """The record arguments of copies of `envelope` with these ids (see `record_args`)."""
    if not _has_record(envelope):
        return []
    canvas = canvas_of(envelope)
    shared = [envelope.parent_id or "", envelope.root_id or "",
              orjson.dumps(canvas) if canvas else ""]  # fmt: skip
    args: list[Any] = []
    for task_id in ids:
        args += [task_id, *shared]
    return args


# The op codes of the settle script.
_KIND = {SettleKind.ACK: "a", SettleKind.DEAD: "d", SettleKind.RETRY: "r", SettleKind.RELEASE: "l"}


class Receipt:
    """What a `Delivery.receipt` names:
    "<band>|<entry id>|<PEL count at claim>|<consumer>|<origin>|<task id>"."""

    __slots__ = ("band", "consumer", "count", "entry", "origin", "task")

    def __init__(self, receipt: str) -> None:
        parts = receipt.split("|", 5)
        self.band, self.entry, self.count, self.consumer, self.origin, self.task = parts


class ScriptArgs:
    """Builds script arguments with the broker's codec; one per broker (it numbers the
    dead letters it makes)."""

    def __init__(self, codec: EnvelopeCodec) -> None:
        self._codec = codec
        self._dlq_last_us = 0

    def batch(self, batches: Sequence[Copies]) -> list[Any]:
        """The arguments of `store_batch`: the count of runs, the runs, the records."""
        now = time.time()
        args: list[Any] = [len(batches)]
        for copies in batches:
            args += self.copies(copies, now)
        for copies in batches:
            args += copy_record_args(copies.envelope, copies.ids)
        return args

    def lone(self, batches: Sequence[Copies], now: float) -> list[Any] | None:
        """The ENQUEUE_ONE arguments (queue, band, task, payload) when `batches` is one
        message that is ready now, with no limiter and no record; else None."""
        if len(batches) != 1 or len(batches[0].ids) != 1:
            return None
        copies = batches[0]
        env = copies.envelope
        if _due(env, now) or env.rate or _has_record(env):
            return None
        return [env.queue, rk.band_of(env.priority), copies.ids[0], copies.payloads[0]]

    def message(self, envelope: Envelope, now: float, payload: bytes | None = None) -> list[Any]:
        """The eight script arguments of one new message (see `store_message`)."""
        due = _due(envelope, now)
        rate = envelope.rate
        return [
            envelope.queue, rk.band_of(envelope.priority), envelope.id,
            self._codec.encode(envelope) if payload is None else payload,
            repr(envelope.not_before) if due else "", os.urandom(6).hex() if due else "",
            rate[0] if rate else "", repr(rate[1]) if rate else "",
        ]  # fmt: skip

    def copies(self, copies: Copies, now: float) -> list[Any]:
        """The script arguments of one run of copies (see `store_copies`): what they
        share once, then each one's task id and payload (and nonce, when delayed)."""
        env, rate = copies.envelope, copies.envelope.rate
        due = _due(env, now)
        args: list[Any] = [
            env.queue, rk.band_of(env.priority), repr(env.not_before) if due else "",
            *((rate[0], repr(rate[1])) if rate else ("", "")), len(copies.ids),
        ]  # fmt: skip
        if not due:
            for pair in zip(copies.ids, copies.payloads, strict=True):
                args += pair
            return args
        for task_id, payload in zip(copies.ids, copies.payloads, strict=True):
            # A delayed message's nonce tells apart two copies due at the same time.
            args += [task_id, payload, os.urandom(6).hex()]
        return args

    def settle(self, s: Settlement) -> list[Any]:
        """One op of the SETTLE script: its code, the message, then what its kind needs."""
        r = Receipt(s.delivery.receipt)
        kind = _KIND[s.kind]
        if s.follow is not None:
            kind = kind.upper()  # 'A' or 'D': with follow-ups
        head = [kind, s.delivery.queue, r.band, r.entry, r.origin, r.task]
        if s.kind == SettleKind.ACK:
            return head if s.follow is None else head + self.follow(s.follow)
        if s.kind == SettleKind.DEAD:
            dead = head + self.dead(s)
            return dead if s.follow is None else dead + self.follow(s.follow)
        if s.kind == SettleKind.RELEASE:
            return [*head, r.consumer, r.count, int(s.count_delivery)]
        if s.envelope is None:
            raise ValueError("a RETRY settlement needs the next attempt's envelope")
        env = s.envelope
        due = _due(env, time.time())
        rate = env.rate
        return [
            *head, r.consumer, r.count, env.queue, rk.band_of(env.priority), env.id,
            self._codec.reencode(env), repr(env.not_before) if due else "",
            rate[0] if rate else "", repr(rate[1]) if rate else "",
        ]  # fmt: skip

    def follow(self, follow: FollowUps) -> list[Any]:
        """The follow-up block of an 'A' or 'D' settle op (see SETTLE)."""
        now = time.time()
        ops: list[Any] = []
        count = 0
        for envelope in follow.enqueue:
            unique = (envelope.flow or {}).get("unique")
            guard = [str(unique[0]), max(1, int(float(unique[1]) * 1000))] if unique else ["", 0]
            payload = self._codec.reencode(envelope)
            record = record_args([envelope]) or [envelope.id, "", "", ""]
            ops += ["e", *self.message(envelope, now, payload), *guard, *record,
                    RECORD_TTL_MS]  # fmt: skip
            count += 1
        if follow.chord is not None:
            ops += ["c", follow.chord.chord_id, follow.chord.index, follow.chord.value]
            count += 1
        if follow.release is not None:
            ops += ["k", follow.release, follow.task_id]
            count += 1
        return [count, *ops]

    def dead(self, s: Settlement) -> list[Any]:
        """A dead letter's id, time, record (JSON) and payload, for a 'd' or 'D' op."""
        dead_at = time.time()
        # Ids sort by time (microseconds, strictly increasing in this process) so that
        # ties in dead_at still list newest first; the random tail keeps processes apart.
        self._dlq_last_us = max(int(dead_at * 1_000_000), self._dlq_last_us + 1)
        dlq_id = f"{self._dlq_last_us:017d}-{os.urandom(3).hex()}"
        record = dead_record(self._codec, s, dead_at)
        return [dlq_id, repr(dead_at), orjson.dumps(record), s.delivery.payload]
