#!/usr/bin/env python3
"""Coverage-guided fuzzing of the wire encoder (pop3sf.wire, docs/protocol.md §9/§10).

Invariants, for any message bytes and any chunking:

* the unstuffed output is the same however the message is cut into chunks, and its length is
  ``measure(...).size`` — the size STAT/LIST announce is exactly what RETR sends;
* the output is CRLF-only (no bare CR or LF) and ends with CRLF unless empty;
* dot-stuffed output unstuffs to the unstuffed output;
* TOP output is a prefix of the whole message's output, chunking-invariant too;
* a downgraded message has a 7-bit header section, an unchanged body, and the size
  ``measure(...).downgraded_size``;
* each downgraded field keeps RFC 2047's limits (a line holding an encoded-word at most 76
  characters, a word at most 75, no UTF-8 character cut in two) and an unstructured one decodes
  back to exactly its original value.
"""

from __future__ import annotations

import base64
import io
import re
import sys

import atheris

with atheris.instrument_imports(include=["pop3sf"]):
    from pop3sf.wire import (
        HeaderTooLarge,
        WireEncoder,
        downgrade_header_section,
        header_section,
        measure,
        wire_bytes,
    )

from common import main


def encode(message: bytes, cuts: list[int], **options: object) -> bytes:
    encoder = WireEncoder(**options)  # type: ignore[arg-type]
    out = bytearray()
    for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True):
        if encoder.done:
            break
        out += encoder.feed(message[a:b])
    return bytes(out + encoder.finish())


def unstuff(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def check_crlf(data: bytes) -> None:
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n"), "bare CR or LF"
    assert not data or data.endswith(b"\r\n"), "no final CRLF"


ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?[bB]\?([^?\s]*)\?=")
OUR_WORD = re.compile(rb"=\?(utf-8|unknown-8bit)\?B\?")
FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
ADDRESS_FIELDS = {p + n for p in (b"", b"resent-") for n in (b"from", b"sender", b"reply-to",
                                                            b"to", b"cc", b"bcc")}


def rfc2047_decode(value: bytes) -> bytes:
    """An unfolded field value as a MIME reader sees it: whitespace between two adjacent
    encoded-words vanishes, everything else stays."""
    out, after_word = b"", False
    for ws, word in re.findall(rb"([ \t]*)([^ \t]+)", value):
        m = ENCODED_WORD.fullmatch(word)
        out += (b"" if m and after_word else ws) + (base64.b64decode(m.group(2)) if m else word)
        after_word = m is not None
    return out


def check_downgraded_field(field: bytes) -> None:
    """One LF-form header field with 8-bit octets, downgraded on its own."""
    out = downgrade_header_section(field)
    name = FIELD_NAME.match(field)
    address = name is not None and name.group(1).lower() in ADDRESS_FIELDS
    literal = address and b"=?" in field  # ASCII addresses are kept as written, =? or not
    for line in out.split(b"\n"):
        if OUR_WORD.search(line) and not literal:
            assert len(line) <= 76, f"line of {len(line)} characters: {line!r}"
        for m in ENCODED_WORD.finditer(line):
            if not literal:
                assert len(m.group(0)) <= 75, f"encoded-word of {len(m.group(0))}"
                if m.group(1) == b"utf-8":
                    base64.b64decode(m.group(2)).decode("utf-8")
    if address:
        return
    value = field[name.end():] if name else field
    prefix = name.group(1) + b":" if name else b"X-Invalid-Header:"
    assert out.startswith(prefix)
    unfolded = out[len(prefix):].replace(b"\n", b"")
    assert rfc2047_decode(unfolded).strip(b" \t") == value.replace(b"\n", b"").strip(b" \t"), \
        "the downgraded field decodes to something else"


def check_fields(message: bytes) -> None:
    section = header_section(message.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
    fields: list[bytes] = []
    for line in section.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        elif line:
            fields.append(line)
    for field in fields:
        if max(field) >= 0x80:
            check_downgraded_field(field)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    ncuts = fdp.ConsumeIntInRange(0, 6)
    top = fdp.ConsumeIntInRange(0, 5)
    message = fdp.ConsumeBytes(fdp.remaining_bytes())
    cuts = sorted({fdp.ConsumeIntInRange(0, len(message)) for _ in range(ncuts)} |
                  {len(message) // 2} if message else set())
    cuts = [c for c in cuts if 0 < c < len(message)]

    plain = encode(message, [], stuff=False)
    assert plain == wire_bytes(message)
    assert encode(message, cuts, stuff=False) == plain, "depends on chunking"
    m = measure(io.BytesIO(message), chunk=max(1, len(message) // 3 or 1))
    assert m.size == len(plain), f"measured {m.size}, sent {len(plain)}"
    check_crlf(plain)

    stuffed = encode(message, cuts)
    check_crlf(stuffed)
    assert unstuff(stuffed) == plain
    assert not any(line == b"." for line in stuffed.split(b"\r\n")[:-1]), "a lone dot leaked"

    top_out = encode(message, cuts, stuff=False, top_lines=top)
    assert top_out == encode(message, [], stuff=False, top_lines=top)
    assert plain.startswith(top_out), "TOP is not a prefix of the message"
    check_crlf(top_out)

    if m.utf8_header:
        try:
            down = encode(message, cuts, stuff=False, downgrade=True)
        except HeaderTooLarge:
            assert m.downgraded_size is None
            return
        assert down == encode(message, [], stuff=False, downgrade=True)
        check_crlf(down)
        assert m.downgraded_size == len(down), f"downgraded {m.downgraded_size} != {len(down)}"
        head, sep, body = down.partition(b"\r\n\r\n")
        assert max(head, default=0) < 0x80, "8-bit octets left in a downgraded header"
        if sep:
            assert plain.endswith(b"\r\n\r\n" + body) or plain.endswith(body), "body altered"
        check_fields(message)
    else:
        assert m.downgraded_size is None


if __name__ == "__main__":
    main(test_one_input, "wire")
    sys.exit(0)
