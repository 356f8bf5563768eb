"""SASL PLAIN and LOGIN for POP3 AUTH (RFC 5034, RFC 4616), as pure functions of the client's lines.

Kept free of I/O so the exchange can be fuzzed on its own.
"""

from __future__ import annotations

import binascii
import unicodedata

MECHANISMS = ("PLAIN", "LOGIN")
LOGIN_USER_PROMPT = b"+ VXNlcm5hbWU6\r\n"  # "Username:"
LOGIN_PASS_PROMPT = b"+ UGFzc3dvcmQ6\r\n"  # "Password:"
EMPTY_CHALLENGE = b"+ \r\n"


class SaslError(Exception):
    """The exchange failed; ``str()`` is safe to show (never contains client data)."""


class Cancelled(SaslError):
    pass


def decode_response(line: bytes) -> bytes:
    """A client response line: ``*`` cancels, ``=`` is empty, otherwise strict base64."""
    line = line.strip()
    if line == b"*":
        raise Cancelled("Authentication cancelled")
    if line == b"=":
        return b""
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SaslError("Invalid base64 data") from None


def to_text(data: bytes) -> str:
    """UTF-8 (NFC) where valid; otherwise the octets kept losslessly via surrogateescape."""
    try:
        return unicodedata.normalize("NFC", data.decode("utf-8"))
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogateescape")


def parse_plain(data: bytes) -> tuple[str, str]:
    """``authzid NUL authcid NUL passwd`` -> (user, password); a different authzid is refused."""
    parts = data.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise SaslError("Malformed PLAIN response")
    authzid, authcid, password = parts
    if authzid and authzid != authcid:
        raise SaslError("Authorization identity must match the authentication identity")
    return to_text(authcid), to_text(password)


class Exchange:
    """State of one AUTH exchange: feed it decoded responses until it yields credentials."""

    __slots__ = ("mechanism", "user")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.user: str | None = None

    def start(self, initial: bytes | None) -> tuple[bytes, tuple[str, str] | None]:
        """(challenge to send, or b"" when done; credentials when complete)."""
        if initial is None:
            return (EMPTY_CHALLENGE if self.mechanism == "PLAIN" else LOGIN_USER_PROMPT), None
        return self.step(initial)

    def step(self, data: bytes) -> tuple[bytes, tuple[str, str] | None]:
        if self.mechanism == "PLAIN":
            return b"", parse_plain(data)
        if self.user is None:
            if not data:
                raise SaslError("Empty user name")
            self.user = to_text(data)
            return LOGIN_PASS_PROMPT, None
        return b"", (self.user, to_text(data))
