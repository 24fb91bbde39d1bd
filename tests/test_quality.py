"""The checks that keep main shippable run with the suite: lint, format, types, and
the rule that the core never imports the TUI's toolkit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_is_clean() -> None:
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = run(str(BIN / "ruff"), "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def printed_by(code: str) -> str:
    """What `code` prints, run in a fresh interpreter (its imports are its own)."""
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_core_never_imports_textual_or_redis_for_sqlite_users() -> None:
    code = (
        "import sys, appliance, appliance.cli.main, appliance.worker.supervisor\n"
        "from appliance import Stem\n"
        "Stem(broker='sqlite:///:memory:')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'redis')))"
    )
    assert printed_by(code) == "[]"


def test_a_stem_imports_its_store_package_when_made_not_in_its_first_enqueue() -> None:
    """The import (redis-py: 110-160 ms) once came inside the first enqueue, so a paced
    producer fell behind and sent a burst. Made, not connected: nothing listens on port 1."""
    code = (
        "import sys\n"
        "from appliance import Stem\n"
        "Stem(broker='redis://127.0.0.1:1/0', result_backend='sqlite:///:memory:')\n"
        "print(sorted(m for m in sys.modules if m in ('appliance.stores.redis', "
        "'appliance.stores.sqlite')))"
    )
    assert printed_by(code) == "['appliance.stores.redis', 'appliance.stores.sqlite']"


def test_a_redis_supervisor_without_schedules_imports_no_sqlite_or_beat_libraries() -> None:
    """The supervisor's RSS is a target (40 MB, bench/README.md) and Redis's client alone
    takes most of it: sqlite3 (via the observer's type hints), astral and cronsim (via
    the Redis Beat store) cost it ~1.2 MB for nothing until a schedule needs them."""
    code = (
        "import sys, appliance.cli.main, appliance.worker.supervisor\n"
        "from appliance import Stem\n"
        "Stem(broker='redis://127.0.0.1:1/0').stores\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sqlite3', 'astral', 'cronsim')))"
    )
    assert printed_by(code) == "[]"
