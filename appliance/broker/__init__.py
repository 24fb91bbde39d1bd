"""Brokers: where messages wait, are leased, and are settled. See `protocol.Broker`."""

from appliance.broker.protocol import (
    Broker,
    Consumer,
    DeadLetterEntry,
    DeadLetterInfo,
    Delivery,
    MessageInfo,
    QueueStats,
    Settlement,
)

__all__ = [
    "Broker",
    "Consumer",
    "DeadLetterEntry",
    "DeadLetterInfo",
    "Delivery",
    "MessageInfo",
    "QueueStats",
    "Settlement",
]
