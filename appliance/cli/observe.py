"""`stem observe ...`: read queues and tasks through `appliance.observe.Observer`."""

from __future__ import annotations

import argparse

from appliance.cli import output
from appliance.cli.common import (
    CliError,
    Commands,
    Parser,
    non_negative_int,
    opened,
    positive_int,
    store_command,
)
from appliance.observe import Observer, schedule_views


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "observe",
        help="read queues and tasks",
        description="Read-only views of queues and tasks (every one has --json).",
    )
    sub = group.add_subparsers(dest="observe_command", metavar="COMMAND", required=True)
    queues = _leaf(sub, "queues", "counts per queue: ready, delayed, in flight, dead")
    queues.set_defaults(handler=run_queues)
    workers = _leaf(sub, "workers", "the supervisors alive now, from their heartbeat records")
    workers.set_defaults(handler=run_workers)
    schedules = _leaf(sub, "schedules", "Beat's schedules: runs, last and next run, drift")
    schedules.add_argument(
        "--summary", action="store_true", help="one line: entries, runs, worst drift, errors"
    )
    schedules.set_defaults(handler=run_schedules)

    tasks = sub.add_parser(
        "tasks",
        help="list or show tasks",
        description="Tasks waiting or in flight, and one task by id.",
    )
    tasks_sub = tasks.add_subparsers(dest="tasks_command", metavar="COMMAND", required=True)
    listing = _leaf(tasks_sub, "list", "tasks waiting or in flight, in claim order")
    listing.add_argument("--queue", metavar="Q", help="only this queue")
    listing.add_argument(
        "--limit", type=positive_int, default=50, metavar="N", help="at most N tasks (default: 50)"
    )
    listing.add_argument(
        "--offset", type=non_negative_int, default=0, metavar="N", help="skip N tasks"
    )
    listing.set_defaults(handler=run_tasks_list)
    show = _leaf(tasks_sub, "show", "one task: its message and its stored state and result")
    show.add_argument("--id", required=True, metavar="ID", help="the task id")
    show.set_defaults(handler=run_tasks_show)


def _leaf(sub: Commands, name: str, text: str) -> Parser:
    return store_command(sub, name, text, app_text="read the stores this app is configured with")


def run_queues(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        stats = Observer(stem).queue_stats()
    output.queues(stats, args.json)
    return 0


def run_workers(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        beats = Observer(stem).workers()
    output.workers(beats, args.json)
    return 0


def run_tasks_list(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        items = Observer(stem).tasks_list(args.queue, limit=args.limit, offset=args.offset)
    output.messages(items, args.json)
    return 0


def run_tasks_show(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        detail = Observer(stem).task_show(args.id)
    if detail is None:
        raise CliError(f"no task with id {args.id!r} (unknown, or its result has expired)")
    output.task(detail, args.json)
    return 0


def run_schedules(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        views = schedule_views(stem)
    output.schedules(views, args.json, summary=args.summary)
    return 0
