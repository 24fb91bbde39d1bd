"""The control channel's round trip: `ping` broadcast to two live workers, p50 and p99.

    .venv/bin/python bench/control.py --store sqlite --n 300
    .venv/bin/python bench/control.py --store redis  --n 300

The time is what the operator waits for: from sending the request to having both
workers' replies (each worker is woken by the store's poke and answers from its loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import Stem  # noqa: E402
from appliance.control.client import ControlClient  # noqa: E402
from bench.common import bench_store, percentile  # noqa: E402
from tests.process import WorkerProcess  # noqa: E402


def ping_rounds(tmp: Path, url: str, n: int) -> list[float]:
    """Round trips (ms) of `n` pings answered by two live workers on `url`."""
    workers = [
        WorkerProcess(tmp, url, concurrency=1, extra=["--name", f"w{i}"]).start() for i in (1, 2)
    ]
    stem = Stem(broker=url)
    client = ControlClient(stem.stores)
    try:
        while len(client.live_workers()) < 2:
            time.sleep(0.05)
        for _ in range(20):  # warm up
            client.call("ping")
        rounds = []
        for _ in range(n):
            started = time.perf_counter()
            result = client.call("ping")
            assert result.complete and len(result.answers) == 2, result
            rounds.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)
        return rounds
    finally:
        for worker in workers:
            worker.stop()
        stem.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    with bench_store(args.store, tmp) as url:
        rounds = ping_rounds(tmp, url, args.n)
    print(json.dumps({
        "store": args.store, "n": args.n, "workers": 2,
        "round_trip_ms": {"p50": round(statistics.median(rounds), 2),
                          "p99": round(percentile(rounds, 99), 2),
                          "max": round(max(rounds), 2)},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
