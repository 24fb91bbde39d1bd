"""Secrets never shown: a Redis password, signing keys and OTLP credentials, all set
for real (a password-protected redis-server, an HMAC key, an OTLP endpoint with a
password and API-key headers), then every output is searched for them: the real CLI's
stdout and stderr (text and `--json`, success and error paths) and a real worker's log
file, through a Redis outage and back."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

from appliance import Stem
from appliance.config import Settings, load_settings
from appliance.redaction import Redactor, redact_url, secrets_from_environment, secrets_of
from appliance.signing import SigningConfig
from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import ROOT, WorkerProcess
from tests.redis_server import RedisServer, free_port

PASSWORD = "Kx7@Qz9-redis-secret"  # an '@' too: the URL holds it percent-encoded
WRONG_PASSWORD = "Wrong-Pass-4411"
HMAC_KEY = base64.b64encode(b"k" * 16 + b"\x01\x02 signing secret").decode()
OTLP_PASSWORD = "Otlp-Pass-5566"
OTLP_TOKEN = "tok-ABCDEF123456"
OTLP_API_KEY = "apikey-XYZ789"
SECRETS = (
    PASSWORD, quote(PASSWORD, safe=""), "Qz9-redis-secret", WRONG_PASSWORD, HMAC_KEY,
    HMAC_KEY[:16], base64.b64decode(HMAC_KEY).hex(), OTLP_PASSWORD, OTLP_TOKEN, OTLP_API_KEY,
)  # fmt: skip


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows a secret ({secret[:3]}...):\n{text}"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=PASSWORD)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def env(locked_redis: RedisServer) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEM_")}
    return clean | {
        "STEM_BROKER_URL": locked_redis.url,
        "STEM_SIGNING_KEYS": f"k1:{HMAC_KEY}",
        # Nothing listens there: exports fail, and their errors are logged.
        "STEM_OTLP_ENDPOINT": f"http://collector:{OTLP_PASSWORD}@127.0.0.1:{free_port()}",
        "STEM_OTLP_HEADERS": f"authorization=Bearer%20{OTLP_TOKEN},x-api-key={OTLP_API_KEY}",
        "PYTHONPATH": str(ROOT),
    }


def stem(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "stem"), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_no_secret(result.stdout + result.stderr, f"`stem {' '.join(argv)}`")
    return result


def run_all(
    env: dict[str, str], commands: list[list[str]]
) -> list[subprocess.CompletedProcess[str]]:
    """`stem` for each command, four at a time: they only read, and one by one they took
    most of this module's time."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda argv: stem(env, *argv), commands))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def worker(
    tmp_path: Path, env: dict[str, str], locked_redis: RedisServer
) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(
        tmp_path, locked_redis.url,
        env={k: v for k, v in env.items() if k not in ("STEM_BROKER_URL", "PYTHONPATH")}
        | {"STEM_LOG_LEVEL": "DEBUG"},
        extra=["--name", "redaction-worker"],
    )  # fmt: skip
    yield proc
    proc.stop()
    assert_no_secret(proc.read_log(), "the worker's log")


@pytest.mark.process
def test_no_command_and_no_log_line_shows_a_secret(
    worker: WorkerProcess, env: dict[str, str], locked_redis: RedisServer, tmp_path: Path
) -> None:
    locked_redis.flush()
    worker.start()
    # The producer signs with the worker's key (the worker runs signed messages only).
    signing = SigningConfig.from_env(env)
    app = Stem(settings=replace(Settings(), broker_url=locked_redis.url, signing=signing))
    app.registry.update(ledger_app.stem.registry)
    try:
        assert app.enqueue("t.record", {"n": 1}).result(timeout=20) == 1
        app.enqueue("t.fails_until_flag", {"flag": str(tmp_path / "never")})
        assert wait_until(lambda: app.broker.dlq_count() == 1, timeout=30), worker.read_log()
        entry = app.broker.dlq_list()[0].id
        task = app.enqueue("t.record", {"n": 2}, queue="unserved").id
    finally:
        app.close()

    health = orjson.loads(ok(stem(env, "health", "--json")))
    assert health["healthy"] is True, health
    commands = [
        ["health"], ["observe", "queues"], ["observe", "workers"], ["observe", "schedules"],
        ["observe", "tasks", "list"], ["observe", "tasks", "show", "--id", task],
        ["worker", "status"], ["worker", "ping"], ["worker", "stats"], ["worker", "inspect"],
        ["dlq", "list"], ["dlq", "show", entry], ["schedule", "list"],
    ]  # fmt: skip
    for result in run_all(env, [[*argv, *form] for argv in commands for form in ([], ["--json"])]):
        ok(result)
    ok(stem(env, "enqueue", "t.record", "--args", '{"n": 3}', "--json"))

    # Error paths: each message names the store, never its password.
    closed = free_port()
    wrong = f"redis://:{WRONG_PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    quoted = quote(PASSWORD, safe="")
    failures = [
        # Refused by the server (each takes seconds: redis-py retries AuthenticationError).
        ["health", "--json", "--broker", wrong],
        ["observe", "queues", "--broker", f"redis://:{quoted}@127.0.0.1:{closed}/0"],  # nobody
        ["observe", "queues", "--broker", f"redis://:{quoted}@127.0.0.1:notaport/0"],  # config
        ["observe", "queues", "--broker", f"http://user:{quoted}@127.0.0.1/"],  # a bad scheme
    ]
    for failed in run_all(env, failures):
        assert failed.returncode in (1, 69, 78), failed  # never an internal error (70)
        assert failed.stderr.startswith("stem: error:"), failed
    assert stem({**env, "STEM_BROKER_URL": wrong}, "observe", "workers").returncode != 0
    bad_signing = stem({**env, "STEM_SIGNING_KEYS": f"k1:{HMAC_KEY}x"}, "observe", "queues")
    assert bad_signing.returncode == 78 and "STEM_SIGNING_KEYS" in bad_signing.stderr

    # An outage and the recovery, as the worker logs them (the lines that quote the URL).
    locked_redis.kill()
    assert wait_until(lambda: "unreachable" in worker.read_log(), timeout=20), worker.read_log()
    locked_redis.start()
    assert wait_until(lambda: "reachable again" in worker.read_log(), timeout=30), worker.read_log()


def test_settings_repr_and_the_log_formatter_mask_everything(env: dict[str, str]) -> None:
    settings = load_settings(env=env)
    assert_no_secret(repr(settings), "repr(Settings)")
    assert "redis://:***@127.0.0.1" in repr(settings)
    redact = Redactor(secrets_of(settings, env))
    line = f"connecting to {settings.broker_url} with {dict(settings.otlp_headers)} key {HMAC_KEY}"
    assert_no_secret(redact(line), "a redacted line")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw-secret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:pw-secret@h/0", "rediss://user:***@h/0"),
        ("redis://user@h/0", "redis://user@h/0"),  # no password: nothing to hide
        ("redis://:p@ss-secret@h/0", "redis://:***@h/0"),  # an unencoded '@'
        ("redis://:pw-secret@[::1/0", "redis://:***@[::1/0"),  # does not parse: still masked
        ("see http://a:pw-secret@x/y and redis://:pw2-secret@z", "see http://a:***@x/y and "
         "redis://:***@z"),
        ("sqlite:///var/stem.db", "sqlite:///var/stem.db"),
    ],
)  # fmt: skip
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "hostile",
    ["a" * 1_000_000, "a" * 500_000 + "@", "x://" + "a" * 1_000_000 + "@", "a://" * 250_000 + "@"],
)
def test_redact_url_is_linear_in_a_hostile_value(hostile: str) -> None:
    """Regression: an unbounded scheme pattern scanned to the end of the text from every
    start position, so a 20 kB flag value took 0.45 s and a megabyte would take ~20
    minutes; every CLI error line passes through here."""
    started = time.monotonic()
    shown = redact_url(hostile)
    assert len(shown) <= len(hostile)
    assert time.monotonic() - started < 5  # linear: ~10 ms here; quadratic: many minutes


def test_secrets_from_the_environment_when_settings_cannot_be_built() -> None:
    found = secrets_from_environment(
        {"STEM_BROKER_URL": "redis://:pa%40ss-word@h/0", "STEM_OTLP_HEADERS": "a=b%20tok-123456",
         "STEM_SIGNING_KEYS": f"k1:{HMAC_KEY}", "OTHER": "redis://:not-ours-at-all@h"},
        ["stem", "--broker", "redis://:argv-secret@h/0"],
    )  # fmt: skip
    assert {"pa%40ss-word", "pa@ss-word", "b tok-123456", HMAC_KEY, "argv-secret"} <= set(found)
    assert "not-ours-at-all" not in found


def test_a_redis_url_with_a_bad_port_is_a_config_error_that_hides_the_password() -> None:
    """Regression: redact() read the port to rebuild the URL, so the ConfigError about a
    bad port raised ValueError instead (exit 70, an internal error)."""
    from appliance.errors import ConfigError
    from appliance.stores.redis.conn import client_options

    for port in ("notaport", "99999"):
        with pytest.raises(ConfigError) as info:
            client_options(f"redis://:pw-secret@127.0.0.1:{port}/0")
        assert "pw-secret" not in str(info.value) and ":***@" in str(info.value)


def test_a_short_value_is_not_searched_for() -> None:
    assert Redactor(["abc"])("abc abc") == "abc abc"
