"""Wire form (docs/protocol.md §9-10): CRLF, dot-stuffing, TOP and downgrade, chunking-invariant."""

from __future__ import annotations

import base64
import email.header
import email.policy
import io
import re
import time

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


# --- RFC 2047 shape of the downgrade ---------------------------------------------------------

ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
FIELD_NAMES = st.sampled_from([b"Subject", b"Comments", b"X-" + b"n" * 70, b"X-" + b"n" * 90])
VALUE_PARTS = st.sampled_from([
    b"a", b"Zz", b" ", b"   ", b" " * 80, b"\t", b"\n ", b"\n\t", b"=?", b"?=", b"=?utf-8?B?QQ==?=",
    b"x" * 30, b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", "Grüße".encode() * 9,
    "漢字".encode() * 13, b"\xff", b"\xe2\x82",
])
values = st.lists(VALUE_PARTS, max_size=60).map(b"".join)


def squeeze(text: bytes) -> bytes:
    return b" ".join(text.split())


def decoded(value: bytes) -> bytes:
    """The octets a MIME reader recovers from a downgraded field value (whitespace aside)."""
    chunks = email.header.decode_header(value.decode("ascii"))
    return b" ".join(c if isinstance(c, bytes) else c.encode("ascii") for c, _ in chunks)


def decoded_exactly(value: bytes) -> bytes:
    """RFC 2047 section 6.2 by the letter: whitespace between adjacent encoded-words vanishes,
    all other whitespace stays."""
    out, after_word = b"", False
    for ws, word in re.findall(rb"([ \t]*)([^ \t]+)", value):
        m = ENCODED_WORD.fullmatch(word)
        out += (b"" if m and after_word else ws) + (base64.b64decode(m.group(3)) if m else word)
        after_word = m is not None
    return out


def check_rfc2047_lines(field: bytes) -> None:
    """Lines holding an encoded-word are <= 76 characters, each word <= 75; a word in UTF-8
    holds whole characters only; continuation lines start with whitespace and hold something."""
    lines = field.split(b"\n")
    for i, line in enumerate(lines):
        assert max(line, default=0) < 0x80
        if i:
            assert line[:1] in (b" ", b"\t") and line.strip(), lines
        if b"=?" in line:
            assert len(line) <= 76, lines
        for m in ENCODED_WORD.finditer(line):
            assert len(m.group(0)) <= 75, m.group(0)
            assert m.group(2) in (b"B", b"b")
            payload = base64.b64decode(m.group(3), validate=True)
            if m.group(1).lower() == b"utf-8":
                payload.decode("utf-8")  # no character cut in two


@settings(max_examples=500)
@given(FIELD_NAMES, values, st.integers(1, 9))
def test_downgraded_unstructured_field_is_rfc2047_and_decodes_back(
        name: bytes, value: bytes, chunk: int) -> None:
    value = "é".encode() + value  # always an 8-bit field
    out = downgrade_header_section(name + b": " + value + b"\nX-Plain: =?ok?=\n\n")
    field, sep, rest = out.partition(b"\nX-Plain: =?ok?=\n")
    assert sep and rest == b"\n"  # other fields untouched
    assert field.startswith(name + b":")
    check_rfc2047_lines(field)
    unfolded = field[len(name) + 1:].replace(b"\n", b"")
    assert squeeze(decoded(unfolded)) == squeeze(value.replace(b"\n", b""))
    assert decoded_exactly(unfolded).strip(b" \t") == value.replace(b"\n", b"").strip(b" \t")
    msg = name + b": " + value + b"\n\nbody\n"
    down = encode(msg, chunk, downgrade=True, stuff=False)
    assert measure(io.BytesIO(msg), chunk).downgraded_size == len(down)


NAMES = st.lists(st.sampled_from(["Zoë", "Jörg", "Ann", " ", "Łukasz", "李", "ü" * 40]),
                 min_size=1, max_size=12).map("".join).map(str.strip).filter(bool)


@settings(max_examples=300)
@given(st.lists(st.tuples(NAMES, st.booleans()), min_size=1, max_size=6))
def test_downgraded_address_field_is_rfc2047_and_keeps_names(
        people: list[tuple[str, bool]]) -> None:
    def addr(i: int, ascii_addr: bool) -> str:
        return f"u{i}@example.org" if ascii_addr else f"ü{i}@example.org"

    value = ", ".join(f"{name} <{addr(i, a)}>" for i, (name, a) in enumerate(people))
    out = downgrade_header_section(b"To: " + value.encode() + b"\n\n")
    field = out[:-2]
    check_rfc2047_lines(field)
    expected = ", ".join(f"{n} <{addr(i, a)}>" + ("" if a else " :;")
                         for i, (n, a) in enumerate(people))
    assert squeeze(decoded(field[3:].replace(b"\n", b""))).decode() == " ".join(expected.split())
    # Python's own parser finds the same mailboxes and groups (it keeps the whitespace between
    # adjacent encoded-words in a phrase, against RFC 2047 section 6.2, hence the squeezing)
    msg = email.message_from_bytes(out, policy=email.policy.default)
    found = []
    for group in msg["To"].groups:
        if group.display_name is None:
            found += [("".join(a.display_name.split()), a.addr_spec) for a in group.addresses]
        else:  # a non-ASCII address became an empty group named after the whole mailbox
            assert not group.addresses
            found.append(("".join(group.display_name.split()), ""))
    assert found == [("".join(n.split()), addr(i, a)) if a
                     else ("".join(f"{n}<{addr(i, a)}>".split()), "")
                     for i, (n, a) in enumerate(people)]


def test_downgrading_the_largest_header_takes_linear_time() -> None:
    """A 1 MB header of short 8-bit words (one long run) or many mailboxes: no quadratic work."""
    for header in (b"Subject: " + "é ".encode() * 300_000 + b"\n\n",
                   b"Subject: " + b"\xe9 a " * 200_000 + b"\n\n",
                   b"To: " + ", ".join(f"Jörg{i} <j{i}@x.org>" for i in range(40_000)).encode()
                   + b"\n\n"):
        start = time.monotonic()
        out = downgrade_header_section(header)
        assert time.monotonic() - start < 5
        assert max(out) < 0x80 and out.endswith(b"\n\n")
