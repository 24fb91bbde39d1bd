"""Signed envelopes (appliance/signing.py): HMAC and Ed25519, rotation, tampering, and
key material that never shows in an error, a repr or a description."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from appliance.envelope import Envelope, new_task_id
from appliance.errors import ConfigError, DecodeError, SignatureInvalid
from appliance.signing import (
    BAD_SIGNATURE,
    MALFORMED,
    UNKNOWN_KEY,
    UNSIGNED,
    SigningConfig,
    generate_key,
    signed_content,
)
from appliance.telemetry import FOLLOWS_HEADER, PREVIOUS_ATTEMPT_HEADER


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


HMAC_A, HMAC_B = generate_key()[0], generate_key()[0]
ED_A_PRIVATE, ED_A_PUBLIC = generate_key("ed25519")
ED_B_PRIVATE, ED_B_PUBLIC = generate_key("ed25519")
assert ED_A_PUBLIC is not None and ED_B_PUBLIC is not None


def config(**env: str) -> SigningConfig:
    found = SigningConfig.from_env({f"STEM_SIGNING_{k.upper()}": v for k, v in env.items()})
    assert found is not None
    return found


def hmac_config(keys: str, active: str | None = None) -> SigningConfig:
    return config(keys=keys, **({"active_key": active} if active else {}))


def ed_producer(key_id: str = "a", private: bytes = ED_A_PRIVATE) -> SigningConfig:
    return config(algorithm="ed25519", private_key=f"{key_id}:{b64(private)}")


def ed_worker(public_keys: str) -> SigningConfig:
    return config(algorithm="ed25519", public_keys=public_keys)


def envelope_dict(**fields: Any) -> dict[str, Any]:
    """An envelope as a worker reads it from the store: the dict orjson.loads gives."""
    env = Envelope(
        id=new_task_id(), name="reports.build", args={"customer": 42, "lines": [1, 2.5]},
        enqueued_at=1_700_000_000.25, meta={"who": "web"}, headers={"h": "v"}, **fields,
    )  # fmt: skip
    raw: dict[str, Any] = orjson.loads(orjson.dumps(env))
    return raw


def signed(cfg: SigningConfig, **fields: Any) -> dict[str, Any]:
    raw = envelope_dict(**fields)
    raw["sig"] = cfg.signer().sign(raw)
    # Through bytes, as the store keeps it.
    stored: dict[str, Any] = orjson.loads(orjson.dumps(raw))
    return stored


def reason_of(verify: Callable[[], None]) -> str:
    with pytest.raises(SignatureInvalid) as info:
        verify()
    return info.value.reason


# --- HMAC and Ed25519 alike -------------------------------------------------------------

SCHEMES = {
    "hmac": (lambda: hmac_config(f"a:{b64(HMAC_A)}"), lambda: hmac_config(f"a:{b64(HMAC_A)}")),
    "ed25519": (ed_producer, lambda: ed_worker(f"a:{b64(ED_A_PUBLIC)}")),
}


@pytest.fixture(params=list(SCHEMES))
def pair(request: pytest.FixtureRequest) -> tuple[SigningConfig, SigningConfig]:
    producer, worker = SCHEMES[request.param]
    return producer(), worker()


def test_a_signed_message_verifies(pair: tuple[SigningConfig, SigningConfig]) -> None:
    producer, worker = pair
    raw = signed(producer)
    assert raw["sig"][0] == "a"
    worker.verifier().verify(raw)


def test_the_worker_managed_fields_can_change_without_breaking_the_signature(
    pair: tuple[SigningConfig, SigningConfig],
) -> None:
    producer, worker = pair
    raw = signed(producer)
    raw.update(attempt=3, not_before=1_800_000_000.0, previous={"step": [1, 2]})
    raw["headers"] = {
        **raw["headers"],
        PREVIOUS_ATTEMPT_HEADER: "00-ab-cd-01",
        FOLLOWS_HEADER: "00-ef-01-01",
    }
    worker.verifier().verify(raw)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda raw: raw["args"].update(customer=43),
        lambda raw: raw.update(name="reports.delete_all"),
        lambda raw: raw.update(queue="other"),
        lambda raw: raw.update(priority=9),
        lambda raw: raw.update(max_retries=1000),
        lambda raw: raw.update(expires=1.0),
        lambda raw: raw["meta"].update(who="attacker"),
        lambda raw: raw["headers"].update(h="w"),
        lambda raw: raw.update(flow={"link": "x"}),
        lambda raw: raw.pop("meta"),  # read back as its default, {}
    ],
    ids=[
        "args",
        "name",
        "queue",
        "priority",
        "max_retries",
        "expires",
        "meta",
        "headers",
        "flow",
        "removed-field",
    ],
)
def test_a_tampered_message_is_refused(
    pair: tuple[SigningConfig, SigningConfig], tamper: Callable[[dict[str, Any]], Any]
) -> None:
    producer, worker = pair
    raw = signed(producer)
    tamper(raw)
    assert reason_of(lambda: worker.verifier().verify(raw)) == BAD_SIGNATURE


def test_a_field_this_version_does_not_know_is_not_covered(
    pair: tuple[SigningConfig, SigningConfig],
) -> None:
    """What the decoder ignores (and a retry drops) is not signed: a newer writer's field
    can neither break an older worker's verification nor change what it runs."""
    producer, worker = pair
    raw = signed(producer)
    raw["extra_field_of_a_newer_writer"] = 1
    worker.verifier().verify(raw)


def test_a_flipped_byte_in_the_stored_args_is_refused(
    pair: tuple[SigningConfig, SigningConfig],
) -> None:
    producer, worker = pair
    data = orjson.dumps(signed(producer))
    at = data.index(b'"customer":42') + len(b'"customer":4')
    tampered = data[:at] + b"3" + data[at + 1 :]
    with pytest.raises(SignatureInvalid) as info:
        worker.verifier().verify(orjson.loads(tampered), tampered)
    assert info.value.reason == BAD_SIGNATURE
    assert info.value.data == tampered  # kept for the DLQ
    assert isinstance(info.value, DecodeError)  # refused wherever undecodable bytes are


def test_an_unsigned_message_is_refused(pair: tuple[SigningConfig, SigningConfig]) -> None:
    _, worker = pair
    assert reason_of(lambda: worker.verifier().verify(envelope_dict())) == UNSIGNED


@pytest.mark.parametrize(
    "sig", [[], ["a"], ["a", "b", "c"], "a:b", ["a", 5], [1, "x"], ["a", "not base64!"], ["a", "é"]]
)
def test_a_malformed_sig_field_is_refused(
    pair: tuple[SigningConfig, SigningConfig], sig: Any
) -> None:
    _, worker = pair
    raw = {**envelope_dict(), "sig": sig}
    assert reason_of(lambda: worker.verifier().verify(raw)) in (MALFORMED, UNKNOWN_KEY)


def test_a_signature_of_the_wrong_length_is_a_bad_signature(
    pair: tuple[SigningConfig, SigningConfig],
) -> None:
    producer, worker = pair
    raw = signed(producer)
    raw["sig"] = ["a", b64(base64.b64decode(raw["sig"][1])[:-1])]
    assert reason_of(lambda: worker.verifier().verify(raw)) == BAD_SIGNATURE


def test_a_message_too_deep_to_encode_is_refused_not_crashed(
    pair: tuple[SigningConfig, SigningConfig],
) -> None:
    _, worker = pair
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    raw = {**envelope_dict(), "args": {"x": deep}, "sig": ["a", b64(b"x" * 32)]}
    assert reason_of(lambda: worker.verifier().verify(raw)) == MALFORMED


def test_signing_ignores_an_existing_sig_and_key_order(
    pair: tuple[SigningConfig, SigningConfig],
) -> None:
    producer, _ = pair
    raw = envelope_dict()
    first = producer.signer().sign(raw)
    shuffled = dict(reversed(list({**raw, "sig": ["x", "y"]}.items())))
    shuffled["args"] = dict(reversed(list(raw["args"].items())))
    assert signed_content(shuffled) == signed_content(raw)
    if producer.algorithm == "hmac-sha256":  # Ed25519 is deterministic too, but say it once
        assert producer.signer().sign(shuffled) == first


# --- rotation -----------------------------------------------------------------------------


def test_hmac_rotation_old_messages_verify_new_ones_use_the_new_key() -> None:
    old = hmac_config(f"k1:{b64(HMAC_A)}")
    before = signed(old)
    both = hmac_config(f"k1:{b64(HMAC_A)},k2:{b64(HMAC_B)}", active="k2")
    after = signed(both)
    assert before["sig"][0] == "k1" and after["sig"][0] == "k2"
    both.verifier().verify(before)  # still in flight from before the rotation
    both.verifier().verify(after)
    # A worker not yet given k2 refuses the new messages by their key id, not as tampered.
    assert reason_of(lambda: old.verifier().verify(after)) == UNKNOWN_KEY
    # k1 retired: what it signed is refused.
    new_only = hmac_config(f"k2:{b64(HMAC_B)}")
    with pytest.raises(SignatureInvalid, match="k1") as info:
        new_only.verifier().verify(before)
    assert info.value.reason == UNKNOWN_KEY


def test_ed25519_rotation_and_a_worker_that_holds_only_public_keys() -> None:
    before = signed(ed_producer("k1", ED_A_PRIVATE))
    after = signed(ed_producer("k2", ED_B_PRIVATE))
    worker = ed_worker(f"k1:{b64(ED_A_PUBLIC)},k2:{b64(ED_B_PUBLIC)}")
    assert not worker.can_sign and worker.private_key is None
    worker.verifier().verify(before)
    worker.verifier().verify(after)
    retired = ed_worker(f"k2:{b64(ED_B_PUBLIC)}")
    assert reason_of(lambda: retired.verifier().verify(before)) == UNKNOWN_KEY
    with pytest.raises(ConfigError, match="no signing key"):
        worker.signer()


def test_same_key_id_with_another_key_is_a_bad_signature_not_a_pass() -> None:
    raw = signed(hmac_config(f"k1:{b64(HMAC_A)}"))
    impostor = hmac_config(f"k1:{b64(HMAC_B)}")
    assert reason_of(lambda: impostor.verifier().verify(raw)) == BAD_SIGNATURE
    ed_raw = signed(ed_producer("k1", ED_A_PRIVATE))
    assert reason_of(lambda: ed_worker(f"k1:{b64(ED_B_PUBLIC)}").verifier().verify(ed_raw)) == (
        BAD_SIGNATURE
    )


def test_an_hmac_signature_does_not_pass_an_ed25519_worker_or_back() -> None:
    hmac_raw = signed(hmac_config(f"a:{b64(HMAC_A)}"))
    ed_raw = signed(ed_producer())
    assert reason_of(lambda: ed_worker(f"a:{b64(ED_A_PUBLIC)}").verifier().verify(hmac_raw)) == (
        BAD_SIGNATURE
    )
    hmac_worker = hmac_config(f"a:{b64(HMAC_A)}")
    assert reason_of(lambda: hmac_worker.verifier().verify(ed_raw)) == BAD_SIGNATURE


def test_an_ed25519_producer_verifies_its_own_messages() -> None:
    producer = ed_producer()
    assert producer.key_ids == ("a",)
    producer.verifier().verify(signed(producer))


# --- configuration -------------------------------------------------------------------------


def test_nothing_configured_is_none_and_empty_values_count_as_unset() -> None:
    assert SigningConfig.from_env({}) is None
    assert SigningConfig.from_env({"STEM_SIGNING_KEYS": "", "STEM_SIGNING_ACTIVE_KEY": " "}) is None


SECRET = b64(HMAC_A)
ED_SECRET = b64(ED_A_PRIVATE)


@pytest.mark.parametrize(
    ("env", "variable", "fragment"),
    [
        ({"KEYS": f"a:{SECRET},b:{b64(HMAC_B)}"}, "ACTIVE_KEY", "name the one that signs"),
        ({"KEYS": f"a:{SECRET}", "ACTIVE_KEY": "zz"}, "ACTIVE_KEY", "not a key id"),
        ({"KEYS": f"a:{SECRET}", "ACTIVE_KEY": SECRET}, "ACTIVE_KEY", "not a key id"),
        ({"KEYS": SECRET}, "KEYS", "entry 1 is not id:BASE64"),
        ({"KEYS": f"a:{SECRET}:{SECRET}"}, "KEYS", "not base64"),
        ({"KEYS": f"a:{SECRET},a:{SECRET}"}, "KEYS", "given twice"),
        ({"KEYS": f"a b:{SECRET}"}, "KEYS", "a key id is"),
        ({"KEYS": f"a:{b64(HMAC_A[:16])}"}, "KEYS", "at least 32 bytes"),
        ({"KEYS": f"a:{SECRET}", "PUBLIC_KEYS": f"a:{SECRET}"}, "PUBLIC_KEYS", "ed25519 only"),
        ({"ACTIVE_KEY": "a"}, "KEYS", "no key is given"),
        ({"ALGORITHM": "rsa", "KEYS": f"a:{SECRET}"}, "ALGORITHM", "one of"),
        ({"ALGORITHM": SECRET * 3, "KEYS": f"a:{SECRET}"}, "ALGORITHM", "one of"),
        ({"ALGORITHM": "ed25519", "KEYS": f"a:{SECRET}"}, "KEYS", "is for hmac-sha256"),
        ({"ALGORITHM": "ed25519"}, "PUBLIC_KEYS", "needs"),
        ({"ALGORITHM": "ed25519", "PRIVATE_KEY": f"a:{SECRET}x"}, "PRIVATE_KEY", "not base64"),
        ({"ALGORITHM": "ed25519", "PRIVATE_KEY": f"a:{b64(HMAC_A + b'x')}"}, "PRIVATE_KEY",
         "32 bytes"),
        ({"ALGORITHM": "ed25519", "PRIVATE_KEY": f"a:{ED_SECRET},b:{ED_SECRET}"}, "PRIVATE_KEY",
         "one id:BASE64"),
        ({"ALGORITHM": "ed25519", "PUBLIC_KEYS": f"a:{b64(b'x' * 31)}"}, "PUBLIC_KEYS", "32 bytes"),
        ({"ALGORITHM": "ed25519", "PRIVATE_KEY": f"a:{ED_SECRET}",
          "PUBLIC_KEYS": f"a:{b64(ED_B_PUBLIC)}"}, "PUBLIC_KEYS", "same id, another key"),
        ({"ALGORITHM": "ed25519", "PRIVATE_KEY": f"a:{ED_SECRET}", "ACTIVE_KEY": "b"},
         "ACTIVE_KEY", "the id of"),
    ],
)  # fmt: skip
def test_bad_configuration_names_the_variable_and_never_the_key(
    env: dict[str, str], variable: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        SigningConfig.from_env({f"STEM_SIGNING_{k}": v for k, v in env.items()})
    message = str(info.value)
    assert f"STEM_SIGNING_{variable}" in message and fragment in message, message
    for secret in (SECRET, ED_SECRET, b64(HMAC_B), SECRET[:12], ED_SECRET[:12]):
        assert secret not in message
    # No chained exception (a binascii or cryptography error) carries the value either.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_repr_and_describe_show_key_ids_only() -> None:
    hmac_cfg = hmac_config(f"k1:{SECRET},k2:{b64(HMAC_B)}", active="k2")
    ed_cfg = ed_producer()
    shown = " ".join(
        [
            repr(hmac_cfg),
            hmac_cfg.describe(),
            repr(hmac_cfg.signer()),
            repr(hmac_cfg.verifier()),
            repr(ed_cfg),
            ed_cfg.describe(),
            repr(ed_cfg.signer()),
            repr(ed_cfg.verifier()),
            str(copy.copy(hmac_cfg)),
        ]
    )
    for secret in (SECRET, b64(HMAC_B), ED_SECRET, b64(ED_A_PUBLIC)):
        assert secret not in shown
    assert "k1" in shown and "k2" in shown and "hmac-sha256" in shown
    assert hmac_cfg.describe() == "hmac-sha256, signs with k2, verifies k1, k2"


def test_the_unsigned_headers_are_the_ones_the_supervisor_writes() -> None:
    from appliance.signing import UNSIGNED_HEADERS

    assert frozenset({PREVIOUS_ATTEMPT_HEADER, FOLLOWS_HEADER}) == UNSIGNED_HEADERS


# --- stem signing keygen ------------------------------------------------------------------


def keygen(*argv: str) -> str:
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [str(Path(sys.executable).parent / "stem"), "signing", "keygen", *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result.stdout


def env_lines(block: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in block.splitlines() if line and line[0] != "#")
    return dict(pairs)


def test_keygen_prints_hmac_lines_that_sign_and_verify() -> None:
    out = keygen("--id", "k9")
    cfg = SigningConfig.from_env(env_lines(out))
    assert cfg is not None and cfg.active_key == "k9" and cfg.algorithm == "hmac-sha256"
    cfg.verifier().verify(signed(cfg))
    assert keygen() != keygen()  # a fresh key (and id) every time


def test_keygen_ed25519_gives_producers_the_private_key_and_workers_the_public_one() -> None:
    found = orjson.loads(keygen("--algorithm", "ed25519", "--id", "prod-2", "--json"))
    assert found["algorithm"] == "ed25519" and found["key_id"] == "prod-2"
    producer = SigningConfig.from_env(found["env"]["producers"])
    worker = SigningConfig.from_env(found["env"]["workers"])
    assert producer is not None and worker is not None
    assert not worker.can_sign and worker.key_ids == ("prod-2",)
    worker.verifier().verify(signed(producer))
    text = keygen("--algorithm", "ed25519")
    producer_block, worker_block = text.split("\n\n")
    assert "PRIVATE_KEY" in producer_block and "PRIVATE_KEY" not in worker_block


def test_hmac_users_never_import_cryptography() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from appliance.config import load_settings\n"
        f"s = load_settings(env={{'STEM_SIGNING_KEYS': 'k1:{SECRET}'}})\n"
        "s.signing.verifier(), s.signing.signer()\n"
        "print('cryptography' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr
