"""Every flag of every `stem` command, given hostile values: huge and negative integers,
1e308, NaN, empty and control-character strings, very long strings, a directory, /proc
paths, text that is not UTF-8, JSON nested 10,000 deep. Run in-process through
`appliance.cli.main.main(argv)` against a temporary SQLite broker, each must end with a
documented exit code (never 70, "internal error") and at most one line on stderr, with
no traceback.

The command tree is walked as tests/test_docs.py walks it, so a new flag is covered the
day it is added. `stem worker run` and `stem demo` must never start a supervisor here:
`worker run` always gets an --app that cannot be imported (unless --app is the flag
under test, and then it gets only values that name no Stem), and `demo` always gets a
--dir below a regular file, so it fails before it starts anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cli import demo
from appliance.cli.main import build_parser, main
from appliance.states import ExitCode
from appliance.worker.supervisor import Supervisor

DOCUMENTED = {ExitCode.OK, ExitCode.FAILURE, ExitCode.USAGE, ExitCode.UNAVAILABLE, ExitCode.CONFIG}
UNLOADABLE_APP = "no_such_module_for_the_walk:stem"


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, parser) of every command that runs something."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from leaves(sub, (*path, name))
                else:
                    yield (*path, name), sub


def takes_value(action: argparse.Action) -> bool:
    skipped = argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction
    return not isinstance(action, skipped) and action.nargs != 0


SLOTS = [
    (path, sub, action)
    for path, sub in leaves(build_parser())
    for action in sub._actions
    if takes_value(action)
]
SLOT_IDS = [f"{' '.join(p)} {'/'.join(a.option_strings) or a.dest}" for p, _, a in SLOTS]


def test_the_walk_reaches_every_command_and_the_flags_that_broke() -> None:
    commands = {" ".join(path) for path, _, _ in SLOTS}
    assert {"worker run", "enqueue", "dlq list", "demo", "observe tasks show"} <= commands
    assert {"dlq list --page", "observe queues --config", "enqueue --args"} <= set(SLOT_IDS)


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory of its own, no STEM_* settings, and the process state the
    commands touch (the import path, the root logger) restored afterwards."""
    for name in [n for n in os.environ if n.startswith("STEM_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_app puts the cwd on it
    (tmp_path / "a-file").write_text("a regular file, so nothing can be created below it\n")
    # A tripwire, not a stand-in: a hostile value that gets as far as running a
    # supervisor is itself a finding (an empty --app once did), and must fail the test
    # instead of forking children inside pytest.
    monkeypatch.setattr(Supervisor, "run", _tripwire)
    monkeypatch.setattr(demo, "_start_supervisor", _tripwire)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield tmp_path
    root.handlers[:], root.level = handlers, level


def _tripwire(*args: object) -> NoReturn:
    raise AssertionError("the walk reached a running supervisor")


def hostile(tmp: Path) -> list[str]:
    """The fixed hostile values every flag gets."""
    deep_list = "[" * 10_000 + "]" * 10_000
    deep_object = '{"a":' * 10_000 + "1" + "}" * 10_000
    return [
        "999999999999999999999", str(2**63), str(2**70), "-999999999999999999999", "-1",
        "0", "1e308", "-1e308", "nan", "inf", "-inf", "1e-320", "2**70",
        "", " ", "a\x00b", "\x00", "\x01\x1b[2J", "a\nb", "\t", "\x7f", "\u202eevil",
        "x" * 100_000, "é" * 50_000,
        str(tmp), "/proc", "/proc/x.db", "/proc/self/mem", "/proc/self/environ", "/dev/zero",
        "\udcff", "\ud800", "\ufeff", "\U0010ffff", "\U0001d7d9", "\u0663",  # digits int() takes
        deep_list, deep_object, '{"a": NaN}', '{"a": 1e999}', '{"a": ' + "9" * 30 + "}",
        "sqlite://", "sqlite:///", "sqlite:///:memory:", f"sqlite:///{tmp}",
        "sqlite:///x.db?synchronous=OFF", "redis://[::1", "redis://h:99999/0",
        "redis://127.0.0.1:6379/abc", "file:///etc/passwd", "-", "--", "-x", "--help=x",
        ":", "a:", ":b", "os:path", "appliance:Stem", "appliance.units:MAX_COUNT",
        "os.nosuch:x", "appliance.nosuch:x", "a,,b", ",", "default,\x00",
    ]  # fmt: skip


def runnable(action: argparse.Action, value: str) -> bool:
    """Values left out for one flag, each for a stated reason."""
    if action.dest in ("broker_url", "result_backend_url") and value.startswith("redis://127"):
        # A well-formed Redis URL would wait seconds for a server that is not there
        # (tests/test_cli.py test_unreachable_broker covers it).
        return False
    # An --app that names a real Stem would start a supervisor (worker run).
    return not (action.dest == "app" and value.endswith(":stem"))


def argv_for(
    path: tuple[str, ...],
    parser: argparse.ArgumentParser,
    target: argparse.Action,
    value: str,
    tmp: Path,
    switches: bool = False,
) -> list[str]:
    """The command with `value` for `target` and harmless values for what else it needs."""
    if target.dest == "dir":  # demo: always below a regular file (see the module docstring)
        value = f"{tmp}/a-file/{value}"
    benign = {
        "broker_url": f"sqlite:///{tmp}/walk.db",
        "app": UNLOADABLE_APP if path == ("worker", "run") else None,
        "dir": f"{tmp}/a-file/demo",
        "id": "0" * 32,
        "name": "walk.task",
    }
    argv = list(path)
    for action in parser._actions:
        if action is target or not (takes_value(action) or switches):
            continue
        if not takes_value(action):
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                argv.append(action.option_strings[0])  # --json, --confirm
            continue
        given = benign.get(action.dest)
        if given is not None:
            argv += [action.option_strings[0], given] if action.option_strings else [given]
    flag = target.option_strings[0] if target.option_strings else None
    # --flag=value, so that a value starting with "-" still reaches the flag's parser.
    return [*argv, f"{flag}={value}"] if flag else [*argv, value]


def run_in_process(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def check(argv: list[str]) -> None:
    code, err = run_in_process(argv)
    shown = [a if len(a) < 80 else a[:80] + "..." for a in argv]
    assert code in DOCUMENTED, (shown, code, err[-2000:])
    assert "Traceback" not in err, (shown, err[-2000:])
    assert len(err.splitlines()) <= 1, (shown, err[-2000:])
    if code == ExitCode.OK:  # nothing on stderr but, at most, a note beside the output
        assert err == "" or err.startswith("stem: note: "), (shown, err)
    else:
        assert err.startswith("stem: error: "), (shown, err)


@pytest.mark.parametrize(("path", "parser", "action"), SLOTS, ids=SLOT_IDS)
def test_every_flag_refuses_each_hostile_value_in_one_line(
    place: Path, path: tuple[str, ...], parser: argparse.ArgumentParser, action: argparse.Action
) -> None:
    for value in hostile(place):
        if runnable(action, value):
            check(argv_for(path, parser, action, value, place))


# Generated values: any text (including what a shell hands over for bytes that are not
# UTF-8), any integer, any float, any JSON document; short, so a path made of one stays
# inside the temporary directory's name limits.
TEXT = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=20).map(lambda data: data.decode("utf-8", "surrogateescape")),
    st.integers().map(str),
    st.floats().map(repr),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=10,
    ).map(json.dumps),
)


def generated(action: argparse.Action, text: str) -> str:
    if action.dest in ("broker_url", "result_backend_url"):
        # A file in the working directory: no "/" (so no ".."), and a name short enough
        # to create (too long a name is the SQLite opener's case in test_cli.py).
        return "sqlite:///" + text.replace("/", "_")[:50]
    if action.dest == "app":
        return f"walk_missing_{text}"  # never a real module: importing one runs its code
    return text


@pytest.mark.parametrize(("path", "parser", "action"), SLOTS, ids=SLOT_IDS)
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=TEXT, switches=st.booleans())
def test_every_flag_survives_generated_values(
    place: Path,
    path: tuple[str, ...],
    parser: argparse.ArgumentParser,
    action: argparse.Action,
    text: str,
    switches: bool,
) -> None:
    check(argv_for(path, parser, action, generated(action, text), place, switches))
