"""The SQL of the MySQL adapters: schema, the one listing query, chunked bodies, lock names.

Sizes (SPEC §P3) are computed by the database at login, without sending bodies: the wire size is
the octet length plus one for every *bare* CR or LF (each becomes CRLF), plus 2 when the message
does not end with a line break. On MariaDB the bare line ends are counted in one linear pass with
``REGEXP_REPLACE(b, '[^\\r\\n]++|\\r\\n', '')`` (what is left is exactly the bare CRs and LFs);
MariaDB's ``REPLACE`` is quadratic in the number of matches (16 MiB of short lines takes
minutes), so it is used only on MySQL, whose ``REPLACE`` is linear and whose ICU regular
expressions refuse binary strings.

For the RFC 6858 downgraded size (SPEC §P4) the query also returns the raw header section, but
only of messages whose header candidate has an octet >= 0x80 (a byte-exact test: converting a
latin1 view to ASCII changes exactly those octets); Python then finds the exact header section
with :func:`pop3sf.wire.header_section` and downgrades it, as :func:`pop3sf.wire.measure` does.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from pop3sf.wire import MAX_DOWNGRADE_HEADER, downgrade_header_section, header_section

from .base import ConfigurationError, MessageGone, MessageInfo

IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,63}")
LOCK_PREFIX = "pop3sf:"
#: How much of a message may hold its header section (as :mod:`pop3sf.wire` allows).
HEADER_PREFIX = MAX_DOWNGRADE_HEADER + 2
#: On MySQL the header candidate is a plain prefix of this size (no regex on binary strings).
MYSQL_HEADER_PREFIX = 64 * 1024
#: Bare CRs and LFs survive this replacement; everything else goes.
BARE_LINE_ENDS_RE = "[^\r\n]++|\r\n"
#: The raw header section up to and including its blank line (atomic groups keep a CRLF from
#: being read as CR + LF).
HEADER_RE = "^(?s).*?(?>\r\n|\r|\n)(?>\r\n|\r|\n)"


def check_identifier(name: str, key: str) -> str:
    """``name`` back-quoted, after checking it is a plain identifier (never formatted raw)."""
    if not isinstance(name, str) or IDENTIFIER_RE.fullmatch(name) is None:
        raise ConfigurationError(
            f"{key} = {name!r}: not a plain table name ([A-Za-z_][A-Za-z0-9_$]{{0,63}})")
    return f"`{name}`"


def lock_name(database: str, table: str, account_id: str) -> str:
    """``pop3sf:`` + a hash of where the account's messages are: 64 characters, MySQL's limit."""
    key = "\0".join((database, table, account_id)).encode("utf-8", "surrogateescape")
    return LOCK_PREFIX + hashlib.sha256(key).hexdigest()[: 64 - len(LOCK_PREFIX)]


def plaintext_subject(row_id: int) -> str:
    """The Subject of a wrapped ``is_plaintext`` row, as the original pop3sf named it."""
    return f"Plaintext database entry {row_id}"


def schema_sql(messages: str, users: str | None, column_type: str) -> list[str]:
    """CREATE TABLE IF NOT EXISTS: the original pop3sf's columns, plus INDEX(user_id).

    ``messages`` and ``users`` are already checked and quoted; ``users`` None means the
    single-user table (no ``user_id``).
    """
    user_col = "user_id INT UNSIGNED NOT NULL,\n" if users else ""
    user_idx = ",\nINDEX user_id (user_id)" if users else ""
    stmts = [f"""CREATE TABLE IF NOT EXISTS {messages} (
id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL,
{user_col}message {column_type} NOT NULL,
is_plaintext BOOL NOT NULL,
added_timestamp DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL{user_idx}
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""]
    if users:
        stmts.append(f"""CREATE TABLE IF NOT EXISTS {users} (
id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL,
username VARCHAR(64) UNIQUE NOT NULL,
password_bcrypt CHAR(60) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""")
    return stmts


def _has_8bit(expr: str) -> str:
    return f"(CAST(CONVERT(CONVERT({expr} USING latin1) USING ascii) AS BINARY) <> {expr})"


def listing_sql(table: str, where: str, dialect: str) -> tuple[str, tuple[Any, ...], int]:
    """(SQL, its leading parameters, header prefix size) of the listing query.

    Columns: id, is_plaintext, UNIX_TIMESTAMP(added_timestamp), octet length, bare CR/LF count,
    last octet, CRC32 (plain-text rows only), header candidate (8-bit ones only), octet length
    of the column itself. ``where`` is appended to ``WHERE 1 = 1`` (with its own parameters
    after these). The database refuses to ``CAST`` a value longer than its
    ``max_allowed_packet`` (the result is NULL): such a row has only the last length.
    """
    if dialect == "mariadb":
        bare = "LENGTH(REGEXP_REPLACE(b, %s, ''))"
        bare_args: tuple[Any, ...] = (BARE_LINE_ENDS_RE,)
        head = f"COALESCE(NULLIF(REGEXP_SUBSTR(LEFT(b, {HEADER_PREFIX}), %s), ''), " \
               f"LEFT(b, {HEADER_PREFIX}))"
        head_args: tuple[Any, ...] = (HEADER_RE,)
        prefix = HEADER_PREFIX
    else:
        lf = "(LENGTH(b) - LENGTH(REPLACE(b, CHAR(10), '')))"
        cr = "(LENGTH(b) - LENGTH(REPLACE(b, CHAR(13), '')))"
        crlf = "((LENGTH(b) - LENGTH(REPLACE(b, CHAR(13,10), ''))) DIV 2)"
        bare = f"({lf} + {cr} - 2 * {crlf})"
        bare_args = ()
        head = f"LEFT(b, {MYSQL_HEADER_PREFIX})"
        head_args = ()
        prefix = MYSQL_HEADER_PREFIX
    sql = f"""SELECT id, is_plaintext, ts, LENGTH(b), {bare}, RIGHT(b, 1),
  IF(is_plaintext, CRC32(b), NULL),
  IF(is_plaintext OR NOT {_has_8bit(head)}, NULL, {head}), stored
FROM (SELECT id, is_plaintext, UNIX_TIMESTAMP(added_timestamp) AS ts,
             CAST(message AS BINARY) AS b, LENGTH(message) AS stored
      FROM {table} WHERE 1 = 1{where}) AS m
ORDER BY id"""
    # Placeholders in order: the count, the header twice in the 8-bit test, then once more.
    return sql, bare_args + head_args * 3, prefix


class Listed(NamedTuple):
    """One row of the listing query, decoded."""

    id: int
    plaintext: bool
    timestamp: int
    length: int
    crc: int
    size: int | None  # None: the database could not count (REGEXP_REPLACE over its limit)
    head: bytes | None
    #: The row is longer than the database's max_allowed_packet: it cannot be read at all.
    too_large: bool = False


def decode_row(row: Sequence[Any]) -> Listed:
    rid, plain, ts, length, bare, last, crc, head, stored = row
    if length is None and stored is not None:
        return Listed(int(rid), bool(plain), int(ts or 0), int(stored), 0, None, None, True)
    length = int(length or 0)
    size: int | None = None
    if bare is not None:
        size = length + int(bare)
        if length and to_bytes(last) not in (b"\n", b"\r"):
            size += 2
    return Listed(int(rid), bool(plain), int(ts or 0), length, int(crc or 0), size,
                  None if head is None else to_bytes(head))


def message_info(uid: str, size: int, length: int, head: bytes | None,
                 prefix: int) -> MessageInfo:
    """The listing entry from the wire size and the raw header candidate (8-bit ones only)."""
    if head is None:
        return MessageInfo(uid, size)
    cut = len(head) >= prefix and length > len(head)
    if cut:
        head = head[:-1]  # a CR at the cut may be half a CRLF
    lf = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    section = header_section(lf)
    if max(section, default=0) < 0x80:
        return MessageInfo(uid, size)
    terminated = section == b"\n" or section.endswith(b"\n\n")
    if (cut and not terminated) or len(section) > MAX_DOWNGRADE_HEADER:
        return MessageInfo(uid, size, True, None)
    down = downgrade_header_section(section)
    return MessageInfo(uid, size, True, size - _crlf_len(section) + _crlf_len(down))


def _crlf_len(lf_data: bytes) -> int:
    return len(lf_data) + lf_data.count(b"\n")


def to_bytes(value: Any) -> bytes:
    """A binary column as bytes, whatever type the driver chose."""
    if value is None:
        return b""
    if isinstance(value, str):  # a driver that decoded a binary column: undo it exactly
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def to_text(value: Any) -> str:
    return bytes(value).decode("utf-8", "surrogateescape") \
        if isinstance(value, bytes | bytearray) else str(value)


def chunk_sql(table: str, where: str) -> str:
    """One chunk of a body: parameters (1-based offset, length, id, owner...)."""
    return (f"SELECT SUBSTRING(CAST(message AS BINARY), %s, %s) FROM {table} "
            f"WHERE id = %s{where}")


class RowStream(io.RawIOBase):
    """A seekable binary stream over one row's ``message``, fetched ``chunk`` octets per query.

    Only the current chunk is held; seeking back into it costs no query (a small plain-text
    row is fetched once although the wrapper reads it twice).
    """

    def __init__(self, fetch: Callable[[int, int], bytes | None], length: int, chunk: int) -> None:
        super().__init__()
        self._fetch = fetch
        self.length = length
        self._chunk = chunk
        self._pos = 0
        self._buf = b""
        self._buf_start = 0
        #: Octets fetched and queries run so far (tests check memory stays bounded).
        self.fetched = 0
        self.queries = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self.length:
            return 0
        offset = self._pos - self._buf_start
        if not 0 <= offset < len(self._buf):
            self._buf = b""  # drop the old chunk before fetching the next
            data = self._fetch(self._pos, min(self._chunk, self.length - self._pos))
            self.queries += 1
            if data is None:
                raise MessageGone("message deleted while it was being read")
            if not data:
                self.length = self._pos  # the row shrank: end here
                return 0
            self.fetched += len(data)
            self._buf, self._buf_start, offset = data, self._pos, 0
        view = memoryview(buffer)
        n = min(len(view), len(self._buf) - offset)
        view[:n] = self._buf[offset:offset + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._buf = b""
        super().close()
