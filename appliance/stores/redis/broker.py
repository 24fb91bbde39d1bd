"""The Redis broker: Streams + one consumer group per stream, leases as PEL idle time.

Shape (keys in `keys.py`):
- One stream per queue and priority band; claims read band 9 first. Delayed messages
  (countdown, ETA, retries) wait in a per-queue sorted set and are moved to their stream
  by the claim script itself, so they are claimable as soon as they are due.
- Every operation that writes is one Lua script call (one round trip, atomic): enqueue
  of a whole batch, claim of a batch, settle of a batch, extend of a batch
  (`RedisSession.call`, which loads a script again after NOSCRIPT: a restarted server).
  A failed call has applied nothing, so the caller may simply retry it later. The
  arguments of each script are built in `script_args.py`.
- A lease is the idle time of the pending entry: `extend` re-claims the same ids for the
  same consumer with JUSTID (idle reset, counter unchanged), and a claim takes over
  entries idle longer than its lease with XAUTOCLAIM (counter bumped: poison pills are
  counted). `deliveries` = PEL counter + the base a release carried over.
- Settles check that the lease is still ours (owner and counter) before RETRY or
  RELEASE change anything; ACK and DEAD always remove the message.
- An idle worker's pool waits in a parked claim (`parking`: XREADGROUP BLOCK on a
  connection of its own), so Redis hands it a new entry in the producer's round trip;
  the PUBLISH wake-up names the bands it woke, and serves the streams a park does not
  watch.
- Acknowledged entries are XDELeted at once (Redis 7.0 has no XACKDEL), so XLEN minus
  the pending count is exactly the ready count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import redis

from appliance.broker.protocol import (
    Consumer,
    Copies,
    DeadLetterEntry,
    Delivery,
    HealthCheck,
    MessageInfo,
    QueueStats,
    Settlement,
    TaskRecord,
    Wake,
    consumer_gone,
)
from appliance.envelope import Envelope, EnvelopeCodec
from appliance.stores.common import QueueRotation, replay_of
from appliance.stores.redis import keys as rk
from appliance.stores.redis import scripts
from appliance.stores.redis.conn import client_options, connect, durability_warnings
from appliance.stores.redis.listing import MessageListing
from appliance.stores.redis.parking import RedisParking
from appliance.stores.redis.records import dead_entry, text
from appliance.stores.redis.script_args import (
    RECORD_TTL_MS,
    Receipt,
    ScriptArgs,
    record_args,
)  # fmt: skip
from appliance.stores.redis.session import RedisSession
from appliance.stores.redis.wake import RedisWake

log = logging.getLogger("stem.redis")


class RedisBroker:
    """`Broker` on Redis Streams, on the `RedisSession` it shares with the result backend
    (`appliance.stores.redis.open_store`). One per process."""

    def __init__(
        self, url: str, session: RedisSession, keys: rk.Keys, codec: EnvelopeCodec
    ) -> None:
        self.codec = codec
        self.url = url
        self.session = session
        self.client = session.client
        self.keys = keys
        self._head: list[Any] = [self.keys.prefix, rk.GROUP]
        self.head = self._head  # the first two arguments of every script (prefix, group)
        self._enqueue = session.script(scripts.source(scripts.ENQUEUE))
        self._enqueue_one = session.script(scripts.source(scripts.ENQUEUE_ONE, helpers=False))
        self._enqueue_guarded = session.script(scripts.source(scripts.ENQUEUE_GUARDED))
        self._enqueue_chord = session.script(scripts.source(scripts.ENQUEUE_CHORD))
        self._claim = session.script(scripts.source(scripts.CLAIM))
        self._settle = session.script(scripts.source(scripts.SETTLE))
        self._extend = session.script(scripts.source(scripts.EXTEND))
        self._stats = session.script(scripts.source(scripts.STATS, helpers=False))
        self._replay = session.script(scripts.source(scripts.REPLAY))
        self._purge = session.script(scripts.source(scripts.PURGE, helpers=False))
        self._next_sweep = 0.0
        self._rotation = QueueRotation()
        self._wake: RedisWake | None = None
        self._parking: RedisParking | None = None
        self._listing = MessageListing(self.client, keys, codec)
        # (queue, band) streams that delivered to this broker: they exist and have the
        # group, so a parked claim may block on them (`parking`).
        self.known_streams: set[tuple[str, int]] = set()
        self.args = ScriptArgs(codec)  # every script's arguments (`script_args`)
        self._epoch: str | None = None  # the data set this broker serves (`watch_identity`)
        self._checked_durability = False  # producers warn once about unsafe settings

    def _guard(self, what: str) -> Any:
        return self.session.guard(what)

    def watch_identity(self) -> str | None:
        """Compare the server's epoch token with the one this broker saw first; a changed
        or missing token means Redis lost its data (reported once, then adopted). Never
        fails for a full server: the token is written when there is room again."""
        with self._guard("reading the epoch"):
            found = self.client.get(self.keys.epoch)
            if found is None:
                with contextlib.suppress(redis.ResponseError):  # full: written later
                    self.client.set(self.keys.epoch, os.urandom(8).hex(), nx=True)
                found = self.client.get(self.keys.epoch)
        token = None if found is None else text(found)
        seen, self._epoch = self._epoch, token or self._epoch
        if seen is None or token is None or token == seen:
            return None
        return (
            f"Redis at {self.session.outage.where} lost its data (it restarted without "
            "persistence or was flushed): messages and results stored before are gone; "
            "turn on appendonly to keep them across restarts"
        )

    def _warn_about_durability(self) -> None:
        # Once per process: a producer must learn that Redis may silently drop what it
        # enqueues (an evicting policy, no AOF); the worker says so too, at start.
        self._checked_durability = True
        for warning in durability_warnings(self.client):
            log.warning("Redis at %s: %s", self.session.outage.where, warning)

    def health_checks(self) -> list[HealthCheck]:
        with self._guard("checking health"):
            started = time.monotonic()
            self.client.ping()
            latency = (time.monotonic() - started) * 1000
            warnings = durability_warnings(self.client)
            try:
                memory: Any = self.client.info("memory")
            except redis.ResponseError:  # an ACL without INFO: nothing to say about memory
                memory = {}
        used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
        share = f"{used / 2**20:.1f} MiB" + (f" of {limit / 2**20:.0f} MiB" if limit else "")
        return [
            HealthCheck("redis latency", latency < 100, f"PING {latency:.1f} ms"),
            HealthCheck(
                "durability", not warnings, "; ".join(warnings) or "appendonly, noeviction"
            ),
            HealthCheck("redis memory", not limit or used < 0.9 * limit, share),
        ]

    def durability_warnings(self) -> list[str]:
        """Startup check: why acknowledged enqueues could be lost (see `conn`)."""
        with self._guard("checking persistence settings"):
            return durability_warnings(self.client)

    # --- enqueue, claim, settle --------------------------------------------------------

    def enqueue(self, envelopes: Sequence[Any], *, connection: Any = None) -> None:
        if connection is not None:
            raise TypeError(
                "connection= (enqueue inside your own transaction) works with the SQLite "
                "broker only; the Redis broker commits each enqueue on its own"
            )
        if not envelopes:
            return
        self.enqueue_copies([Copies.of(e, self.codec.encode(e)) for e in envelopes])

    def enqueue_copies(self, batches: Sequence[Copies]) -> None:
        if not any(copies.ids for copies in batches):
            return
        lone = self.args.lone(batches, time.time())
        if lone is not None:
            self._send(self._enqueue_one, [*self._head, *lone])
            return
        self._send(self._enqueue, [*self._head, RECORD_TTL_MS, *self.args.batch(batches)])

    def _send(self, script: Any, args: list[Any]) -> Any:
        with self._guard("enqueue"):
            self.session.load_scripts()
            if not self._checked_durability:
                self._warn_about_durability()
            return self.session.call(script, args)

    def enqueue_guarded(
        self, envelope: Envelope, key: str, ttl: float, *, note_duplicate: bool = False
    ) -> str | None:
        now = time.time()
        args = [*self._head, key, max(1, int(ttl * 1000)), envelope.id, int(note_duplicate),
                repr(now), RECORD_TTL_MS, *self.args.message(envelope, now),
                *record_args([envelope])]  # fmt: skip
        reply: Any = self._send(self._enqueue_guarded, args)
        return None if reply[0] == 1 else text(reply[1] or b"")

    def enqueue_chord(
        self, chord_id: str, members: Sequence[Envelope], callback: Envelope, ttl: float
    ) -> None:
        rate = callback.rate
        args: list[Any] = [
            *self._head, chord_id, len(members), max(1, int(ttl * 1000)), RECORD_TTL_MS,
            callback.queue, rk.band_of(callback.priority), callback.id,
            self.codec.encode(callback), rate[0] if rate else "", repr(rate[1]) if rate else "",
            *self.args.batch([Copies.of(e, self.codec.encode(e)) for e in members]),
            *record_args([callback]),  # records go last: after the members' own
        ]  # fmt: skip
        self._send(self._enqueue_chord, args)

    def chord_values(self, chord_id: str, size: int) -> list[Any]:
        with self._guard("reading a chord"):
            found: Any = self.client.hgetall(f"{self.keys.chord(chord_id)}:values")
        values = {int(index): value for index, value in found.items()}
        if len(values) != size or set(values) != set(range(size)):
            raise LookupError(
                f"chord {chord_id}: {len(values)} of {size} member results are stored (the "
                "chord's record expired, or Redis lost it)"
            )
        return [orjson.loads(values[i]) for i in range(size)]

    def task_record(self, task_id: str) -> TaskRecord | None:
        with self._guard("reading a task record"):
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self.keys.record(task_id))
            pipe.lrange(self.keys.children(task_id), 0, -1)
            fields, children = pipe.execute()
        if not fields and not children:
            return None
        got = {text(k): text(v) for k, v in fields.items()}
        canvas = got.get("canvas")
        kids = tuple(dict.fromkeys(text(c) for c in children))  # once each, in order
        return TaskRecord(
            task_id, got.get("parent"), got.get("root"),
            orjson.loads(canvas) if canvas else None, kids,
            int(got.get("dups", 0)), float(got["dup_at"]) if "dup_at" in got else None,
        )  # fmt: skip

    def claim(
        self, queues: Sequence[str], limit: int, *, consumer: Consumer, lease: float
    ) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        now = time.time()
        # Sweeping for abandoned entries scans the PEL; a few times per lease is enough.
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + min(1.0, lease / 4)
        queues = self._rotation.order(queues)
        name = consumer.name
        args = [*self._head, repr(now), name, limit, int(lease * 1000), int(sweep), repr(lease)]
        with self._guard("claim"):
            if self.session.pipe is not None and self.session.pipe.command_stack:
                rows = self.session.flush(then=(self._claim, [*args, *queues]))
            else:
                rows = self.session.call(self._claim, [*args, *queues])
        if self._wake is not None:
            self._wake.maybe_resubscribe()
        lease_until = now + lease
        deliveries = [self._delivery(row, name, lease_until) for row in rows]
        if rows and self._parking is not None:
            self.known_streams.update(
                (d.queue, int(row[1])) for d, row in zip(deliveries, rows, strict=True)
            )
        return deliveries

    @staticmethod
    def _delivery(row: list[Any], consumer: str, lease_until: float) -> Delivery:
        queue, band, entry, payload, task, base, count, origin = row
        receipt = f"{band}|{text(entry)}|{count}|{consumer}|{text(origin)}|{text(task)}"
        return Delivery(receipt, text(queue), payload, int(base) + count, lease_until)

    def settle(self, settlements: Sequence[Settlement]) -> None:
        if not settlements:
            return
        args = list(self._head)
        for settlement in settlements:
            args += self.args.settle(settlement)
        if self.session.pipe is not None:
            self.session.queue(self._settle, args)
            return
        with self._guard("settle"):
            self.session.call(self._settle, args)

    def idle(self) -> None:
        # Acknowledged entries are deleted when settled; Redis needs no idle upkeep.
        return None

    def extend(self, deliveries: Sequence[Delivery], lease: float) -> list[Delivery]:
        if not deliveries:
            return []
        args: list[Any] = [*self._head, repr(lease)]
        for delivery in deliveries:
            r = Receipt(delivery.receipt)
            args += [delivery.queue, r.band, r.entry, r.consumer, r.count]
        with self._guard("extend"):
            lost: list[int] = self.session.call(self._extend, args)
        return [deliveries[i - 1] for i in lost]

    # --- recovery ------------------------------------------------------------------------

    def recover(self, consumer: Consumer) -> int:
        with self._guard("recover"):
            leases = {
                text(k): float(v) for k, v in self.client.hgetall(self.keys.consumers).items()
            }
            released = 0
            for queue, band, key in self._streams():
                for info in self._group_consumers(key):
                    released += self._recover_consumer(queue, band, key, info, consumer, leases)
            # Forget the leases of consumers on this host that are gone, or the hash would
            # gain an entry per supervisor lifetime.
            gone = [n for n in leases if n != consumer.name and consumer_gone(n, consumer)]
            if gone:
                self.client.hdel(self.keys.consumers, *gone)
            return released

    def _streams(self) -> Iterator[tuple[str, int, str]]:
        for queue in self._queues():
            for band in rk.BANDS_HIGH_FIRST:
                yield queue, band, self.keys.stream(queue, band)

    def _queues(self) -> list[str]:
        return sorted(text(q) for q in self.client.smembers(self.keys.queues))

    def _group_consumers(self, key: str) -> list[dict[str, Any]]:
        try:
            infos: list[dict[str, Any]] = self.client.xinfo_consumers(key, rk.GROUP)
        except redis.ResponseError:  # no such stream or group yet: nothing is leased
            return []
        return infos

    def _recover_consumer(
        self, queue: str, band: int, key: str, info: dict[str, Any], me: Consumer,
        leases: dict[str, float],
    ) -> int:  # fmt: skip
        name = text(info["name"])
        dead = name != me.name and consumer_gone(name, me)
        if not dead and name not in leases:
            return 0
        min_idle = 0 if dead else int(leases[name] * 1000)
        released = 0
        for page in self._pending_pages(key, name, min_idle):
            ops: list[Any] = list(self._head)
            for entry in page:
                ops += ["l", queue, band, text(entry["message_id"]), "", "", name,
                        entry["times_delivered"], 1]  # fmt: skip
            self.session.call(self._settle, ops)
            released += len(page)
        if dead:
            self.client.xgroup_delconsumer(key, rk.GROUP, name)
        return released

    def _pending_pages(self, key: str, name: str, min_idle: int) -> Iterator[list[dict[str, Any]]]:
        start = "-"
        while True:
            page: list[dict[str, Any]] = self.client.xpending_range(
                key, rk.GROUP, start, "+", 500, consumername=name, idle=min_idle
            )
            if not page:
                return
            yield page
            start = "(" + text(page[-1]["message_id"])

    # --- wake-ups and timing ---------------------------------------------------------------

    def next_due(self, queues: Sequence[str]) -> float | None:
        with self._guard("next_due"):
            pipe = self.client.pipeline(transaction=False)
            for queue in queues:
                pipe.zrange(self.keys.delayed(queue), 0, 0, withscores=True)
            replies = pipe.execute()
        scores = [float(reply[0][1]) for reply in replies if reply]
        return min(scores) if scores else None

    def wake_fd(self, queues: Sequence[str]) -> int | None:
        channels = sorted({*(self.keys.wake(q) for q in queues), self.keys.wake_control})
        if self._wake is None:
            self._wake = RedisWake(connect(self.url, retry=False), channels)
        elif self._wake.channels != channels:
            self._wake.channels = channels
        self._wake.subscribe()
        return self._wake.fd

    def clear_wake(self) -> Wake:
        if self._wake is None:
            return Wake.NONE
        seen = self._wake.drain()
        woke = Wake.CONTROL if self.keys.wake_control in seen else Wake.NONE
        if seen.keys() - {self.keys.wake_control}:
            woke |= Wake.MESSAGES
            if self._parking is not None:
                seen.pop(self.keys.wake_control, None)  # not a queue's (even one so named)
                self._parking.note_woken(seen, self.keys.wake(""))
        return woke

    def parking(self) -> RedisParking | None:
        """Parked claims (`parking`), for a worker; off over TLS, where a socket that is
        not readable may still hold a reply inside the TLS layer."""
        if self._parking is None and not client_options(self.url)["ssl"]:
            self._parking = RedisParking(self)
        return self._parking

    # --- pausing queues ------------------------------------------------------------------

    def pause(self, queue: str) -> bool:
        with self._guard("pausing a queue"):
            return bool(self.client.hsetnx(self.keys.paused, queue, repr(time.time())))

    def resume(self, queue: str) -> bool:
        with self._guard("resuming a queue"):
            return bool(self.client.hdel(self.keys.paused, queue))

    def paused(self) -> dict[str, float]:
        with self._guard("reading paused queues"):
            raw: Any = self.client.hgetall(self.keys.paused)
        return {text(queue): float(at) for queue, at in raw.items()}

    def queue_stats(self) -> list[QueueStats]:
        with self._guard("queue_stats"):
            paused = self.paused()
            queues = sorted({*self._queues(), *paused})
            rows = (
                self.session.call(self._stats, [*self._head, repr(time.time()), *queues])
                if queues else []
            )  # fmt: skip
        stats = []
        for queue, row in zip(queues, rows, strict=True):
            ready, delayed, in_flight, dead = map(int, row)
            stats.append(QueueStats(queue, ready, delayed, in_flight, dead, queue in paused))
        return [s for s in stats if s.ready or s.delayed or s.in_flight or s.dead or s.paused]

    # --- observation (`listing`) ----------------------------------------------------------

    def list_messages(
        self, queue: str | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[MessageInfo]:
        """Leased first, then ready (priority, then enqueue order), then delayed by due
        time: the order the SQLite broker lists in, across queues."""
        if limit <= 0:
            return []
        with self._guard("list_messages"):
            queues = [queue] if queue is not None else self._queues()
            return self._listing.messages(queues, limit=limit, offset=offset)

    def find_message(self, task_id: str) -> MessageInfo | None:
        with self._guard("find_message"):
            return self._listing.find(task_id)

    # --- dead-letter queue --------------------------------------------------------------------

    def _dlq_index(self, queue: str | None) -> str:
        return self.keys.dlq if queue is None else self.keys.dlq_queue(queue)

    def dlq_list(
        self, queue: str | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[DeadLetterEntry]:
        if limit <= 0:
            return []
        with self._guard("dlq_list"):
            ids: Any = self.client.zrevrange(self._dlq_index(queue), offset, offset + limit - 1)
            return self._dlq_entries(ids)

    def _dlq_entries(self, ids: list[bytes]) -> list[DeadLetterEntry]:
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.dlq_entry, ids)
        pipe.hmget(self.keys.dlq_payload, ids)
        records, payloads = pipe.execute()
        return [
            dead_entry(text(i), record, payload or b"")
            for i, record, payload in zip(ids, records, payloads, strict=True)
            if record is not None
        ]

    def dlq_count(self, queue: str | None = None) -> int:
        with self._guard("dlq_count"):
            return int(self.client.zcard(self._dlq_index(queue)))

    def dlq_get(self, entry_id: str) -> DeadLetterEntry | None:
        with self._guard("dlq_get"):
            found = self._dlq_entries([entry_id.encode()])
        return found[0] if found else None

    def dlq_replay(self, queue: str | None = None, *, limit: int | None = None) -> list[str]:
        stop = -1 if limit is None else limit - 1
        if limit is not None and limit <= 0:
            return []
        replayed: list[str] = []
        with self._guard("dlq_replay"):
            ids: Any = self.client.zrange(self._dlq_index(queue), 0, stop)
            for entry in self._dlq_entries(ids):
                if self._replay_one(entry) and entry.task_id is not None:
                    replayed.append(entry.task_id)
        return replayed

    def _replay_one(self, entry: DeadLetterEntry) -> bool:
        priority = int(entry.extra.get("priority", 0))
        replay = replay_of(self.codec, entry.queue, priority, entry.payload, entry.task_id)
        rate = replay.rate
        args = [*self._head, entry.id, entry.queue, replay.queue, rk.band_of(replay.priority),
                replay.task_id or "", replay.payload, rate[0] if rate else "",
                repr(rate[1]) if rate else ""]  # fmt: skip
        return bool(self.session.call(self._replay, args))

    def dlq_purge(self, queue: str | None = None) -> int:
        with self._guard("dlq_purge"):
            return int(self.session.call(self._purge, [*self._head, queue or ""]))

    def close(self) -> None:
        """Release the wake-up subscriber (the client is the `Stores`' to close)."""
        if self._parking is not None:
            self._parking.close()
            self._parking = None
        if self._wake is not None:
            self._wake.close()
            self._wake = None
