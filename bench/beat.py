"""Beat's drift on an idle supervisor: dispatch time minus slot time, p50 and p99.

    .venv/bin/python bench/beat.py --store sqlite --seconds 60
    .venv/bin/python bench/beat.py --store redis  --seconds 60

One supervisor runs Beat (`stem worker run --beat`) with an every-second entry
(tests/apps/beat_app.py); the drift of each dispatch is what Beat recorded with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import Stem  # noqa: E402
from bench.common import bench_store, percentile  # noqa: E402
from tests.process import WorkerProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    with bench_store(args.store, tmp) as url:
        worker = WorkerProcess(tmp, url, app="tests.apps.beat_app:stem", concurrency=1,
                               extra=["--beat"]).start()  # fmt: skip
        try:
            time.sleep(args.seconds)
        finally:
            worker.stop()
        stem = Stem(broker=url)
        runs = stem.stores.schedules.runs("every-second", 500)
        drifts = [r.drift_ms for r in runs if r.drift_ms is not None]
        stem.close()
    print(json.dumps({
        "store": args.store, "runs": len(drifts),
        "drift_ms": {"p50": round(percentile(drifts, 50), 2),
                     "p99": round(percentile(drifts, 99), 2), "max": round(max(drifts), 2)},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
