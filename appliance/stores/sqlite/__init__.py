"""The SQLite store: broker and result backend in one WAL database file.

`open_store` opens the file once (creating it and applying the schema if needed) and
hands the one connection to both adapters, so their writes inside one unit of work are
one `BEGIN IMMEDIATE` transaction: the group commit the supervisor's throughput rests on.
A namespace other than the default has a file of its own (`db.namespaced_url`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.stores import Stores
from appliance.stores.sqlite.backend import SqliteBackend
from appliance.stores.sqlite.beat import SqliteSchedules
from appliance.stores.sqlite.broker import SqliteBroker
from appliance.stores.sqlite.control import SqliteControl
from appliance.stores.sqlite.db import BUSY_DEADLINE, namespaced_url
from appliance.stores.sqlite.schema import open_current

if TYPE_CHECKING:
    from appliance.config import Settings
    from appliance.envelope import EnvelopeCodec


def open_store(
    url: str,
    settings: Settings,
    codec: EnvelopeCodec,
    *,
    busy_wait: float | None = None,
    create: bool = True,
) -> Stores:
    """Broker and backend on the database of `url` (of its namespace), sharing its
    connection."""
    url = namespaced_url(url, settings.namespace)
    db = open_current(
        url, settings.sqlite_synchronous,
        busy_deadline=BUSY_DEADLINE if busy_wait is None else busy_wait, create=create,
    )  # fmt: skip
    broker = SqliteBroker(db, url, codec)
    backend = SqliteBackend(db, url)
    control = SqliteControl(db, broker.waker)
    schedules = SqliteSchedules(db, broker)
    closers = [broker.close, backend.close, db.close]
    return Stores(
        broker, backend, db.unit_of_work, control, schedules, closers, [db.close_for_fork]
    )
