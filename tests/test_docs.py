"""Docs that cannot drift: every `stem` command has help text and a section in
docs/cli.md, and prints its help with `--help`."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.cli.main import build_parser, main

CLI_DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """(path, parser, one-line help) for every command and subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name, "")
                yield from commands(sub, (*path, name))


ALL = [(" ".join(path), sub, text) for path, sub, text in commands(build_parser())]
LEAVES = [
    name
    for name, sub, _ in ALL
    if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
]


def test_the_command_tree_is_what_the_spec_names() -> None:
    assert LEAVES == [
        "worker run",
        "worker ping",
        "worker stats",
        "worker inspect",
        "worker revoke",
        "worker pause",
        "worker resume",
        "worker shutdown",
        "worker status",
        "worker multi start",
        "worker multi stop",
        "worker multi restart",
        "worker multi status",
        "beat run",
        "enqueue",
        "observe queues",
        "observe workers",
        "observe schedules",
        "observe tasks list",
        "observe tasks show",
        "schedule list",
        "schedule show",
        "schedule apply",
        "schedule enable",
        "schedule disable",
        "schedule delete",
        "schedule dry-run",
        "dlq list",
        "dlq show",
        "dlq replay",
        "dlq purge",
        "health",
        "tui",
        "signing keygen",
        "demo",
    ]


@pytest.mark.parametrize(("name", "parser", "text"), ALL, ids=[n for n, _, _ in ALL])
def test_every_command_has_help_text(name: str, parser: argparse.ArgumentParser, text: str) -> None:
    assert text.strip(), f"`stem {name}` has no one-line help"
    assert (parser.description or "").strip(), f"`stem {name}` has no description"
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            flag = "/".join(action.option_strings) or action.dest
            assert action.help, f"`stem {name}`: {flag} has no help"


@pytest.mark.parametrize("name", [n for n, _, _ in ALL])
def test_every_command_is_in_the_cli_reference(name: str) -> None:
    assert f"`stem {name}`" in CLI_DOC.read_text(), f"docs/cli.md does not mention `stem {name}`"


@pytest.mark.parametrize("name", LEAVES)
def test_every_command_has_a_section_with_an_example(name: str) -> None:
    text = CLI_DOC.read_text()
    heading = f"## `stem {name}`"
    assert heading in text, f"docs/cli.md has no section {heading}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    assert f"$ stem {name}" in section, f"the {heading} section has no example"


@pytest.mark.parametrize("name", ["", *[n for n, _, _ in ALL]])
def test_help_prints_and_exits_zero(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: stem {name}".rstrip())
