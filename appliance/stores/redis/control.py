"""The control channel on Redis: requests in one stream every worker reads from its own
cursor (a fan-out: nothing is consumed), replies in a hash per request, and a poke on
the `wake:control` channel the supervisors' wake-up subscribers already listen to."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from appliance.control.protocol import REQUEST_TTL_S, ControlReply, ControlRequest
from appliance.stores.redis.keys import Keys
from appliance.stores.redis.records import text
from appliance.stores.redis.session import RedisSession

MAX_REQUESTS = 1000  # the stream is trimmed to about this many entries, and by age
_FIRST = "0-0"


class RedisControl:
    """`ControlChannel` on the store's Redis session."""

    def __init__(self, session: RedisSession, keys: Keys) -> None:
        self.session = session
        self.client = session.client
        self.keys = keys

    def cursor(self) -> str:
        with self.session.guard("reading control requests"):
            newest: Any = self.client.xrevrange(self.keys.control, count=1)
        return text(newest[0][0]) if newest else _FIRST

    def send(self, request: ControlRequest, ttl: float = REQUEST_TTL_S) -> None:
        fields: dict[Any, Any] = {
            "i": request.id, "t": request.target, "c": request.command,
            "a": orjson.dumps(request.args), "s": repr(request.sent_at),
        }  # fmt: skip
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.keys.control, fields, maxlen=MAX_REQUESTS, approximate=True)
        pipe.xtrim(self.keys.control, minid=_min_id(ttl), approximate=True)
        pipe.publish(self.keys.wake_control, "1")
        with self.session.guard("sending a control request"):
            pipe.execute()

    def receive(self, after: str, worker: str) -> tuple[list[ControlRequest], str]:
        with self.session.guard("reading control requests"):
            entries: Any = self.client.xrange(self.keys.control, min=f"({after}", count=100)
        requests = []
        for _, raw in entries:
            fields = {text(k): v for k, v in raw.items()}
            request = ControlRequest(
                text(fields["c"]), orjson.loads(fields["a"]), text(fields["t"]),
                text(fields["i"]), float(fields["s"]),
            )  # fmt: skip
            if request.for_worker(worker) and request.sent_at >= time.time() - REQUEST_TTL_S:
                requests.append(request)
        return requests, text(entries[-1][0]) if entries else after

    def reply(self, replies: Sequence[ControlReply], ttl: float = REQUEST_TTL_S) -> None:
        if not replies:
            return
        pipe = self.client.pipeline(transaction=True)
        for r in replies:
            key = self.keys.control_reply(r.request_id)
            body = orjson.dumps({"reply": r.reply, "at": r.replied_at})
            pipe.hset(key, r.worker, body)
            pipe.pexpire(key, int(ttl * 1000))
        with self.session.guard("storing control replies"):
            pipe.execute()

    def replies(self, request_id: str) -> list[ControlReply]:
        with self.session.guard("reading control replies"):
            raw: Any = self.client.hgetall(self.keys.control_reply(request_id))
        found = []
        for worker, body in raw.items():
            data = orjson.loads(body)
            found.append(ControlReply(request_id, text(worker), data["reply"], data["at"]))
        return sorted(found, key=lambda reply: reply.replied_at)

    def purge_expired(self) -> int:
        """Replies expire by themselves (PEXPIRE); old requests are trimmed by age."""
        with self.session.guard("trimming control requests"):
            trimmed: Any = self.client.xtrim(self.keys.control, minid=_min_id(REQUEST_TTL_S))
        return int(trimmed)


def _min_id(ttl: float) -> str:
    """The stream id of `ttl` seconds ago (ids start with milliseconds since the epoch)."""
    return f"{int((time.time() - ttl) * 1000)}-0"
