"""Writing to MySQL/MariaDB sources (:mod:`pop3sf.adapters.mysql`'s tables).

Rows are inserted as the original pop3sf's tools inserted them: a message as its bytes with
``is_plaintext = 0``, plain text as text with ``is_plaintext = 1`` (the server wraps it). The
connection, table names and checks are the adapter's own, built from the same ``[adapter]``
section, so the tools always write where the server reads; missing tables are created as the
server would create them (unless ``create_tables = no``).
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from pop3sf.adapters.base import AdapterError, normalize_secret
from pop3sf.adapters.mysql import MultiUserMySQLAdapter, MySQLAdapter, MySQLAdapterBase
from pop3sf.adapters.mysql_sql import plaintext_subject, to_bytes, to_text

from pop3sf import passwords

from .sources import (
    BadMessage,
    BadName,
    MessageLike,
    MessageSummary,
    SingleUserSource,
    Source,
    SourceError,
    UnknownUser,
    UserExists,
    build_adapter,
    message_bytes,
    password_bytes,
)

_T = TypeVar("_T")
_HEADER_PEEK = 64 * 1024
#: Server errors about the data, with what to tell the admin.
_DATA_ERRORS = {
    1366: "the message is not valid UTF-8, which a text column can't store: use a BLOB "
          "column (message_column_type = LONGBLOB for new tables) or encode 8-bit parts "
          "(quoted-printable, base64)",
    1406: "the message is too large for the message column (MEDIUMTEXT holds 16 MiB; "
          "ALTER it to LONGTEXT)",
    1153: "the message is larger than the database server's max_allowed_packet (raise it in "
          "the server's configuration: [mysqld] max_allowed_packet)",
    1301: "the message is larger than the database server's max_allowed_packet (raise it in "
          "the server's configuration: [mysqld] max_allowed_packet)",
}
#: Octets a driver escapes with a backslash in a string literal (each then takes two).
_ESCAPED = frozenset(b"\0\n\r\\'\"\x1a")
#: The server refuses a statement a few octets short of max_allowed_packet (3 on MariaDB 10.11);
#: stay clear of the edge rather than have it drop the connection.
_PACKET_MARGIN = 16


def statement_octets(sql: str, args: Sequence[Any]) -> int:
    """About how many octets the driver sends for ``sql`` with ``args`` (``%s`` each), the
    command byte included: bytes travel as ``_binary'...'`` with some octets escaped."""
    size = 1 + len(sql.encode("utf-8")) - 2 * len(args)
    for arg in args:
        if isinstance(arg, bytes):
            size += len("_binary''") + len(arg) + sum(arg.count(c) for c in _ESCAPED)
        else:
            size += len(str(int(arg)))
    return size


def _packet_limit_message(needed: int, limit: int) -> str:
    wanted = needed + _PACKET_MARGIN
    mib = 1 << (-(-wanted // (1 << 20)) - 1).bit_length()  # a power of two that fits it
    return (f"the message is too large for the database server: storing it takes a "
            f"{needed}-octet statement, and the server's max_allowed_packet is {limit} octets. "
            f"Raise max_allowed_packet on the database server ([mysqld] max_allowed_packet = "
            f"{mib}M in its configuration, or SET GLOBAL max_allowed_packet = {mib << 20} "
            f"until it restarts); pop3sf needs the same limit to read the message back")


def _subject(head: bytes) -> str:
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    try:
        return " ".join(str(parsed.get("Subject", "")).split())
    except (ValueError, TypeError, IndexError):
        return ""


class MySQLSource(Source):
    """A MySQL source; built as the single- or multi-user one its config describes.

    ``MySQLSource(config)`` gives a :class:`SingleUserMySQLSource` when the section has
    ``username`` (the single-user adapter's key), else a :class:`MultiUserMySQLSource`.
    """

    adapter_class: ClassVar[type[MySQLAdapterBase]] = MultiUserMySQLAdapter

    def __new__(cls, config: Mapping[str, Any], service_user: str | None = None) -> MySQLSource:
        if cls is MySQLSource:
            cls = SingleUserMySQLSource if "username" in config else MultiUserMySQLSource
        return super().__new__(cls)

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        self.adapter = build_adapter(self.adapter_class, config)
        super().__init__(self.adapter.options, service_user)
        self.table: str = self.adapter.options["messages_sql"]

    # --- database access -----------------------------------------------------------------

    def _run(self, fn: Callable[[Any], _T], write: bool = False) -> _T:
        """``fn(conn)`` on a connection, in one transaction when ``write``; errors explained."""
        adapter = self.adapter

        def body(conn: Any) -> _T:
            if not write:
                return fn(conn)
            adapter.execute(conn, "START TRANSACTION")
            try:
                result = fn(conn)
                conn.commit()
                return result
            except BaseException:
                conn.rollback()
                raise

        try:
            adapter.ensure_schema()
            return adapter.pool.run(body, retry=not write)
        except AdapterError as exc:
            cause = exc.__cause__ or exc
            raise SourceError(f"database {adapter.params.where()}: {exc} ({cause})") from exc
        except adapter.driver.Error as exc:
            num = adapter.driver.errno(exc)
            if num in _DATA_ERRORS:
                raise BadMessage(_DATA_ERRORS[num]) from exc
            if num == 1062:
                raise UserExists(str(exc)) from exc
            raise SourceError(f"database {adapter.params.where()}: {exc}") from exc

    def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._run(lambda conn: self.adapter.fetch_all(conn, sql, args))

    def close(self) -> None:
        self.adapter.close()

    # --- messages --------------------------------------------------------------------------

    def _user_id(self, user: str | None) -> int | None:
        raise NotImplementedError

    def _account(self, user: str | None) -> tuple[str, int | None]:
        """(account name as the server knows it, user_id or None) of an existing user."""
        raise NotImplementedError

    def add_message(self, user: str | None, message: MessageLike) -> str:
        user_id = self._user_id(user)
        plaintext = isinstance(message, str)
        if isinstance(message, str):
            if not message.strip():
                raise BadMessage("empty message")
            value: bytes = message.encode("utf-8", "surrogateescape")
        else:
            value = message_bytes(message)
        columns = "message, is_plaintext" + (", user_id" if user_id is not None else "")
        args: tuple[Any, ...] = (value, plaintext) + ((user_id,) if user_id is not None else ())
        marks = ", ".join(["%s"] * len(args))

        sql = f"INSERT INTO {self.table} ({columns}) VALUES ({marks})"
        needed = statement_octets(sql, args)

        def insert(conn: Any) -> int:
            # Over the limit the server just drops the connection ("Lost connection",
            # "server has gone away"): check first and say which setting to change.
            limit = int(self.adapter.fetch_all(conn, "SELECT @@max_allowed_packet")[0][0])
            if needed + _PACKET_MARGIN > limit:
                raise BadMessage(_packet_limit_message(needed, limit))
            cur = conn.cursor()
            try:
                cur.execute(sql, args)
                return int(cur.lastrowid)
            finally:
                cur.close()

        return str(self._run(insert, write=True))

    def count_messages(self, user: str | None) -> int:
        user_id = self._user_id(user)
        where, args = ("WHERE user_id = %s", (user_id,)) if user_id is not None else ("", ())
        return int(self._fetch(f"SELECT COUNT(*) FROM {self.table} {where}", args)[0][0])

    def list_messages(self, user: str | None) -> Sequence[MessageSummary]:
        """The messages the server lists, with the sizes it sends (its own listing: line ends
        as CRLF, plain-text rows wrapped)."""
        account, user_id = self._account(user)
        session = self.adapter.session_for(account, user_id)
        try:
            sizes = {info.uid: info.size for info in session.list_messages()}
        except AdapterError as exc:
            cause = exc.__cause__ or exc
            raise SourceError(f"database {self.adapter.params.where()}: {exc} ({cause})") from exc
        finally:
            session.connection_closed()
        where, args = ("WHERE user_id = %s", (user_id,)) if user_id is not None else ("", ())
        rows = self._fetch(
            f"SELECT id, UNIX_TIMESTAMP(added_timestamp), is_plaintext, IF(is_plaintext, NULL, "
            f"LEFT(CAST(message AS BINARY), {_HEADER_PEEK})) FROM {self.table} {where} "
            f"ORDER BY id", args)
        out = []
        for rid, ts, plain, head in rows:
            size = sizes.get(str(rid))
            if size is None:  # added since the listing, or one the server can't read
                continue
            date = datetime.datetime.fromtimestamp(int(ts or 0), tz=datetime.UTC)
            subject = plaintext_subject(int(rid)) if plain else _subject(to_bytes(head))
            out.append(MessageSummary(str(rid), size, date, subject))
        return out


class SingleUserMySQLSource(SingleUserSource, MySQLSource):
    """The single-user table: its one user is the configured ``username``."""

    adapter_class = MySQLAdapter

    def _user_id(self, user: str | None) -> int | None:
        name = self.config["username"]
        if user is not None and normalize_secret(user) != normalize_secret(name):
            raise UnknownUser(f"unknown user {user!r} (this source's user is {name!r})")
        return None

    def _account(self, user: str | None) -> tuple[str, int | None]:
        return normalize_secret(self.config["username"]), self._user_id(user)



class MultiUserMySQLSource(MySQLSource):
    """The users table and the shared messages table of the multi-user adapter."""

    adapter_class = MultiUserMySQLAdapter

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        super().__init__(config, service_user)
        self.users: str = self.adapter.options["users_sql"]
        self.rounds: int = self.adapter.options["bcrypt_rounds"]

    def check_user_name(self, name: str) -> None:
        self._checked_name(name)

    @staticmethod
    def _checked_name(name: str | None) -> str:
        """The name as stored (NFC), or :class:`BadName`: 1-64 printable characters, no space
        (POP3 clients send it on the USER line), no ``:`` (it separates SASL fields)."""
        if name is None:
            raise BadName("this source has several users: name one")
        name = normalize_secret(name)
        bad = [ch for ch in name if ch.isspace() or ch == ":"
               or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")]
        if not 1 <= len(name) <= 64 or bad:
            raise BadName(f"invalid user name {name!r}: use 1-64 printable characters, "
                          "no spaces or ':'")
        return name

    def _find(self, name: str | None) -> tuple[int, str]:
        """(id, stored name) of an existing user."""
        name = self._checked_name(name)
        rows = self._fetch(f"SELECT id, username FROM {self.users} WHERE username = %s",
                           (name,))
        if len(rows) > 1:
            rows = [r for r in rows if to_text(r[1]) == name]
        if len(rows) != 1:
            raise UnknownUser(f"unknown user {name!r}")
        return int(rows[0][0]), to_text(rows[0][1])

    def _user_id(self, user: str | None) -> int | None:
        return self._find(user)[0]

    def _account(self, user: str | None) -> tuple[str, int | None]:
        user_id, name = self._find(user)
        return name, user_id

    def list_users(self) -> Sequence[str]:
        return [to_text(r[0]) for r in
                self._fetch(f"SELECT username FROM {self.users} ORDER BY username")]

    def _hash(self, password: str) -> str:
        return passwords.hash_bcrypt(password_bytes(password), rounds=self.rounds)

    def add_user(self, name: str, password: str) -> None:
        name = self._checked_name(name)
        hashed = self._hash(password)
        existing = self._fetch(f"SELECT username FROM {self.users} WHERE username = %s",
                               (name,))
        if existing:
            raise UserExists(f"user {name!r} already exists"
                             + ("" if to_text(existing[0][0]) == name
                                else f" (as {to_text(existing[0][0])!r})"))
        self._run(lambda conn: self.adapter.execute(
            conn, f"INSERT INTO {self.users} (username, password_bcrypt) VALUES (%s, %s)",
            (name, hashed)), write=True)

    def set_password(self, name: str, password: str) -> None:
        user_id, _ = self._find(name)
        hashed = self._hash(password)
        self._run(lambda conn: self.adapter.execute(
            conn, f"UPDATE {self.users} SET password_bcrypt = %s WHERE id = %s",
            (hashed, user_id)), write=True)

    def delete_user(self, name: str) -> None:
        """The user and all their messages, in one transaction."""
        user_id, _ = self._find(name)

        def delete(conn: Any) -> None:
            self.adapter.execute(conn, f"DELETE FROM {self.table} WHERE user_id = %s",
                                 (user_id,))
            self.adapter.execute(conn, f"DELETE FROM {self.users} WHERE id = %s", (user_id,))

        self._run(delete, write=True)


__all__ = ["MultiUserMySQLSource", "MySQLSource", "SingleUserMySQLSource"]
