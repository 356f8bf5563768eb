"""Messages on the wire: CRLF, dot-stuffing, TOP, header downgrade, exact sizes.

The rules are in docs/protocol.md §9 and §10.

Everything works on chunks so a 100 MB message never sits in memory, and every state that spans a
chunk boundary (a CR at the end of one chunk, a line start, the header/body split) is carried in
:class:`WireEncoder`. Internally text is brought to bare-LF form first, the only form in which
dot-stuffing and line counting are one ``replace``/``count`` each, then turned into CRLF.
"""

from __future__ import annotations

import base64
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
    """One pass over a message: everything a listing needs (MessageInfo, docs/adapters.md)."""
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


#: RFC 2047 §2: an encoded-word is at most 75 characters, a line holding one at most 76.
_WORD_MAX = 75
_LINE_MAX = 76


class _FieldWriter:
    """Lays out one downgraded field: plain words and 8-bit runs, folded so that every line
    holding an encoded-word stays within RFC 2047's limits.

    Folding only ever puts a line break before existing whitespace, or between two encoded-words
    (where decoders ignore whitespace), so the unfolded, decoded value is the original one.
    """

    __slots__ = ("lines",)

    def __init__(self, name: bytes) -> None:
        self.lines = [name + b":"]

    def plain(self, ws: bytes, word: bytes) -> None:
        if len(self.lines[-1]) + len(ws) + len(word) > _LINE_MAX:
            self.lines.append(b"")
        self.lines[-1] += ws + word

    def encoded(self, ws: bytes, raw: bytes) -> None:
        """``raw`` as B-encoded words; whitespace beyond one character goes inside them."""
        raw, ws = ws[1:] + raw, ws[:1]
        try:
            raw.decode("utf-8")
            charset, utf8 = b"utf-8", True
        except UnicodeDecodeError:
            charset, utf8 = b"unknown-8bit", False
        prefix = b"=?" + charset + b"?B?"
        pos = 0
        while pos < len(raw):
            line = self.lines[-1]
            room = min(_WORD_MAX, _LINE_MAX - len(line) - len(ws)) - len(prefix) - 2
            end = min(len(raw), pos + max(0, room // 4 * 3))
            while utf8 and pos < end < len(raw) and raw[end] & 0xC0 == 0x80:
                end -= 1  # never cut a UTF-8 character in two
            if end == pos:  # no room left on this line
                self.lines.append(b"")
                continue
            self.lines[-1] = line + ws + prefix + base64.b64encode(raw[pos:end]) + b"?="
            pos, ws = end, b" "

    def field(self) -> bytes:
        return b"\n".join(self.lines)


def _needs_encoding(word: bytes) -> bool:
    """8-bit, or ASCII that a decoder could mistake for an encoded-word."""
    return max(word) >= 0x80 or b"=?" in word


def _words(value: bytes) -> list[tuple[bytes, bytes]]:
    """(whitespace before, word) pairs of an unfolded value; the first gets one space."""
    words = re.findall(rb"([ \t]*)([^ \t]+)", value)
    if words:
        words[0] = (b" ", words[0][1])
    return words


def _downgrade_unstructured(name: bytes, value: bytes) -> bytes:
    out = _FieldWriter(name)
    run: list[bytes] = []  # a run of words to encode, with the whitespace between them
    run_ws = b" "
    for ws, word in _words(value.replace(b"\n", b"")):
        if _needs_encoding(word):
            if run:
                run += (ws, word)
            else:
                run, run_ws = [word], ws
            continue
        if run:
            out.encoded(run_ws, b"".join(run))
            run = []
        out.plain(ws, word)
    if run:
        out.encoded(run_ws, b"".join(run))
    return out.field()


def _downgrade_addresses(name: bytes, value: bytes) -> bytes:
    import email.utils  # only for UTF-8 headers of clients without UTF8: not at start-up

    text = value.decode("utf-8", "surrogateescape").replace("\n", " ")
    out = _FieldWriter(name)
    pairs = email.utils.getaddresses([text])
    for i, (display, addr) in enumerate(pairs):
        comma = "," if i < len(pairs) - 1 else ""
        if addr.isascii() and display.isascii():
            formatted = email.utils.formataddr((display, addr)) if display else addr
            for ws, word in _words((formatted + comma).encode("ascii", "replace")):
                out.plain(ws, word)
        elif addr.isascii():
            out.encoded(b" ", display.encode("utf-8", "surrogateescape"))
            out.plain(b" ", f"<{addr}>{comma}".encode("ascii"))
        else:  # no ASCII form of this address: an empty group named after it (RFC 6858 §3)
            whole = f"{display} <{addr}>" if display else addr
            out.encoded(b" ", whole.encode("utf-8", "surrogateescape"))
            out.plain(b" ", f":;{comma}".encode("ascii"))
    return out.field()


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
            out.append(_downgrade_unstructured(b"X-Invalid-Header", f))
        elif m.group(1).lower().decode() in _ADDRESS_FIELDS:
            out.append(_downgrade_addresses(m.group(1), m.group(2)))
        else:
            out.append(_downgrade_unstructured(m.group(1), m.group(2)))
    return b"\n".join(out)
