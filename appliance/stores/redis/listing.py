"""Listing the messages of Redis queues for observers (`stem observe tasks`, the TUI):
leased, ready and delayed messages with their states, in the SQLite broker's order.
Read-only; the broker guards each call and maps its errors."""

from __future__ import annotations

import time
from typing import Any

import redis

from appliance.broker.protocol import MessageInfo
from appliance.envelope import EnvelopeCodec
from appliance.stores.redis import keys as rk
from appliance.stores.redis.records import message_info, stream_info, text


class MessageListing:
    """`RedisBroker.list_messages` and `find_message`, on the broker's client."""

    def __init__(self, client: redis.Redis, keys: rk.Keys, codec: EnvelopeCodec) -> None:
        self.client = client
        self.keys = keys
        self.codec = codec

    def messages(self, queues: list[str], *, limit: int, offset: int) -> list[MessageInfo]:
        """Leased first, then ready (priority, then enqueue order), then delayed by due
        time, across `queues`."""
        want = offset + limit
        ranked: list[tuple[tuple[Any, ...], MessageInfo]] = []
        leases = self._leases()
        for name in queues:
            for band in rk.BANDS_HIGH_FIRST:
                ranked += self._ranked_stream(name, self.keys.stream(name, band), want, leases)
            ranked += [((2, m.not_before), m) for m in self._delayed_infos(name, want)]
        ranked.sort(key=lambda pair: pair[0])
        return [info for _, info in ranked[offset:want]]

    def find(self, task_id: str) -> MessageInfo | None:
        where = self.client.hget(self.keys.tasks, task_id)
        if where is None:
            return None
        kind, band, ref, queue = text(where).split("|", 3)
        if kind == "d":
            return self._find_delayed(queue, rk.delayed_member(band, ref, task_id))
        key = self.keys.stream(queue, int(band))
        entries: Any = self.client.xrange(key, ref, ref)
        infos = self._stream_infos(queue, key, entries, self._leases())
        return infos[0] if infos else None

    def _leases(self) -> dict[str, float]:
        raw = self.client.hgetall(self.keys.consumers)
        return {text(k): float(v) for k, v in raw.items()}

    def _ranked_stream(
        self, queue: str, key: str, want: int, leases: dict[str, float]
    ) -> list[tuple[tuple[Any, ...], MessageInfo]]:
        """Up to `want` leased and `want` ready messages of one stream, with sort keys."""
        try:
            pending: Any = self.client.xpending_range(key, rk.GROUP, "-", "+", want)
        except redis.ResponseError:  # no stream or group yet
            pending = []
        pipe = self.client.pipeline(transaction=False)
        for p in pending:
            pipe.xrange(key, p["message_id"], p["message_id"])
        pipe.xrange(key, count=want + int(self._pending_count(key)))
        *held_entries, head = pipe.execute()
        entries = [e[0] for e in held_entries if e] + [e for e in head]
        seen: set[bytes] = set()
        ranked = []
        for info, entry_id in zip(
            self._stream_infos(queue, key, entries, leases), [e[0] for e in entries], strict=True
        ):
            if entry_id in seen:
                continue
            seen.add(entry_id)
            ms, seq = text(entry_id).split("-")
            rank = 0 if info.state == "leased" else 1
            ranked.append(((rank, -info.priority, int(ms), int(seq)), info))
        return ranked

    def _pending_count(self, key: str) -> int:
        try:
            summary: Any = self.client.xpending(key, rk.GROUP)
        except redis.ResponseError:
            return 0
        return int(summary["pending"])

    def _stream_infos(
        self, queue: str, key: str, entries: list[Any], leases: dict[str, float]
    ) -> list[MessageInfo]:
        if not entries:
            return []
        try:
            ids = sorted((e[0] for e in entries), key=_id_order)
            pending: Any = self.client.xpending_range(key, rk.GROUP, ids[0], ids[-1], len(ids))
        except redis.ResponseError:  # no group yet: nothing was ever claimed
            pending = []
        held = {text(p["message_id"]): p for p in pending}
        now = time.time()
        return [
            stream_info(self.codec, queue, text(entry_id), fields, held, leases, now)
            for entry_id, fields in entries
        ]

    def _delayed_infos(self, queue: str, want: int) -> list[MessageInfo]:
        members: Any = self.client.zrange(self.keys.delayed(queue), 0, want - 1, withscores=True)
        if not members:
            return []
        payloads: Any = self.client.hmget(self.keys.delayed_payload(queue), [m for m, _ in members])
        return [
            message_info(self.codec, queue, payload, "delayed", base=0, not_before=float(score))
            for (_, score), payload in zip(members, payloads, strict=True)
            if payload is not None
        ]

    def _find_delayed(self, queue: str, member: str) -> MessageInfo | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.zscore(self.keys.delayed(queue), member)
        pipe.hget(self.keys.delayed_payload(queue), member)
        score, payload = pipe.execute()
        if score is None or payload is None:
            return None
        return message_info(self.codec, queue, payload, "delayed", base=0, not_before=float(score))


def _id_order(entry_id: bytes) -> tuple[int, int]:
    ms, seq = entry_id.split(b"-")
    return int(ms), int(seq)
