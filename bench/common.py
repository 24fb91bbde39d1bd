"""What the benchmark scripts share: a store to measure on (a fresh SQLite file, or a
private redis-server torn down afterwards) and the percentile they report."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.redis_server import RedisServer


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of `values` (one of them, never an interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(pct / 100 * len(ordered)))) - 1]


@contextmanager
def bench_store(store: str, tmp: Path) -> Iterator[str]:
    """The URL of a fresh store of kind `store` ("sqlite" or "redis") under `tmp`."""
    if store != "redis":
        yield f"sqlite:///{tmp / 'stem.db'}"
        return
    server = RedisServer(tmp / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
