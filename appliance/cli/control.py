"""`stem worker ping|stats|inspect|revoke|pause|resume|shutdown|status`: operate running
workers through the control channel of their store (`appliance.control`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from appliance.cli import output
from appliance.cli.common import (
    CliError,
    Commands,
    Parser,
    opened,
    store_command,
)
from appliance.control.client import DEFAULT_TIMEOUT_S, REVOKE_TTL_S, CallResult, ControlClient
from appliance.observe import Observer
from appliance.units import MAX_SECONDS, check_name


def register(sub: Commands) -> None:
    """Add the control commands to the `stem worker` group."""
    _command(sub, "ping", "ask live workers to answer, with the round-trip time", run_ping)
    _command(sub, "stats", "each live worker's counts, queues and paused queues", run_stats)
    _command(sub, "inspect", "the tasks each live worker is running now", run_inspect)
    revoke = _command(
        sub, "revoke", "revoke tasks: a pending one never runs; stored, so a worker started "
        "later honours it", run_revoke, targeted=False,
    )  # fmt: skip
    revoke.add_argument(
        "ids", nargs="+", metavar="ID", type=_named("the task id"), help="task ids to revoke"
    )
    revoke.add_argument(
        "--terminate", action="store_true", help="also kill the child running it, at once"
    )
    revoke.add_argument(
        "--ttl", type=_seconds, default=REVOKE_TTL_S, metavar="S",
        help=f"keep the revoke this long (default: {REVOKE_TTL_S:.0f} s, a week)",
    )  # fmt: skip
    for name, text, handler in (
        ("pause", "stop every worker claiming from a queue (stored; messages stay)", run_pause),
        ("resume", "let workers claim from a paused queue again", run_resume),
    ):
        parser = _command(sub, name, text, handler, targeted=False)
        parser.add_argument(
            "--queue", required=True, metavar="Q", type=_named("the queue name"), help="the queue"
        )
    shutdown = _command(
        sub, "shutdown", "shut workers down: warm (finish running tasks) or cold", run_shutdown
    )
    shutdown.add_argument(
        "--mode", choices=("warm", "cold"), default="warm",
        help="warm: running tasks finish (as SIGTERM); cold: children killed (as SIGQUIT)",
    )  # fmt: skip
    status = store_command(
        sub, "status", "the live workers' heartbeat records",
        app_text="use the stores this app is configured with",
    )  # fmt: skip
    status.add_argument(
        "--stream", action="store_true", help="refresh until interrupted (JSON: one list a line)"
    )
    status.add_argument(
        "--interval", type=_seconds, default=1.0, metavar="S",
        help="seconds between refreshes with --stream (default: 1)",
    )  # fmt: skip
    status.set_defaults(handler=run_status)


def _named(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check_name(text, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:40]!r}") from None
    if not 0 < value <= MAX_SECONDS:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {MAX_SECONDS:.0f}, got {text}")
    return value


def _command(
    sub: Commands, name: str, text: str, handler: Callable[[argparse.Namespace], int],
    *, targeted: bool = True,
) -> Parser:  # fmt: skip
    parser = store_command(sub, name, text, app_text="use the stores this app is configured with")
    if targeted:
        parser.add_argument(
            "--worker", metavar="ID", help="only this worker (default: every live worker)"
        )
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="S",
        help=f"wait this long for the answers (default: {DEFAULT_TIMEOUT_S:g} s)",
    )  # fmt: skip
    parser.set_defaults(handler=handler)
    return parser


def _finish(result: CallResult, as_json: bool, shape: str) -> int:
    """Print the answers; exit 1 when a worker asked did not answer, or none was live."""
    if not result.answers and not result.missing:
        if as_json:
            output.print_json([])
        raise CliError("no live workers share this store (see `stem worker status`)")
    output.control_result(result, as_json, shape)
    return 0 if result.complete else 1


def _call(args: argparse.Namespace, command: str) -> int:
    with opened(args) as stem:
        result = ControlClient(stem.stores).call(command, worker=args.worker, timeout=args.timeout)
    return _finish(result, args.json, command)


def run_ping(args: argparse.Namespace) -> int:
    return _call(args, "ping")


def run_stats(args: argparse.Namespace) -> int:
    return _call(args, "stats")


def run_inspect(args: argparse.Namespace) -> int:
    return _call(args, "inspect")


def run_revoke(args: argparse.Namespace) -> int:
    with opened(args, create=True) as stem:  # stored: it may come before anything else
        unknown = [i for i in args.ids if Observer(stem).task_show(i) is None]
        result = ControlClient(stem.stores).revoke(
            args.ids, terminate=args.terminate, ttl=args.ttl, timeout=args.timeout
        )
    for task_id in unknown:
        output.note(
            f"no task {task_id!r} is queued or known now: the revoke is stored, and holds "
            f"for {args.ttl:g} s if it is enqueued"
        )
    return _stored(result, args.json, f"revoked {len(args.ids)} task(s)")


def run_pause(args: argparse.Namespace) -> int:
    return _pause(args, pause=True)


def run_resume(args: argparse.Namespace) -> int:
    return _pause(args, pause=False)


def _pause(args: argparse.Namespace, *, pause: bool) -> int:
    with opened(args, create=True) as stem:  # stored: it may come before anything else
        client = ControlClient(stem.stores)
        served = any(args.queue in beat.queues for beat in client.live_workers())
        changed, result = (client.pause if pause else client.resume)(
            args.queue, timeout=args.timeout
        )
    verb = "paused" if pause else "resumed"
    if not changed:
        output.note(f"queue {args.queue!r} was {'already paused' if pause else 'not paused'}")
    elif pause and not served:
        output.note(f"no live worker serves queue {args.queue!r}; it is paused for any that will")
    return _stored(result, args.json, f"queue {args.queue} {verb}")


def _stored(result: CallResult, as_json: bool, summary: str) -> int:
    """A stored command holds whether or not workers answered: say so, then who did."""
    if as_json:
        output.print_json({
            "done": summary, "answers": [a.reply | {"worker": a.worker} for a in result.answers],
            "missing": [m.worker for m in result.missing],
        })  # fmt: skip
    else:
        output.say(summary + (" (stored; no live workers to tell)" if not result.answers
                              and not result.missing else ""))  # fmt: skip
        output.control_result(result, False, "plain")
    return 0 if result.complete else 1


def run_shutdown(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        result = ControlClient(stem.stores).shutdown(
            worker=args.worker, mode=args.mode, timeout=args.timeout
        )
    return _finish(result, args.json, "shutdown")


def run_status(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        observer = Observer(stem)
        while True:
            beats = observer.workers()
            if args.stream and not args.json:
                output.say("\033[2J\033[H" + time.strftime("%H:%M:%S"))  # clear, then redraw
            output.workers(beats, args.json)
            if not args.stream:
                return 0
            time.sleep(args.interval)
