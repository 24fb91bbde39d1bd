"""The two processes of the telemetry test, run as `python -m tests.telemetry_actors ROLE`
with STEM_OTLP_* in the environment; each prints one JSON object on stdout.

producer: an enqueue span, and the headers it would put in the envelope.
worker:   a supervisor that starts its metrics, exports once, then forks two children in
          turn (attempt 0 fails, attempt 1 runs linked to it), as the real one will.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

from appliance import telemetry
from appliance.config import load_settings
from appliance.context import TaskContext
from appliance.telemetry import PoolLoad, QueueDepth

TASK_ID = "0190c0de0000700080000000000000aa"


def producer() -> None:
    tel = telemetry.load(load_settings())
    with tel.enqueue_span(TASK_ID, "email.send", "email"):
        headers = tel.inject({"stem-origin": "test"})
    tel.shutdown()
    print(orjson.dumps({"pid": os.getpid(), "headers": headers}).decode())


def run_child(tel: telemetry.Telemetry, ctx: TaskContext, outcome: str) -> tuple[int, str]:
    """Fork a child that runs one attempt's span; returns its pid and its traceparent."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            tel.setup_child()
            with tel.task_span(ctx) as span:
                span.set_outcome(outcome, "KeyError" if outcome == "failure" else "", "no row")
                os.write(write_fd, (span.traceparent or "").encode())
            tel.flush(timeout=10)
            code = 0
        finally:
            os._exit(code)  # as a real child leaves: no atexit hooks
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        traceparent = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid, traceparent


def worker(headers: dict[str, str]) -> None:
    tel = telemetry.load(load_settings())
    tel.start_metrics(
        worker="edge-1:42",
        depth=lambda: [QueueDepth("email", ready=3, delayed=1, in_flight=2, dead=1)],
        pools=lambda: [PoolLoad("default", concurrency=2, in_flight=1)],
    )
    tel.record_outcome("retry", "email.send", "email", 0.02)
    tel.tick(time.monotonic() + 3600)  # an export now, so its thread exists at fork
    first = TaskContext(id=TASK_ID, name="email.send", attempt=0, queue="email",
                        headers=headers)  # fmt: skip
    pid1, traceparent1 = run_child(tel, first, "failure")
    retry = TaskContext(id=TASK_ID, name="email.send", attempt=1, queue="email",
                        headers=tel.link_retry(headers, traceparent1))  # fmt: skip
    pid2, traceparent2 = run_child(tel, retry, "success")
    tel.record_outcome("success", "email.send", "email", 0.01)
    tel.record_lease_renewals(3)
    tel.record_child_restart("default", "recycled")
    tel.shutdown()
    print(orjson.dumps({
        "pid": os.getpid(), "children": [pid1, pid2], "traceparents": [traceparent1, traceparent2],
    }).decode())  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if sys.argv[1] == "producer":
        producer()
    else:
        worker(orjson.loads(sys.argv[2]))
