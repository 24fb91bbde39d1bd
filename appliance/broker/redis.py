"""The Redis broker: Streams + one consumer group per stream, leases as PEL idle time.

Shape (keys in `redis_keys.py`):
- One stream per queue and priority band; claims read band 9 first. Delayed messages
  (countdown, ETA, retries) wait in a per-queue sorted set and are moved to their stream
  by the claim script itself, so they are claimable as soon as they are due.
- Every operation that writes is one Lua script call (one round trip, atomic): enqueue
  of a whole batch, claim of a batch, settle of a batch, extend of a batch. redis-py's
  `Script` reloads a script after NOSCRIPT (a restarted server), and a failed call has
  applied nothing, so the caller may simply retry it later.
- A lease is the idle time of the pending entry: `extend` re-claims the same ids for the
  same consumer with JUSTID (idle reset, counter unchanged), and a claim takes over
  entries idle longer than its lease with XAUTOCLAIM (counter bumped: poison pills are
  counted). `deliveries` = PEL counter + the base a release carried over.
- Settles check that the lease is still ours (owner and counter) before RETRY or
  RELEASE change anything; ACK and DEAD always remove the message.
- Acknowledged entries are XDELeted at once (Redis 7.0 has no XACKDEL), so XLEN minus
  the pending count is exactly the ready count.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import orjson
import psutil
import redis
from redis.commands.core import Script

from appliance.broker import redis_keys as rk
from appliance.broker.protocol import (
    Consumer,
    DeadLetterEntry,
    Delivery,
    MessageInfo,
    QueueStats,
    Settlement,
)
from appliance.config import Settings
from appliance.envelope import decode, encode, peek_id
from appliance.errors import DecodeError
from appliance.redis_conn import OutageLog, connect, durability_warnings, guarded, redact
from appliance.states import SettleKind

# Shared helpers of the writing scripts (after the key prelude).
_LUA_HELPERS = """
-- `origin` names a message across the copies a release or retry makes (field 'o'; a
-- fresh entry is its own origin), so a late ACK or DEAD still finds the message.
local function add_ready(q, band, task, payload, base, origin)
  local id
  if origin == '' then
    id = redis.call('XADD', k_stream(q, band), '*', 'p', payload, 't', task, 'b', base)
  else
    id = redis.call('XADD', k_stream(q, band), '*', 'p', payload, 't', task, 'b', base,
                    'o', origin)
  end
  if task ~= '' then redis.call('HSET', k_tasks, task, loc_stream(q, band, id)) end
  return id
end
local function add_delayed(q, band, nonce, task, payload, score)
  local member = band .. '|' .. nonce .. '|' .. task
  redis.call('ZADD', k_delayed(q), score, member)
  redis.call('HSET', k_delayed_payload(q), member, payload)
  if task ~= '' then redis.call('HSET', k_tasks, task, loc_delayed(q, band, nonce)) end
end
-- The index keeps only the newest message of a task id: drop it only if it is ours.
local function forget_loc(task, loc)
  if redis.call('HGET', k_tasks, task) == loc then redis.call('HDEL', k_tasks, task) end
end
local function fields_of(id, flat)
  local p, t, b, o = false, '', '0', id
  for j = 1, #flat, 2 do
    local f = flat[j]
    if f == 'p' then p = flat[j + 1] elseif f == 't' then t = flat[j + 1]
    elseif f == 'b' then b = flat[j + 1] elseif f == 'o' then o = flat[j + 1] end
  end
  return p, t, b, o
end
"""

_ENQUEUE = """#!lua
-- ARGV: prefix, group, then (queue, band, task, payload, score or '', nonce) per message
local woken = {}
for i = 3, #ARGV, 6 do
  local q, band, task, payload, score = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if score == '' then add_ready(q, band, task, payload, 0, '')
  else add_delayed(q, band, ARGV[i + 5], task, payload, score) end
  if not woken[q] then woken[q] = true; redis.call('SADD', k_queues, q) end
end
for q in pairs(woken) do redis.call('PUBLISH', k_wake(q), '1') end
return 0
"""

_CLAIM = """#!lua
-- ARGV: prefix, group, now, consumer, limit, (unused), sweep 0|1, lease, queues...
local now, consumer, limit = ARGV[3], ARGV[4], tonumber(ARGV[5])
local sweep, lease = ARGV[7] == '1', ARGV[8]
local out = {}

local function promote(q)
  local due = redis.call('ZRANGEBYSCORE', k_delayed(q), '-inf', now, 'LIMIT', 0, 1000)
  for _, member in ipairs(due) do
    local band, nonce, task = string.match(member, '^(%d+)|([^|]*)|(.*)$')
    local payload = redis.call('HGET', k_delayed_payload(q), member)
    redis.call('ZREM', k_delayed(q), member)
    redis.call('HDEL', k_delayed_payload(q), member)
    if payload then
      local was = redis.call('HGET', k_tasks, task)
      local id = redis.call('XADD', k_stream(q, band), '*', 'p', payload, 't', task, 'b', 0,
                            'o', nonce)
      if was == loc_delayed(q, band, nonce) then
        redis.call('HSET', k_tasks, task, loc_stream(q, band, id))
      end
    end
  end
end

local function push(q, band, id, flat, count)
  local p, t, b, o = fields_of(id, flat)
  if p then out[#out + 1] = {q, band, id, p, t, b, count, o} end
end

-- An entry idle longer than its owner's lease (the lease that consumer last claimed or
-- extended with) was abandoned. XAUTOCLAIM cannot judge per owner, so walk each owner's
-- idle entries with XPENDING IDLE, page by page, and XCLAIM them (counter bumped: a
-- task that keeps killing its holder is still counted).
local function reclaim_owner(key, q, band, owner)
  local idle = math.floor(tonumber(redis.call('HGET', k_consumers, owner) or lease) * 1000)
  local start = '-'
  while #out < limit do
    local page = redis.call('XPENDING', key, GROUP, 'IDLE', idle, start, '+', 100, owner)
    for _, e in ipairs(page) do
      local got = redis.call('XCLAIM', key, GROUP, consumer, idle, e[1])
      if got[1] then push(q, band, e[1], got[1][2], e[4] + 1) end
      if #out >= limit then return end
    end
    if #page < 100 then return end
    start = '(' .. page[#page][1]
  end
end

local function reclaim(key, q, band)
  local owners = redis.pcall('XINFO', 'CONSUMERS', key, GROUP)
  if owners.err then return end
  for _, info in ipairs(owners) do
    local name, pending = false, 0
    for j = 1, #info, 2 do
      local field, value = info[j], info[j + 1]
      if field == 'name' then name = value elseif field == 'pending' then pending = value end
    end
    if name and pending > 0 and #out < limit then reclaim_owner(key, q, band, name) end
  end
end

local function read_new(key, q, band)
  local args = {'XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', limit - #out,
                'STREAMS', key, '>'}
  local r = redis.pcall(unpack(args))
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'NOGROUP') then error(r.err) end
    -- Groups are made on first read at id 0, so nothing enqueued before is skipped.
    redis.call('XGROUP', 'CREATE', key, GROUP, '0')
    r = redis.call(unpack(args))
  end
  if not r then return end
  for _, e in ipairs(r[1][2]) do push(q, band, e[1], e[2], 1) end
end

for i = 9, #ARGV do promote(ARGV[i]) end
for band = BANDS - 1, 0, -1 do
  for i = 9, #ARGV do
    local q = ARGV[i]
    local key = k_stream(q, band)
    if #out < limit and redis.call('EXISTS', key) == 1 then
      if sweep then reclaim(key, q, band) end
      if #out < limit then read_new(key, q, band) end
    end
  end
end
if #out > 0 then redis.call('HSET', k_consumers, consumer, lease) end
return out
"""

_SETTLE = """#!lua
-- ARGV: prefix, group, then one op per settlement, each starting with
-- kind, queue, band, entry id, origin, task id:
--   a (ack)                                                              6 args
--   d (dead): + dlq id, dead_at, JSON record, payload                   10 args
--   r (retry): + consumer, count, new queue, new band, new task id,
--               payload, score or ''                                    13 args
--   l (release): + consumer, count, counted 1|0                          9 args
local woken = {}

local function held(key, id, consumer, count)
  local r = redis.pcall('XPENDING', key, GROUP, id, id, 1)
  if r.err or #r == 0 then return false end
  return r[1][2] == consumer and tostring(r[1][4]) == count
end

local function finish(key, q, band, id, task)
  redis.call('XACK', key, GROUP, id)
  local gone = redis.call('XDEL', key, id)
  forget_loc(task, loc_stream(q, band, id))
  return gone == 1
end

-- The copy of the same message (same origin) that a release or retry made after our
-- lease was lost, if the task index still points at it.
local function remove_copy(origin, task)
  local loc = redis.call('HGET', k_tasks, task)
  if not loc then return false end
  local kind, band, ref, q = string.match(loc, '^(%a)|(%d+)|([^|]*)|(.*)$')
  if kind == 'd' then
    if ref ~= origin then return false end
    local member = band .. '|' .. ref .. '|' .. task
    redis.call('HDEL', k_delayed_payload(q), member)
    redis.call('HDEL', k_tasks, task)
    return redis.call('ZREM', k_delayed(q), member) == 1
  end
  local key = k_stream(q, band)
  local entry = redis.call('XRANGE', key, ref, ref)
  if #entry == 0 then return false end
  local _, _, _, o = fields_of(ref, entry[1][2])
  if o ~= origin then return false end
  return finish(key, q, band, ref, task)
end

-- ACK and DEAD remove the message even when the lease was lost (the task did finish);
-- a message already gone is left alone.
local function remove(key, q, band, id, origin, task)
  return finish(key, q, band, id, task) or remove_copy(origin, task)
end

local function dead(key, q, band, id, origin, task, i)
  if not remove(key, q, band, id, origin, task) then return end
  local dlq_id, dead_at = ARGV[i + 6], ARGV[i + 7]
  redis.call('HSET', k_dlq_entry, dlq_id, ARGV[i + 8])
  redis.call('HSET', k_dlq_payload, dlq_id, ARGV[i + 9])
  redis.call('ZADD', k_dlq, dead_at, dlq_id)
  redis.call('ZADD', k_dlq_queue(q), dead_at, dlq_id)
end

local function retry(key, q, band, id, origin, task, i)
  if not held(key, id, ARGV[i + 6], ARGV[i + 7]) then return end
  finish(key, q, band, id, task)
  local nq, nband, ntask, payload, score = ARGV[i + 8], ARGV[i + 9], ARGV[i + 10],
                                           ARGV[i + 11], ARGV[i + 12]
  redis.call('SADD', k_queues, nq)
  if score == '' then add_ready(nq, nband, ntask, payload, 0, origin); woken[nq] = true
  else add_delayed(nq, nband, origin, ntask, payload, score) end
end

local function release(key, q, band, id, i)
  if not held(key, id, ARGV[i + 6], ARGV[i + 7]) then return end
  local entry = redis.call('XRANGE', key, id, id)
  local p, t, b, o = false, '', '0', id
  if #entry > 0 then p, t, b, o = fields_of(id, entry[1][2]) end
  finish(key, q, band, id, t)
  if p then
    local base = tonumber(b) + tonumber(ARGV[i + 7])
    if ARGV[i + 8] ~= '1' then base = base - 1 end
    add_ready(q, band, t, p, base, o)
    woken[q] = true
  end
end

local i = 3
while i <= #ARGV do
  local kind, q, band, id = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local origin, task = ARGV[i + 4], ARGV[i + 5]
  local key = k_stream(q, band)
  if kind == 'a' then remove(key, q, band, id, origin, task); i = i + 6
  elseif kind == 'd' then dead(key, q, band, id, origin, task, i); i = i + 10
  elseif kind == 'r' then retry(key, q, band, id, origin, task, i); i = i + 13
  elseif kind == 'l' then release(key, q, band, id, i); i = i + 9
  else return redis.error_reply('unknown settle kind ' .. kind) end
end
for q in pairs(woken) do redis.call('PUBLISH', k_wake(q), '1') end
return 0
"""

_EXTEND = """#!lua
-- ARGV: prefix, group, lease, then (queue, band, entry id, consumer, count) per delivery.
-- XCLAIM with min-idle 0 and JUSTID resets the idle time without bumping the counter;
-- only for entries still held by the same consumer with the same counter.
local n = 0
local consumer = nil
for i = 4, #ARGV, 5 do
  local key, id = k_stream(ARGV[i], ARGV[i + 1]), ARGV[i + 2]
  local r = redis.pcall('XPENDING', key, GROUP, id, id, 1)
  if not r.err and #r == 1 and r[1][2] == ARGV[i + 3] and tostring(r[1][4]) == ARGV[i + 4] then
    redis.call('XCLAIM', key, GROUP, ARGV[i + 3], 0, id, 'JUSTID')
    consumer = ARGV[i + 3]
    n = n + 1
  end
end
if consumer then redis.call('HSET', k_consumers, consumer, ARGV[3]) end
return n
"""

_STATS = """#!lua flags=no-writes
-- ARGV: prefix, group, now, queues... -> per queue {ready, delayed, in flight, dead}
-- A delayed message already due counts as ready: the next claim promotes it.
local now = ARGV[3]
local out = {}
for i = 4, #ARGV do
  local q = ARGV[i]
  local ready, inflight = 0, 0
  for band = 0, BANDS - 1 do
    local key = k_stream(q, band)
    if redis.call('EXISTS', key) == 1 then
      local pend = redis.pcall('XPENDING', key, GROUP)
      local n = 0
      if not pend.err then n = pend[1] end
      ready = ready + redis.call('XLEN', key) - n
      inflight = inflight + n
    end
  end
  local due = redis.call('ZCOUNT', k_delayed(q), '-inf', now)
  out[#out + 1] = {ready + due, redis.call('ZCARD', k_delayed(q)) - due, inflight,
                   redis.call('ZCARD', k_dlq_queue(q))}
end
return out
"""

_REPLAY = """#!lua
-- ARGV: prefix, group, dlq id, dead queue, new queue, band, task, payload
local id, dq, q, band, task, payload = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if redis.call('ZREM', k_dlq, id) == 0 then return 0 end
redis.call('ZREM', k_dlq_queue(dq), id)
redis.call('HDEL', k_dlq_entry, id)
redis.call('HDEL', k_dlq_payload, id)
redis.call('SADD', k_queues, q)
add_ready(q, band, task, payload, 0, '')
redis.call('PUBLISH', k_wake(q), '1')
return 1
"""

_PURGE = """#!lua
-- ARGV: prefix, group, queue or '' (all) -> how many dead letters were deleted
local q = ARGV[3]
local index = k_dlq
if q ~= '' then index = k_dlq_queue(q) end
local ids = redis.call('ZRANGE', index, 0, -1)
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', k_dlq_entry, id)
  redis.call('ZREM', k_dlq, id)
  redis.call('HDEL', k_dlq_entry, id)
  redis.call('HDEL', k_dlq_payload, id)
  if raw then redis.call('ZREM', k_dlq_queue(cjson.decode(raw)['queue']), id) end
end
redis.call('DEL', index)
return #ids
"""


# The op codes of the settle script.
_KIND = {SettleKind.ACK: "a", SettleKind.DEAD: "d", SettleKind.RETRY: "r", SettleKind.RELEASE: "l"}


def _script(client: redis.Redis, body: str, *, helpers: bool = True) -> Script:
    shebang, _, rest = body.partition("\n")
    source = "\n".join([shebang, rk.LUA_KEYS, _LUA_HELPERS if helpers else "", rest])
    return client.register_script(source)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Receipt:
    """What a `Delivery.receipt` names:
    "<band>|<entry id>|<PEL count at claim>|<consumer>|<origin>|<task id>"."""

    __slots__ = ("band", "consumer", "count", "entry", "origin", "task")

    def __init__(self, receipt: str) -> None:
        parts = receipt.split("|", 5)
        self.band, self.entry, self.count, self.consumer, self.origin, self.task = parts


class _Wake:
    """The wake-up subscriber behind `wake_fd`, with a file descriptor that never changes.

    The supervisor selects on `fd`, a dup of the subscriber's socket. When that socket is
    replaced (Redis restarted), `dup2` re-points the same fd number at the new one; while
    Redis is down it points at a socket nobody writes to, so the loop falls back to its
    1 s poll instead of spinning on a dead connection.
    """

    RETRY_EVERY = 1.0

    def __init__(self, client: redis.Redis, channels: list[str]) -> None:
        self.client = client
        self.channels = channels
        self.pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self._quiet, self._quiet_peer = socket.socketpair()
        self.fd = os.dup(self._quiet.fileno())
        self.sock_fd: int | None = None
        self.next_try = 0.0

    def subscribe(self) -> None:
        try:
            self.pubsub.reset()
            self.pubsub.subscribe(*self.channels)
            # Read the confirmations now, so the fd is not readable for no reason.
            for _ in self.channels:
                self.pubsub.get_message(timeout=1.0)
            self._point_at_socket()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._go_quiet()

    def _point_at_socket(self) -> None:
        conn = self.pubsub.connection
        sock = conn._sock if conn is not None else None
        if sock is None:
            self._go_quiet()
            return
        if sock.fileno() != self.sock_fd:
            os.dup2(sock.fileno(), self.fd)
            self.sock_fd = sock.fileno()

    def _go_quiet(self) -> None:
        os.dup2(self._quiet.fileno(), self.fd)
        self.sock_fd = None
        self.next_try = time.monotonic() + self.RETRY_EVERY

    def drain(self) -> None:
        """Read every pending message without blocking."""
        if self.sock_fd is None:
            self.maybe_resubscribe()
            return
        try:
            while self.pubsub.get_message(timeout=0) is not None:
                pass
            self._point_at_socket()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._go_quiet()

    def maybe_resubscribe(self) -> None:
        if self.sock_fd is None and time.monotonic() >= self.next_try:
            self.subscribe()

    def close(self) -> None:
        try:
            self.pubsub.close()
        finally:
            os.close(self.fd)
            self._quiet.close()
            self._quiet_peer.close()
            self.client.close()


class RedisBroker:
    """`Broker` on Redis Streams. One instance per process (connections never cross fork)."""

    def __init__(self, url: str, client: redis.Redis, *, namespace: str) -> None:
        self.url = url
        self.client = client
        self.keys = rk.Keys(namespace)
        self._head: list[Any] = [self.keys.prefix, rk.GROUP]
        self._outage = OutageLog(redact(url))
        self._enqueue = _script(client, _ENQUEUE)
        self._claim = _script(client, _CLAIM)
        self._settle = _script(client, _SETTLE)
        self._extend = _script(client, _EXTEND, helpers=False)
        self._stats = _script(client, _STATS, helpers=False)
        self._replay = _script(client, _REPLAY)
        self._purge = _script(client, _PURGE, helpers=False)
        self._scripts = [self._enqueue, self._claim, self._settle, self._extend, self._stats,
                         self._replay, self._purge]  # fmt: skip
        self._loaded = False
        self._next_sweep = 0.0
        self._rotation = 0
        self._wake: _Wake | None = None
        self._dlq_last_us = 0
        # Inside batch(): writes queue here and go out with the next claim, or at the end
        # of the batch, in one round trip (the supervisor's settle-and-claim round).
        self._pipe: Any = None

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisBroker:
        return cls(url, connect(url), namespace=settings.namespace)

    def _guard(self, what: str) -> Any:
        return guarded(self._outage, what)

    def _load_scripts(self) -> None:
        """Load every script once, in one round trip, before the first big call: otherwise
        EVALSHA of a 20k-message enqueue is sent twice (NOSCRIPT, then again). After a
        server restart redis-py's NOSCRIPT fallback reloads them one by one."""
        if not self._loaded:
            pipe = self.client.pipeline(transaction=False)
            for script in self._scripts:
                pipe.script_load(script.script)
            pipe.execute()
            self._loaded = True

    def durability_warnings(self) -> list[str]:
        """Startup check: why acknowledged enqueues could be lost (see `redis_conn`)."""
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
        now = time.time()
        args = list(self._head)
        for envelope in envelopes:
            due = envelope.not_before is not None and envelope.not_before > now
            args += [
                envelope.queue, rk.band_of(envelope.priority), envelope.id, encode(envelope),
                repr(envelope.not_before) if due else "", os.urandom(6).hex() if due else "",
            ]  # fmt: skip
        with self._guard("enqueue"):
            self._load_scripts()
            self._enqueue(args=args)

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
        # Rotate the first queue between calls so a busy queue cannot starve the others.
        start = self._rotation % len(queues)
        self._rotation += 1
        queues = [*queues[start:], *queues[:start]]
        name = consumer.name
        args = [*self._head, repr(now), name, limit, int(lease * 1000), int(sweep), repr(lease)]
        with self._guard("claim"):
            if self._pipe is not None and self._pipe.command_stack:
                rows = self._flush_batch(then=(self._claim, [*args, *queues]))
            else:
                rows = self._claim(args=[*args, *queues])
        if self._wake is not None:
            self._wake.maybe_resubscribe()
        lease_until = now + lease
        return [self._delivery(row, name, lease_until) for row in rows]

    @staticmethod
    def _delivery(row: list[Any], consumer: str, lease_until: float) -> Delivery:
        queue, band, entry, payload, task, base, count, origin = row
        receipt = f"{band}|{_text(entry)}|{count}|{consumer}|{_text(origin)}|{_text(task)}"
        return Delivery(receipt, _text(queue), payload, int(base) + count, lease_until)

    def settle(self, settlements: Sequence[Settlement]) -> None:
        if not settlements:
            return
        args = list(self._head)
        for settlement in settlements:
            args += self._settle_args(settlement)
        if self._pipe is not None:
            self._queue(self._settle, args)
            return
        with self._guard("settle"):
            self._settle(args=args)

    def _settle_args(self, s: Settlement) -> list[Any]:
        r = _Receipt(s.delivery.receipt)
        head = [_KIND[s.kind], s.delivery.queue, r.band, r.entry, r.origin, r.task]
        if s.kind == SettleKind.ACK:
            return head
        if s.kind == SettleKind.DEAD:
            return head + self._dead_args(s)
        if s.kind == SettleKind.RELEASE:
            return [*head, r.consumer, r.count, int(s.count_delivery)]
        if s.envelope is None:
            raise ValueError("a RETRY settlement needs the next attempt's envelope")
        env = s.envelope
        due = env.not_before is not None and env.not_before > time.time()
        return [
            *head, r.consumer, r.count, env.queue, rk.band_of(env.priority), env.id,
            encode(env), repr(env.not_before) if due else "",
        ]  # fmt: skip

    def _dead_args(self, s: Settlement) -> list[Any]:
        dead_at = time.time()
        # Ids sort by time (microseconds, strictly increasing in this process) so that
        # ties in dead_at still list newest first; the random tail keeps processes apart.
        self._dlq_last_us = max(int(dead_at * 1_000_000), self._dlq_last_us + 1)
        dlq_id = f"{self._dlq_last_us:017d}-{os.urandom(3).hex()}"
        record = _dead_record(s, dead_at)
        return [dlq_id, repr(dead_at), orjson.dumps(record), s.delivery.payload]

    def batch(self) -> AbstractContextManager[None]:
        """Pipelining, not a transaction: each script stays atomic on its own, and a
        batch that fails part-way is retried whole by the supervisor, which is safe
        because result writes and settles are idempotent (a repeated settle of a lease
        already settled changes nothing)."""
        return self._batch_scope()

    @contextlib.contextmanager
    def _batch_scope(self) -> Iterator[None]:
        if self._pipe is not None:  # reentrant
            yield
            return
        with self._guard("loading scripts"):
            self._load_scripts()
        self._pipe = self.client.pipeline(transaction=False)
        try:
            yield
            if self._pipe.command_stack:
                with self._guard("settle"):
                    self._flush_batch()
        finally:
            self._pipe = None

    @property
    def batch_pipeline(self) -> Any:
        """The pipeline of the open batch, for a result backend on the same server."""
        return self._pipe

    def _queue(self, script: Script, args: list[Any]) -> None:
        # EVALSHA rather than the Script object: a pipeline holding Script objects asks
        # SCRIPT EXISTS on every execute, a second round trip. The scripts were loaded
        # when the batch opened; after a server restart NOSCRIPT fails the batch, the
        # supervisor retries it, and the reload below makes the retry work.
        self._pipe.evalsha(script.sha, 0, *args)

    def _flush_batch(self, then: tuple[Script, list[Any]] | None = None) -> Any:
        """Send what the batch queued (plus `then`), one round trip; `then`'s reply."""
        if then is not None:
            self._queue(*then)
        pipe, self._pipe = self._pipe, self.client.pipeline(transaction=False)
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:
            self._loaded = False
            raise
        return replies[-1] if then is not None else None

    def idle(self) -> None:
        # Acknowledged entries are deleted when settled; Redis needs no idle upkeep.
        return None

    def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        if not deliveries:
            return
        args: list[Any] = [*self._head, repr(lease)]
        for delivery in deliveries:
            r = _Receipt(delivery.receipt)
            args += [delivery.queue, r.band, r.entry, r.consumer, r.count]
        with self._guard("extend"):
            self._extend(args=args)

    # --- recovery ------------------------------------------------------------------------

    def recover(self, consumer: Consumer) -> int:
        with self._guard("recover"):
            leases = {
                _text(k): float(v) for k, v in self.client.hgetall(self.keys.consumers).items()
            }
            released = 0
            for queue, band, key in self._streams():
                for info in self._group_consumers(key):
                    released += self._recover_consumer(queue, band, key, info, consumer, leases)
            return released

    def _streams(self) -> Iterator[tuple[str, int, str]]:
        for queue in self._queues():
            for band in rk.BANDS_HIGH_FIRST:
                yield queue, band, self.keys.stream(queue, band)

    def _queues(self) -> list[str]:
        return sorted(_text(q) for q in self.client.smembers(self.keys.queues))

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
        name = _text(info["name"])
        dead = name != me.name and _dead_here(name, me)
        if not dead and name not in leases:
            return 0
        min_idle = 0 if dead else int(leases[name] * 1000)
        released = 0
        for page in self._pending_pages(key, name, min_idle):
            ops: list[Any] = list(self._head)
            for entry in page:
                ops += ["l", queue, band, _text(entry["message_id"]), "", "", name,
                        entry["times_delivered"], 1]  # fmt: skip
            self._settle(args=ops)
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
            start = "(" + _text(page[-1]["message_id"])

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
        channels = sorted(self.keys.wake(q) for q in queues)
        if self._wake is None:
            self._wake = _Wake(connect(self.url, retry=False), channels)
        elif self._wake.channels != channels:
            self._wake.channels = channels
        self._wake.subscribe()
        return self._wake.fd

    def clear_wake(self) -> None:
        if self._wake is not None:
            self._wake.drain()

    # --- observation ------------------------------------------------------------------------

    def queue_stats(self) -> list[QueueStats]:
        with self._guard("queue_stats"):
            queues = self._queues()
            rows = self._stats(args=[*self._head, repr(time.time()), *queues]) if queues else []
        stats = [QueueStats(q, *map(int, row)) for q, row in zip(queues, rows, strict=True)]
        return [s for s in stats if s.ready or s.delayed or s.in_flight or s.dead]

    def list_messages(
        self, queue: str | None = None, *, limit: int = 50, offset: int = 0
    ) -> list[MessageInfo]:
        """Leased first, then ready (priority, then enqueue order), then delayed by due
        time: the order the SQLite broker lists in, across queues."""
        want = offset + limit
        if limit <= 0:
            return []
        ranked: list[tuple[tuple[Any, ...], MessageInfo]] = []
        with self._guard("list_messages"):
            leases = self._leases()
            for name in [queue] if queue is not None else self._queues():
                for band in rk.BANDS_HIGH_FIRST:
                    ranked += self._ranked_stream(name, self.keys.stream(name, band), want, leases)
                ranked += [((2, m.not_before), m) for m in self._delayed_infos(name, want)]
        ranked.sort(key=lambda pair: pair[0])
        return [info for _, info in ranked[offset:want]]

    def _leases(self) -> dict[str, float]:
        raw = self.client.hgetall(self.keys.consumers)
        return {_text(k): float(v) for k, v in raw.items()}

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
            ms, seq = _text(entry_id).split("-")
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
        held = {_text(p["message_id"]): p for p in pending}
        now = time.time()
        return [
            _stream_info(queue, _text(entry_id), fields, held, leases, now)
            for entry_id, fields in entries
        ]

    def _delayed_infos(self, queue: str, want: int) -> list[MessageInfo]:
        members: Any = self.client.zrange(self.keys.delayed(queue), 0, want - 1, withscores=True)
        if not members:
            return []
        payloads: Any = self.client.hmget(self.keys.delayed_payload(queue), [m for m, _ in members])
        return [
            _message_info(queue, payload, "delayed", base=0, not_before=float(score))
            for (_, score), payload in zip(members, payloads, strict=True)
            if payload is not None
        ]

    def find_message(self, task_id: str) -> MessageInfo | None:
        with self._guard("find_message"):
            where = self.client.hget(self.keys.tasks, task_id)
            if where is None:
                return None
            kind, band, ref, queue = _text(where).split("|", 3)
            if kind == "d":
                return self._find_delayed(queue, rk.delayed_member(band, ref, task_id))
            key = self.keys.stream(queue, int(band))
            entries: Any = self.client.xrange(key, ref, ref)
            infos = self._stream_infos(queue, key, entries, self._leases())
            return infos[0] if infos else None

    def _find_delayed(self, queue: str, member: str) -> MessageInfo | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.zscore(self.keys.delayed(queue), member)
        pipe.hget(self.keys.delayed_payload(queue), member)
        score, payload = pipe.execute()
        if score is None or payload is None:
            return None
        return _message_info(queue, payload, "delayed", base=0, not_before=float(score))

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
            _dead_entry(_text(i), record, payload or b"")
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
        try:
            envelope = decode(entry.payload).for_replay()
            payload, queue, band = encode(envelope), envelope.queue, rk.band_of(envelope.priority)
        except DecodeError:  # reinserted as it was: the worker dead-letters it again, visibly
            payload, queue, band = entry.payload, entry.queue, 0
        args = [*self._head, entry.id, entry.queue, queue, band, entry.task_id or "", payload]
        return bool(self._replay(args=args))

    def dlq_purge(self, queue: str | None = None) -> int:
        with self._guard("dlq_purge"):
            return int(self._purge(args=[*self._head, queue or ""]))

    def close(self) -> None:
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        self.client.close()


def _id_order(entry_id: bytes) -> tuple[int, int]:
    ms, seq = entry_id.split(b"-")
    return int(ms), int(seq)


def _dead_here(name: str, me: Consumer) -> bool:
    """True when consumer `name` ran on this host and its process is provably gone."""
    try:
        other = Consumer.parse(name)
    except ValueError:
        return False
    if other.host != me.host:
        return False
    try:
        started = psutil.Process(other.pid).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
    return abs(started - other.started) > 0.5  # the pid was reused by another process


def _dead_record(s: Settlement, dead_at: float) -> dict[str, Any]:
    info = s.dead
    try:
        envelope = decode(s.delivery.payload)
        task_id: str | None = envelope.id
        name, attempts = envelope.name, envelope.attempt + 1
        enqueued_at: float | None = envelope.enqueued_at
        priority = envelope.priority
    except DecodeError:
        task_id, name, attempts, enqueued_at = None, None, 1, None
        task_id, priority = peek_id(s.delivery.payload), 0
    return {
        "task_id": task_id, "name": name, "queue": s.delivery.queue,
        "reason": str(info.reason) if info else "", "error_type": info.error_type if info else "",
        "message": info.message if info else "", "traceback": info.traceback if info else "",
        "attempts": attempts, "enqueued_at": enqueued_at, "dead_at": dead_at,
        "extra": {"deliveries": s.delivery.deliveries, "priority": priority},
    }  # fmt: skip


def _dead_entry(entry_id: str, record: bytes, payload: bytes) -> DeadLetterEntry:
    data = orjson.loads(record)
    return DeadLetterEntry(id=entry_id, payload=payload, **data)


def _stream_info(
    queue: str, entry_id: str, fields: dict[bytes, bytes], held: dict[str, Any],
    leases: dict[str, float], now: float,
) -> MessageInfo:  # fmt: skip
    base = int(fields.get(b"b", b"0"))
    payload = fields.get(b"p", b"")
    pend = held.get(entry_id)
    if pend is None:
        return _message_info(queue, payload, "ready", base=base)
    owner = _text(pend["consumer"])
    idle = pend["time_since_delivered"] / 1000
    lease = leases.get(owner)
    return _message_info(
        queue, payload, "leased", base=base + pend["times_delivered"], owner=owner,
        lease_until=None if lease is None else now - idle + lease,
    )  # fmt: skip


def _message_info(
    queue: str, payload: bytes, state: str, *, base: int, not_before: float | None = None,
    lease_until: float | None = None, owner: str | None = None,
) -> MessageInfo:  # fmt: skip
    try:
        env = decode(payload)
        task_id, name, priority, attempt = env.id, env.name, env.priority, env.attempt
        not_before = not_before if not_before is not None else env.not_before
    except DecodeError:
        task_id, name, priority, attempt = peek_id(payload) or "", "", 0, 0
    return MessageInfo(
        task_id=task_id, name=name, queue=queue, priority=priority, attempt=attempt,
        deliveries=base, state=state, not_before=not_before, lease_until=lease_until,
        owner=owner,
    )  # fmt: skip
