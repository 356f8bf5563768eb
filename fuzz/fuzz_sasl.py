#!/usr/bin/env python3
"""Coverage-guided fuzzing of the SASL PLAIN/LOGIN decoding (pop3sf.sasl, RFC 4616/5034).

Invariants: only :class:`sasl.SaslError` ever escapes, its text is one of the fixed messages
(never client data, docs/protocol.md §3); strict base64 round-trips; a well-formed PLAIN response
yields exactly its user and password; a different authorization identity is always refused.
"""

from __future__ import annotations

import base64
import sys

import atheris

with atheris.instrument_imports(include=["pop3sf"]):
    from pop3sf import sasl

from common import main

SAFE_TEXTS = {"Authentication cancelled", "Invalid base64 data", "Malformed PLAIN response",
              "Authorization identity must match the authentication identity",
              "Empty user name"}


def _step(exchange: sasl.Exchange, line: bytes) -> tuple[bytes, tuple[str, str] | None] | None:
    try:
        return exchange.step(sasl.decode_response(line))
    except sasl.SaslError as exc:
        assert str(exc) in SAFE_TEXTS, f"error text not fixed: {exc}"
        return None


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    line = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())

    # Arbitrary client lines through both mechanisms, as the session feeds them.
    for mechanism in sasl.MECHANISMS:
        exchange = sasl.Exchange(mechanism)
        challenge, creds = exchange.start(None)
        assert challenge.startswith(b"+ ") and challenge.endswith(b"\r\n") and creds is None
        for piece in (line, rest):
            result = _step(exchange, piece)
            if result is None or result[1] is not None:
                break
            assert result[0] == sasl.LOGIN_PASS_PROMPT

    # Strict base64: what we encode decodes back, surrounding whitespace tolerated.
    encoded = base64.b64encode(rest)
    if encoded:
        assert sasl.decode_response(b" " + encoded + b"\r") == rest
    # A well-formed PLAIN response gives its parts back.
    user, password = line.replace(b"\0", b""), rest.replace(b"\0", b"")
    if user:
        assert sasl.parse_plain(b"\0" + user + b"\0" + password) == \
            (sasl.to_text(user), sasl.to_text(password))
        assert sasl.parse_plain(user + b"\0" + user + b"\0" + password)[0] == sasl.to_text(user)
        other = user + b"x"
        try:
            sasl.parse_plain(other + b"\0" + user + b"\0" + password)
        except sasl.SaslError as exc:
            assert "Authorization identity" in str(exc)
        else:
            raise AssertionError("a different authorization identity was accepted")
    # to_text is lossless for anything that is not valid UTF-8.
    try:
        rest.decode("utf-8")
    except UnicodeDecodeError:
        assert sasl.to_text(rest).encode("utf-8", "surrogateescape") == rest


if __name__ == "__main__":
    main(test_one_input, "sasl")
    sys.exit(0)
