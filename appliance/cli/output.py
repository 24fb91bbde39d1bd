"""All `stem` output: aligned text tables for people, `--json` (orjson) for scripts.

Commands hand plain data from `appliance.observe` to one function here, so the look of
every command (and the JSON shape scripts rely on) is decided in this one module.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import orjson

if TYPE_CHECKING:
    from pathlib import Path

    from appliance.backend.protocol import WorkerHeartbeat
    from appliance.beat.store import ScheduleRun
    from appliance.broker.protocol import MessageInfo, QueueStats
    from appliance.cli.demo import DemoSummary
    from appliance.control.client import Answer, CallResult
    from appliance.health import HealthReport
    from appliance.observe import DeadLetter, DeadLetterPage, ScheduleView, TaskDetail

EMPTY = "-"


# --- primitives ---------------------------------------------------------------------


def print_json(value: Any, out: TextIO | None = None) -> None:
    """One indented JSON document (dataclasses and enums included) and a newline."""
    text = orjson.dumps(value, default=_json_default, option=orjson.OPT_INDENT_2).decode()
    (out or sys.stdout).write(text + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):  # raw payloads: show them rather than fail
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [list(headers)] + [[cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [text.ljust(width) for text, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def cell(value: Any) -> str:
    if value is None or value == "":
        return EMPTY
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def when(epoch: float | None) -> str:
    """A wall-clock time in local time, to the second."""
    if epoch is None:
        return EMPTY
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def fields_block(pairs: Sequence[tuple[str, Any]]) -> str:
    """`key: value` lines with the values aligned."""
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key + ':':<{width + 1}} {cell(value)}" for key, value in pairs)


def say(text: str, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(text + "\n")


def note(text: str) -> None:
    """A remark beside the output (stderr), never part of what scripts parse."""
    sys.stderr.write(f"stem: note: {text}\n")


# --- observe ------------------------------------------------------------------------


def queues(stats: Sequence[QueueStats], as_json: bool) -> None:
    if as_json:
        return print_json(list(stats))
    if not stats:
        return say("no messages waiting, in flight or dead")
    rows = [(s.queue, s.ready, s.delayed, s.in_flight, s.dead, "paused" if s.paused else "")
            for s in stats]  # fmt: skip
    say(table(("QUEUE", "READY", "DELAYED", "IN-FLIGHT", "DEAD", "PAUSED"), rows))


def workers(beats: Sequence[WorkerHeartbeat], as_json: bool) -> None:
    if as_json:
        return print_json(list(beats))
    if not beats:
        return say("no workers alive")
    rows = [
        (b.id, b.host, b.pid, b.status, ",".join(b.queues), ",".join(b.paused), b.concurrency,
         b.in_flight, b.processed, b.failed, when(b.started_at), beat_age(b))
        for b in beats
    ]  # fmt: skip
    headers = ("WORKER", "HOST", "PID", "STATUS", "QUEUES", "PAUSED", "CHILDREN", "IN-FLIGHT",
               "PROCESSED", "FAILED", "STARTED", "BEAT AGE")  # fmt: skip
    say(table(headers, rows))


def beat_age(beat: WorkerHeartbeat) -> str:
    """Seconds since the worker's last beat, marked "late" past two of its intervals."""
    age = max(0.0, time.time() - beat.sent_at)
    late = beat.interval_s and age > 2 * beat.interval_s
    return f"{age:.1f}s late" if late else f"{age:.1f}s"


def health(report: HealthReport, as_json: bool) -> None:
    if as_json:
        return print_json(report)
    rows = [("ok" if c.ok else "FAIL", c.name, c.detail) for c in report.checks]
    say(table(("", "CHECK", "DETAIL"), rows))
    if report.healthy:
        say("healthy")


# --- schedules ----------------------------------------------------------------------


def schedules(views: Sequence[ScheduleView], as_json: bool, *, summary: bool = False) -> None:
    if summary:
        worst = max((v.drift_ms["p99"] for v in views if v.drift_ms), default=None)
        failing = [v.name for v in views if v.last_error]
        line = {"entries": len(views), "enabled": sum(v.enabled for v in views),
                "runs": sum(v.runs for v in views), "worst_p99_drift_ms": worst,
                "failing": failing}  # fmt: skip
        if as_json:
            return print_json(line)
        return say(
            f"{line['entries']} schedules ({line['enabled']} enabled), {line['runs']} runs, "
            f"worst p99 drift {cell(worst)} ms, failing: {', '.join(failing) or 'none'}"
        )
    if as_json:
        return print_json([
            {"name": v.name, "task": v.task, "spec": v.spec, "next_run": v.next_run,
             "last_run": v.last_run, "enabled": v.enabled, "runs": v.runs,
             "drift_ms": v.drift_ms, "last_error": v.last_error, "origin": v.origin}
            for v in views
        ])  # fmt: skip
    if not views:
        return say("no schedules stored (see `stem schedule apply`)")
    rows = [
        (v.name, v.task, v.spec, "yes" if v.enabled else "no", v.next_run, v.last_run, v.runs,
         v.drift_ms["p99"] if v.drift_ms else None, v.last_error)
        for v in views
    ]  # fmt: skip
    say(table(("NAME", "TASK", "SPEC", "ENABLED", "NEXT RUN", "LAST RUN", "RUNS",
               "P99 DRIFT MS", "LAST ERROR"), rows))  # fmt: skip


def schedule(
    view: ScheduleView, table_: dict[str, Any], runs: Sequence[ScheduleRun], as_json: bool
) -> None:
    if as_json:
        return print_json({"schedule": view, "entry": table_, "runs": list(runs)})
    say(fields_block([
        ("name", view.name), ("task", view.task), ("spec", view.spec),
        ("enabled", "yes" if view.enabled else "no"), ("origin", view.origin),
        ("next run", view.next_run), ("last run", view.last_run),
        ("drift ms", view.drift_ms), ("last error", view.last_error),
    ]))  # fmt: skip
    if runs:
        say("")
        say(table(("SLOT", "DISPATCHED", "TASK", "DRIFT MS", "ERROR"),
                  [(r.slot, when(r.dispatched_at), r.task_id, r.drift_ms, r.error)
                   for r in runs]))  # fmt: skip


def applied(changed: Sequence[str], total: int, as_json: bool) -> None:
    if as_json:
        return print_json({"applied": total, "changed": list(changed)})
    say(f"{total} schedules checked, {len(changed)} new or changed"
        + (f": {', '.join(changed)}" if changed else ""))  # fmt: skip


# --- control ------------------------------------------------------------------------


def control_result(result: CallResult, as_json: bool, shape: str) -> None:
    """A control command's answers: each worker's reply (`shape` picks the fields and
    the table); who did not answer goes to stderr, one line each."""
    if as_json and shape == "ping":
        print_json([{"worker": a.worker, "latency_ms": round(a.latency_ms, 2)}
                    for a in result.answers])  # fmt: skip
    elif as_json:
        print_json([a.reply | {"worker": a.worker} for a in result.answers])
    else:
        say(_CONTROL_TABLES.get(shape, _plain_answers)(result.answers))
    for missing in result.missing:
        sys.stderr.write(
            f"stem: no answer from {missing.worker} (last beat {missing.beat_age_s:.1f}s ago)\n"
        )


def messages(items: Sequence[MessageInfo], as_json: bool) -> None:
    if as_json:
        return print_json(list(items))
    if not items:
        return say("no tasks waiting or in flight")
    rows = [
        (
            m.task_id,
            m.name,
            m.queue,
            m.state,
            m.priority,
            m.attempt,
            m.deliveries,
            when(m.lease_until if m.state == "leased" else m.not_before),
            m.owner,
        )
        for m in items
    ]
    headers = (
        "TASK ID",
        "NAME",
        "QUEUE",
        "STATE",
        "PRIORITY",
        "ATTEMPT",
        "DELIVERIES",
        "UNTIL",
        "OWNER",
    )
    say(table(headers, rows))


def task(detail: TaskDetail, as_json: bool) -> None:
    if as_json:
        return print_json(detail)
    pairs: list[tuple[str, Any]] = [("task id", detail.task_id), ("state", detail.state)]
    message, result = detail.message, detail.result
    if message is not None:
        pairs += [
            ("name", message.name),
            ("queue", message.queue),
            ("message", message.state),
            ("priority", message.priority),
            ("attempt", message.attempt),
            ("deliveries", message.deliveries),
            ("not before", when(message.not_before)),
            ("lease until", when(message.lease_until)),
            ("owner", message.owner),
        ]
    if result is not None:
        pairs += _result_pairs(result, with_name=message is None)
    pairs += _lineage_pairs(detail)
    say(fields_block(pairs))
    if result is not None and result.error is not None and result.error.traceback:
        say("\n" + result.error.traceback.rstrip())


def _lineage_pairs(detail: TaskDetail) -> list[tuple[str, Any]]:
    """Parent, root, children, canvas place and duplicates, for the tasks that have them."""
    pairs: list[tuple[str, Any]] = []
    if detail.parent_id:
        pairs.append(("parent", detail.parent_id))
    if detail.root_id and detail.root_id != detail.parent_id:
        pairs.append(("root", detail.root_id))
    canvas = detail.canvas
    if canvas:
        place = "" if canvas.get("index") is None else f"{int(canvas['index']) + 1} of "
        pairs.append(("canvas", f"{canvas['kind']} {canvas['id']}: {place}{canvas['size']}"))
    if detail.children:
        shown = ", ".join(detail.children[:5])
        more = f" and {len(detail.children) - 5} more" if len(detail.children) > 5 else ""
        pairs.append((f"children ({len(detail.children)})", shown + more))
    if detail.duplicates:
        pairs.append(("duplicates", f"{detail.duplicates}, last {when(detail.last_duplicate_at)}"))
    return pairs


def _result_pairs(result: Any, *, with_name: bool) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    if with_name:
        pairs += [("name", result.name), ("queue", result.queue), ("attempt", result.attempt)]
    pairs += [
        ("worker", result.worker),
        ("started", when(result.started_at)),
        ("finished", when(result.finished_at)),
        ("progress", result.progress),
    ]
    if result.error is not None:
        pairs.append(("error", f"{result.error.type}: {result.error.message}"))
    elif result.value is not None:
        pairs.append(("result", orjson.dumps(result.value).decode()))
    return pairs


# --- DLQ ----------------------------------------------------------------------------


def dlq_page(page: DeadLetterPage, as_json: bool) -> None:
    if as_json:
        return print_json(
            {
                "entries": page.entries,
                "total": page.total,
                "page": page.page,
                "page_size": page.page_size,
                "pages": page.pages,
            }
        )
    if not page.entries:
        return say(
            "the dead-letter queue is empty"
            if page.total == 0
            else f"no entries on page {page.page} of {page.pages}"
        )
    rows = [
        (e.id, e.task_id, e.name, e.queue, e.reason, e.error_type, e.attempts, when(e.dead_at))
        for e in page.entries
    ]
    say(table(("ID", "TASK ID", "NAME", "QUEUE", "REASON", "ERROR", "ATTEMPTS", "DEAD AT"), rows))
    say(f"page {page.page} of {page.pages} ({page.total} entries)")


def dead_letter(entry: DeadLetter, as_json: bool) -> None:
    if as_json:
        return print_json(entry)
    payload = (
        ("args", orjson.dumps(entry.args).decode()) if entry.raw is None else ("payload", entry.raw)
    )
    say(
        fields_block(
            [
                ("id", entry.id),
                ("task id", entry.task_id),
                ("name", entry.name),
                ("queue", entry.queue),
                ("reason", entry.reason),
                ("error", entry.error_type),
                ("message", entry.message),
                ("attempts", entry.attempts),
                ("enqueued", when(entry.enqueued_at)),
                ("dead at", when(entry.dead_at)),
                payload,
            ]
        )
    )
    if entry.traceback:
        say("\n" + entry.traceback.rstrip())


def replayed(task_ids: Sequence[str], as_json: bool) -> None:
    if as_json:
        return print_json({"replayed": list(task_ids), "count": len(task_ids)})
    say(f"replayed {len(task_ids)} dead letter(s) onto their queues")
    for task_id in task_ids:
        say(task_id)


def purged(count: int, as_json: bool) -> None:
    if as_json:
        return print_json({"purged": count})
    say(f"purged {count} dead letter(s)")


# --- enqueue ------------------------------------------------------------------------


def enqueued(task_id: str, name: str, queue: str | None, as_json: bool) -> None:
    if as_json:
        return print_json({"id": task_id, "name": name, "queue": queue})
    say(task_id)  # the id alone, so `ID=$(stem enqueue ...)` works


# --- signing ------------------------------------------------------------------------


def signing_key(
    algorithm: str, key_id: str, sections: dict[str, dict[str, str]], as_json: bool
) -> None:
    """A new key as environment lines, one block per kind of process that gets them (the
    one output that shows key material: it is what was asked for)."""
    if as_json:
        return print_json({"algorithm": algorithm, "key_id": key_id, "env": sections})
    blocks = []
    for who, variables in sections.items():
        lines = [f"# {algorithm} key {key_id}: for {who}"]
        lines += [f"{name}={value}" for name, value in variables.items()]
        blocks.append("\n".join(lines))
    say("\n\n".join(blocks))


# --- demo ---------------------------------------------------------------------------


def demo_progress(done: int, total: int, retries: int, dead: int, elapsed: float) -> str:
    return (
        f"{done}/{total} tasks final  retries seen: {retries}  dead letters: {dead}  "
        f"({elapsed:.1f}s)"
    )


class ProgressLine:
    """A status line redrawn in place on a terminal, printed now and then otherwise
    (a pipe or CI log gets a readable history instead of carriage returns)."""

    def __init__(self, out: TextIO | None = None, every: float = 1.0) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.every = every
        self._last_text = ""
        self._last_at = -math.inf  # the first line always prints

    def update(self, text: str, *, force: bool = False) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.out.flush()
            return
        now = time.monotonic()
        if text != self._last_text and (force or now - self._last_at >= self.every):
            self.out.write(text + "\n")
            self.out.flush()
            self._last_text, self._last_at = text, now

    def finish(self, text: str) -> None:
        self.update(text, force=True)
        if self.tty:
            self.out.write("\n")


def demo_started(url: str, concurrency: int, log_path: Path) -> None:
    say(f"demo: supervisor with {concurrency} children on {url}\ndemo: worker log in {log_path}")


def demo_summary(summary: DemoSummary, out: TextIO | None = None) -> None:
    """The end-of-demo report: states, dead letters, speed, and the verdict."""
    lines = [
        "",
        "States:",
        table(("STATE", "TASKS"), sorted(summary.states.items())),
        "",
        "Dead-letter queue:",
    ]
    dead = summary.dead_letters
    lines.append(
        table(
            ("NAME", "REASON", "ERROR", "ATTEMPTS", "MESSAGE"),
            [(d.name, d.reason, d.error_type, d.attempts, d.message) for d in dead],
        )
        if dead
        else "empty"
    )
    rate = summary.total / max(summary.elapsed, 1e-9)
    lines += [
        "",
        f"{summary.total} tasks in {summary.elapsed:.2f}s ({rate:.0f} tasks/s), "
        f"{summary.retries} retries",
    ]
    if summary.problems:
        lines += ["", "Demo FAILED:", *(f"  - {p}" for p in summary.problems)]
    else:
        lines += [
            "",
            "Demo OK: the flaky task succeeded on retry, the failing and the slow "
            "task are in the dead-letter queue, every add succeeded.",
        ]
    say("\n".join(lines), out)


def log_tail(path: Path, lines: int = 30) -> None:
    """The end of the worker log on stderr, so a failed demo shows why."""
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    say(f"\nlast lines of {path}:", sys.stderr)
    say("\n".join(tail), sys.stderr)


def _ping_table(answers: Sequence[Answer]) -> str:
    return table(("WORKER", "LATENCY"), [(a.worker, f"{a.latency_ms:.1f} ms") for a in answers])


def _stats_table(answers: Sequence[Answer]) -> str:
    rows = [(r["worker"], r["host"], r["pid"], ",".join(r["queues"]), r["concurrency"],
             r["in_flight"], r["processed"], r["failed"], ",".join(r["paused"]) or EMPTY)
            for r in (a.reply for a in answers)]  # fmt: skip
    return table(("WORKER", "HOST", "PID", "QUEUES", "CHILDREN", "IN-FLIGHT", "PROCESSED",
                  "FAILED", "PAUSED"), rows)  # fmt: skip


def _inspect_table(answers: Sequence[Answer]) -> str:
    rows = [
        (a.worker, t["task_id"], t["name"], f"{t['runtime_s']:.1f}s", f"{t['lease_age_s']:.1f}s")
        for a in answers for t in a.reply.get("active", [])
    ]  # fmt: skip
    if not rows:
        return "no tasks running"
    return table(("WORKER", "TASK", "NAME", "RUNNING", "LEASE AGE"), rows)


def _plain_answers(answers: Sequence[Answer]) -> str:
    lines = [f"{a.worker}: {a.reply.get('error') or 'ok'}" for a in answers]
    return "\n".join(lines)


_CONTROL_TABLES = {"ping": _ping_table, "stats": _stats_table, "inspect": _inspect_table}
