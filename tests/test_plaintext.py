"""adapters/plaintext.py: text wrapped as RFC 5322 messages; deterministic, exact, streamable."""

from __future__ import annotations

import datetime
import email
import email.header
import email.policy
import io

from hypothesis import given, settings
from hypothesis import strategies as st
from pop3sf.adapters.plaintext import (
    PlaintextMessage,
    decode_text,
    message_id,
    subject_for,
    wrap_plaintext,
)

from pop3sf.wire import measure, wire_bytes

WHEN = datetime.datetime(2024, 3, 1, 12, 30, 45, 123456, tzinfo=datetime.UTC)
META = dict(uid="u1", name="report.txt", date=WHEN, from_addr="pop3sf <p@localhost>",
            to_addr="alice@localhost")


def wrap(text: bytes, **over: object) -> bytes:
    kw = {**META, **over}
    return wrap_plaintext(text, **kw)


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_same_input_same_bytes() -> None:
    text = "Grüße aus Köln\nzweite Zeile\n".encode()
    assert wrap(text) == wrap(text)
    assert wrap(text) != wrap(text, uid="u2")  # Message-ID follows the uid


def test_headers_and_crlf() -> None:
    raw = wrap(b"hello\nworld")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")  # only CRLF line ends
    assert raw.endswith(b"\r\n")
    assert wire_bytes(raw) == raw  # listed size == len(raw)
    names = [line.split(b":")[0] for line in head.split(b"\r\n")]
    assert names == [b"Date", b"From", b"To", b"Subject", b"Message-ID", b"MIME-Version",
                     b"Content-Type", b"Content-Transfer-Encoding"]
    msg = parse(raw)
    assert msg["Date"] == "Fri, 01 Mar 2024 12:30:45 +0000"
    assert msg["Message-ID"] == message_id("u1")
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert msg.get_content_charset() == "utf-8"
    assert body == b"hello\r\nworld\r\n"


def test_dates_are_utc() -> None:
    cet = datetime.timezone(datetime.timedelta(hours=1))
    local = WHEN.astimezone(cet)
    assert wrap(b"x", date=local) == wrap(b"x")
    naive = WHEN.replace(tzinfo=None)
    assert wrap(b"x", date=naive) == wrap(b"x")


def test_non_ascii_body_and_subject() -> None:
    text = "Příliš žluťoučký kůň úpěl ďábelské ódy — 東京\n".encode()
    msg = parse(wrap(text, name="Zpráva č. 1 — 東京.txt"))
    assert msg.get_content().replace("\r\n", "\n") == text.decode()
    assert str(msg["Subject"]) == "Zpráva č. 1 — 東京.txt"
    raw_subject = wrap(text, name="Zpráva č. 1 — 東京.txt").split(b"Subject:")[1]
    assert raw_subject.split(b"\r\nMessage-ID")[0].isascii()  # RFC 2047, not raw UTF-8


def test_long_subject_is_folded_and_shortened() -> None:
    raw = wrap(b"x", name="ž" * 500)
    head = raw.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert str(parse(raw)["Subject"]) == "ž" * 200


def test_subject_sanitised_no_header_injection() -> None:
    raw = wrap(b"x", name="evil\r\nBcc: victim@example.com\x00\x1b[31m.txt")
    assert b"\r\nBcc:" not in raw
    assert "Bcc" not in parse(raw)  # no extra field
    assert str(parse(raw)["Subject"]) == "evil Bcc: victim@example.com [31m.txt"
    assert subject_for("  \t ") == "(no name)"
    # A name that looks like an encoded word is encoded itself, so clients don't decode it.
    assert str(parse(wrap(b"x", name="=?utf-8?B?QQ==?="))["Subject"]) == "=?utf-8?B?QQ==?="


def test_surrogate_file_names() -> None:
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")  # a Latin-1 file name on disk
    assert str(parse(wrap(b"x", name=name))["Subject"]) == "caf\ufffd.txt"


def test_non_ascii_display_name_encoded() -> None:
    raw = wrap(b"x", from_addr="Jiří Novák <jiri@example.com>")
    line = raw.split(b"From: ")[1].split(b"\r\n")[0]
    assert line.isascii()
    assert str(parse(raw)["From"]) == "Jiří Novák <jiri@example.com>"


def test_windows_1252_text_becomes_utf8() -> None:
    msg = parse(wrap(b"caf\xe9 \x80 \x81\n"))
    assert msg.get_content().replace("\r\n", "\n") == "café € \x81\n"
    assert decode_text(b"caf\xe9") == "café"
    assert decode_text("café".encode()) == "café"


def test_long_lines_and_nul_use_quoted_printable() -> None:
    line = "ž" * 600  # 1200 octets
    raw = wrap((line + "\nshort\n").encode())
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert all(len(x) <= 998 for x in raw.split(b"\r\n"))
    assert msg.get_content().replace("\r\n", "\n") == line + "\nshort\n"
    raw = wrap(b"a\x00b\n")
    assert parse(raw)["Content-Transfer-Encoding"] == "quoted-printable"
    assert b"\x00" not in raw
    payload = parse(raw).get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.replace(b"\r\n", b"\n") == b"a\x00b\n"
    assert parse(wrap(b"x" * 998))["Content-Transfer-Encoding"] == "8bit"  # limit inclusive


def test_line_end_forms() -> None:
    assert wrap(b"a\r\nb\rc\nd").split(b"\r\n\r\n", 1)[1] == b"a\r\nb\r\nc\r\nd\r\n"


def test_stream_equals_bytes_and_measures_exactly() -> None:
    text = ("Grüße\r\n" * 1000 + "x" * 5000 + "\r").encode()
    expected = wrap(text)
    stream = PlaintextMessage(io.BytesIO(text), chunk=7, **META)
    assert io.BufferedReader(stream).read() == expected
    m = measure(PlaintextMessage(io.BytesIO(text), **META))
    assert m.size == len(expected) and not m.utf8_header


def test_stream_close_closes_source() -> None:
    src = io.BytesIO(b"abc")
    stream = PlaintextMessage(src, **META)
    stream.close()
    assert src.closed


@settings(max_examples=200, deadline=None)
@given(text=st.binary(max_size=3000) | st.text(max_size=1500).map(str.encode),
       chunk=st.integers(1, 64))
def test_any_text_wraps_identically_in_chunks(text: bytes, chunk: int) -> None:
    expected = wrap(text)
    stream = PlaintextMessage(io.BytesIO(text), chunk=chunk, **META)
    assert io.BufferedReader(stream).read() == expected
    assert wire_bytes(expected) == expected
    assert all(len(line) <= 998 for line in expected.split(b"\r\n"))


def test_long_ascii_subject_folded() -> None:
    name = " ".join(["word"] * 30) + ".txt"
    raw = wrap(b"x", name=name)
    head = raw.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert str(parse(raw)["Subject"]) == name
