"""The Redis result backend: one JSON string per task id, expiring with the result, and
the primitives on native Redis TTLs (keys in `keys.py`).

Redis removes expired keys itself (PEXPIREAT via SET ... PXAT), so `get` never sees an
expired result. Each primitive is one atomic command or Lua script. Revokes and the
worker index are sorted sets scored by expiry in milliseconds of the *server's* clock
(`TIME` inside the scripts), so hosts with skewed clocks agree on what expired; their
expired members are trimmed by each write and by `purge_expired`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from redis.commands.core import Script

from appliance.backend.protocol import (
    TaskResult,
    WorkerHeartbeat,
    as_bytes,
    check_ttl,
    decode_heartbeat,
    decode_result,
    encode_heartbeat,
    encode_result,
)
from appliance.stores.redis.keys import Keys
from appliance.stores.redis.session import RedisSession

# Milliseconds since the epoch on the server's clock (a double: exact until year 287396).
_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Compare-and-delete and compare-and-extend: the GET and the write must be one step, or
# a lock that expired and was taken over in between would be released or extended.
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REFRESH_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# ARGV: amount, TTL in ms or '' (none). The TTL is set only by the increment that creates
# the counter (a fixed window), as the protocol says.
_INCR = """
local fresh = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if fresh and ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""
# ARGV: size, TTL in ms. A live group is left alone (a repeated init keeps its members).
_GROUP_INIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'size', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# ARGV: index (>= 0, checked by the caller), result JSON -> finished count, 0 for an
# unknown group, -1 for an index past the size. HSETNX keeps a duplicate from counting.
_GROUP_ADD = """
local size = redis.call('HGET', KEYS[1], 'size')
if not size then return 0 end
if tonumber(ARGV[1]) >= tonumber(size) then return -1 end
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HLEN', KEYS[1]) - 1
"""
# ARGV: TTL in ms, task ids. GT: a revoke never shortens an earlier, longer one.
_REVOKE = f"""{_NOW}
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'GT', now + tonumber(ARGV[1]), ARGV[i]) end
return 0
"""
_IS_REVOKED = f"""#!lua flags=no-writes
{_NOW}
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expires and tonumber(expires) >= now_ms() then return 1 end
return 0
"""
_LIST_REVOKED = f"""#!lua flags=no-writes
{_NOW}
return redis.call('ZRANGEBYSCORE', KEYS[1], now_ms(), '+inf')
"""
# KEYS: result keys. ARGV: per key, the JSON and then its expiry in epoch ms ('' for
# none, '-' to delete). allow-oom: the supervisor stores results with its acks, which
# free more memory than the results take, so a full Redis can still be drained.
_STORE_RESULTS = """#!lua flags=allow-oom
for i, key in ipairs(KEYS) do
  local data, at = ARGV[2 * i - 1], ARGV[2 * i]
  if at == '-' then redis.call('DEL', key)
  elseif at == '' then redis.call('SET', key, data)
  else redis.call('SET', key, data, 'PXAT', at) end
end
return #KEYS
"""
# KEYS: worker key, index. ARGV: worker id, heartbeat JSON, TTL in ms.
_PUT_WORKER = f"""#!lua flags=allow-oom
{_NOW}
local now = now_ms()
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
return 0
"""
# KEYS: the sorted sets scored by expiry -> how many expired members were removed.
_TRIM = f"""#!lua flags=allow-oom
{_NOW}
local now, removed = now_ms(), 0
for _, key in ipairs(KEYS) do
  removed = removed + redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. now)
end
return removed
"""


def _ms(ttl: float) -> int:
    """A TTL in whole milliseconds, rounded up: a short TTL must not become 0 (invalid)."""
    return max(1, math.ceil(check_ttl(ttl) * 1000))


class RedisBackend:
    """`ResultBackend` on Redis, on the `RedisSession` it shares with the broker
    (`appliance.stores.redis.open_store`): inside the session's unit of work its result
    writes ride in the same transaction as the broker's settles."""

    def __init__(self, url: str, session: RedisSession, keys: Keys) -> None:
        self.url = url
        self.session = session
        self.client = session.client
        self.keys = keys
        self._scripts = _Scripts(session)

    def store(self, results: Sequence[TaskResult]) -> None:
        if not results:
            return
        now = time.time()
        # Encode everything first: a value that is not JSON fails before anything is sent.
        keys, args = [], []
        for result in results:
            keys.append(self.keys.result(result.task_id))
            if result.expires_at is None:
                expiry = ""
            elif result.expires_at <= now:
                expiry = "-"  # already expired: a later write still replaces the earlier
            else:
                expiry = str(int(result.expires_at * 1000))
            args += [encode_result(result), expiry]
        if self.session.pipe is not None:  # in the unit of work's transaction
            self.session.queue(self._scripts.store_results, args, keys)
            return
        self._run(self._scripts.store_results, keys, args, "storing results")

    def get(self, task_id: str) -> TaskResult | None:
        with self.session.guard("reading a result"):
            raw: Any = self.client.get(self.keys.result(task_id))
        return None if raw is None else decode_result(raw)

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        if not task_ids:
            return {}
        with self.session.guard("reading results"):
            raws: Any = self.client.mget([self.keys.result(t) for t in task_ids])
        return {
            t: decode_result(raw) for t, raw in zip(task_ids, raws, strict=True) if raw is not None
        }

    def forget(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            with self.session.guard("forgetting results"):
                self.client.delete(*[self.keys.result(t) for t in task_ids])

    def purge_expired(self) -> int:
        """Redis deletes expired keys itself; what is left are the expired members of
        the revoked set and the worker index."""
        keys = [self.keys.revoked, self.keys.workers]
        return self._run(self._scripts.trim, keys, [], "purging expired entries")

    # -- keys with a TTL ---------------------------------------------------------------

    def put_if_absent(self, key: str, value: bytes | str, ttl: float) -> bool:
        with self.session.guard("putting a key"):
            stored: Any = self.client.set(self.keys.kv(key), as_bytes(value), nx=True, px=_ms(ttl))
        return bool(stored)

    def get_key(self, key: str) -> bytes | None:
        with self.session.guard("reading a key"):
            raw: Any = self.client.get(self.keys.kv(key))
        return None if raw is None else bytes(raw)

    def delete_key(self, key: str, value: bytes | str | None = None) -> bool:
        if value is None:
            with self.session.guard("deleting a key"):
                deleted: Any = self.client.delete(self.keys.kv(key))
            return bool(deleted)
        args = [as_bytes(value)]
        return self._run(self._scripts.delete_if, [self.keys.kv(key)], args, "deleting a key") > 0

    def refresh_key(self, key: str, value: bytes | str, ttl: float) -> bool:
        args = [as_bytes(value), _ms(ttl)]
        return self._run(self._scripts.refresh_if, [self.keys.kv(key)], args, "refreshing") > 0

    # -- counters ----------------------------------------------------------------------

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        args = [amount, "" if ttl is None else _ms(ttl)]
        return self._run(self._scripts.incr, [self.keys.counter(key)], args, "incrementing")

    # -- groups and chords -------------------------------------------------------------

    def group_init(self, group_id: str, size: int, ttl: float) -> bool:
        if size < 0:
            raise ValueError(f"a group cannot have {size} members")
        args = [size, _ms(ttl)]
        keys = [self.keys.group(group_id)]
        return self._run(self._scripts.group_init, keys, args, "creating a group") == 1

    def group_add_result(self, group_id: str, index: int, result: TaskResult) -> int:
        if index < 0:
            raise ValueError(f"group {group_id}: index {index} is out of range")
        args: list[Any] = [index, encode_result(result)]
        keys = [self.keys.group(group_id)]
        count = self._run(self._scripts.group_add, keys, args, "adding a group result")
        if count < 0:
            raise ValueError(f"group {group_id}: index {index} is not below its size")
        return count

    def group_results(self, group_id: str) -> list[TaskResult]:
        with self.session.guard("reading group results"):
            fields: Any = self.client.hgetall(self.keys.group(group_id))
        members = sorted((int(f), raw) for f, raw in fields.items() if f != b"size")
        return [decode_result(raw) for _, raw in members]

    # -- revokes -----------------------------------------------------------------------

    def revoke(self, task_ids: Sequence[str], ttl: float) -> None:
        args = [_ms(ttl), *task_ids]
        if task_ids:
            self._run(self._scripts.revoke, [self.keys.revoked], args, "storing revokes")

    def is_revoked(self, task_id: str) -> bool:
        keys = [self.keys.revoked]
        return self._run(self._scripts.is_revoked, keys, [task_id], "reading revokes") == 1

    def list_revoked(self) -> set[str]:
        with self.session.guard("listing revokes"):
            ids: Any = self._scripts.list_revoked(keys=[self.keys.revoked])
        return {raw.decode() for raw in ids}

    # -- worker heartbeats -------------------------------------------------------------

    def put_worker_heartbeat(self, heartbeat: WorkerHeartbeat, ttl: float) -> None:
        keys = [self.keys.worker(heartbeat.id), self.keys.workers]
        args: list[Any] = [heartbeat.id, encode_heartbeat(heartbeat), _ms(ttl)]
        self._run(self._scripts.put_worker, keys, args, "publishing a heartbeat")

    def list_workers(self) -> list[WorkerHeartbeat]:
        # The index may still name a worker whose key just expired: MGET skips it.
        with self.session.guard("listing workers"):
            ids: Any = self.client.zrange(self.keys.workers, 0, -1)
            raws: Any = self.client.mget([self.keys.worker(i.decode()) for i in ids]) if ids else []
        found = [decode_heartbeat(raw) for raw in raws if raw is not None]
        return sorted(found, key=lambda heartbeat: heartbeat.id)

    def remove_worker(self, worker_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.worker(worker_id))
        pipe.zrem(self.keys.workers, worker_id)
        with self.session.guard("removing a worker"):
            pipe.execute()

    def close(self) -> None:
        """Nothing of its own to release: the client is the `Stores`' to close."""

    def _run(self, script: Script, keys: list[str], args: list[Any], what: str) -> int:
        """Run a script whose reply is an integer, mapping Redis errors."""
        with self.session.guard(what):
            reply: Any = self.session.call(script, args, keys)
        return int(reply)


class _Scripts:
    """The backend's Lua scripts, registered with the store's session."""

    def __init__(self, session: RedisSession) -> None:
        self.store_results = session.script(_STORE_RESULTS)
        self.delete_if = session.script(_DELETE_IF)
        self.refresh_if = session.script(_REFRESH_IF)
        self.incr = session.script(_INCR)
        self.group_init = session.script(_GROUP_INIT)
        self.group_add = session.script(_GROUP_ADD)
        self.revoke = session.script(_REVOKE)
        self.is_revoked = session.script(_IS_REVOKED)
        self.list_revoked = session.script(_LIST_REVOKED)
        self.put_worker = session.script(_PUT_WORKER)
        self.trim = session.script(_TRIM)
