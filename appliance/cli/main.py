"""The `stem` entry point: builds the parser from the command modules and maps errors
to one line on stderr and an exit code (see `common.report`)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

from appliance import __version__
from appliance.cli import (
    beat,
    demo,
    dlq,
    enqueue,
    health,
    observe,
    schedule,
    signing,
    tui,
    worker,
)
from appliance.cli.common import Parser, check_argv, report
from appliance.states import ExitCode

GROUPS = (worker, beat, enqueue, observe, schedule, dlq, health, tui, signing, demo)


@functools.cache
def build_parser() -> Parser:
    """The `stem` command tree, built once per process: building it costs ~25 ms here
    (argparse looks up a translation for every help string), and nothing changes a
    parser when it parses, so every `main()` of a process (tests run thousands) shares it."""
    parser = Parser(
        prog="stem",
        description="Stem appliance: a single-host task queue (SQLite by default, Redis by "
        "URL). Run `stem COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"stem {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `stem` command; returns its exit code (never raises for user errors)."""
    parser = build_parser()
    try:
        check_argv(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        code: int = args.handler(args)
        return code
    except SystemExit as exc:  # --help and --version end through argparse's exit()
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        return int(ExitCode.FAILURE)
    except KeyboardInterrupt:
        print("stem: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report(exc)
