"""Password verification shared by the bundled adapters (SPEC §P6, §A6).

Every check is constant-time in what it compares, and :func:`dummy_verify` lets an adapter spend
the same time on an unknown user as on a wrong password, so timing reveals no names.
"""

from __future__ import annotations

import hmac

import bcrypt

#: bcrypt only reads 72 octets; truncating explicitly keeps newer bcrypt releases from raising.
BCRYPT_MAX = 72
_DUMMY_BCRYPT = bcrypt.hashpw(b"pop3sf-dummy", bcrypt.gensalt(rounds=12))


class UnknownScheme(ValueError):
    """The stored hash uses a scheme this server can't verify."""


def hash_bcrypt(password: bytes, rounds: int = 12) -> str:
    """A new bcrypt hash, as ``pop3sf-admin`` stores it."""
    return bcrypt.hashpw(password[:BCRYPT_MAX], bcrypt.gensalt(rounds=rounds)).decode("ascii")


def check_bcrypt(stored: str | bytes, password: bytes) -> bool:
    stored_b = stored.encode("ascii") if isinstance(stored, str) else stored
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX], stored_b)
    except ValueError:
        return False


def verify(stored: str, password: bytes) -> bool:
    """Check a password against a stored secret: ``{SCHEME}value`` or a bare bcrypt hash."""
    if stored.startswith("{"):
        scheme, _, value = stored[1:].partition("}")
        scheme = scheme.upper()
        if scheme == "PLAIN":
            return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), password)
        if scheme in ("BLF-CRYPT", "BCRYPT"):
            return check_bcrypt(value, password)
        raise UnknownScheme(scheme)
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        return check_bcrypt(stored, password)
    raise UnknownScheme(stored[:4])


def dummy_verify(password: bytes, like: str | None = None) -> None:
    """Spend about what verifying against ``like`` (default: a cost-12 bcrypt) would cost."""
    try:
        verify(like or _DUMMY_BCRYPT.decode(), password)
    except UnknownScheme:
        pass
