"""`stem tui`: the Textual app. Textual and the `tui` package are imported inside the
handler, so no other command (nor `import appliance.cli.main`) loads them."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from appliance.cli.common import (
    Commands,
    UsageError,
    add_app_flag,
    build_settings,
    open_app,
    store_flags,
)
from appliance.logs import configure_logging

MIN_REFRESH_S, MAX_REFRESH_S = 0.2, 3600.0


def register(commands: Commands) -> None:
    text = "the terminal UI: workers, queues, dead letters, task lookup and schedules, live"
    parser = commands.add_parser(
        "tui", parents=[store_flags()], help=text, description=text[0].upper() + text[1:] + "."
    )
    add_app_flag(parser, required=False, text="use the stores this app is configured with")
    parser.add_argument(
        "--read-only", action="store_true",
        help="look only: the action keys (revoke, pause, shutdown, replay, purge) are "
        "hidden and do nothing",
    )  # fmt: skip
    parser.add_argument(
        "--refresh", type=refresh_seconds, default=1.0, metavar="SECONDS",
        help=f"seconds between refreshes (default: 1; {MIN_REFRESH_S:g} to {MAX_REFRESH_S:g})",
    )  # fmt: skip
    parser.set_defaults(handler=run)


def refresh_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:60]!r}") from None
    if not MIN_REFRESH_S <= value <= MAX_REFRESH_S:  # also refuses NaN
        raise argparse.ArgumentTypeError(
            f"must be >= {MIN_REFRESH_S:g} and <= {MAX_REFRESH_S:g}, got {text[:60]}"
        )
    return value


def run(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    stem = open_app(args, settings)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # In a pipe, a cron job or a script it would wait for keys nobody can press.
        raise UsageError(
            "stem tui needs a terminal (stdin and stdout are not both one); for scripts "
            "use `stem observe ... --json`"
        )
    from tui.app import StemTui
    from tui.source import Source

    # Log lines written to the terminal would tear the screen; store errors show in the
    # app's banner instead.
    with open(os.devnull, "w") as sink:
        configure_logging(replace(settings, log_level="ERROR"), stream=sink)
        StemTui(Source(stem), read_only=args.read_only, refresh_s=args.refresh).run()
    return 0
