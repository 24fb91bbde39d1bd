"""The benchmark's short mode, run by CI: `bench/drain.py` on both stores with a few
hundred tasks. It asserts only that the benchmark runs and loses nothing (every task
queued is counted in the marks file, no wait timed out); the figures themselves are
measured side by side with the peers (`make bench-peers`), never judged here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.process import ROOT

pytestmark = pytest.mark.process

N, LATENCY_N = 400, 30


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_the_drain_benchmark_runs_and_loses_nothing(store: str) -> None:
    run = subprocess.run(
        [sys.executable, "bench/drain.py", "--store", store, "--n", str(N),
         "--lat-n", str(LATENCY_N), "--rate", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    drain = result["drain"]
    assert (drain["completed"], drain["timed_out"]) == (N, False), drain
    assert drain["drain_per_s"] > 0 and drain["enqueue_batch_per_s"] > 0
    assert result["latency"]["n"] == LATENCY_N, result["latency"]
