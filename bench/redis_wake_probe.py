"""How long a Redis consumer takes to get an entry after the producer's call returned,
two ways, on raw redis-py (no appliance code), an idle consumer, one entry per 20 ms:

* pubsub: the producer's script XADDs and PUBLISHes; the consumer wakes on its
  subscription, then claims with XREADGROUP (the appliance's shape: wake-up, then claim).
* block: the consumer waits in XREADGROUP BLOCK; Redis hands it the entry itself.

    .venv/bin/python bench/redis_wake_probe.py   # a private redis-server, AOF fsync always
"""

from __future__ import annotations

import os
import select
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import percentile
from tests.redis_server import RedisServer

N, GAP_S = 300, 0.02
PUBLISHING = "redis.call('XADD', KEYS[1], '*', 'p', 'x'); redis.call('PUBLISH', 'wake', '1')"
PLAIN = "redis.call('XADD', KEYS[1], '*', 'p', 'x')"


def consume(url: str, mode: str, out: int) -> None:
    """In a forked child: stamp the time each entry arrives."""
    client = redis.Redis.from_url(url)
    subscriber = client.pubsub()
    if mode == "pubsub":
        subscriber.subscribe("wake")
        subscriber.get_message(timeout=1)
    got = 0
    while got < N:
        if mode == "pubsub":
            select.select([subscriber.connection._sock.fileno()], [], [], 5)  # type: ignore[union-attr]
            while subscriber.get_message(timeout=0):
                pass
            entries = client.xreadgroup("g", "c", {"s": ">"}, count=10)
        else:
            entries = client.xreadgroup("g", "c", {"s": ">"}, count=10, block=5000)
        for _, items in entries or []:
            for _entry in items:
                os.write(out, b"%.6f\n" % time.time())
                got += 1


def probe(url: str, mode: str) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    client.delete("s")
    client.xgroup_create("s", "g", id="0", mkstream=True)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        consume(url, mode, write_fd)
        os._exit(0)
    time.sleep(0.5)
    returned = []
    for _ in range(N):
        time.sleep(GAP_S)
        client.eval(PUBLISHING if mode == "pubsub" else PLAIN, 1, "s")
        returned.append(time.time())
    os.waitpid(pid, 0)
    seen = [float(x) for x in os.read(read_fd, 1 << 20).split()]
    handoff = [(s - r) * 1000 for s, r in zip(seen, returned, strict=True)]
    return {"p50_ms": percentile(handoff, 50), "p90_ms": percentile(handoff, 90)}


def main() -> None:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="stem-wake-probe-")))
    server.start()
    try:
        for mode in ("pubsub", "block", "pubsub", "block"):
            print(mode, probe(server.url, mode))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
