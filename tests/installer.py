"""Helpers for the install.sh and unit-file tests: run install.sh, build the wheelhouse
that lets it install offline, snapshot trees, run a unit's ExecStart by hand, and a
private copy of this system's /etc, /opt and /var/lib for a real (non --prefix) install.

Nothing here is faked: install.sh builds a real venv with pip, and the worker it
installs runs until READY=1. The wheelhouse only spares the network: pip builds the
checkout and installs every dependency from it (`--offline`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SH = ROOT / "install.sh"
UNITS = ("stem.target", "stem.service", "stem@.service", "stem-beat.service")
SERVICES = ("stem.service", "stem@.service", "stem-beat.service")
# Programs the tests need and the Debian package of each (`make test` installs them).
PACKAGES = {"shellcheck": "shellcheck", "systemd-analyze": "systemd", "unshare": "util-linux"}

# One wheelhouse and one installed tree per session, whichever test module asks first.
_SESSION: dict[str, object] = {}


def tool(name: str) -> str:
    """The path of a program the tests need; a missing one fails the test, never skips."""
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install -y {PACKAGES.get(name, name)}"
    return path


def target_python() -> str:
    """The interpreter install.sh picks by default (Debian's own python3)."""
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3"
    found = shutil.which("python3")
    assert found, "no python3 on PATH"
    return found


def install_env(**extra: str) -> dict[str, str]:
    """The environment for install.sh: the caller's, without a PYTHONPATH that could
    shadow the installed package, and without this machine's pip settings (PIP_* and
    config files: their mirrors are noise when installing offline)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env.update(extra)
    return env


def wheelhouse(factory: pytest.TempPathFactory, config: pytest.Config) -> Path:
    """Wheels of every dependency and of the build backend, built once per session by
    pip running for install.sh's interpreter (so environment markers match it)."""
    if "wheelhouse" not in _SESSION:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())
        wanted = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
        dest = factory.mktemp("wheelhouse")
        argv = [sys.executable, "-m", "pip", "--python", target_python(), "wheel"]
        result = subprocess.run(
            [*argv, "--quiet", "--wheel-dir", str(dest), *wanted],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        _SESSION["wheelhouse"] = dest
        config.add_cleanup(lambda: shutil.rmtree(dest, ignore_errors=True))
    path = _SESSION["wheelhouse"]
    assert isinstance(path, Path)
    return path


def run_install(
    *args: str,
    checkout: Path = ROOT,
    wrapper: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `install.sh ARGS` of `checkout` (optionally under `wrapper`, a command prefix)."""
    return subprocess.run(
        [*wrapper, str(checkout / "install.sh"), *args],
        env=dict(env) if env is not None else install_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def install_ok(*args: str, checkout: Path = ROOT, wrapper: Sequence[str] = ()) -> str:
    """Run install.sh, assert it succeeded with nothing on stderr, return its output."""
    result = run_install(*args, checkout=checkout, wrapper=wrapper)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout


@dataclass(frozen=True)
class Installed:
    prefix: Path
    output: str  # what the first install printed


def installed_tree(factory: pytest.TempPathFactory, config: pytest.Config) -> Installed:
    """`install.sh --prefix DIR --offline WHEELS` of this checkout, once per session and
    removed at its end (a venv is 80 MB). Tests that change a tree work on a copy."""
    if "installed" not in _SESSION:
        prefix = factory.mktemp("installed") / "root"
        wheels = wheelhouse(factory, config)
        output = install_ok("--prefix", str(prefix), "--offline", str(wheels))
        _SESSION["installed"] = Installed(prefix, output)
        config.add_cleanup(lambda: shutil.rmtree(prefix, ignore_errors=True))
    tree = _SESSION["installed"]
    assert isinstance(tree, Installed)
    return tree


def copy_tree(source: Path, dest: Path) -> Path:
    """A copy keeping modes, times and symlinks. The venv's scripts still name the
    original's interpreter, which stays in place for the session."""
    shutil.copytree(source, dest, symlinks=True)
    return dest


Entry = tuple[object, ...]


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path below `root`: its type, mode, content hash and modification time, so
    two snapshots are equal only if nothing was written, not merely rewritten alike."""
    entries: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            info = path.lstat()
            rel = str(path.relative_to(root))
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[rel] = ("dir", mode, info.st_mtime_ns)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[rel] = ("file", mode, digest, info.st_mtime_ns)
    return entries


def files_in(root: Path) -> set[str]:
    """The files (not directories) below `root`, relative to it."""
    return {rel for rel, entry in snapshot(root).items() if entry[0] != "dir"}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- units -----------------------------------------------------------------------------


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting of a unit file, in order (keys repeat)."""
    entries = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(text: str, key: str) -> str:
    values = [v for _, k, v in unit_entries(text) if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (no quoting used in ours)."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def exec_start(unit_text: str, env: Mapping[str, str], instance: str = "") -> list[str]:
    """The unit's ExecStart as systemd would run it: %i and ${VAR} replaced."""
    line = unit_value(unit_text, "ExecStart").replace("%i", instance)
    argv = shlex.split(line)
    return [re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), arg) for arg in argv]


# --- running the installed worker ---------------------------------------------------------


@dataclass
class Run:
    returncode: int
    messages: list[str]  # the sd_notify datagrams, in order
    log: str


def run_service(
    argv: Sequence[str], env: Mapping[str, str], log: Path, *, timeout: float = 30.0
) -> Run:
    """Start a service's command with a NOTIFY_SOCKET (abstract, so another user can
    reach it), wait for READY=1, send SIGTERM, and wait for the exit, as systemd would."""
    name = f"stem-test-{os.getpid()}-{time.monotonic_ns()}"
    messages: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        notify.settimeout(0.2)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                list(argv),
                env={**env, "NOTIFY_SOCKET": "@" + name},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _collect(notify, messages, proc, "READY=1", timeout)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                _collect(notify, messages, proc, "STOPPING=1", timeout)
            returncode = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return Run(returncode, messages, log.read_text(errors="replace"))


def _collect(
    notify: socket.socket,
    messages: list[str],
    proc: subprocess.Popen[bytes],
    wanted: str,
    timeout: float,
) -> None:
    """Read datagrams until one holds `wanted`, the process exits, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            messages.append(notify.recv(4096).decode())
            if wanted in messages[-1].splitlines():
                return
        if proc.poll() is not None:
            return


# --- a private copy of this system ------------------------------------------------------


def can_unshare_mounts() -> bool:
    """Root, allowed to create a mount namespace (CI is; an unprivileged container is not)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def private_system(tmp: Path) -> list[str]:
    """A command prefix that runs its command in a private mount namespace where /etc is
    a copy of this host's, and /opt, /var/lib and /run/systemd are empty directories in
    `tmp`. install.sh then installs for real (useradd, chown, /opt/stem ...) and the host
    sees none of it. Call once per test; every command run with the prefix shares the
    same copies."""
    etc, opt, var_lib, run_systemd = (tmp / n for n in ("etc", "opt", "var-lib", "run-systemd"))
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True, timeout=120)
    for directory in (opt, var_lib, run_systemd):
        directory.mkdir()
        directory.chmod(0o755)
    # /run/systemd hidden too: on a host booted with systemd, install.sh must not drive
    # the host's systemctl with units it cannot see.
    script = (
        'set -e; mount --bind "$1" /etc; mount --bind "$2" /opt; mount --bind "$3" /var/lib; '
        'if [ -d /run/systemd ]; then mount --bind "$4" /run/systemd; fi; shift 4; exec "$@"'
    )
    return [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
        str(etc), str(opt), str(var_lib), str(run_systemd),
    ]  # fmt: skip
