"""Signed envelopes on real supervisors, on both stores: producers sign, the worker
verifies before anything runs; retries, chains, chords and tasks enqueued from inside a
child keep working; unsigned, forged, tampered and rotated-out messages are dead-lettered
`signature-invalid`, never run, and leave no result; an Ed25519 worker holding only
public keys runs what producers signed and refuses to enqueue unsigned work itself."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import redis

from appliance import Stem, TaskState
from appliance.broker.protocol import DeadLetterEntry
from appliance.canvas import chain, chord
from appliance.config import Settings
from appliance.signing import SigningConfig, generate_key
from appliance.stores.redis.keys import band_of
from tests.apps import canvas_app
from tests.chaos import kill_session, kill_workers
from tests.conftest import wait_until
from tests.process import WorkerProcess

pytestmark = pytest.mark.process

APP = "tests.apps.canvas_app:stem"
K1, K2, FORGED = (base64.b64encode(generate_key()[0]).decode() for _ in range(3))


def hmac_env(keys: str, active: str) -> dict[str, str]:
    return {"STEM_SIGNING_KEYS": keys, "STEM_SIGNING_ACTIVE_KEY": active}


def producer(url: str, env: dict[str, str] | None) -> Stem:
    """A producer on `url` with the signing keys `env` describes (None: unsigned)."""
    signing = SigningConfig.from_env(env) if env else None
    app = Stem(settings=replace(Settings(), broker_url=url, signing=signing))
    app.registry.update(canvas_app.stem.registry)
    return app


Spawn = Callable[[str, dict[str, str]], WorkerProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    made: list[WorkerProcess] = []

    def make(url: str, env: dict[str, str]) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, url, app=APP, concurrency=2, env=env)
        made.append(worker)
        return worker.start()

    yield make
    kill_workers(made)


def ran(tmp_path: Path, event: str) -> int:
    ledger = tmp_path / "ledger.txt"
    lines = ledger.read_text().splitlines() if ledger.exists() else []
    return sum(1 for line in lines if line.split()[0] == event)


def dead_letter(app: Stem, task_id: str) -> DeadLetterEntry | None:
    return next((e for e in app.broker.dlq_list(limit=500) if e.task_id == task_id), None)


def test_signed_work_runs_and_everything_else_is_dead_lettered(
    store_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    keys = hmac_env(f"k1:{K1}", "k1")
    signed, unsigned = producer(store_url, keys), producer(store_url, None)
    forged = producer(store_url, hmac_env(f"k1:{FORGED}", "k1"))  # right id, wrong secret
    try:
        spawn(store_url, keys)
        assert signed.enqueue("c.add", {"x": 2, "y": 3}).result(timeout=20) == 5
        assert signed.enqueue("c.flaky", {"x": 7}).result(timeout=20) == 7  # a retry
        assert ran(tmp_path, "flaky") == 2
        steps = chain(
            signed.signature("c.add", {"x": 1, "y": 2}),
            signed.signature("c.double"),
            signed.signature("c.double"),
        )
        assert steps.enqueue().result(timeout=20) == 12  # `previous` and `then` unsigned
        members = [signed.signature("c.add", {"x": i}) for i in range(5)]
        total = chord(members, signed.signature("c.total")).enqueue().result(timeout=20)
        assert total["sum"] == 10
        children = signed.enqueue("c.spawn", {"n": 3}).result(timeout=20)  # from a child
        assert [signed.handle(c).result(timeout=20) for c in children] == [0, 1, 2]

        before = ran(tmp_path, "add")
        # Checked by the child before it runs (the first two), or by the supervisor
        # when it would settle the message itself (an unknown task, an expired one):
        # either way signature-invalid, never unknown-task or revoked.
        refused = {
            ("unsigned", "c.add"): unsigned.enqueue("c.add", {"x": 1}).id,
            ("bad-signature", "c.add"): forged.enqueue("c.add", {"x": 1}).id,
            ("bad-signature", "c.nothing"): forged.enqueue("c.nothing").id,
            ("bad-signature", "c.fast"): forged.enqueue("c.fast", countdown=1.5, expires=1.0).id,
        }  # the last one is due after it expired
        for (why, name), task_id in refused.items():
            assert wait_until(lambda t=task_id: dead_letter(signed, t) is not None, timeout=20)
            entry = dead_letter(signed, task_id)
            assert entry is not None and entry.reason == "signature-invalid", entry
            assert entry.error_type == "SignatureInvalid" and entry.name == name
            if why == "unsigned":
                assert "not signed" in entry.message
            else:
                assert "does not match" in entry.message
            assert signed.backend.get(task_id) is None  # no result under a claimed id
        assert ran(tmp_path, "add") == before  # neither ran
    finally:
        for app in (signed, unsigned, forged):
            app.close()


def tamper(app: Stem, url: str) -> None:
    """Change the only stored message's args in place, as someone with write access to
    the store could: the SQLite row, or the Redis stream entry (entries are immutable,
    so the entry is replaced by a changed copy)."""

    def changed(payload: bytes) -> bytes:
        raw = orjson.loads(payload)
        raw["args"]["y"] = 1000
        return orjson.dumps(raw)

    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            (payload,) = conn.execute("SELECT payload FROM messages").fetchone()
            conn.execute("UPDATE messages SET payload = ?", (changed(payload),))
        return
    client = redis.Redis.from_url(url)
    stream = app.broker.keys.stream("default", band_of(0))  # type: ignore[attr-defined]
    ((entry_id, fields),) = client.xrange(stream)
    client.xdel(stream, entry_id)
    client.xadd(stream, {**fields, b"p": changed(fields[b"p"])})
    client.close()


def test_a_message_changed_in_the_store_is_refused(
    store_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    keys = hmac_env(f"k1:{K1}", "k1")
    app = producer(store_url, keys)
    try:
        handle = app.enqueue("c.add", {"x": 1, "y": 1})
        tamper(app, store_url)
        spawn(store_url, keys)
        assert wait_until(lambda: dead_letter(app, handle.id) is not None, timeout=20)
        entry = dead_letter(app, handle.id)
        assert entry is not None and entry.reason == "signature-invalid"
        assert "changed after it was signed" in entry.message
        assert ran(tmp_path, "add") == 0
        assert app.enqueue("c.add", {"x": 1, "y": 1}).result(timeout=20) == 2  # serves on
    finally:
        app.close()


def test_rotation_adds_a_key_then_retires_the_old_one(
    store_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    old = producer(store_url, hmac_env(f"k1:{K1}", "k1"))
    new = producer(store_url, hmac_env(f"k1:{K1},k2:{K2}", "k2"))
    try:
        waiting = old.enqueue("c.add", {"x": 1})  # signed with k1, before the rotation
        worker = spawn(store_url, hmac_env(f"k1:{K1},k2:{K2}", "k2"))  # step 2: both keys
        assert waiting.result(timeout=20) == 1
        assert new.enqueue("c.add", {"x": 2}).result(timeout=20) == 2  # signed with k2
        assert worker.proc is not None
        kill_session(worker.pid)
        worker.proc.wait(timeout=10)
        spawn(store_url, hmac_env(f"k2:{K2}", "k2"))  # step 5: k1 retired, but one producer lags
        assert new.enqueue("c.add", {"x": 4}).result(timeout=20) == 4
        late = old.enqueue("c.add", {"x": 3})  # still signed with k1
        assert wait_until(lambda: dead_letter(new, late.id) is not None, timeout=20)
        entry = dead_letter(new, late.id)
        assert entry is not None and entry.reason == "signature-invalid"
        assert "signed with key id 'k1', which this worker does not have" in entry.message
        assert ran(tmp_path, "add") == 3
    finally:
        old.close()
        new.close()


def test_an_ed25519_worker_with_public_keys_only(
    store_url: str, spawn: Spawn, tmp_path: Path
) -> None:
    private, public = generate_key("ed25519")
    assert public is not None
    encode = base64.b64encode
    producers = {
        "STEM_SIGNING_ALGORITHM": "ed25519",
        "STEM_SIGNING_PRIVATE_KEY": f"e1:{encode(private).decode()}",
    }
    workers = {
        "STEM_SIGNING_ALGORITHM": "ed25519",
        "STEM_SIGNING_PUBLIC_KEYS": f"e1:{encode(public).decode()}",
    }
    app = producer(store_url, producers)
    try:
        spawn(store_url, workers)
        assert app.enqueue("c.add", {"x": 40, "y": 2}).result(timeout=20) == 42
        assert app.enqueue("c.flaky", {"x": 1}).result(timeout=20) == 1  # retry: no key needed
        # A task that enqueues from its child: the worker cannot sign, so it says so
        # instead of writing a message every worker would dead-letter.
        handle = app.enqueue("c.spawn", {"n": 1})
        assert wait_until(lambda: handle.state() is TaskState.DEAD, timeout=30)  # after retries
        result = app.backend.get(handle.id)
        assert result is not None and result.error is not None
        assert "STEM_SIGNING_PRIVATE_KEY" in result.error.message
        assert "holds no key to sign" in result.error.message
        assert ran(tmp_path, "add") == 1
    finally:
        app.close()
