"""The appliance's own benchmark: drain, enqueue rate, latency and memory.

    .venv/bin/python bench/drain.py --store sqlite --n 20000
    .venv/bin/python bench/drain.py --store redis  --n 20000

* enqueue: N single `stem.enqueue` calls from one process; and `enqueue_many` batches.
* drain: with N no-op tasks queued, `stem worker run --concurrency 2` starts; rate is
  first task to N-th task (start-up reported apart), counted from a marks file.
* latency: an idle, warmed pool gets tasks at --rate/s; start minus enqueue time, split
  into the producer's call and the hand-off after it returned.
* memory: peak RSS of the supervisor and of each child during the drain.
For ratios against Celery, Dramatiq, RQ and Huey in the same run, use
../shared/bench/peers.py with STEM_VENV=.venv (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import percentile  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

RECORD = len(b"%.6f\n" % 1_700_000_000.0)


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.sup_rss, self.child_rss = pid, 0, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.05):
            try:
                root = psutil.Process(self.pid)
                self.sup_rss = max(self.sup_rss, root.memory_info().rss)
                for child in root.children():
                    self.child_rss = max(self.child_rss, child.memory_info().rss)
            except psutil.NoSuchProcess:
                return


def producer(url: str, marks: Path, code: str) -> dict[str, Any]:
    env = dict(os.environ, STEM_BROKER_URL=url, BENCH_MARK_FILE=str(marks), PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


ENQUEUE_SINGLE = """
import json, sys, time
from bench.noop_app import stem
n = {n}
t = time.perf_counter()
for _ in range(n):
    stem.enqueue("bench.noop")
e = time.perf_counter() - t
print(json.dumps({{"n": n, "per_s": n / e}}))
"""

ENQUEUE_BATCH = """
import json, time
from bench.noop_app import stem
n, size = {n}, 1000
t = time.perf_counter()
for start in range(0, n, size):
    stem.enqueue_many([("bench.noop", {{}})] * min(size, n - start))
e = time.perf_counter() - t
print(json.dumps({{"n": n, "per_s": n / e}}))
"""

PACED = """
import json, time
from bench.noop_app import stem
n, rate = {n}, {rate}
returned = []  # when each enqueue call returned: splits latency into call and hand-off
t0 = time.perf_counter()
for i in range(n):
    due = t0 + i / rate
    now = time.perf_counter()
    if due > now:
        time.sleep(due - now)
    stem.enqueue("bench.noop", args={{"seq": i, "enq_ts": time.time()}})
    returned.append(time.time())
print(json.dumps({{"n": n, "returned": returned}}))
"""


def start_worker(url: str, marks: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, STEM_BROKER_URL=url, BENCH_MARK_FILE=str(marks), PYTHONPATH=str(ROOT))
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "worker",
                "run",
                "--app",
                "bench.noop_app:stem",
                "--concurrency",
                "2",
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def drain(url: str, tmp: Path, n: int) -> dict[str, Any]:
    marks = tmp / f"drain-{time.monotonic_ns()}.marks"
    ones = min(n // 4, 5000)  # a quarter (at most 5,000) one at a time, the rest batched
    single = producer(url, marks, ENQUEUE_SINGLE.format(n=ones))
    batch = producer(url, marks, ENQUEUE_BATCH.format(n=n - ones))
    spawned = time.time()
    proc = start_worker(url, marks, tmp / "drain.log")
    sampler = Sampler(proc.pid)
    sampler.start()
    ok = wait_for(lambda: marks.exists() and marks.stat().st_size // RECORD >= n, 300)
    sampler.halt.set()
    stop(proc)
    stamps = [float(x) for x in marks.read_bytes().splitlines()]
    first, last = min(stamps), max(stamps)
    return {
        "n": n,
        "completed": len(stamps),
        "timed_out": not ok,
        "enqueue_single_per_s": single["per_s"],
        "enqueue_batch_per_s": batch["per_s"],
        "startup_s": first - spawned,
        "drain_per_s": (len(stamps) - 1) / (last - first),
        "supervisor_rss_mb": sampler.sup_rss / 2**20,
        "child_rss_mb": sampler.child_rss / 2**20,
    }


def latency(url: str, tmp: Path, n: int, rate: float) -> dict[str, Any]:
    marks = tmp / f"lat-{time.monotonic_ns()}.marks"
    proc = start_worker(url, marks, tmp / "latency.log")
    try:
        producer(url, marks, PACED.format(n=20, rate=50))  # warm up
        time.sleep(2.0)  # idle, as in real life
        returned = producer(url, marks, PACED.format(n=n, rate=rate))["returned"]
        wait_for(lambda: len(marks.read_bytes().splitlines()) >= n + 20, 60)
    finally:
        stop(proc)
    rows = [line.split() for line in marks.read_bytes().splitlines()][20:]
    lat = [(float(s) - float(e)) * 1000 for _, e, s in rows]
    # The producer's own call (its commit, and on SQLite its fsync) apart from the
    # hand-off after it returned (wake-up, claim, pipe, child): each is bounded by
    # something else.
    call = [(returned[int(q)] - float(e)) * 1000 for q, e, _ in rows]
    handoff = [(float(s) - returned[int(q)]) * 1000 for q, _, s in rows]
    return {
        "n": len(lat),
        "rate": rate,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat),
        "enqueue_call_p50_ms": percentile(call, 50),
        "handoff_p50_ms": percentile(handoff, 50),
        "handoff_p99_ms": percentile(handoff, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--lat-n", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stem-bench-"))
    server = None
    if args.store == "redis":
        server = RedisServer(tmp / "redis")
        server.start()
        url_for = lambda tag: server.url  # noqa: E731
    else:
        url_for = lambda tag: f"sqlite:///{tmp / tag}.db"  # noqa: E731
    try:
        result = {"store": args.store, "drain": drain(url_for("drain"), tmp, args.n)}
        if server:
            server.flush()
        result["latency"] = latency(url_for("latency"), tmp, args.lat_n, args.rate)
    finally:
        if server:
            server.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
