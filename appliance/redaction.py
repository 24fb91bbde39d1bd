"""Secrets never shown: passwords in URLs, signing keys, OTLP header values.

Two layers. Where a value is printed on purpose, it goes through `redact_url` (a URL
keeps its user, host and path; its password becomes `***`). And every line the
process writes, log lines and the CLI's error line, passes a `Redactor` built from
the secrets this process was configured with (`secrets_of`), so a message that quotes
a URL, an exception text or a header by mistake is caught on its way out. The second
layer is the one that makes a leak in any module harmless; the first keeps the output
readable (`redis://:***@host` rather than a bare `***`).

This module imports nothing from the package but the settings type.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from appliance.config import Settings

MASK = "***"
# scheme://userinfo@ : userinfo runs to the last '@' before the host's end ('/', '?', '#',
# or whitespace), as urlsplit reads it, so a password holding an unencoded '@' is caught.
# The scheme is bounded (RFC 3986 sets no limit; real ones are short): unbounded, a long
# run of letters made every start position scan to its end, quadratic in the text
# (measured: a hostile 100 kB flag value took seconds per check).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,31}://)(?P<info>[^/?#\s]*)@")
# Values shorter than this are not searched for in text: a 3-character password would
# mask every "abc" in every log line, and is no secret anyway.
MIN_SECRET = 6
# The variables whose whole value is key material (SigningConfig reads them).
SECRET_VARIABLES = ("STEM_SIGNING_KEYS", "STEM_SIGNING_PRIVATE_KEY")


def redact_url(url: str) -> str:
    """`url` with the password of its user info masked (`redis://user:***@host:6379/0`);
    the text unchanged when it has none. Never raises, whatever the text."""
    if "@" not in url:
        return url  # nothing to mask; and no regex pass over a hostile megabyte
    return _USERINFO.sub(_mask_userinfo, url)


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _ = match["info"].partition(":")
    return f"{match['scheme']}{user}:{MASK}@" if sep else match.group(0)


def url_password(url: str) -> str | None:
    """The password of `url`'s user info, decoded, or None (also for a URL that does not
    parse)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        match = _USERINFO.search(url)
        password = match["info"].partition(":")[2] if match and ":" in match["info"] else None
    return unquote(password) if password else None


def secrets_of(settings: Settings, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every secret this process is configured with: URL passwords (as written and as
    decoded), OTLP header values, and the signing keys' material."""
    env = os.environ if environ is None else environ
    found: list[str] = []
    for url in (settings.broker_url, settings.result_backend_url, settings.otlp_endpoint):
        password = url_password(url) if url else None
        if password:
            found += [password, quote(password, safe="")]
    found += [value for _, value in settings.otlp_headers]
    for name in SECRET_VARIABLES:
        for entry in env.get(name, "").split(","):
            found.append(entry.partition(":")[2].strip())
    found += _signing_material(settings)
    return tuple(sorted({s for s in found if len(s) >= MIN_SECRET}, key=len, reverse=True))


def secrets_from_environment(
    environ: Mapping[str, str], argv: Iterable[str] = ()
) -> tuple[str, ...]:
    """The secrets of a process whose settings could not be built (the error that says
    why may quote them): URL passwords in `STEM_*` variables and arguments, OTLP header
    values, signing key material."""
    found: list[str] = []
    urls = [value for name, value in environ.items() if name.startswith("STEM_")]
    for text in [*urls, *argv]:
        for match in _USERINFO.finditer(text):
            password = match["info"].partition(":")[2]
            if password:
                found += [password, unquote(password)]
    for item in environ.get("STEM_OTLP_HEADERS", "").split(","):
        value = item.partition("=")[2].strip()
        found += [value, unquote(value)]
    for name in SECRET_VARIABLES:
        for entry in environ.get(name, "").split(","):
            found.append(entry.partition(":")[2].strip())
    return tuple({s for s in found if len(s) >= MIN_SECRET})


def _signing_material(settings: Settings) -> list[str]:
    """The key material of `settings.signing` in the forms it could be printed in."""
    import base64

    signing = getattr(settings, "signing", None)
    if signing is None:
        return []
    raw = [key for _, key in signing.keys if signing.algorithm == "hmac-sha256"]
    if signing.private_key is not None:
        raw.append(signing.private_key)
    return [form for key in raw for form in (base64.b64encode(key).decode(), key.hex())]


class Redactor:
    """Masks URL passwords and the given secrets in any text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first: a secret that contains another is masked whole.
        self.secrets = tuple(sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len)[::-1])

    def __call__(self, text: str) -> str:
        if "@" in text:
            text = redact_url(text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def __repr__(self) -> str:
        return f"Redactor({len(self.secrets)} secrets)"
