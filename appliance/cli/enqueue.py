"""`stem enqueue NAME --args JSON`: store one task by name."""

from __future__ import annotations

import argparse
from datetime import datetime

from appliance.cli import output
from appliance.cli.common import (
    Commands,
    UsageError,
    add_app_flag,
    add_json_flag,
    json_object,
    opened,
    priority,
    seconds,
    store_flags,
)
from appliance.errors import BrokerError, ConfigError, NotRegistered


def register(commands: Commands) -> None:
    parser = commands.add_parser(
        "enqueue",
        parents=[store_flags()],
        help="store one task by name and print its id",
        description="Store one task durably and print its id. No app is needed: the task "
        "is stored by name with default options. With --app, the name must be registered, "
        "the args are checked against the task's signature and the task's own queue and "
        "priority apply.",
    )
    parser.add_argument("name", metavar="NAME", help="the task name, e.g. email.send")
    parser.add_argument(
        "--args",
        default="{}",
        metavar="JSON",
        help="keyword arguments as a JSON object (default: {})",
    )
    parser.add_argument("--queue", metavar="Q", help="queue (default: the task's, or default)")
    parser.add_argument(
        "--countdown",
        type=seconds,
        metavar="S",
        help="run no earlier than S seconds from now (at most 10 years)",
    )
    parser.add_argument(
        "--eta",
        type=_aware_time,
        metavar="TIME",
        help="run no earlier than TIME: ISO 8601 with a timezone, e.g. 2027-01-01T07:00+01:00",
    )
    parser.add_argument(
        "--expires",
        type=_expiry,
        metavar="S|TIME",
        help="cancel (REVOKED, reason expired) a delivery later than S seconds from now, "
        "or than TIME (ISO 8601 with a timezone)",
    )
    parser.add_argument(
        "--priority",
        type=priority,
        metavar="P",
        help="higher runs first (a 32-bit signed integer)",
    )
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        type=_header,
        metavar="KEY=VALUE",
        help="a message header (repeat for more), e.g. --header tenant=acme",
    )
    parser.add_argument("--task-id", metavar="ID", help="the task id (default: a new UUIDv7)")
    add_app_flag(parser, required=False, text="check the name and args against this app")
    add_json_flag(parser)
    parser.set_defaults(handler=run)


def _aware_time(text: str) -> datetime:
    """An ISO 8601 time with its timezone (a naive time would mean something else on
    every host)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (e.g. 2027-01-01T07:00:00+00:00)"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone; add one (+00:00, Z, +01:00)")
    return value


def _expiry(text: str) -> float | datetime:
    try:
        float(text)
    except ValueError:
        return _aware_time(text)
    return seconds(text)


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value


def run(args: argparse.Namespace) -> int:
    task_args = json_object(args.args, "--args")
    with opened(args, create=True) as stem:
        try:
            if args.app:
                stem.get_task(args.name)
            handle = stem.enqueue(
                args.name,
                args=task_args,
                queue=args.queue,
                countdown=args.countdown,
                eta=args.eta,
                expires=args.expires,
                priority=args.priority,
                headers=dict(args.header),
                task_id=args.task_id,
            )
        except (ConfigError, BrokerError):
            raise  # store trouble keeps its own exit code
        except (NotRegistered, TypeError, ValueError) as exc:
            # Bad input caught before anything was stored: args that do not fit the
            # task, values with no JSON form, a payload over the size limit.
            raise UsageError(str(exc)) from exc
    queue = args.queue or (stem.registry[args.name].options.queue if args.app else "default")
    output.enqueued(handle.id, args.name, queue, args.json)
    return 0
