"""The Redis store: broker (Streams + consumer groups) and result backend on one server.

`open_store` creates one client and one `RedisSession` for both adapters, so their
writes inside one unit of work go out as one MULTI/EXEC transaction in one round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# First: redis-py is imported here, once, without the OTel SDK (see `client`).
from appliance.stores.redis import client  # noqa: F401  # isort: skip
from appliance.stores import Stores
from appliance.stores.redis.backend import RedisBackend
from appliance.stores.redis.beat import RedisSchedules
from appliance.stores.redis.broker import RedisBroker
from appliance.stores.redis.conn import connect
from appliance.stores.redis.control import RedisControl
from appliance.stores.redis.keys import Keys
from appliance.stores.redis.session import RedisSession

if TYPE_CHECKING:
    from appliance.config import Settings
    from appliance.envelope import EnvelopeCodec


def open_store(
    url: str, settings: Settings, codec: EnvelopeCodec, *, quick: bool = False
) -> Stores:
    """Broker and backend on the server of `url` (lazy: nothing is sent yet); `quick`
    for the supervisor, whose calls must never stall its loop (`conn.connect`)."""
    session = RedisSession(url, connect(url, quick=quick))
    keys = Keys(settings.namespace)
    broker = RedisBroker(url, session, keys, codec)
    backend = RedisBackend(url, session, keys)
    control = RedisControl(session, keys)
    schedules = RedisSchedules(session, keys, broker)
    closers = [broker.close, backend.close, session.close]
    return Stores(broker, backend, session.unit_of_work, control, schedules, closers)
