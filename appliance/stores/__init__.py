"""Open a broker or result backend from its URL (the one place that maps schemes)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from appliance.errors import UnsupportedBroker

if TYPE_CHECKING:
    from appliance.backend.protocol import ResultBackend
    from appliance.broker.protocol import Broker
    from appliance.config import Settings

SCHEMES = ("sqlite", "redis", "rediss")


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise UnsupportedBroker(
            "url", url, f"unsupported scheme {scheme!r}; use sqlite:///PATH or redis://HOST"
        )
    return scheme


def open_broker(url: str, settings: Settings) -> Broker:
    """A broker for `url`; adapters import lazily so SQLite users never load redis."""
    if scheme_of(url) == "sqlite":
        from appliance.stores.sqlite.broker import SqliteBroker

        return SqliteBroker.from_url(url, settings)
    from appliance.stores.redis.broker import RedisBroker

    return RedisBroker.from_url(url, settings)


def open_backend(url: str, settings: Settings) -> ResultBackend:
    if scheme_of(url) == "sqlite":
        from appliance.stores.sqlite.backend import SqliteBackend

        return SqliteBackend.from_url(url, settings)
    from appliance.stores.redis.backend import RedisBackend

    return RedisBackend.from_url(url, settings)


def open_stores(
    settings: Settings, *, sqlite_busy_wait: float | None = None
) -> tuple[Broker, ResultBackend]:
    """Broker and backend; on one store they share a connection, so that
    `Broker.batch()` writes results and settlements together: one SQLite transaction,
    or one Redis round trip. `sqlite_busy_wait` caps how long one call waits for other
    SQLite writers before it raises `BrokerBusy` (the supervisor must not stall)."""
    broker = open_broker(settings.broker_url, settings)
    from appliance.stores.sqlite.broker import SqliteBroker

    if isinstance(broker, SqliteBroker) and sqlite_busy_wait is not None:
        broker.database.busy_deadline = sqlite_busy_wait
    if scheme_of(settings.backend_url) == "sqlite" and settings.backend_url == settings.broker_url:
        from appliance.stores.sqlite.backend import SqliteBackend

        if isinstance(broker, SqliteBroker):
            return broker, SqliteBackend(broker.database.share(), settings.backend_url)
    if scheme_of(settings.backend_url) != "sqlite" and settings.backend_url == settings.broker_url:
        from appliance.stores.redis.backend import RedisBackend
        from appliance.stores.redis.broker import RedisBroker

        if isinstance(broker, RedisBroker):
            return broker, RedisBackend.sharing(broker, namespace=settings.namespace)
    return broker, open_backend(settings.backend_url, settings)
