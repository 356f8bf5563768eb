"""Plain text files as RFC 5322 messages (docs/adapters.md#bundled).

The wrapping is a pure function of the file's bytes and the given metadata, so the size a listing
caches stays exact for as long as the file is unchanged. The body is sent as UTF-8: a file that
isn't valid UTF-8 is read as Windows-1252 (the usual legacy encoding of text files; undefined
octets map to the Latin-1 code point). It travels ``8bit`` unless a line would exceed RFC 5322's
998 octets or holds a NUL, then ``quoted-printable``. Large files stream: they are read twice
(once to choose the encoding, once to send), never held in memory.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import hashlib
import io
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import BinaryIO

CHUNK = 256 * 1024
MAX_LINE = 998
#: Longest subject text kept from a file name, in characters.
MAX_SUBJECT = 200
#: Longest run of one line held before a quoted-printable soft break is forced.
_QP_PIECE = 64 * 1024

_CP1252 = {i: ch for i in range(0x80, 0xA0)
           if (ch := bytes([i]).decode("cp1252", "replace")) != "\ufffd"}


def _from_cp1252(data: bytes) -> bytes:
    return data.decode("latin-1").translate(_CP1252).encode("utf-8")


def decode_text(data: bytes) -> str:
    """Text file bytes as str, the way wrapping reads them: UTF-8, else Windows-1252."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1").translate(_CP1252)


def _identity(data: bytes) -> bytes:
    return data


class _LineEnds:
    """CRLF, CR and LF to LF across chunk boundaries."""

    def __init__(self) -> None:
        self._cr = False

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            self._cr = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            self._cr = data[-1:] == b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return data


def _chunks(source: BinaryIO, chunk: int) -> Iterator[bytes]:
    while data := source.read(chunk):
        yield data


def _needs_qp(chunks: Iterator[bytes], convert: Callable[[bytes], bytes]) -> bool:
    ends = _LineEnds()
    current = 0
    for raw in chunks:
        data = ends.feed(convert(raw))
        if b"\0" in data:
            return True
        parts = data.split(b"\n")
        current += len(parts[0])
        if len(parts) > 1:
            if current > MAX_LINE or max(map(len, parts[1:-1]), default=0) > MAX_LINE:
                return True
            current = len(parts[-1])
        if current > MAX_LINE:
            return True
    return False


def _is_utf8(chunks: Iterator[bytes]) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for data in chunks:
            decoder.decode(data)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


# --- header fields ------------------------------------------------------------------------


def _clean(text: str) -> str:
    """One line of printable text: surrogates replaced, controls and runs of space collapsed."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def encode_words(text: str) -> str:
    """RFC 2047 B encoded-words for UTF-8 text, folded, never splitting a character."""
    pieces: list[str] = []
    current = ""
    for ch in text:
        if len((current + ch).encode()) > 39:  # 64-character words: "Subject: " + one <= 76
            pieces.append(current)
            current = ""
        current += ch
    if current:
        pieces.append(current)
    return "\r\n ".join(f"=?utf-8?B?{base64.b64encode(p.encode()).decode()}?=" for p in pieces)


def _fold(text: str, first: int) -> str:
    """Fold ASCII text at spaces so lines stay within 78 characters where words allow."""
    lines: list[str] = []
    current, limit = "", 78 - first
    for word in text.split(" "):
        if current and len(current) + 1 + len(word) > limit:
            lines.append(current)
            current, limit = word, 77
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n ".join(lines)


def _unstructured(text: str, first: int) -> str:
    if text.isascii() and "=?" not in text:
        return _fold(text, first)
    return encode_words(text)


def subject_for(name: str) -> str:
    """The Subject field body for a file name: sanitised, shortened, encoded if not ASCII."""
    text = _clean(name)[:MAX_SUBJECT] or "(no name)"
    return _unstructured(text, len("Subject: "))


def address_field(value: str) -> str:
    """A From/To field body: an ASCII display name as is, a non-ASCII one encoded."""
    value = _clean(value)
    if value.isascii():
        return value
    import email.utils  # 7 ms at start-up otherwise; the first rendered message pays it

    name, addr = email.utils.parseaddr(value)
    if not addr or "@" not in addr:
        return value  # not an address; left as UTF-8 (the server downgrades it for old clients)
    if name.isascii():
        return email.utils.formataddr((name, addr)) if name else addr
    words = encode_words(name)
    last = words.rpartition("\r\n")[2]  # a line holding an encoded-word stays within 76
    fold = " " if len("From: " + last) + len(addr) + 3 <= 76 else "\r\n "
    return f"{words}{fold}<{addr}>"


def message_id(uid: str) -> str:
    digest = hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return f"<{digest}@pop3sf.invalid>"


def _header(*, uid: str, name: str, date: datetime.datetime, from_addr: str, to_addr: str,
            qp: bool) -> bytes:
    import email.utils

    if date.tzinfo is None:
        date = date.replace(tzinfo=datetime.UTC)
    date = date.astimezone(datetime.UTC).replace(microsecond=0)
    fields = [
        ("Date", email.utils.format_datetime(date)),
        ("From", address_field(from_addr)),
        ("To", address_field(to_addr)),
        ("Subject", subject_for(name)),
        ("Message-ID", message_id(uid)),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", "quoted-printable" if qp else "8bit"),
    ]
    return "".join(f"{k}: {v}\r\n" for k, v in fields).encode("utf-8") + b"\r\n"


# --- body ---------------------------------------------------------------------------------


def _body_8bit(chunks: Iterator[bytes], convert: Callable[[bytes], bytes]) -> Iterator[bytes]:
    ends = _LineEnds()
    last = b"\n"
    for raw in chunks:
        data = ends.feed(convert(raw))
        if data:
            last = data[-1:]
            yield data.replace(b"\n", b"\r\n")
    if last != b"\n":
        yield b"\r\n"


def _body_qp(chunks: Iterator[bytes], convert: Callable[[bytes], bytes]) -> Iterator[bytes]:
    ends = _LineEnds()
    pending = b""
    for raw in chunks:
        pending += ends.feed(convert(raw))
        cut = pending.rfind(b"\n") + 1
        out = binascii.b2a_qp(pending[:cut], istext=True) if cut else b""
        pending = pending[cut:]
        while len(pending) > _QP_PIECE:  # one enormous line: soft breaks keep memory bounded
            out += binascii.b2a_qp(pending[:_QP_PIECE], istext=True) + b"=\n"
            pending = pending[_QP_PIECE:]
        if out:
            yield out.replace(b"\n", b"\r\n")
    if pending:
        yield binascii.b2a_qp(pending, istext=True).replace(b"\n", b"\r\n") + b"\r\n"


def wrapped_chunks(source: BinaryIO, *, uid: str, name: str, date: datetime.datetime,
                   from_addr: str, to_addr: str, chunk: int = CHUNK) -> Iterator[bytes]:
    """The wrapped message, chunk by chunk; ``source`` must be seekable and is read twice."""
    start = source.tell()
    convert: Callable[[bytes], bytes] = _identity
    if not _is_utf8(_chunks(source, chunk)):
        convert = _from_cp1252
    source.seek(start)
    qp = _needs_qp(_chunks(source, chunk), convert)
    source.seek(start)
    yield _header(uid=uid, name=name, date=date, from_addr=from_addr, to_addr=to_addr, qp=qp)
    body = _body_qp if qp else _body_8bit
    yield from body(_chunks(source, chunk), convert)


def wrap_plaintext(text: bytes, *, uid: str, name: str, date: datetime.datetime,
                   from_addr: str, to_addr: str) -> bytes:
    """A deterministic RFC 5322 message (CRLF line ends) whose body is ``text``."""
    return b"".join(wrapped_chunks(io.BytesIO(text), uid=uid, name=name, date=date,
                                   from_addr=from_addr, to_addr=to_addr))


class PlaintextMessage(io.RawIOBase):
    """A readable binary stream of a text file wrapped as a message; closing it closes the file."""

    def __init__(self, source: BinaryIO, *, uid: str, name: str, date: datetime.datetime,
                 from_addr: str, to_addr: str, chunk: int = CHUNK) -> None:
        super().__init__()
        self._source = source
        self._iter = wrapped_chunks(source, uid=uid, name=name, date=date,
                                    from_addr=from_addr, to_addr=to_addr, chunk=chunk)
        self._buf = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        """The source file's descriptor (lets callers ``fstat`` what they read)."""
        return self._source.fileno()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._pos >= len(self._buf):
            data = next(self._iter, None)
            if data is None:
                return 0
            self._buf, self._pos = data, 0
        n = min(len(buffer), len(self._buf) - self._pos)
        buffer[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()
