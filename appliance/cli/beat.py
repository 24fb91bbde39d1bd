"""`stem beat run`: the Beat scheduler alone, in the foreground."""

from __future__ import annotations

import argparse

from appliance.cli.common import Commands, add_app_flag, build_settings, open_app, store_flags
from appliance.logs import configure_logging


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "beat", help="run the Beat scheduler",
        description="Run the Beat scheduler, which enqueues scheduled tasks.",
    )  # fmt: skip
    sub = group.add_subparsers(dest="beat_command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run", parents=[store_flags()], help="run Beat in the foreground",
        description="Run Beat in the foreground: it applies the app's schedules "
        "(stem.schedule) and the config's [[schedules]] to the store, then enqueues each "
        "slot when it is due. Any number of instances may run on one store: each slot is "
        "dispatched once, and only the instance holding the leader lease works; if it "
        "dies another takes over within the lease (--config [beat] lease). SIGTERM stops it.",
    )  # fmt: skip
    add_app_flag(run, required=True, text="the app whose schedules and tasks to use")
    run.set_defaults(handler=run_beat_command)


def run_beat_command(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    configure_logging(settings)
    stem = open_app(args, settings)
    from appliance.beat.runner import run_beat

    return run_beat(stem)
