"""`stem dlq ...`: list, show, replay and purge dead letters (changes need --confirm)."""

from __future__ import annotations

import argparse

from appliance.cli import output
from appliance.cli.common import (
    CliError,
    Commands,
    Parser,
    UsageError,
    opened,
    positive_int,
    store_command,
)
from appliance.observe import Observer


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "dlq",
        help="the dead-letter queue",
        description="Inspect, replay and purge the dead-letter queue.",
    )
    sub = group.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)

    listing = _leaf(sub, "list", "dead letters, newest first, a page at a time")
    listing.add_argument("queue", nargs="?", metavar="QUEUE", help="only this original queue")
    listing.add_argument(
        "--page-size",
        type=positive_int,
        default=20,
        metavar="N",
        help="entries per page (default: 20)",
    )
    listing.add_argument(
        "--page", type=positive_int, default=1, metavar="K", help="page number, from 1 (default: 1)"
    )
    listing.set_defaults(handler=run_list)

    show = _leaf(sub, "show", "one dead letter with its error, traceback and args")
    show.add_argument("id", metavar="ID", help="the DLQ entry id (from `stem dlq list`)")
    show.set_defaults(handler=run_show)

    replay = _leaf(sub, "replay", "put dead letters back on their queues as first attempts")
    replay.add_argument("queue", nargs="?", metavar="QUEUE", help="only this original queue")
    replay.add_argument("--limit", type=positive_int, metavar="N", help="oldest N only")
    _confirm_flag(replay, "replay")
    replay.set_defaults(handler=run_replay)

    purge = _leaf(sub, "purge", "delete dead letters for good")
    purge.add_argument("queue", nargs="?", metavar="QUEUE", help="only this original queue")
    _confirm_flag(purge, "purge")
    purge.set_defaults(handler=run_purge)


def _leaf(sub: Commands, name: str, text: str) -> Parser:
    return store_command(sub, name, text, app_text="use the stores this app is configured with")


def _confirm_flag(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--confirm", action="store_true", help=f"really {verb} (without it nothing changes)"
    )


def run_list(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        page = Observer(stem).dlq_list(args.queue, page=args.page, page_size=args.page_size)
    output.dlq_page(page, args.json)
    return 0


def run_show(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        entry = Observer(stem).dlq_show(args.id)
    if entry is None:
        raise CliError(f"no dead letter with id {args.id!r} (see `stem dlq list`)")
    output.dead_letter(entry, args.json)
    return 0


def run_replay(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        observer = Observer(stem)
        if not args.confirm:
            _refuse("replay", observer.dlq_count(args.queue), args.limit)
        task_ids = observer.dlq_replay(args.queue, limit=args.limit)
    output.replayed(task_ids, args.json)
    return 0


def run_purge(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        observer = Observer(stem)
        if not args.confirm:
            _refuse("purge", observer.dlq_count(args.queue), None)
        count = observer.dlq_purge(args.queue)
    output.purged(count, args.json)
    return 0


def _refuse(verb: str, count: int, limit: int | None) -> None:
    # Changing the DLQ is not undoable, so it takes an explicit flag; say what it would do.
    affected = min(count, limit) if limit is not None else count
    raise UsageError(f"dlq {verb} would affect {affected} dead letter(s); add --confirm to do it")
