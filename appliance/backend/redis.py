"""The Redis result backend: one JSON string per task id, expiring with the result.

Redis removes expired keys itself (PEXPIREAT via SET ... PXAT), so `get` never sees an
expired result and `purge_expired` has nothing left to do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis

from appliance.backend.protocol import ErrorInfo, TaskResult
from appliance.broker.redis_keys import Keys
from appliance.config import Settings
from appliance.envelope import dumps_json
from appliance.redis_conn import OutageLog, connect, guarded, redact
from appliance.states import TaskState

_FIELDS = tuple(TaskResult.__dataclass_fields__)


class RedisBackend:
    """`ResultBackend` on Redis strings under `<namespace>:result:<task id>`."""

    def __init__(self, url: str, client: redis.Redis, *, namespace: str) -> None:
        self.url = url
        self.client = client
        self.keys = Keys(namespace)
        self._outage = OutageLog(redact(url))

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisBackend:
        return cls(url, connect(url), namespace=settings.namespace)

    def store(self, results: Sequence[TaskResult]) -> None:
        if not results:
            return
        now = time.time()
        # Encode everything first: a value that is not JSON fails before anything is sent.
        encoded = [(r, dumps_json({f: getattr(r, f) for f in _FIELDS})) for r in results]
        pipe = self.client.pipeline(transaction=True)  # MULTI/EXEC: all or none
        for result, data in encoded:
            key = self.keys.result(result.task_id)
            if result.expires_at is None:
                pipe.set(key, data)
            elif result.expires_at <= now:
                pipe.delete(key)  # already expired: a later write still replaces the earlier
            else:
                pipe.set(key, data, pxat=int(result.expires_at * 1000))
        with guarded(self._outage, "storing results"):
            pipe.execute()

    def get(self, task_id: str) -> TaskResult | None:
        with guarded(self._outage, "reading a result"):
            raw: Any = self.client.get(self.keys.result(task_id))
        return None if raw is None else _decode(raw)

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskResult]:
        if not task_ids:
            return {}
        with guarded(self._outage, "reading results"):
            raws: Any = self.client.mget([self.keys.result(t) for t in task_ids])
        return {t: _decode(raw) for t, raw in zip(task_ids, raws, strict=True) if raw is not None}

    def forget(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            with guarded(self._outage, "forgetting results"):
                self.client.delete(*[self.keys.result(t) for t in task_ids])

    def purge_expired(self) -> int:
        return 0  # Redis deletes expired keys itself

    def close(self) -> None:
        self.client.close()


def _decode(raw: bytes) -> TaskResult:
    data: dict[str, Any] = orjson.loads(raw)
    error = data.pop("error", None)
    return TaskResult(
        **data | {"state": TaskState(data["state"]), "error": ErrorInfo(**error) if error else None}
    )
