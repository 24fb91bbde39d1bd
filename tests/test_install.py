"""install.sh: the tree it lays down under --prefix, a second run that changes nothing,
an edited config kept, an upgrade in place, --dry-run, --uninstall and --purge, a real
install into a private copy of this system, and shellcheck.

Every install is real (a venv built by pip from this checkout); the wheelhouse built
once per session only spares the network (see tests/installer.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.installer import (
    INSTALL_SH,
    ROOT,
    UNITS,
    Installed,
    can_unshare_mounts,
    copy_tree,
    env_file,
    exec_start,
    files_in,
    install_ok,
    installed_tree,
    mode_of,
    private_system,
    run_install,
    run_service,
    snapshot,
    target_python,
    tool,
    wheelhouse,
)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Installed:
    return installed_tree(tmp_path_factory, pytestconfig)


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    return wheelhouse(tmp_path_factory, pytestconfig)


@pytest.fixture
def tree_copy(installed: Installed, tmp_path: Path) -> Iterator[Path]:
    """A copy of the installed tree for a test that changes it, removed afterwards."""
    prefix = copy_tree(installed.prefix, tmp_path / "root")
    yield prefix
    shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture
def tree_but_venv(installed: Installed, tmp_path: Path) -> Path:
    """A copy of the installed tree whose venv is a symlink to the session's, for tests
    that change everything but the venv (copying 80 MB of venv takes seconds)."""
    prefix = tmp_path / "root"
    venv = Path("opt/stem/venv")
    shutil.copytree(
        installed.prefix,
        prefix,
        symlinks=True,
        ignore=lambda d, names: ["venv"] if Path(d) == installed.prefix / venv.parent else [],
    )
    (prefix / venv).symlink_to(installed.prefix / venv)
    return prefix


@pytest.fixture
def private_copy(tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    """The command prefix of `private_system` and its directory; removed afterwards."""
    yield private_system(tmp_path), tmp_path
    for name in ("etc", "opt", "var-lib"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)


def test_shellcheck_finds_nothing() -> None:
    result = subprocess.run(
        [tool("shellcheck"), str(INSTALL_SH), str(ROOT / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_script_is_all_functions_and_runs_main_last() -> None:
    """A truncated download must run nothing: outside functions there are only
    settings and definitions, and `main "$@"` is the last line."""
    lines = INSTALL_SH.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert lines[-1] == 'main "$@"'
    assert "set -Eeuo pipefail" in lines
    assert os.access(INSTALL_SH, os.X_OK)
    definition = re.compile(r"(#.*|set -\w+ \w+|(readonly )?[A-Z_]+=.*|\w+\(\) \{ .* \})?")
    in_function = False
    for number, line in enumerate(lines[:-1], start=1):
        if in_function:
            in_function = line != "}"
        elif re.fullmatch(r"\w+\(\) \{", line):
            in_function = True
        else:
            assert definition.fullmatch(line), f"install.sh:{number} runs at load: {line}"


def test_the_prefix_tree_is_the_one_the_spec_names(installed: Installed) -> None:
    prefix = installed.prefix
    assert os.access(prefix / "opt/stem/venv/bin/stem", os.X_OK)
    assert mode_of(prefix / "var/lib/stem") == 0o700
    assert mode_of(prefix / "etc/stem") == 0o750
    for name in ("stem.toml", "stem.env"):
        assert mode_of(prefix / "etc/stem" / name) == 0o640
    for unit in UNITS:
        installed_unit = prefix / "etc/systemd/system" / unit
        assert installed_unit.read_bytes() == (ROOT / "systemd" / unit).read_bytes()
        assert mode_of(installed_unit) == 0o644
    # The config is the example with the database in the state directory.
    config = (prefix / "etc/stem/stem.toml").read_text()
    assert 'broker_url = "sqlite:////var/lib/stem/stem.db"' in config
    assert (
        config.replace(
            "# install.sh: the database lives in the service's state directory.\n"
            'broker_url = "sqlite:////var/lib/stem/stem.db"',
            'broker_url = "sqlite:///./var/stem.db"',
        )
        == (ROOT / "config/stem.toml").read_text()
    )
    assert env_file(prefix / "etc/stem/stem.env") == {"STEM_APP": "appliance.demo:stem"}
    # Under --prefix, what would touch the system is printed, never run.
    assert "[--prefix] not run: useradd --system" in installed.output
    assert "[--prefix] not run: systemctl enable --now stem.target stem.service" in installed.output
    enabled = [line for line in installed.output.splitlines() if "enable --now" in line]
    assert enabled and not any("stem-beat" in line for line in enabled)  # Beat: never
    assert not (prefix / "etc/systemd/system/multi-user.target.wants").exists()


def test_the_installed_config_loads_with_its_database_in_the_state_directory(
    installed: Installed,
) -> None:
    from appliance.config import load_settings

    settings = load_settings(installed.prefix / "etc/stem/stem.toml", env={})
    assert settings.broker_url == "sqlite:////var/lib/stem/stem.db"


def test_a_second_run_changes_nothing_and_says_so(installed: Installed, wheels: Path) -> None:
    before = snapshot(installed.prefix)
    output = install_ok("--prefix", str(installed.prefix), "--offline", str(wheels))
    assert snapshot(installed.prefix) == before
    assert output.rstrip().endswith(
        f"Nothing changed: the install in {installed.prefix} is up to date"
    )
    assert not [line for line in output.splitlines() if line.lstrip().startswith("changed:")]
    assert "daemon-reload" not in output  # no unit changed, so nothing to reload


def test_an_edited_config_is_never_overwritten(
    installed: Installed, wheels: Path, tree_but_venv: Path
) -> None:
    prefix = tree_but_venv
    config = prefix / "etc/stem/stem.toml"
    edited = config.read_text().replace("concurrency = 2", "concurrency = 7")
    config.write_text(edited)
    output = install_ok("--prefix", str(prefix), "--offline", str(wheels))
    assert config.read_text() == edited
    assert "stem.toml was edited: kept; the new defaults are in stem.toml.dist" in output
    dist = prefix / "etc/stem/stem.toml.dist"
    assert dist.read_bytes() == (installed.prefix / "etc/stem/stem.toml").read_bytes()
    assert mode_of(dist) == 0o640
    # And a third run has nothing left to do.
    before = snapshot(prefix)
    assert "Nothing changed" in install_ok("--prefix", str(prefix), "--offline", str(wheels))
    assert snapshot(prefix) == before


def test_an_upgrade_reinstalls_the_venv_in_place_and_updates_an_unedited_config(
    wheels: Path, tree_copy: Path, tmp_path: Path
) -> None:
    # A newer checkout: a changed module and a changed default in the example config.
    checkout = tmp_path / "checkout"
    for part in ("install.sh", "pyproject.toml", "README.md", "config", "systemd", "appliance"):
        source = ROOT / part
        if source.is_dir():
            copy_tree(source, checkout / part)
        else:
            checkout.mkdir(exist_ok=True)
            (checkout / part).write_bytes(source.read_bytes())
            (checkout / part).chmod(source.stat().st_mode)
    with (checkout / "appliance/demo.py").open("a") as module:
        module.write("\nUPGRADED = True\n")
    example = checkout / "config/stem.toml"
    example.write_text(
        example.read_text().replace('shutdown_grace = "30s"', 'shutdown_grace = "20s"')
    )
    prefix = tree_copy
    site = next((prefix / "opt/stem/venv/lib").glob("python3*/site-packages"))
    (site / "operator_app.py").write_text("")  # an operator's app, installed in the venv

    output = install_ok("--prefix", str(prefix), "--offline", str(wheels), checkout=checkout)

    assert "UPGRADED = True" in (site / "appliance/demo.py").read_text()
    assert (site / "operator_app.py").exists()  # upgraded in place, not rebuilt
    assert 'shutdown_grace = "20s"' in (prefix / "etc/stem/stem.toml").read_text()
    assert "stem.toml was not edited since the last install: new defaults" in output
    assert "not run: systemctl try-restart stem.service" in output  # running units restart
    assert "daemon-reload" not in output  # the units did not change
    before = snapshot(prefix)
    again = install_ok("--prefix", str(prefix), "--offline", str(wheels), checkout=checkout)
    assert "Nothing changed" in again
    assert snapshot(prefix) == before


def test_another_python_rebuilds_the_venv(wheels: Path, tree_copy: Path) -> None:
    """The stamp names the Python the venv was built with; after a Python upgrade (here:
    a stamp naming another one) the venv is rebuilt, since it cannot be moved over."""
    venv = tree_copy / "opt/stem/venv"
    stamp = venv / ".stem-install"
    lines = stamp.read_text().splitlines()
    assert lines[0].startswith("python=")
    stamp.write_text("\n".join(["python=/usr/bin/python3.10 3.10", *lines[1:]]) + "\n")
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "operator_app.py").write_text("")

    output = install_ok("--prefix", str(tree_copy), "--offline", str(wheels))

    assert "another Python" in output and "reinstall anything you added" in output
    assert not (site / "operator_app.py").exists()  # --clear: a new venv
    assert stamp.read_text().splitlines() == lines
    assert os.access(venv / "bin/stem", os.X_OK)


def test_dry_run_changes_nothing(installed: Installed, wheels: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    output = install_ok("--prefix", str(fresh), "--offline", str(wheels), "--dry-run")
    assert not fresh.exists()
    for step in ("useradd --system", "-m venv /", "-m pip install", "systemctl enable --now"):
        assert step in output, step
    assert "Dry run:" in output and "nothing was changed" in output

    before = snapshot(installed.prefix)
    for args in (
        ["--dry-run"],
        ["--dry-run", "--uninstall"],
        ["--dry-run", "--uninstall", "--purge"],
    ):
        output = install_ok("--prefix", str(installed.prefix), "--offline", str(wheels), *args)
        assert snapshot(installed.prefix) == before, args
    assert f"[dry-run] rm -rf -- {installed.prefix}/var/lib/stem" in output


def test_uninstall_keeps_config_and_data_and_purge_removes_them(
    installed: Installed, tree_but_venv: Path
) -> None:
    prefix = tree_but_venv
    state = prefix / "var/lib/stem"
    for name in ("stem.db", "stem.db-wal", "stem.db-shm"):
        (state / name).write_bytes(b"data")
    (state / "stem.db-wake").mkdir(mode=0o700)

    output = install_ok("--prefix", str(prefix), "--uninstall")
    assert files_in(prefix) == {
        "etc/stem/stem.toml",
        "etc/stem/stem.env",
        "var/lib/stem/stem.db",
        "var/lib/stem/stem.db-wal",
        "var/lib/stem/stem.db-shm",
    }
    assert (state / "stem.db-wake").is_dir()
    assert not (prefix / "opt/stem").exists()
    assert (installed.prefix / "opt/stem/venv/bin/stem").exists()  # the link went, not the venv
    assert "[--prefix] not run: systemctl disable stem.target stem.service" in output
    assert "Nothing changed" in install_ok("--prefix", str(prefix), "--uninstall")

    install_ok("--prefix", str(prefix), "--uninstall", "--purge")
    assert files_in(prefix) == set()
    assert not (prefix / "etc/stem").exists()
    assert not state.exists()


def test_bad_options_are_refused_before_anything_happens(tmp_path: Path) -> None:
    purge_alone = run_install("--prefix", str(tmp_path / "root"), "--purge")
    assert purge_alone.returncode != 0
    assert "--purge only goes with --uninstall" in purge_alone.stderr
    unknown = run_install("--prefix", str(tmp_path / "root"), "--frobnicate")
    assert unknown.returncode != 0
    assert "unknown option '--frobnicate'" in unknown.stderr
    assert not (tmp_path / "root").exists()
    help_text = run_install("--help")
    assert help_text.returncode == 0
    assert "--prefix DIR" in help_text.stdout and "--uninstall" in help_text.stdout


def test_the_installed_venv_runs_the_unit_s_command_to_ready(
    installed: Installed, tmp_path: Path
) -> None:
    """stem.service's ExecStart, run from the prefix tree: the venv is complete and the
    installed config valid (the database is moved to tmp_path by STEM_BROKER_URL)."""
    prefix = installed.prefix
    env = env_file(prefix / "etc/stem/stem.env")
    unit = (prefix / "etc/systemd/system/stem.service").read_text()
    argv = [
        str(prefix) + arg if arg.startswith(("/opt/stem/", "/etc/stem/")) else arg
        for arg in exec_start(unit, env)
    ]
    assert argv[:3] == [str(prefix / "opt/stem/venv/bin/stem"), "worker", "run"]
    run = run_service(
        argv,
        {
            "PATH": "/usr/bin:/bin",
            "PYTHONUNBUFFERED": "1",
            **env,
            "STEM_BROKER_URL": f"sqlite:///{tmp_path / 'stem.db'}",
        },
        tmp_path / "worker.log",
    )
    assert run.returncode == 0, run.log
    assert any("READY=1" in m.splitlines() for m in run.messages), run.messages
    assert any("STOPPING=1" in m.splitlines() for m in run.messages), run.messages


@pytest.mark.skipif(
    not can_unshare_mounts(), reason="needs root allowed to create a mount namespace (as CI)"
)
def test_a_real_install_into_a_private_copy_of_this_system(
    wheels: Path, private_copy: tuple[list[str], Path]
) -> None:
    """No --prefix: install.sh creates the user stem, chowns, installs the units; the
    worker then runs as stem from /opt/stem with /etc/stem/stem.toml and its database in
    /var/lib/stem. /etc, /opt and /var/lib are private copies (tests/installer.py)."""
    system, tmp = private_copy
    output = install_ok("--offline", str(wheels), checkout=ROOT, wrapper=system)
    assert "changed: created the system user stem" in output
    assert "[no systemd running] not run: systemctl enable --now" in output
    etc, var_lib = tmp / "etc", tmp / "var-lib"
    account = _account(etc, "stem")
    assert account["shell"] == "/usr/sbin/nologin" and account["home"] == "/var/lib/stem"
    state = (var_lib / "stem").stat()
    assert (state.st_uid, state.st_gid, state.st_mode & 0o777) == (
        account["uid"], account["gid"], 0o700,
    )  # fmt: skip
    config = (etc / "stem/stem.toml").stat()
    assert (config.st_uid, config.st_gid, config.st_mode & 0o777) == (0, account["gid"], 0o640)
    assert (etc / "stem").stat().st_gid == account["gid"]

    again = install_ok("--offline", str(wheels), checkout=ROOT, wrapper=system)
    assert "Nothing changed" in again and "exists" in again

    unit = (etc / "systemd/system/stem.service").read_text()
    env = {"PATH": "/usr/bin:/bin", "HOME": "/var/lib/stem", "PYTHONUNBUFFERED": "1"}
    env |= env_file(etc / "stem/stem.env")
    as_stem = ["setpriv", "--reuid=stem", "--regid=stem", "--init-groups"]
    run = run_service([*system, *as_stem, *exec_start(unit, env)], env, tmp / "worker.log")
    assert run.returncode == 0, run.log
    assert any("READY=1" in m.splitlines() for m in run.messages), run.log
    database = (var_lib / "stem/stem.db").stat()
    assert (database.st_uid, database.st_mode & 0o777) == (account["uid"], 0o600)

    install_ok("--uninstall", "--purge", checkout=ROOT, wrapper=system)
    assert not (etc / "stem").exists() and not (var_lib / "stem").exists()
    assert not (tmp / "opt/stem").exists()
    assert not any((etc / "systemd/system").glob("stem*"))
    assert _account(etc, "stem")["uid"] == account["uid"]  # the user is kept


def _account(etc: Path, name: str) -> dict[str, int | str]:
    """The passwd entry of `name` in a copied /etc (the host's pwd module cannot see it)."""
    for line in (etc / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return {"uid": int(fields[2]), "gid": int(fields[3]), "home": fields[5],
                    "shell": fields[6]}  # fmt: skip
    raise AssertionError(f"no user {name} in {etc / 'passwd'}")


def test_make_says_how_to_get_python3_venv_when_it_is_missing() -> None:
    """Debian's python3 without python3-venv: as a non-root user, make stops with the
    exact apt command (as root it installs the package)."""
    with tempfile.TemporaryDirectory(prefix="stem-make-") as scratch:
        work = Path(scratch)
        work.chmod(0o755)
        (work / "Makefile").write_bytes((ROOT / "Makefile").read_bytes())
        (work / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
        # A python3 that is new enough but, like Debian's, has no ensurepip.
        fake = work / "python3"
        fake.write_text(
            f'#!/bin/sh\ncase "$*" in *ensurepip*) exit 1;; esac\nexec {target_python()} "$@"\n'
        )
        fake.chmod(0o755)
        argv = ["make", "-s", f"PY={fake}", ".venv/.installed"]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
        result = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert "run 'sudo apt-get install -y python3-venv'" in result.stderr
        assert not (work / ".venv").exists()
