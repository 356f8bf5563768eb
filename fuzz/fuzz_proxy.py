#!/usr/bin/env python3
"""Coverage-guided fuzzing of the PROXY protocol header parser (pop3sf.proxy, docs/deployment.md).

The parser reads bytes straight from the network before anything else (no greeting, no TLS), so
it must survive anything. Invariants, for any bytes and any listener mode (v1, v2, any):

* the answer is NEED_MORE, Done or Invalid, never an exception;
* Done consumed at most what was given, at least one octet; re-parsing exactly the consumed
  bytes, or them plus anything, gives the same answer; every shorter prefix is NEED_MORE;
* a decided answer (Done or Invalid) on a prefix stays the same when more bytes arrive, so a
  header split across reads is judged as if it came at once;
* a source address is a valid IPv4/IPv6 address and its port is 0-65535;
* an Invalid reason is a short ASCII text of our own (never the client's bytes).
"""

from __future__ import annotations

import socket
import sys

import atheris

with atheris.instrument_imports(include=["pop3sf"]):
    from pop3sf.proxy import NEED_MORE, Done, Invalid, parse

from common import main

MODES = ((1,), (2,), (1, 2))


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    versions = MODES[data[0] % 3]
    cut = data[1]
    buf = data[2:]
    result = parse(buf, versions)
    assert result is NEED_MORE or isinstance(result, Done | Invalid), result
    if isinstance(result, Invalid):
        assert result.reason.isascii() and len(result.reason) < 80, result.reason
    if isinstance(result, Done):
        assert 0 < result.consumed <= len(buf)
        head = buf[:result.consumed]
        assert parse(head, versions) == result
        assert parse(bytearray(head) + b"\r\nPROXY", versions) == result
        for n in range(result.consumed):
            assert parse(head[:n], versions) is NEED_MORE, n
        source = result.header.source
        if source is not None:
            family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
            socket.inet_pton(family, source[0])
            assert 0 <= source[1] <= 65535
    early = parse(buf[:cut], versions)
    if early is not NEED_MORE:
        assert early == result, (early, result)


if __name__ == "__main__":
    main(test_one_input, "proxy")
    sys.exit(0)
