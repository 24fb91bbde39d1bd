"""`stem signing keygen`: a new signing key, printed as the environment lines that use it."""

from __future__ import annotations

import argparse
import base64
import os
import time

from appliance.cli import output
from appliance.cli.common import Commands, UsageError, add_json_flag
from appliance.signing import (
    ALGORITHMS,
    ED25519,
    ENV_ACTIVE_KEY,
    ENV_ALGORITHM,
    ENV_KEYS,
    ENV_PRIVATE_KEY,
    ENV_PUBLIC_KEYS,
    HMAC_SHA256,
    KEY_ID,
    generate_key,
)


def register(commands: Commands) -> None:
    group = commands.add_parser(
        "signing", help="manage envelope signing keys",
        description="Envelope signing keys (docs/security.md has the rotation procedure).",
    )  # fmt: skip
    sub = group.add_subparsers(dest="signing_command", metavar="COMMAND", required=True)
    keygen = sub.add_parser(
        "keygen", help="print a new signing key as STEM_SIGNING_* lines",
        description="Print a new random signing key as the STEM_SIGNING_* lines that use it, "
        "for an environment file (mode 0600). HMAC: one secret for producers and workers. "
        "Ed25519: a private key for producers and its public key for workers, which can then "
        "verify but never sign. Nothing is stored; the output is the only copy.",
    )  # fmt: skip
    keygen.add_argument(
        "--algorithm", choices=ALGORITHMS, default=HMAC_SHA256,
        help=f"{HMAC_SHA256} (default) or {ED25519}",
    )  # fmt: skip
    keygen.add_argument(
        "--id", dest="key_id", metavar="ID",
        help="the key id (default: k<date>-<random>); 1-64 letters, digits, '.', '_', '-'",
    )  # fmt: skip
    add_json_flag(keygen)
    keygen.set_defaults(handler=run_keygen)


def default_key_id() -> str:
    """Sortable and unique enough to tell keys apart in a rotation: k20250601-3fa2c1."""
    return f"k{time.strftime('%Y%m%d', time.gmtime())}-{os.urandom(3).hex()}"


def run_keygen(args: argparse.Namespace) -> int:
    key_id = args.key_id if args.key_id is not None else default_key_id()
    if not KEY_ID.fullmatch(key_id):
        raise UsageError(
            f"--id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit, got {key_id[:64]!r}"
        )
    secret, public = generate_key(args.algorithm)
    encoded = base64.b64encode(secret).decode("ascii")
    if public is None:
        sections = {
            "producers and workers": {ENV_KEYS: f"{key_id}:{encoded}", ENV_ACTIVE_KEY: key_id},
        }
    else:
        public_encoded = base64.b64encode(public).decode("ascii")
        sections = {
            "producers": {ENV_ALGORITHM: ED25519, ENV_PRIVATE_KEY: f"{key_id}:{encoded}"},
            "workers": {ENV_ALGORITHM: ED25519, ENV_PUBLIC_KEYS: f"{key_id}:{public_encoded}"},
        }
    output.signing_key(args.algorithm, key_id, sections, args.json)
    return 0
