"""`stem worker ...`: run the supervisor in the foreground."""

from __future__ import annotations

import argparse

from appliance.cli import control, multi
from appliance.cli.common import (
    Commands,
    add_app_flag,
    build_settings,
    open_app,
    setting,
    store_flags,
)
from appliance.logs import configure_logging
from appliance.units import check_name


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "worker", help="run workers", description="Run the supervisor and its process pools."
    )
    sub = group.add_subparsers(dest="worker_command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        parents=[store_flags()],
        help="run the supervisor and its pools in the foreground",
        description="Run the supervisor in the foreground: it forks the pool children, "
        "claims tasks for them and settles their outcomes. SIGTERM shuts down warm (running "
        "tasks finish, the rest go back to the queue); a second SIGTERM or SIGQUIT shuts "
        "down cold. Nothing is lost either way.",
    )
    add_app_flag(run, required=True, text="the app whose tasks to run, e.g. myapp.tasks:stem")
    run.add_argument("--pool", metavar="NAME", help="run only this pool of the config")
    run.add_argument(
        "--concurrency",
        type=setting("concurrency"),
        metavar="N",
        help="children per pool, at most 1024 (default: the number of CPUs)",
    )
    run.add_argument(
        "--queues",
        type=setting("queues"),
        metavar="A,B",
        help="queues to consume (default: default)",
    )
    run.add_argument(
        "--name", metavar="NAME", type=_worker_name,
        help="this worker's id for control commands and status (default: HOST:PID)",
    )  # fmt: skip
    run.add_argument(
        "--beat", action="store_true",
        help="also run the Beat scheduler (as [beat] enabled = true in the config)",
    )  # fmt: skip
    run.set_defaults(handler=run_worker)
    control.register(sub)
    multi.register(sub)


def _worker_name(text: str) -> str:
    try:
        return check_name(text, "the worker name")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_worker(args: argparse.Namespace) -> int:
    """Build settings, load the app, and hand both to the supervisor until it exits."""
    settings = build_settings(
        args, pool=args.pool, concurrency=args.concurrency, queues=args.queues
    )
    configure_logging(settings)
    stem = open_app(args, settings)
    # Imported here: the process tree (fork, shared memory, psutil) is only needed by
    # this command, and every other command stays quick to start.
    from appliance.worker.supervisor import Supervisor

    return int(Supervisor(stem, stem.settings.pools, name=args.name, beat=args.beat).run())
