"""Wire form (SPEC §P3, §P4): CRLF, dot-stuffing, TOP and downgrade, invariant under chunking."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from pop3sf.wire import WireEncoder, downgrade_header_section, measure, wire_bytes

ALPHABET = st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\xc3\xa9", b" "])
messages = st.lists(ALPHABET, max_size=60).map(b"".join)


def reference(msg: bytes, stuff: bool = True) -> bytes:
    """A slow, obviously correct model of the wire form."""
    text = msg.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not text:
        return b""
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if stuff:
        lines = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in lines)


def encode(msg: bytes, chunk: int, **kw: object) -> bytes:
    enc = WireEncoder(**kw)  # type: ignore[arg-type]
    out = b"".join(enc.feed(msg[i:i + chunk]) for i in range(0, len(msg), chunk))
    return out + enc.finish()


@settings(max_examples=400)
@given(messages, st.integers(1, 9))
def test_encoding_matches_model_at_any_chunking(msg: bytes, chunk: int) -> None:
    assert encode(msg, chunk) == reference(msg)
    assert encode(msg, chunk, stuff=False) == reference(msg, stuff=False)
    assert measure(io.BytesIO(msg), chunk).size == len(reference(msg, stuff=False))


@settings(max_examples=300)
@given(messages, st.integers(0, 4), st.integers(1, 9))
def test_top_matches_model(msg: bytes, n: int, chunk: int) -> None:
    lines = reference(msg, stuff=False).split(b"\r\n")[:-1]
    if b"" in lines:
        blank = lines.index(b"")
        lines = lines[: blank + 1 + n]
    expected = reference(b"".join(line + b"\n" for line in lines))
    assert encode(msg, chunk, top_lines=n) == expected


def test_final_crlf_added_and_counted() -> None:
    assert wire_bytes(b"Subject: x\n\nbody") == b"Subject: x\r\n\r\nbody\r\n"
    assert measure(io.BytesIO(b"Subject: x\n\nbody")).size == 20
    assert wire_bytes(b"") == b""


def test_downgrade_only_headers_and_sizes_exact() -> None:
    msg = "Subject: Grüße\nTo: Zoë <zoe@example.org>, ü@example.org\nX-Plain: ok\n\nKörper é\n"
    raw = msg.encode()
    m = measure(io.BytesIO(raw))
    assert m.utf8_header
    out = encode(raw, 7, downgrade=True, stuff=False)
    assert m.downgraded_size == len(out)
    header, _, body = out.partition(b"\r\n\r\n")
    assert max(header) < 0x80 and body == "Körper é\r\n".encode()
    assert b"=?utf-8?B?" in header and b"X-Plain: ok" in header
    assert b":;" in header  # the non-ASCII address became an empty group (RFC 6858)


def test_body_only_8bit_is_not_internationalized() -> None:
    m = measure(io.BytesIO("Subject: plain\n\nKörper\n".encode()))
    assert not m.utf8_header and m.downgraded_size is None


def test_downgrade_invalid_utf8_uses_unknown_8bit() -> None:
    out = downgrade_header_section(b"Subject: caf\xe9\n\n")
    assert b"unknown-8bit" in out and max(out) < 0x80
