"""Password verification shared by the bundled adapters (docs/protocol.md §7).

Every check is constant-time in what it compares, and :func:`verify_padded` with
:func:`dummy_verify` let an adapter spend the same time on an unknown user, a broken account, a
cheap hash and a wrong password, so timing reveals no names.

Stored secrets use Dovecot's notation, ``{SCHEME}value``, so a Dovecot passwd-file works as it
is: ``{PLAIN}``, ``{CRYPT}`` (and un-prefixed crypt hashes, Dovecot's default for passwd-files),
``{MD5-CRYPT}``, ``{SHA256-CRYPT}``, ``{SHA512-CRYPT}``, ``{BLF-CRYPT}``, ``{SSHA256}`` and
``{SSHA512}`` (with Dovecot's optional ``.b64``/``.hex`` encoding suffix). crypt(3)-style hashes
go to the system's libcrypt through ``crypt_r`` via ctypes: a foreign call releases the GIL, so a
slow SHA-512 crypt doesn't stall the event loop the way the deprecated :mod:`crypt` module does.
bcrypt hashes go to the bcrypt module, which also releases the GIL.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import functools
import hashlib
import hmac
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("pop3sf.passwords")

#: bcrypt only reads 72 octets; truncating explicitly keeps newer bcrypt releases from raising.
BCRYPT_MAX = 72
#: ``sizeof(struct crypt_data)`` of libxcrypt 4.x (Debian 12's libcrypt.so.1): 384 output +
#: 384 setting + 512 input + 767 reserved + 1 initialized + 30720 internal. A larger buffer is
#: harmless, a smaller one corrupts memory, so this is checked against nothing smaller.
CRYPT_DATA_SIZE = 32768
#: libxcrypt refuses longer passphrases (CRYPT_MAX_PASSPHRASE_SIZE).
CRYPT_MAX_PASSPHRASE = 512

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$", "$2x$")
#: What an un-prefixed crypt(3) hash looks like: ``$id$...``, 13-char DES, 20-char BSDi DES.
_CRYPT_SHAPE = re.compile(r"\$[0-9a-z]{1,3}\$[!-~]+|[./0-9A-Za-z]{13}|_[./0-9A-Za-z]{19}")
_CRYPT_SCHEMES = {"CRYPT": None, "DES-CRYPT": None, "MD5-CRYPT": "$1$", "MD5": "$1$",
                  "SHA256-CRYPT": "$5$", "SHA512-CRYPT": "$6$"}
_SALTED = {"SSHA256": hashlib.sha256, "SSHA512": hashlib.sha512}
_PLAIN = frozenset({"PLAIN", "CLEAR", "CLEARTEXT", "PLAINTEXT"})
_ENCODINGS = {"": "B64", "B64": "B64", "BASE64": "B64", "HEX": "HEX"}


class UnknownScheme(ValueError):
    """The stored hash uses a scheme this server can't verify."""


def hash_bcrypt(password: bytes, rounds: int = 12) -> str:
    """A new bcrypt hash, as ``pop3sf-admin`` stores it."""
    import bcrypt  # only bcrypt hashes need it; start-up doesn't

    return bcrypt.hashpw(password[:BCRYPT_MAX], bcrypt.gensalt(rounds=rounds)).decode("ascii")


def check_bcrypt(stored: str | bytes, password: bytes) -> bool:
    """bcrypt through libcrypt when it is there: ctypes releases the GIL for the whole hash, so
    the authentication pool really uses every core (Debian's bcrypt module does not scale)."""
    stored_b = stored.encode("ascii") if isinstance(stored, str) else stored
    if b"\0" in password:
        return False
    if _load_crypt_r() is not None:
        computed = crypt(password[:BCRYPT_MAX], stored_b.decode("ascii", "replace"))
        return computed is not None and hmac.compare_digest(
            computed.encode("ascii", "replace"), stored_b)
    try:
        import bcrypt

        return bcrypt.checkpw(password[:BCRYPT_MAX], stored_b)
    except ValueError:
        return False


# --- libcrypt -----------------------------------------------------------------------------

_crypt_lock = threading.Lock()
_crypt_r: Any = None  # the ctypes function, once loaded
_crypt_missing = False


def _load_crypt_r() -> Any:
    global _crypt_r, _crypt_missing
    if _crypt_r is not None or _crypt_missing:
        return _crypt_r
    with _crypt_lock:
        if _crypt_r is None and not _crypt_missing:
            _crypt_r = _crypt_r_from("libcrypt.so.1")
            if _crypt_r is None:
                import ctypes.util  # runs ldconfig: only where the usual name is missing

                _crypt_r = _crypt_r_from(ctypes.util.find_library("crypt"))
            _crypt_missing = _crypt_r is None
    return _crypt_r


def _crypt_r_from(library: str | None) -> Any:
    if not library:
        return None
    try:
        func = ctypes.CDLL(library, use_errno=True).crypt_r
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_char_p
    func.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    return func


def crypt_available() -> bool:
    """Whether the system's libcrypt (``crypt_r``) could be loaded."""
    return _load_crypt_r() is not None


def crypt(password: bytes, setting: str) -> str | None:
    """crypt(3) of ``password`` with ``setting`` (a salt or a whole hash); None on failure.

    Each call gets its own zeroed ``struct crypt_data``, so calls from many threads are safe.
    """
    func = _load_crypt_r()
    if func is None:
        raise UnknownScheme("crypt (libcrypt unavailable)")
    if b"\0" in password or len(password) >= CRYPT_MAX_PASSPHRASE:
        return None
    try:
        setting_b = setting.encode("ascii")
    except UnicodeEncodeError:
        return None
    data = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
    result = func(password, setting_b, data)
    if not result or result.startswith(b"*"):  # libxcrypt's failure tokens are "*0" / "*1"
        return None
    return result.decode("ascii", "replace")


def check_crypt(stored: str, password: bytes) -> bool:
    """Verify against a crypt(3) hash; bcrypt hashes go to the bcrypt module."""
    if stored.startswith(_BCRYPT_PREFIXES):
        return check_bcrypt(stored, password)
    computed = crypt(password, stored)
    if computed is None:
        return False
    return hmac.compare_digest(computed.encode("ascii", "replace"),
                               stored.encode("ascii", "replace"))


# --- salted digests -----------------------------------------------------------------------

def _decode(value: str, encoding: str) -> bytes | None:
    try:
        if encoding == "HEX":
            return bytes.fromhex(value)
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return None


def check_salted(scheme: str, value: str, password: bytes, encoding: str = "B64") -> bool:
    """``{SSHA256}``/``{SSHA512}``: encoding of ``digest(password + salt) + salt``."""
    algo = _SALTED[scheme]
    raw = _decode(value, encoding)
    size = algo().digest_size
    if raw is None or len(raw) <= size:
        return False
    digest, salt = raw[:size], raw[size:]
    return hmac.compare_digest(algo(password + salt).digest(), digest)


def hash_salted(scheme: str, password: bytes, salt: bytes) -> str:
    """A ``{SSHA256}``/``{SSHA512}`` secret (used by tests and migrations)."""
    algo = _SALTED[scheme]
    encoded = base64.b64encode(algo(password + salt).digest() + salt).decode("ascii")
    return "{" + scheme + "}" + encoded


# --- dispatch -----------------------------------------------------------------------------

def split_scheme(stored: str) -> tuple[str, str]:
    """``("SCHEME", value)`` of a stored secret; ``("", stored)`` when it has no prefix."""
    if stored.startswith("{"):
        scheme, sep, value = stored[1:].partition("}")
        if sep:
            return scheme.upper(), value
    return "", stored


def scheme_of(stored: str) -> str:
    """The scheme of a secret :func:`verify` can check (``CRYPT`` for an un-prefixed crypt(3)
    hash, ``BLF-CRYPT`` for a bare bcrypt one); :class:`UnknownScheme` for any other."""
    kind, scheme, _ = _classify(stored)
    if not kind:
        raise UnknownScheme(_unknown_name(stored, scheme))
    return scheme


def _unknown_name(stored: str, scheme: str) -> str:
    """How an unknown scheme is named in errors and logs: never any part of the secret."""
    if stored.startswith("{"):
        return "".join(c for c in scheme[:32] if c.isprintable())
    return "(no {SCHEME} prefix and not a crypt hash)"


def _classify(stored: str) -> tuple[str, str, str]:
    """(kind, scheme, value): kind is plain, salted, bcrypt, crypt or "" (unknown);
    ``scheme`` keeps an encoding suffix (``SSHA256.HEX``)."""
    scheme, value = split_scheme(stored)
    if not scheme:
        if stored.startswith(_BCRYPT_PREFIXES):
            return "bcrypt", "BLF-CRYPT", stored
        return ("crypt" if _CRYPT_SHAPE.fullmatch(stored) else ""), "CRYPT", stored
    base, _, encoding = scheme.partition(".")
    if encoding not in _ENCODINGS:
        return "", scheme, value
    if base in _PLAIN:
        return "plain", scheme, value
    if base in _SALTED:
        return "salted", scheme, value
    if encoding:
        return "", scheme, value
    if scheme in ("BLF-CRYPT", "BCRYPT"):
        return "bcrypt", scheme, value
    if scheme in _CRYPT_SCHEMES:
        return "crypt", scheme, value
    return "", scheme, value


def is_supported(stored: str) -> bool:
    """Whether :func:`verify` can check this secret (instead of raising UnknownScheme)."""
    kind = _classify(stored)[0]
    return bool(kind) and (kind != "crypt" or crypt_available())


def verify(stored: str, password: bytes) -> bool:
    """Check a password against a stored secret: ``{SCHEME}value`` or a bare crypt(3) hash.

    Raises :class:`UnknownScheme` for a scheme it can't check (the caller denies the login).
    """
    kind, scheme, value = _classify(stored)
    base, _, encoding = scheme.partition(".")
    encoding = _ENCODINGS.get(encoding, "B64")
    if kind == "plain":
        if scheme == base:
            return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), password)
        raw = _decode(value, encoding)
        return raw is not None and hmac.compare_digest(raw, password)
    if kind == "salted":
        return check_salted(base, value, password, encoding)
    if kind == "bcrypt":
        return check_bcrypt(value, password)
    if kind == "crypt":
        prefix = _CRYPT_SCHEMES[scheme]
        if prefix is not None and not value.startswith(prefix):
            return False
        return check_crypt(value, password)
    raise UnknownScheme(_unknown_name(stored, scheme))


# --- the same time for every account -------------------------------------------------------
#
# An attempt must not show whether its name exists, nor whether that account is broken or has a
# cheap hash. The rule: every attempt spends one verification of the adapter's *reference*
# secret, the one unknown names are dummy-checked against: the source's most common kind of
# hash (its cost class; a tie goes to the slower kind), or what ``pop3sf-admin`` writes. An
# account whose own hash costs the same (same scheme and cost parameters) is verified alone; any
# other is verified and then the reference is dummy-checked too, so among bcrypt accounts a
# {PLAIN} or {SSHA512} one costs the reference plus microseconds. Padding by a real hash, not a
# sleep, keeps it equal under load. What this can't hide: an account whose hash is *slower* than
# the reference (bcrypt among mostly {PLAIN} accounts, or cost 14 among cost 12) - nothing short
# of padding the majority up to the minority would, which would make most logins pay for the
# few; such hashes stand out only to the admin who chose them.


def cost_class(stored: str) -> str:
    """What decides how long checking ``stored`` takes: its algorithm and cost parameters
    (``bcrypt$12``, ``$6$rounds=5000``, ``$y$j9T``); "" for the cheap ones (a comparison, one
    salted digest, MD5 or DES crypt) and for schemes :func:`verify` can't check."""
    kind, _, value = _classify(stored)
    if kind not in ("bcrypt", "crypt") or not value.startswith("$") or value.startswith("$1$"):
        return ""
    if value.startswith(_BCRYPT_PREFIXES):
        return "bcrypt$" + value[4:6]  # $2a$, $2b$, $2y$: the same work for the same cost
    ident, _, rest = value[1:].partition("$")
    params = rest.partition("$")[0]
    if ident in ("5", "6") and not params.startswith("rounds="):
        params = "rounds=5000"  # the default, implied when left out
    elif ident == "7":
        params = params[:11]  # scrypt: N, r and p run straight into the salt
    return f"${ident}${params}"


def bcrypt_class(rounds: int) -> str:
    """The :func:`cost_class` of a bcrypt hash of ``rounds``, without hashing one."""
    return f"bcrypt${rounds:02d}"


def reference(secrets: Iterable[str]) -> str | None:
    """The secret a source's dummy checks imitate: one of its most common cost class (a tie
    goes to a slow class); the accounts of other classes are padded up to it."""
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for stored in secrets:
        if is_supported(stored):
            kind = cost_class(stored)
            counts[kind] += 1
            first.setdefault(kind, stored)
    if not counts:
        return None
    return first[max(counts, key=lambda kind: (counts[kind], kind != ""))]


@functools.cache
def _dummy_bcrypt() -> str:
    import bcrypt

    return bcrypt.hashpw(b"pop3sf-dummy", bcrypt.gensalt(rounds=12)).decode("ascii")


def verify_padded(stored: str, password: bytes, like: str | None = None) -> bool:
    """:func:`verify`, spending at least one verification of the reference ``like`` (None:
    ``stored`` is the reference): a dummy check of ``like`` follows unless ``stored`` is of
    its cost class. Raises :class:`UnknownScheme` after the dummy check."""
    try:
        ok = verify(stored, password)
    except UnknownScheme:
        dummy_verify(password, like)
        raise
    if like is not None and not (cost_class(stored) and cost_class(stored) == cost_class(like)):
        dummy_verify(password, like)
    return ok


def verify_or_deny(stored: str, password: bytes, like: str | None = None,
                   account: str = "") -> None:
    """For adapters: raise ``AuthenticationFailed`` unless ``password`` matches ``stored``, in
    the time of the reference ``like`` (see :func:`verify_padded`). A hash of an unknown scheme
    denies the login, with a warning naming ``account`` for the admin."""
    from pop3sf.adapters.base import AuthenticationFailed

    try:
        ok = verify_padded(stored, password, like)
    except UnknownScheme as exc:
        log.warning("account %r: password hash of unknown scheme %s; login denied",
                    account, exc)
        raise AuthenticationFailed("unknown password scheme") from None
    if not ok:
        raise AuthenticationFailed("wrong password")


def dummy_verify(password: bytes, like: str | None = None) -> None:
    """Spend about what verifying against ``like`` (default: a cost-12 bcrypt) would cost.

    ``like`` is a real user's stored secret: the check runs the same scheme with the same cost
    parameters, and its result is thrown away.
    """
    try:
        verify(like or _dummy_bcrypt(), password)
    except UnknownScheme:
        pass
