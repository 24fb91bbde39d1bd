"""`stem health`: exit 0 only when the broker, the backend and the workers are healthy."""

from __future__ import annotations

import argparse

from appliance.cli import output
from appliance.cli.common import CliError, Commands, non_negative_int, opened, store_command
from appliance.health import check_health


def register(commands: Commands) -> None:
    parser = store_command(
        commands, "health", "check the broker, the backend and the workers; exit 0 only "
        "when all are healthy (for deploy pipelines)",
        app_text="use the stores this app is configured with",
    )  # fmt: skip
    parser.add_argument(
        "--min-workers", type=non_negative_int, default=1, metavar="N",
        help="live workers required (default: 1; 0 to check the stores only)",
    )  # fmt: skip
    parser.add_argument(
        "--max-dlq-growth", type=non_negative_int, metavar="N",
        help="fail when more than N tasks were dead-lettered since the last look",
    )  # fmt: skip
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        report = check_health(
            stem, min_workers=args.min_workers, max_dlq_growth=args.max_dlq_growth
        )
    output.health(report, args.json)
    if not report.healthy:
        failed = ", ".join(c.name for c in report.checks if not c.ok)
        raise CliError(f"unhealthy: {failed}")
    return 0
