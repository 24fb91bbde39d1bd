"""`stem worker multi start|stop|restart|status NAMES`: named workers running detached,
each with a pidfile and a log file, for hosts without systemd. Everything after `--`
goes to each `stem worker run`, which also gets `--name NAME`.

Decisions (docs/cli.md says the same to users):
- A lone number N means w1..wN; otherwise every NAME is a name (never all digits).
- `start` leaves a worker that is already running alone. When some worker fails (it
  exits, or is not READY in time), that one is killed and its pidfile removed; the ones
  that did start keep running (`start` is idempotent: fix the cause and run it again),
  and the command exits 1.
- `restart` goes one name at a time (stop, then start) and stops at the first failure,
  so a bad release takes down one worker, not all of them.
- A stale pidfile (its pid gone, or some other program) is removed by `start`, `stop`
  and `restart` with a note; `status` only reports it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.cli import detached
from appliance.cli.common import CliError, Commands, Parser, UsageError, add_json_flag
from appliance.cli.detached import RUNNING, STALE, STOPPED, Found, Launch, NamedWorker
from appliance.cli.output import print_json, say
from appliance.states import ExitCode
from appliance.units import MAX_NAME

FAILED = "failed"
DEFAULT_PIDFILE = "./var/run/%n.pid"
DEFAULT_LOGFILE = "./var/log/%n.log"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0  # above the default shutdown_grace (30 s), so a warm stop can finish
STOP_SIGNALS = {"warm": signal.SIGTERM, "cold": signal.SIGQUIT}
# A name becomes part of file names (%n) and the worker's id, so it stays plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")

Handler = Callable[[argparse.Namespace], int]


class MultiParser(Parser):
    """Splits its arguments at the first `--`: before it, this command's own; after it,
    the `stem worker run` arguments for every worker (`args.worker_args`). argparse alone
    cannot: it drops the `--` and then mixes both into the NAME positional."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        cut = argv.index("--") if "--" in argv else len(argv)
        parsed, extras = super().parse_known_args(argv[:cut], namespace)
        parsed.worker_args = argv[cut + 1 :]
        return parsed, extras


@dataclass(slots=True)
class Report:
    """What one command found of, or did to, one worker."""

    worker: NamedWorker
    state: str  # running | stopped | stale | failed
    pid: int | None = None
    uptime_s: float | None = None
    notes: list[str] = field(default_factory=list)  # what happened, in order
    ok: bool = True  # counts towards exit code 0
    log_tail: list[str] | None = None  # a failed start's last log lines

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.worker.name,
            "pid": self.pid,
            "state": self.state,
            "pidfile": str(self.worker.pidfile),
            "logfile": str(self.worker.logfile),
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 1),
            "notes": self.notes,
        }


# --- the parser ----------------------------------------------------------------------


def register(sub: Commands) -> None:
    """Add `multi` and its four actions to the `stem worker` group."""
    group = sub.add_parser(
        "multi",
        help="start, stop, restart and check named detached workers (hosts without systemd)",
        description="Run named workers detached, each with a pidfile and a log file, on "
        "hosts without systemd. Everything after `--` goes to each `stem worker run`, "
        "which also gets --name NAME.",
    )
    actions = group.add_subparsers(
        dest="multi_command", metavar="ACTION", required=True, parser_class=MultiParser
    )
    start = _action(
        actions, "start", start_command, worker_args=True,
        text="start the named workers detached and wait until each is ready",
        more="A worker already running is left alone. Returns once every worker sent "
        "READY=1; one that exits or is not ready within --timeout is killed and its log's "
        "last lines printed (the others keep running), and the exit code is 1.",
    )  # fmt: skip
    _timeout_flag(start, f"seconds to wait for each READY=1 (default {START_TIMEOUT:g})")
    stop = _action(
        actions, "stop", stop_command,
        text="stop the named workers and wait until each has exited",
        more="SIGTERM (a warm shutdown: running tasks finish) or, with --mode cold, "
        "SIGQUIT; then waits for each to exit and removes its pidfile. A name with no "
        "pidfile, or a stale one, is reported, not an error. Arguments after -- are ignored.",
    )  # fmt: skip
    _timeout_flag(stop, f"seconds to wait for the workers to exit (default {STOP_TIMEOUT:g})")
    _mode_flag(stop)
    restart = _action(
        actions, "restart", restart_command, worker_args=True,
        text="stop and start the named workers, one at a time",
        more="Each name is stopped and started before the next one, and a failure stops "
        "the rest, so a release that does not start takes down one worker only.",
    )  # fmt: skip
    _timeout_flag(
        restart,
        f"seconds each stop and each start may take (default {STOP_TIMEOUT:g} to stop, "
        f"{START_TIMEOUT:g} to start)",
    )
    _mode_flag(restart)
    _action(
        actions, "status", status_command,
        text="say which of the named workers are running",
        more="Per name: running (pid, uptime), stopped, or a stale pidfile. Exits 0 only "
        "when every one is running. Arguments after -- are ignored.",
    )  # fmt: skip


def _action(
    actions: argparse._SubParsersAction[MultiParser],
    name: str,
    handler: Handler,
    *,
    text: str,
    more: str,
    worker_args: bool = False,
) -> MultiParser:
    usage = "%(prog)s NAME [NAME ...] [options]" + (" -- WORKER-RUN-ARGS" if worker_args else "")
    parser = actions.add_parser(
        name, help=text, description=f"{text[0].upper()}{text[1:]}. {more}", usage=usage
    )
    parser.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="worker names such as w1 w2 (%%h becomes the host name), or a count N for w1..wN",
    )
    parser.add_argument(
        "--pidfile",
        metavar="TEMPLATE",
        default=DEFAULT_PIDFILE,
        help="each worker's pidfile; %%n is its name, %%h the host (default ./var/run/%%n.pid)",
    )
    parser.add_argument(
        "--logfile",
        metavar="TEMPLATE",
        default=DEFAULT_LOGFILE,
        help="each worker's log, appended to; %%n and %%h as for --pidfile "
        "(default ./var/log/%%n.log)",
    )
    add_json_flag(parser)
    parser.set_defaults(handler=handler)
    return parser


def _timeout_flag(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--timeout", type=positive_seconds, metavar="S", help=text)


def _mode_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=tuple(STOP_SIGNALS),
        default="warm",
        help="warm: SIGTERM, running tasks finish (default); cold: SIGQUIT, their children "
        "are killed and the tasks go back to the queue at once",
    )


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# --- names, paths and worker arguments ------------------------------------------------


MAX_WORKERS = 256  # workers one `multi` command manages (each is a supervisor)


def worker_names(raw: Sequence[str], host: str) -> list[str]:
    """NAMES as given (`%h` replaced by `host`), or w1..wN for a lone count N."""
    if len(raw) == 1 and raw[0].isascii() and raw[0].isdigit():
        count = int(raw[0])
        if not 1 <= count <= MAX_WORKERS:
            raise UsageError(f"a count of workers must be 1 to {MAX_WORKERS}, got {raw[0][:20]}")
        return [f"w{i}" for i in range(1, count + 1)]
    names = [name.replace("%h", host) for name in raw]
    for name in names:
        if name.isdigit():
            raise UsageError(f"a worker name cannot be a number ({name}): a lone N means w1..wN")
        if len(name) > MAX_NAME:
            raise UsageError(f"a worker name must be at most {MAX_NAME} characters")
        if not _NAME.fullmatch(name):
            raise UsageError(
                f"bad worker name {name!r}: use letters, digits and _ . @ - "
                "(it becomes part of file names)"
            )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"worker name given twice: {', '.join(twice)}")
    return names


def expand(template: str, flag: str, name: str, host: str) -> Path:
    """`template` with %n, %h and %% replaced, as an absolute path."""

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code in ("n", "h", "%"):
            return {"n": name, "h": host, "%": "%"}[code]
        raise UsageError(
            f"{flag} {template!r}: unknown %{code} (use %n for the name, %h for the host, "
            "%% for a %)"
        )

    if not template.strip():
        raise UsageError(f"{flag} must not be empty")
    return Path(os.path.abspath(re.sub(r"%(.?)", one, template)))


def named_workers(args: argparse.Namespace) -> list[NamedWorker]:
    """The workers the command line names, with their expanded files."""
    host = socket.gethostname()
    workers = [
        NamedWorker(
            name,
            expand(args.pidfile, "--pidfile", name, host),
            expand(args.logfile, "--logfile", name, host),
        )
        for name in worker_names(args.names, host)
    ]
    owners: dict[Path, str] = {}
    for worker in workers:
        other = owners.setdefault(worker.pidfile, worker.name)
        if other != worker.name:
            raise UsageError(
                f"--pidfile {args.pidfile} gives {other} and {worker.name} the same file "
                f"{worker.pidfile}: put %n in it"
            )
    return workers


def checked_worker_args(worker_args: list[str]) -> list[str]:
    """WORKER-RUN-ARGS parsed as `stem worker run` will parse them, so a mistake fails
    here, before anything starts, instead of in every worker's log."""
    from appliance.cli.main import build_parser  # main imports this module

    try:
        parsed, unknown = build_parser().parse_known_args(["worker", "run", *worker_args])
    except UsageError as exc:
        raise UsageError(f"after --: {exc}") from None
    if unknown:
        raise UsageError(
            f"after --: `stem worker run` does not take {' '.join(unknown)} "
            "(see 'stem worker run --help')"
        )
    if getattr(parsed, "name", None) is not None:
        raise UsageError("after --: leave out --name: each worker runs with --name NAME")
    return worker_args


def _prepare_dirs(workers: Sequence[NamedWorker]) -> None:
    for directory in {path.parent for w in workers for path in (w.pidfile, w.logfile)}:
        try:
            detached.ensure_dir(directory)
        except OSError as exc:
            raise CliError(f"cannot create {directory}: {exc.strerror}") from None


def _locked(workers: Sequence[NamedWorker]) -> AbstractContextManager[None]:
    def waiting(directory: Path) -> None:
        say(f"waiting for another `stem worker multi` on {directory}", sys.stderr)

    return detached.locked((w.pidfile.parent for w in workers), waiting)


# --- looking -------------------------------------------------------------------------


def _current(worker: NamedWorker, *, clear_stale: bool) -> tuple[Report, Found]:
    """The worker as its pidfile says; a stale pidfile is removed when `clear_stale`."""
    found = detached.look(worker)
    report = Report(worker, found.state, found.pid)
    if found.process is not None:
        report.uptime_s = detached.uptime(found.process)
    if found.state == STALE and clear_stale:
        detached.remove_pidfile(worker.pidfile)
        report.state = STOPPED
        report.notes.append(f"removed a stale pidfile {worker.pidfile}: {found.why}")
    return report, found


def status_command(args: argparse.Namespace) -> int:
    """`stem worker multi status`: read-only; exit 0 only when every worker runs."""
    reports = []
    for worker in named_workers(args):
        report, found = _current(worker, clear_stale=False)
        report.ok = report.state == RUNNING
        if report.state == RUNNING:
            report.notes.append(f"running (pid {report.pid}, up {duration(report.uptime_s)})")
        elif report.state == STALE:
            report.notes.append(f"stale pidfile {worker.pidfile}: {found.why}")
        else:
            report.notes.append("stopped")
        reports.append(report)
    return finish(reports, args.json)


# --- start ---------------------------------------------------------------------------


def start_command(args: argparse.Namespace) -> int:
    """`stem worker multi start`: launch the workers not running, wait for READY=1."""
    workers = named_workers(args)
    worker_args = checked_worker_args(args.worker_args)
    _prepare_dirs(workers)
    with _locked(workers):
        reports = start(workers, worker_args, args.timeout or START_TIMEOUT)
    return finish(reports, args.json)


def start(workers: Sequence[NamedWorker], worker_args: list[str], timeout: float) -> list[Report]:
    """Launch every worker that is not running, all at once, then wait for them."""
    reports = []
    launches: list[tuple[Launch, Report]] = []
    for worker in workers:
        report, _ = _current(worker, clear_stale=True)
        reports.append(report)
        if report.state == RUNNING:
            report.notes.append(
                f"already running (pid {report.pid}, up {duration(report.uptime_s)})"
            )
            continue
        item = _launch(worker, worker_args, report)
        if item is not None:
            launches.append((item, report))
    detached.wait_ready([item for item, _ in launches], timeout)
    for item, report in launches:
        _settle(item, report)
    return reports


def _launch(worker: NamedWorker, worker_args: list[str], report: Report) -> Launch | None:
    try:
        item = detached.launch(worker, worker_args)
    except OSError as exc:
        report.state, report.ok = FAILED, False
        report.notes.append(f"failed: cannot open {worker.logfile}: {exc.strerror}")
        return None
    try:
        detached.write_pidfile(worker.pidfile, item.process.pid)
    except BaseException:
        detached.abandon(item)  # a worker without its pidfile could not be stopped
        raise
    return item


def _settle(item: Launch, report: Report) -> None:
    report.pid = item.process.pid
    if item.failure is None:
        report.state, report.uptime_s = RUNNING, item.ready_after
        report.notes.append(f"started (pid {report.pid}, ready in {item.ready_after:.1f}s)")
        return
    detached.abandon(item)
    detached.remove_pidfile(item.worker.pidfile)
    report.state, report.ok = FAILED, False
    report.log_tail = detached.log_tail(item)
    report.notes.append(f"failed: {item.failure} (its log's last lines are on stderr)")


# --- stop ----------------------------------------------------------------------------


def stop_command(args: argparse.Namespace) -> int:
    """`stem worker multi stop`: signal each running worker and wait for it to exit."""
    workers = named_workers(args)
    with _locked(workers):
        reports = stop(workers, args.mode, args.timeout or STOP_TIMEOUT)
    return finish(reports, args.json)


def stop(workers: Sequence[NamedWorker], mode: str, timeout: float) -> list[Report]:
    """Signal every running worker at once, then wait for all of them."""
    reports = []
    targets = []
    for worker in workers:
        report, found = _current(worker, clear_stale=True)
        reports.append(report)
        if found.state == STOPPED:
            report.notes.append("not running (no pidfile)")
        elif report.state == RUNNING and found.process is not None:
            targets.append((report, found.process))
    took = detached.stop_all([process for _, process in targets], STOP_SIGNALS[mode], timeout)
    for report, process in targets:
        elapsed = took[process.pid]
        if elapsed is None:
            report.ok = False
            hint = "; try --mode cold" if mode == "warm" else ""
            report.notes.append(
                f"still running after {timeout:g}s (pid {report.pid}); pidfile kept{hint}"
            )
            continue
        detached.remove_pidfile(report.worker.pidfile)
        report.state, report.uptime_s = STOPPED, None
        report.notes.append(f"stopped (pid {report.pid}, {mode} shutdown in {elapsed:.1f}s)")
    return reports


# --- restart -------------------------------------------------------------------------


def restart_command(args: argparse.Namespace) -> int:
    """`stem worker multi restart`: stop and start each name in turn."""
    workers = named_workers(args)
    worker_args = checked_worker_args(args.worker_args)
    _prepare_dirs(workers)
    stop_timeout = args.timeout or STOP_TIMEOUT
    start_timeout = args.timeout or START_TIMEOUT
    reports: list[Report] = []
    with _locked(workers):
        for done, worker in enumerate(workers, 1):
            [report] = stop([worker], args.mode, stop_timeout)
            if report.ok:
                notes = report.notes
                [report] = start([worker], worker_args, start_timeout)
                report.notes[:0] = notes
            reports.append(report)
            if not report.ok:
                reports += [_not_restarted(rest, worker.name) for rest in workers[done:]]
                break
    return finish(reports, args.json)


def _not_restarted(worker: NamedWorker, failed: str) -> Report:
    report, _ = _current(worker, clear_stale=False)
    report.ok = False
    report.notes.append(f"not restarted, left {report.state}: {failed} failed first")
    return report


# --- output --------------------------------------------------------------------------


def finish(reports: Sequence[Report], as_json: bool) -> int:
    """Print a line per note (or the JSON list), failed starts' log tails on stderr;
    the exit code: 0 when every report is ok."""
    if as_json:
        print_json([report.as_json() for report in reports])
    else:
        for report in reports:
            for note in report.notes:
                say(f"{report.worker.name}: {note}")
    sys.stdout.flush()  # the lines above come before the tails below on a terminal
    for report in reports:
        if report.log_tail is not None:
            say(f"{report.worker.name}: last lines of {report.worker.logfile}:", sys.stderr)
            say("\n".join(f"  {line}" for line in report.log_tail) or "  (empty)", sys.stderr)
    failed = [report.worker.name for report in reports if not report.ok]
    if failed:  # the exit code, and one line saying why, after the details above
        raise CliError(f"not as asked: {', '.join(failed)} (see the lines above)")
    return int(ExitCode.OK)


def duration(elapsed: float | None) -> str:
    """A short uptime: 45s, 3m12s, 2h05m, 3d04h."""
    if elapsed is None:
        return "?"
    s = int(elapsed)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
