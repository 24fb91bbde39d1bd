"""Real stores for tests, opened the way the appliance opens them: `open_stores`.

Every `Stores` opened here is closed after the test that opened it (the autouse
fixture in conftest), so tests can take `.broker` or `.backend` and forget the rest."""

from __future__ import annotations

from dataclasses import replace

from appliance.config import Settings
from appliance.envelope import EnvelopeCodec
from appliance.stores import Stores, open_stores

OPENED: list[Stores] = []


def open_test_stores(url: str, settings: Settings | None = None) -> Stores:
    """Broker and backend on `url` (one connection, one unit of work), with `settings`."""
    chosen = replace(settings or Settings(), broker_url=url, result_backend_url=None)
    stores = open_stores(chosen, EnvelopeCodec(chosen.max_payload_bytes))
    OPENED.append(stores)
    return stores


def close_opened() -> None:
    while OPENED:
        OPENED.pop().close()


def overwrite_dead_letter_payload(broker: object, entry_id: str, payload: bytes) -> None:
    """Replace a dead letter's stored payload behind the broker's back (a corrupted or
    hostile store): the one place tests reach into each store's layout for it."""
    from appliance.stores.redis.broker import RedisBroker
    from appliance.stores.sqlite.broker import SqliteBroker

    if isinstance(broker, SqliteBroker):
        broker._db.write(
            lambda conn: conn.execute(
                "UPDATE dead_letters SET payload = ? WHERE id = ?", (payload, entry_id)
            )
        )
    elif isinstance(broker, RedisBroker):
        broker.client.hset(broker.keys.dlq_payload, entry_id, payload)
    else:
        raise TypeError(f"no layout known for {type(broker).__name__}")
