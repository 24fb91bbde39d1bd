"""`stem schedule list|show|apply|enable|disable|delete|dry-run`: Beat's schedules in the
store (what every Beat instance dispatches)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from appliance.cli import output
from appliance.cli.common import (
    CliError,
    Commands,
    Parser,
    bounded_int,
    opened,
    store_command,
)
from appliance.observe import schedule_views


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "schedule", help="Beat's schedules",
        description="List, apply, enable, disable and delete Beat's schedules in the store.",
    )  # fmt: skip
    sub = group.add_subparsers(dest="schedule_command", metavar="COMMAND", required=True)
    _leaf(sub, "list", "every stored schedule with its next and last run", run_list)
    show = _leaf(sub, "show", "one schedule and its recent runs", run_show)
    show.add_argument("name", metavar="NAME", help="the schedule's name")
    show.add_argument("--runs", type=bounded_int(1, 500), default=20, metavar="N",
                      help="recent runs to show (default: 20)")  # fmt: skip
    _leaf(sub, "apply", "store the config's [[schedules]] and the app's stem.schedule(...) "
          "entries (all checked first; nothing half-applied)", run_apply, create=True)  # fmt: skip
    for name, text, handler in (
        ("enable", "let Beat dispatch a schedule again (missed slots are not made up)",
         run_enable),
        ("disable", "stop Beat dispatching a schedule (kept in the store)", run_disable),
        ("delete", "remove a schedule and its runs from the store", run_delete),
    ):  # fmt: skip
        parser = _leaf(sub, name, text, handler, create=True)
        parser.add_argument("name", metavar="NAME", help="the schedule's name")
    dry = _leaf(sub, "dry-run", "print the next times of a schedule; dispatch nothing", run_dry)
    dry.add_argument("name", metavar="NAME", help="a stored schedule, or one of the config/app")
    dry.add_argument("--count", type=bounded_int(1, 1000), default=5, metavar="N",
                     help="how many times (default: 5)")  # fmt: skip


def _leaf(sub: Commands, name: str, text: str, handler: object, *, create: bool = False) -> Parser:
    parser = store_command(sub, name, text, app_text="the app whose stem.schedule() entries and "
                           "tasks to use")  # fmt: skip
    parser.set_defaults(handler=handler, create=create)
    return parser


def run_list(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        views = schedule_views(stem)
    output.schedules(views, args.json)
    return 0


def run_show(args: argparse.Namespace) -> int:
    with opened(args) as stem:
        stored = stem.stores.schedules.get(args.name)
        if stored is None:
            raise CliError(f"no schedule named {args.name!r} is stored (see `stem schedule list`)")
        view = next(v for v in schedule_views(stem) if v.name == args.name)
        runs = stem.stores.schedules.runs(args.name, args.runs)
    output.schedule(view, stored.entry.to_table(), runs, args.json)
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from appliance.beat.scheduler import Beat

    with opened(args, create=True) as stem:
        beat = Beat(stem, stem.stores)
        entries_code = list(stem.schedules.values())
        entries_config = list(stem.settings.schedules)
        if not entries_code and not entries_config:
            raise CliError("nothing to apply: no [[schedules]] in the config and no "
                           "stem.schedule(...) in the app (--app)")  # fmt: skip
        from appliance.beat.spec import validate_entries

        validate_entries([*entries_code, *entries_config], source=stem.settings.source,
                         tasks=set(stem.registry) or None)  # fmt: skip
        changed = []
        if entries_code:
            changed += beat.apply(entries_code, "code")
        if entries_config:
            changed += beat.apply(entries_config, stem.settings.source)
    output.applied(changed, len(entries_code) + len(entries_config), args.json)
    return 0


def _toggle(args: argparse.Namespace, enabled: bool) -> int:
    with opened(args, create=True) as stem:
        if not stem.stores.schedules.set_enabled(args.name, enabled):
            raise CliError(f"no schedule named {args.name!r} is stored (see `stem schedule list`)")
    output.say(f"schedule {args.name} {'enabled' if enabled else 'disabled'}")
    return 0


def run_enable(args: argparse.Namespace) -> int:
    return _toggle(args, True)


def run_disable(args: argparse.Namespace) -> int:
    return _toggle(args, False)


def run_delete(args: argparse.Namespace) -> int:
    with opened(args, create=True) as stem:
        if not stem.stores.schedules.delete(args.name):
            raise CliError(f"no schedule named {args.name!r} is stored (see `stem schedule list`)")
    output.say(f"schedule {args.name} deleted")
    return 0


def run_dry(args: argparse.Namespace) -> int:
    from appliance.beat.calendar import dry_run

    with opened(args) as stem:
        declared = {e.name: e for e in [*stem.settings.schedules, *stem.schedules.values()]}
        entry = declared.get(args.name)
        if entry is None:
            stored = stem.stores.schedules.get(args.name)
            entry = stored.entry if stored is not None else None
    if entry is None:
        raise CliError(f"no schedule named {args.name!r} in the store, the config or the app")
    times = dry_run(entry, datetime.now(UTC), args.count)
    if args.json:
        output.print_json(times)
    else:
        output.say("\n".join(times) if times else "no more runs")
    return 0
