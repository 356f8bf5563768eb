"""Messages on the wire (SPEC §P3, §P4): CRLF, dot-stuffing, TOP, header downgrade, exact sizes.

Everything works on chunks so a 100 MB message never sits in memory, and every state that spans a
chunk boundary (a CR at the end of one chunk, a line start, the header/body split) is carried in
:class:`WireEncoder`. Internally text is brought to bare-LF form first, the only form in which
dot-stuffing and line counting are one ``replace``/``count`` each, then turned into CRLF.
"""

from __future__ import annotations

import base64
import email.utils
import re
from typing import BinaryIO, NamedTuple

CHUNK = 256 * 1024
#: A header section longer than this is not downgraded but refused (no client needs it).
MAX_DOWNGRADE_HEADER = 1024 * 1024


class HeaderTooLarge(ValueError):
    """The header section is too large to downgrade."""


class WireEncoder:
    """Turns a message's raw bytes into POP3 wire form, one chunk at a time.

    ``stuff``: dot-stuff (off to measure sizes). ``top_lines``: stop after the header section,
    the blank line and that many body lines (TOP). ``downgrade``: re-encode 8-bit header fields
    (RFC 6858) for clients that did not enable UTF8. When :attr:`done` turns true the rest of the
    message is not needed.
    """

    __slots__ = ("_stuff", "_cr_pending", "_at_line_start", "_in_header", "_lines_left",
                 "_header_buf", "_downgrade", "done", "_empty")

    def __init__(self, stuff: bool = True, top_lines: int | None = None,
                 downgrade: bool = False) -> None:
        self._stuff = stuff
        self._cr_pending = False
        self._at_line_start = True
        self._in_header = top_lines is not None or downgrade
        self._lines_left = top_lines
        self._downgrade = downgrade
        self._header_buf: bytearray | None = bytearray() if downgrade else None
        self._empty = True
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        if self._cr_pending:
            self._cr_pending = False
            if data[:1] == b"\n":
                data = data[1:]
        if not data:
            return b""
        if b"\r" in data:
            self._cr_pending = data[-1:] == b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._empty = False
        if self._in_header:
            data = self._header_part(data)
        elif self._lines_left is not None:
            data = self._body_lines(data)
        return self._emit(data)

    def finish(self) -> bytes:
        """What ends the message: a CRLF if the last line lacks one (nothing for an empty one)."""
        tail = b""
        if self._header_buf is not None and not self.done:
            tail = self._emit(self._flush_header(b""))
        if not self._at_line_start and not self._empty:
            tail += b"\r\n"
            self._at_line_start = True
        return tail

    def _emit(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._stuff:
            if self._at_line_start and data[:1] == b".":
                data = b"." + data
            if b"\n." in data:
                data = data.replace(b"\n.", b"\n..")
        self._at_line_start = data[-1:] == b"\n"
        return data.replace(b"\n", b"\r\n")

    def _header_part(self, data: bytes) -> bytes:
        """Pass header bytes until the blank line; then hand the rest to the body counter."""
        buf = self._header_buf
        if buf is not None:
            start = len(buf)
            buf += data
            if len(buf) > MAX_DOWNGRADE_HEADER:
                raise HeaderTooLarge("header section too large to downgrade")
            idx = 0 if bytes(buf[:1]) == b"\n" else buf.find(b"\n\n", max(0, start - 1))
            if idx < 0:
                return b""
            split = idx + 2 if idx else 1
            rest = bytes(buf[split:])
            head = self._flush_header(bytes(buf[:split]))
            return head + self._after_header(rest)
        if self._at_line_start and data[:1] == b"\n":
            return data[:1] + self._after_header(data[1:])
        idx = data.find(b"\n\n")
        if idx < 0:
            return data
        return data[: idx + 2] + self._after_header(data[idx + 2:])

    def _flush_header(self, header: bytes) -> bytes:
        buf = self._header_buf
        self._header_buf = None
        self._in_header = False
        if not header and buf:  # end of message without a blank line: all header
            header = bytes(buf)
        if not header:
            return b""
        return downgrade_header_section(header) if self._downgrade else header

    def _after_header(self, rest: bytes) -> bytes:
        self._in_header = False
        return self._body_lines(rest) if self._lines_left is not None else rest

    def _body_lines(self, data: bytes) -> bytes:
        left = self._lines_left
        assert left is not None
        if left <= 0:
            self.done = True
            return b""
        count = data.count(b"\n")
        if count < left:
            self._lines_left = left - count
            return data
        pos = -1
        for _ in range(left):
            pos = data.find(b"\n", pos + 1)
        self._lines_left = 0
        self.done = True
        return data[: pos + 1]


class Measure(NamedTuple):
    """Exact RETR size, whether the header section is 8-bit, and the downgraded size."""

    size: int
    utf8_header: bool
    downgraded_size: int | None


def _lf(data: bytes | bytearray) -> bytes:
    return bytes(data).replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _crlf_len(lf_data: bytes) -> int:
    return len(lf_data) + lf_data.count(b"\n")


def header_section(lf_data: bytes) -> bytes:
    """The header section of LF-form bytes, with its blank line if there is one."""
    if lf_data[:1] == b"\n":
        return b"\n"
    idx = lf_data.find(b"\n\n")
    return lf_data if idx < 0 else lf_data[: idx + 2]


def measure(stream: BinaryIO, chunk: int = CHUNK) -> Measure:
    """One pass over a message: everything a listing needs (SPEC §A5)."""
    enc = WireEncoder(stuff=False)
    size = 0
    head = bytearray()
    head_open = True
    while data := stream.read(chunk):
        if head_open:
            head += data
            lf = _lf(head)
            head_open = not (lf[:1] == b"\n" or b"\n\n" in lf) and len(head) <= MAX_DOWNGRADE_HEADER
        size += len(enc.feed(data))
    size += len(enc.finish())
    section = header_section(_lf(head))
    if max(section, default=0) < 0x80:
        return Measure(size, False, None)
    if len(section) > MAX_DOWNGRADE_HEADER:
        return Measure(size, True, None)
    down = downgrade_header_section(section)
    return Measure(size, True, size - _crlf_len(section) + _crlf_len(down))


def wire_bytes(message: bytes) -> bytes:
    """The unstuffed wire form of a message held in memory (its length is the listed size)."""
    enc = WireEncoder(stuff=False)
    return enc.feed(message) + enc.finish()


# --- RFC 6858 downgrade -------------------------------------------------------------------

_ADDRESS_FIELDS = frozenset(
    f"{prefix}{name}" for prefix in ("", "resent-")
    for name in ("from", "sender", "reply-to", "to", "cc", "bcc")
)
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*)$", re.S)


def _encoded_words(text: bytes) -> str:
    """RFC 2047 B-encoded words for a run of octets, each ≤ 75 characters, folded."""
    try:
        chars = text.decode("utf-8")
        charset = "utf-8"
        pieces: list[bytes] = []
        current = ""
        for ch in chars:  # never split a character across two encoded words
            if len((current + ch).encode()) > 45:
                pieces.append(current.encode())
                current = ""
            current += ch
        if current:
            pieces.append(current.encode())
    except UnicodeDecodeError:
        charset = "unknown-8bit"
        pieces = [text[i:i + 45] for i in range(0, len(text), 45)]
    return "\n ".join(f"=?{charset}?B?{base64.b64encode(p).decode()}?=" for p in pieces)


def _downgrade_unstructured(value: bytes) -> bytes:
    words = re.split(rb"([ \t\n]+)", value.strip())
    out: list[bytes] = []
    run: list[bytes] = []

    def flush() -> None:
        if run:
            out.append(_encoded_words(b" ".join(run)).encode("ascii"))
            run.clear()

    for word in words:
        if not word or word.isspace():
            continue
        if max(word) >= 0x80:
            run.append(word)
        else:
            flush()
            out.append(word)
    flush()
    return b" " + b" ".join(out)


def _downgrade_addresses(value: bytes) -> bytes:
    text = value.decode("utf-8", "surrogateescape").replace("\n", " ")
    parts: list[str] = []
    for name, addr in email.utils.getaddresses([text]):
        if not addr.isascii() or not name.isascii():
            name_b = name.encode("utf-8", "surrogateescape")
            if addr.isascii():
                encoded = _encoded_words(name_b).replace("\n ", " ")
                parts.append(f"{encoded} <{addr}>")
            else:  # no ASCII form of this address: an empty group named after it (RFC 6858 §3)
                whole = (f"{name} <{addr}>" if name else addr).encode("utf-8", "surrogateescape")
                parts.append(_encoded_words(whole).replace("\n ", " ") + " :;")
        else:
            parts.append(email.utils.formataddr((name, addr)) if name else addr)
    return (" " + ", ".join(parts)).encode("ascii", "replace")


def downgrade_header_section(header: bytes) -> bytes:
    """Re-encode the 8-bit fields of an LF-form header section as RFC 2047 encoded-words."""
    if max(header, default=0) < 0x80:
        return header
    lines = header.split(b"\n")
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        else:
            fields.append(line)
    out = []
    for f in fields:
        m = _FIELD.match(f)
        if not f or max(f) < 0x80:
            out.append(f)
        elif m is None:  # not a header field at all: drop its 8-bit octets' meaning, keep it ASCII
            out.append(b"X-Invalid-Header: " + _downgrade_unstructured(f).strip())
        elif m.group(1).lower().decode() in _ADDRESS_FIELDS:
            out.append(m.group(1) + b":" + _downgrade_addresses(m.group(2)))
        else:
            out.append(m.group(1) + b":" + _downgrade_unstructured(m.group(2)))
    return b"\n".join(out)
