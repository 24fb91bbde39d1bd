"""What every `stem` command shares: the parser class, the store flags, building
`Settings`, loading an app, and turning errors into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, NoReturn, TypeAlias

import orjson

from appliance.app import Stem
from appliance.config import DEFAULT_BROKER_URL, FIELDS, POOL_FIELDS, Settings, load_settings
from appliance.errors import BrokerUnavailable, ConfigError, StemError
from appliance.logs import configure_logging
from appliance.redaction import Redactor, redact_url, secrets_from_environment
from appliance.states import ExitCode
from appliance.stores import scheme_of
from appliance.units import MAX_COUNT, MAX_SECONDS, check_priority

# What `add_subparsers()` returns; a string so it is only evaluated by the type checker
# (argparse's class is not subscriptable at run time).
Commands: TypeAlias = "argparse._SubParsersAction[Parser]"


class CliError(StemError):
    """A command failed in a way the user can act on; `code` is the exit status."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


class UsageError(CliError):
    """Bad arguments: wrong flags, bad JSON, an app that cannot be found."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.USAGE)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (see `report`), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # argparse (3.11) drops the "--" of `--flag=--` and hands the flag an empty list
        # where its type expects a string; say what is missing instead.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return super()._get_values(action, arg_strings)


# --- flags --------------------------------------------------------------------------


def store_flags() -> Parser:
    """A parent parser with the flags that say where the stores and config are."""
    flags = Parser(add_help=False)
    group = flags.add_argument_group("stores and configuration")
    group.add_argument("--config", metavar="FILE", help="stem.toml to read (default: $STEM_CONFIG)")
    group.add_argument(
        "--broker",
        dest="broker_url",
        metavar="URL",
        help="broker URL (default: $STEM_BROKER_URL, the config, or sqlite:///./var/stem.db)",
    )
    group.add_argument(
        "--result-backend",
        dest="result_backend_url",
        metavar="URL",
        help="result backend URL (default: follow the broker)",
    )
    return flags


def add_app_flag(parser: argparse.ArgumentParser, *, required: bool, text: str) -> None:
    parser.add_argument("--app", metavar="MODULE:ATTR", required=required, help=text)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print JSON for scripts instead of text"
    )


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]. Every count has an upper bound: a huge
    one would otherwise reach the stores (SQLite integers are 64-bit) and fail there."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {shorten(text)!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be >= {low} and <= {high}, got {shorten(text)}")
        return value

    return parse


positive_int = bounded_int(1, MAX_COUNT)
non_negative_int = bounded_int(0, MAX_COUNT)


def seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0, at most ten years (`units.MAX_SECONDS`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {shorten(text)!r}") from None
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {shorten(text)}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_SECONDS:.0f} seconds (10 years), got {shorten(text)}"
        )
    return value


def priority(text: str) -> int:
    """argparse type: a task priority (a 32-bit signed integer, `units.check_priority`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {shorten(text)!r}") from None
    try:
        return check_priority(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def setting(attr: str) -> Callable[[str], Any]:
    """argparse type for a flag that sets the configuration value `attr`: the parser
    declared for it in `config.FIELDS`, so the flag, TOML and STEM_* accept the same."""
    spec = next(f for f in FIELDS + POOL_FIELDS if f.attr == attr)

    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def shorten(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters for an error message (the whole of a 1 MB flag
    value is no help on one line)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def json_object(text: str, flag: str) -> dict[str, Any]:
    """Parse a flag's JSON text that must be an object."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON ({exc}): {shorten(text)!r}") from None
    if not isinstance(value, dict):
        raise UsageError(
            f"{flag} must be a JSON object such as '{{\"x\": 1}}', got {type(value).__name__}"
        )
    return value


# --- settings and apps --------------------------------------------------------------


def build_settings(args: argparse.Namespace, *, pool: str | None = None, **flags: Any) -> Settings:
    """Settings from defaults < config file < STEM_* < these command-line values.

    The URLs are checked here so a bad scheme fails before anything runs, naming where
    the URL came from.
    """
    overrides = {"broker_url": args.broker_url, "result_backend_url": args.result_backend_url}
    settings = load_settings(args.config, overrides=overrides | flags, pool=pool)
    for key, flag, env in _URL_SOURCES:
        url = getattr(settings, key)
        if url is not None:
            _check_url(url, key, flag if getattr(args, key) else None, env, settings)
    return settings


# (setting, its flag, its variable); `args` holds each flag under the setting's name.
_URL_SOURCES = (
    ("broker_url", "--broker", "STEM_BROKER_URL"),
    ("result_backend_url", "--result-backend", "STEM_RESULT_BACKEND_URL"),
)


def _check_url(url: str, key: str, flag: str | None, env: str, settings: Settings) -> None:
    try:
        scheme_of(url)
    except ConfigError as exc:
        if flag is not None:
            where, key = "command line", flag
        elif env in os.environ:
            where = f"environment {env}"
        else:
            where = settings.source
        raise ConfigError(where, key, f"{exc.reason} (got {redact_url(url)!r})") from None


def load_app(spec: str) -> Stem:
    """Import the `Stem` named by "MODULE:ATTR", with the working directory importable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--app must look like MODULE:ATTR (e.g. myapp.tasks:stem), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `stem` is a script, so "." is not on the path
    module = _import(module_name)
    app = getattr(module, attr, None)
    if not isinstance(app, Stem):
        found = "nothing" if app is None else type(app).__name__
        raise UsageError(f"--app {spec}: {module_name}.{attr} is {found}, expected a Stem")
    return app


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except StemError:
        raise  # e.g. a bad STEM_* value read by Stem() at import: reported as itself
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        # Only the module itself (or its package) missing is a usage error; a missing
        # dependency inside the user's module is their import failing.
        if module_name == missing or module_name.startswith(missing + "."):
            raise UsageError(
                f"--app: no module named {module_name!r} (run from the directory that holds "
                "it, or install it)"
            ) from None
        raise CliError(f"--app: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:
        # The user's module raised at import: say where, in one line, without our frames.
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise CliError(
            f"--app: importing {module_name!r} failed at {frame.filename}:{frame.lineno}: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def open_app(args: argparse.Namespace, settings: Settings) -> Stem:
    """The `--app` Stem configured with `settings`, or a plain Stem when none is given."""
    # `is None`: an empty --app is a usage error, never "no app" (a supervisor with no
    # tasks would dead-letter everything it claims as unknown).
    if getattr(args, "app", None) is None:
        return Stem(settings=settings)
    app = load_app(args.app)
    app.configure(_keep_app_urls(app.settings, settings, args))
    return app


def _keep_app_urls(app: Settings, cli: Settings, args: argparse.Namespace) -> Settings:
    # An app built as Stem(broker="redis://...") names its stores in code; replacing its
    # settings wholesale would silently point it at the default SQLite file instead.
    # A URL given by flag, environment or config file still wins.
    broker_given = args.broker_url or "STEM_BROKER_URL" in os.environ
    if not broker_given and cli.broker_url == DEFAULT_BROKER_URL:
        cli = replace(cli, broker_url=app.broker_url)
    backend_given = args.result_backend_url or "STEM_RESULT_BACKEND_URL" in os.environ
    if not backend_given and cli.result_backend_url is None:
        cli = replace(cli, result_backend_url=app.result_backend_url)
    return cli


@contextlib.contextmanager
def opened(args: argparse.Namespace, *, create: bool = False) -> Iterator[Stem]:
    """A Stem for a one-shot command, closed afterwards (SQLite checkpoints on close).
    Only a command that stores something (`create=True`: enqueue) may create or
    migrate a database; every other command opens an existing one, or says there is
    none, and never changes a file that is not ours."""
    settings = build_settings(args)
    # A one-shot command reports its own failure in one line; the stores' warnings (a
    # Redis retry notice, say) are for long-running workers, so only errors are logged
    # here, unless DEBUG was asked for.
    configure_logging(
        replace(settings, log_level="DEBUG" if settings.log_level == "DEBUG" else "ERROR")
    )
    stem = open_app(args, settings)
    stem.create_stores = create
    try:
        yield stem
    finally:
        stem.close()


# --- errors -------------------------------------------------------------------------


def exit_code(exc: BaseException) -> ExitCode:
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG
    if isinstance(exc, BrokerUnavailable | ConnectionError):
        return ExitCode.UNAVAILABLE
    if isinstance(exc, StemError):
        return ExitCode.FAILURE
    return ExitCode.SOFTWARE


def report(exc: BaseException) -> int:
    """Print an error as one `stem: error:` line (a traceback only for our own bugs),
    with every secret of the environment and the command line masked."""
    code = exit_code(exc)
    redact = Redactor(secrets_from_environment(os.environ, sys.argv))
    if code is ExitCode.SOFTWARE:
        text = "".join(traceback.format_exception(exc))
        print(redact(text), end="", file=sys.stderr)
        print(redact(f"stem: error: internal error: {type(exc).__name__}: {exc}"), file=sys.stderr)
    else:
        print(f"stem: error: {one_line(redact(str(exc)))}", file=sys.stderr)
    return int(code)


def one_line(text: str) -> str:
    """`text` with every non-printable character escaped: messages quote what the user
    gave (a path with a newline, an escape sequence), and an error stays one line that
    cannot repaint the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_argv(argv: Sequence[str]) -> None:
    """Refuse arguments no shell can pass on: a NUL (in-process callers only), or bytes
    that are not UTF-8 (Python hands them over as lone surrogates, which no store, file
    name API or terminal takes); said here once instead of failing deep inside."""
    for index, arg in enumerate(argv, 1):
        if "\x00" in arg:
            raise UsageError(f"argument {index} contains a NUL character")
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(
                f"argument {index} is not valid UTF-8 text: {shorten(ascii(arg))}"
            ) from None


def store_command(sub: Commands, name: str, text: str, *, app_text: str) -> Parser:
    """A read or admin subcommand: store flags, an optional --app, and --json."""
    parser: Parser = sub.add_parser(
        name, parents=[store_flags()], help=text, description=text[0].upper() + text[1:] + "."
    )
    add_app_flag(parser, required=False, text=app_text)
    add_json_flag(parser)
    return parser
