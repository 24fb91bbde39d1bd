"""Signed envelopes: HMAC-SHA256 (the default) or Ed25519, with key ids for rotation.

What is signed: `signed_content(raw)`, a context label followed by the canonical
encoding (orjson, keys sorted inside every value) of the envelope's signed fields as one
list in the envelope's field order, a missing field at its default: every field but
those in `UNSIGNED_FIELDS`, and the headers without those in `UNSIGNED_HEADERS`. The
signature travels in the envelope itself as `sig`: `[key_id, base64(signature)]`.

Why those fields are left out: with Ed25519 a worker holds only public keys, so it can
verify but never sign, yet the supervisor must still write a retry (`attempt`,
`not_before`), fill `previous` (a chain step's input, the result of the step before) at
settle time, hand a chain's remaining pre-signed steps on (`then`), and link a retry's
trace to the attempt before it (the `stem-previous-attempt` header). Everything the
producer decided is covered: id, name, args, meta, the other headers, queue, priority,
max_retries, enqueued_at, expires, parent and root ids, version, `flow` (canvas links,
pre-built and signed by the producer) and `rate`. So a retry or a chain step keeps the
producer's signature, and a worker never needs a key that could forge a task. What this
leaves to whoever can write the store: delaying a message, resetting its attempt count,
replaying a signed message as it is, and choosing `previous` (see docs/security.md).

Canonical form and parsing: the codec checks the signature over the envelope it parsed
(the dict the decoder builds the `Envelope` from), never over the bytes, so two JSON
readers can never disagree about what was signed (duplicate keys, number spellings,
escapes), and a writer that stores default values (a retry) and one that leaves them out
(a pre-built chain step) sign the same content. Fields this version does not know are
not covered: it ignores them, and drops them when it writes a retry.

Keys come from the environment only (`SigningConfig.from_env`); no message, `repr()` or
log line shows them.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from appliance.envelope import Envelope
from appliance.errors import ConfigError, SignatureInvalid

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

HMAC_SHA256 = "hmac-sha256"
ED25519 = "ed25519"
ALGORITHMS = (HMAC_SHA256, ED25519)

ENV_KEYS = "STEM_SIGNING_KEYS"  # HMAC: "id1:BASE64,id2:BASE64"
ENV_ACTIVE_KEY = "STEM_SIGNING_ACTIVE_KEY"  # the id that signs
ENV_ALGORITHM = "STEM_SIGNING_ALGORITHM"  # hmac-sha256 (default) | ed25519
ENV_PRIVATE_KEY = "STEM_SIGNING_PRIVATE_KEY"  # Ed25519 producers: "id:BASE64" (32-byte seed)
ENV_PUBLIC_KEYS = "STEM_SIGNING_PUBLIC_KEYS"  # Ed25519 workers: "id:BASE64,..." (32 bytes)
ENV_VARS = (ENV_KEYS, ENV_ACTIVE_KEY, ENV_ALGORITHM, ENV_PRIVATE_KEY, ENV_PUBLIC_KEYS)

# Written by the supervisor after the producer signed (see the module docstring).
UNSIGNED_FIELDS = frozenset({"attempt", "not_before", "previous", "sig", "then"})
# The signed fields in the envelope's order, each with the value a missing one means.
_SIGNED: tuple[tuple[str, Any], ...] = tuple(
    (name, f.default if f.default is not MISSING else {})  # args, meta, headers: {}
    for name, f in Envelope.__dataclass_fields__.items()
    if name not in UNSIGNED_FIELDS
)
_HEADERS_AT = [name for name, _ in _SIGNED].index("headers")
# = telemetry.PREVIOUS_ATTEMPT_HEADER and FOLLOWS_HEADER: trace context the supervisor adds.
UNSIGNED_HEADERS = frozenset({"stem-previous-attempt", "stem-follows"})
# Domain separation: a key shared with another use can never sign an envelope by accident.
CONTEXT = b"stem-envelope-v1\n"

# RFC 2104 advises keys no shorter than the hash output (32 bytes for SHA-256).
MIN_HMAC_KEY_BYTES = 32
ED25519_KEY_BYTES = 32  # a raw private key (the seed) and a raw public key alike
ED25519_SIGNATURE_BYTES = 64
# Key ids travel in every message and appear in errors: short and plain.
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# SignatureInvalid.reason values
UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown-key"
MALFORMED = "malformed"
BAD_SIGNATURE = "bad-signature"
_TOO_DEEP = (
    "the message cannot be put in canonical form (nested too deep); no Stem producer wrote it"
)


def signed_content(raw: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: `CONTEXT` and the canonical JSON of the signed
    fields of `raw` (a parsed envelope, or an `EnvelopeView` of an `Envelope`) as one
    list in the envelope's field order, a missing field at its
    default, keys sorted inside every value, the unsigned headers left out. A list of
    values, not a dict: no dict to copy or filter and no default to compare per field,
    so a verify costs a few microseconds (the drain benchmark's budget). Raises
    `SignatureInvalid` (malformed) for a value orjson cannot write back (nested deeper
    than 254 levels)."""
    get = raw.get
    values = [get(name, default) for name, default in _SIGNED]
    headers = values[_HEADERS_AT]
    if isinstance(headers, dict) and not UNSIGNED_HEADERS.isdisjoint(headers):
        values[_HEADERS_AT] = {k: v for k, v in headers.items() if k not in UNSIGNED_HEADERS}
    try:
        return CONTEXT + orjson.dumps(values, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError: nested deeper than orjson writes
        raise SignatureInvalid(MALFORMED, _TOO_DEEP) from None


class EnvelopeView:
    """An `Envelope` seen as the mapping `signed_content` reads (`.get` only)."""

    __slots__ = ("_envelope",)

    def __init__(self, envelope: Envelope) -> None:
        self._envelope = envelope

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self._envelope, name)


class Signer(abc.ABC):
    """Signs with the active key. `sign(raw)` returns the `sig` field's value."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id

    def sign(self, raw: Mapping[str, Any]) -> list[str]:
        """`[key_id, base64 signature]` over `signed_content(raw)` (any `sig` in `raw` is
        ignored, so re-signing a signed dict gives the same result)."""
        signature = self._sign(signed_content(raw))
        return [self.key_id, base64.b64encode(signature).decode("ascii")]

    def sign_envelope(self, envelope: Envelope) -> list[str]:
        """`sign` of an `Envelope` (its fields read in place, no dict built)."""
        return self.sign(EnvelopeView(envelope))  # type: ignore[arg-type]

    @abc.abstractmethod
    def _sign(self, content: bytes) -> bytes:
        """The raw signature of `content` (each algorithm's own)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self.key_id!r})"


class _HmacSigner(Signer):
    def __init__(self, key_id: str, key: bytes) -> None:
        super().__init__(key_id)
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def _sign(self, content: bytes) -> bytes:
        return _mac(self._mac, content)


class _Ed25519Signer(Signer):
    def __init__(self, key_id: str, key: Ed25519PrivateKey) -> None:
        super().__init__(key_id)
        self._key = key

    def _sign(self, content: bytes) -> bytes:
        return self._key.sign(content)


class Verifier(abc.ABC):
    """Checks `sig` against every configured key (rotation: any of them verifies)."""

    def __init__(self, key_ids: tuple[str, ...]) -> None:
        self.key_ids = key_ids

    def verify(self, raw: Mapping[str, Any], data: bytes = b"") -> None:
        """Return if `raw` carries a valid signature by a known key; else raise
        `SignatureInvalid` with its `reason` (unsigned, unknown-key, malformed,
        bad-signature). `data` (the payload) is kept on the error for the DLQ."""
        sig = raw.get("sig")
        if sig is None:
            raise SignatureInvalid(
                UNSIGNED,
                "the message is not signed, and this worker runs signed messages "
                "only (STEM_SIGNING_* is set); enqueue it from a producer with the keys",
                data,
            )
        if not (type(sig) is list and len(sig) == 2 and all(type(p) is str for p in sig)):
            raise SignatureInvalid(MALFORMED, "the sig field is not [key id, signature]", data)
        key_id, encoded = sig
        if key_id not in self.key_ids:
            known = ", ".join(self.key_ids)
            raise SignatureInvalid(
                UNKNOWN_KEY,
                f"signed with key id {key_id[:64]!r}, which this worker does not "
                f"have (it has: {known}); a key removed too early, or a foreign producer",
                data,
            )
        signature = _b64(encoded)
        if signature is None:
            raise SignatureInvalid(MALFORMED, "the signature is not base64", data)
        try:
            content = signed_content(raw)
        except SignatureInvalid as exc:
            exc.data = data
            raise
        if not self._check(key_id, signature, content):
            raise SignatureInvalid(
                BAD_SIGNATURE,
                f"the signature by key {key_id!r} does not match the message: "
                "it was changed after it was signed (or signed with another key of that id)",
                data,
            )

    @abc.abstractmethod
    def _check(self, key_id: str, signature: bytes, content: bytes) -> bool:
        """Whether `signature` by key `key_id` matches `content` (each algorithm's own)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_ids={self.key_ids!r})"


class _HmacVerifier(Verifier):
    def __init__(self, keys: Mapping[str, bytes]) -> None:
        super().__init__(tuple(keys))
        self._macs = {
            key_id: hmac.new(key, digestmod=hashlib.sha256) for key_id, key in keys.items()
        }

    def _check(self, key_id: str, signature: bytes, content: bytes) -> bool:
        expected = _mac(self._macs[key_id], content)
        return hmac.compare_digest(expected, signature)  # constant time


def _mac(keyed: hmac.HMAC, content: bytes) -> bytes:
    """HMAC of `content` from a copy of a keyed object: the key's pads are computed once
    per key, not per message (a quarter faster than `hmac.digest` here)."""
    mac = keyed.copy()
    mac.update(content)
    return mac.digest()


class _Ed25519Verifier(Verifier):
    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        super().__init__(tuple(keys))
        self._keys = dict(keys)

    def _check(self, key_id: str, signature: bytes, content: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        if len(signature) != ED25519_SIGNATURE_BYTES:
            return False
        try:
            self._keys[key_id].verify(signature, content)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """The signing keys of one process, from `STEM_SIGNING_*` (`from_env`).

    HMAC: `keys` are the shared secrets; the active one signs and any verifies.
    Ed25519: `private_key` (producers) signs as `active_key`; `keys` are the public keys
    that verify (workers), the private key's own public key included. Key material is
    kept out of `repr()`."""

    algorithm: str
    active_key: str | None  # the key id that signs; None: this process cannot sign
    keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    private_key: bytes | None = field(default=None, repr=False)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids that verify, in the order configured."""
        return tuple(key_id for key_id, _ in self.keys)

    @property
    def can_sign(self) -> bool:
        return self.active_key is not None

    @property
    def can_verify(self) -> bool:
        return bool(self.keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SigningConfig | None:
        """The configuration the `STEM_SIGNING_*` variables describe, or None when none is
        set (empty values count as unset). A bad value is a `ConfigError` naming the
        variable and the entry's position, never the key material."""
        env = {name: environ[name].strip() for name in ENV_VARS if environ.get(name, "").strip()}
        if not env:
            return None
        algorithm = env.get(ENV_ALGORITHM, HMAC_SHA256).lower()
        if algorithm not in ALGORITHMS:
            _fail(
                ENV_ALGORITHM,
                f"must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}"
                if algorithm.isprintable() and len(algorithm) <= 40
                else f"must be one of {', '.join(ALGORITHMS)}",
            )
        if algorithm == HMAC_SHA256:
            return _hmac_config(env)
        return _ed25519_config(env)

    def signer(self) -> Signer:
        """The signer of the active key; `ConfigError` when this process has none (an
        Ed25519 worker given only public keys)."""
        if self.active_key is None:
            _fail(
                ENV_PRIVATE_KEY,
                "this process has no signing key (Ed25519 workers hold "
                "public keys only); set it where tasks are enqueued",
            )
        if self.algorithm == HMAC_SHA256:
            return _HmacSigner(self.active_key, dict(self.keys)[self.active_key])
        assert self.private_key is not None
        key = _ed25519().Ed25519PrivateKey.from_private_bytes(self.private_key)
        return _Ed25519Signer(self.active_key, key)

    def verifier(self) -> Verifier:
        """The verifier of every configured key; `ConfigError` when there is none."""
        if not self.keys:
            _fail(ENV_PUBLIC_KEYS, "a worker needs the public keys to verify messages with")
        if self.algorithm == HMAC_SHA256:
            return _HmacVerifier(dict(self.keys))
        public = _ed25519().Ed25519PublicKey.from_public_bytes
        return _Ed25519Verifier({key_id: public(key) for key_id, key in self.keys})

    def describe(self) -> str:
        """For logs and status: the algorithm and key ids, never key material."""
        signs = f"signs with {self.active_key}" if self.active_key else "cannot sign"
        verifies = f"verifies {', '.join(self.key_ids)}" if self.keys else "cannot verify"
        return f"{self.algorithm}, {signs}, {verifies}"


def _fail(variable: str, reason: str) -> NoReturn:
    raise ConfigError("environment", variable, reason)


def _hmac_config(env: Mapping[str, str]) -> SigningConfig:
    for name in (ENV_PRIVATE_KEY, ENV_PUBLIC_KEYS):
        if name in env:
            _fail(
                name,
                f"is for {ED25519} only ({ENV_ALGORITHM} is {HMAC_SHA256}); "
                f"HMAC keys go in {ENV_KEYS}",
            )
    if ENV_KEYS not in env:
        _fail(ENV_KEYS, "signing is configured but no key is given: set id:BASE64 entries")
    keys = _key_list(ENV_KEYS, env[ENV_KEYS])
    for index, (_, key) in enumerate(keys, 1):
        if len(key) < MIN_HMAC_KEY_BYTES:
            _fail(
                ENV_KEYS,
                f"entry {index}: an HMAC key needs at least {MIN_HMAC_KEY_BYTES} "
                "bytes (try `stem signing keygen`); values are not shown",
            )
    return SigningConfig(HMAC_SHA256, _active(env, keys), keys)


def _ed25519_config(env: Mapping[str, str]) -> SigningConfig:
    if ENV_KEYS in env:
        _fail(
            ENV_KEYS,
            f"is for {HMAC_SHA256}; with {ED25519} producers set "
            f"{ENV_PRIVATE_KEY} and workers {ENV_PUBLIC_KEYS}",
        )
    if ENV_PRIVATE_KEY not in env and ENV_PUBLIC_KEYS not in env:
        _fail(
            ENV_PUBLIC_KEYS,
            f"{ED25519} signing needs {ENV_PRIVATE_KEY} (producers) or {ENV_PUBLIC_KEYS} (workers)",
        )
    ed25519 = _ed25519()
    keys = _public_keys(env, ed25519)
    active, private = None, None
    if ENV_PRIVATE_KEY in env:
        ((active, private),) = _key_list(ENV_PRIVATE_KEY, env[ENV_PRIVATE_KEY], single=True)
        own = _own_public_key(private, ed25519)
        listed = dict(keys).get(active)
        if listed is not None and listed != own:
            _fail(
                ENV_PUBLIC_KEYS,
                f"the public key of id {active!r} is not the public key of "
                f"{ENV_PRIVATE_KEY} (same id, another key)",
            )
        if listed is None:  # the producer can verify its own messages
            keys.append((active, own))
    if ENV_ACTIVE_KEY in env and env[ENV_ACTIVE_KEY] != active:
        _fail(
            ENV_ACTIVE_KEY,
            f"with {ED25519} the active key is the id of {ENV_PRIVATE_KEY}"
            + (f" ({active})" if active else ", which is not set"),
        )
    return SigningConfig(ED25519, active, tuple(keys), private)


def _public_keys(env: Mapping[str, str], ed25519: ModuleType) -> list[tuple[str, bytes]]:
    keys = list(_key_list(ENV_PUBLIC_KEYS, env[ENV_PUBLIC_KEYS])) if ENV_PUBLIC_KEYS in env else []
    for index, (_, key) in enumerate(keys, 1):
        if len(key) != ED25519_KEY_BYTES:
            _fail(
                ENV_PUBLIC_KEYS,
                f"entry {index}: an Ed25519 public key is {ED25519_KEY_BYTES} bytes; "
                "values are not shown",
            )
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(key)
            valid = True
        except ValueError:
            valid = False
        if not valid:
            _fail(ENV_PUBLIC_KEYS, f"entry {index}: not an Ed25519 public key")
    return keys


def _own_public_key(private: bytes, ed25519: ModuleType) -> bytes:
    if len(private) != ED25519_KEY_BYTES:
        _fail(
            ENV_PRIVATE_KEY,
            f"an Ed25519 private key is {ED25519_KEY_BYTES} bytes "
            "(the raw seed, as `stem signing keygen --algorithm ed25519` prints it)",
        )
    key = ed25519.Ed25519PrivateKey.from_private_bytes(private)
    raw: bytes = key.public_key().public_bytes_raw()
    return raw


def _active(env: Mapping[str, str], keys: tuple[tuple[str, bytes], ...]) -> str:
    ids = [key_id for key_id, _ in keys]
    if ENV_ACTIVE_KEY not in env:
        if len(ids) == 1:
            return ids[0]
        _fail(
            ENV_ACTIVE_KEY,
            f"{len(ids)} keys are configured: name the one that signs (one of {', '.join(ids)})",
        )
    active = env[ENV_ACTIVE_KEY]
    if active not in ids:
        shown = repr(active) if KEY_ID.fullmatch(active) else "the value"
        _fail(ENV_ACTIVE_KEY, f"{shown} is not a key id of {ENV_KEYS} ({', '.join(ids)})")
    return active


def _key_list(variable: str, text: str, *, single: bool = False) -> tuple[tuple[str, bytes], ...]:
    """`id:BASE64,...` as (id, key bytes) pairs. Errors say the entry's position only:
    an entry that does not parse may be a key pasted in the wrong place."""
    entries = [item.strip() for item in text.split(",")]
    if single and len(entries) != 1:
        _fail(variable, "takes one id:BASE64 entry")
    pairs: list[tuple[str, bytes]] = []
    for index, entry in enumerate(entries, 1):
        key_id, sep, encoded = entry.partition(":")
        key_id, encoded = key_id.strip(), encoded.strip()
        if not sep or not encoded:
            _fail(variable, f"entry {index} is not id:BASE64 (values are not shown)")
        if not KEY_ID.fullmatch(key_id):
            _fail(
                variable,
                f"entry {index}: a key id is 1-64 letters, digits, '.', '_' or "
                "'-', starting with a letter or digit (values are not shown)",
            )
        key = _b64(encoded)
        if key is None:  # failed outside the except: no chained error to show the value
            _fail(
                variable,
                f"entry {index} ({key_id}): the key is not base64 (standard "
                "alphabet, padded); values are not shown",
            )
        if any(key_id == seen for seen, _ in pairs):
            _fail(variable, f"key id {key_id!r} is given twice")
        pairs.append((key_id, key))
    return tuple(pairs)


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII text
        return None


def _ed25519() -> ModuleType:
    """cryptography's Ed25519 module, imported only where Ed25519 is configured."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        _fail(
            ENV_ALGORITHM,
            f"{ED25519} needs the cryptography package: pip install 'stem-appliance[signing]'",
        )
    return ed25519


def generate_key(algorithm: str = HMAC_SHA256) -> tuple[bytes, bytes | None]:
    """A new key: (HMAC secret, None), or (Ed25519 private seed, its public key)."""
    if algorithm == HMAC_SHA256:
        import secrets

        return secrets.token_bytes(MIN_HMAC_KEY_BYTES), None
    if algorithm != ED25519:
        raise ValueError(f"unknown algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
    private = _ed25519().Ed25519PrivateKey.generate()
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()
