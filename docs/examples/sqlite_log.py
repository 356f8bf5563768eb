"""An example pop3sf adapter: the rows of an SQLite log table, one message per row.

The worked example of docs/adapters.md. A program logs into a table such as::

    CREATE TABLE log (id INTEGER PRIMARY KEY, logged_at REAL NOT NULL,  -- Unix time
                      level TEXT NOT NULL, source TEXT NOT NULL, text TEXT NOT NULL);

and one user reads it in a mail client: each row is a plain-text message whose Subject is
``[level] source: first line``; DELE + QUIT deletes the rows. Select it in /etc/pop3sf.conf with
the module on the server's Python path::

    [adapter]
    type = sqlite_log:SQLiteLogAdapter
    database = /var/lib/myapp/log.sqlite3
    username = ops
    password_hash = $2b$12$...     # pop3sf-admin hash
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import io
import os
import re
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from email.header import Header
from pathlib import Path
from typing import Any, BinaryIO

from pop3sf.adapters import (
    Adapter,
    AuthenticationFailed,
    AuthResult,
    ConfigError,
    Credentials,
    DeleteResult,
    MailboxSession,
    MessageGone,
    MessageInfo,
    Peer,
    TemporaryFailure,
)
from pop3sf.adapters.base import normalize_secret

from pop3sf import passwords
from pop3sf.wire import measure

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def render(row: Sequence[Any], sender: str, recipient: str) -> bytes:
    """The message of one ``(id, logged_at, level, source, text)`` row.

    A pure function of the row, so the size listed at login is the size sent later.
    """
    row_id, logged_at, level, source, text = row
    first = (str(text).splitlines() or [""])[0]
    subject = " ".join(f"[{level}] {source}: {first}".split())[:200]
    if not subject.isascii():
        subject = Header(subject, "utf-8").encode()
    date = datetime.datetime.fromtimestamp(float(logged_at), tz=datetime.UTC)
    head = (f"From: {sender}\r\nTo: {recipient}\r\n"
            f"Date: {email.utils.format_datetime(date)}\r\n"
            f"Message-ID: <log.{row_id}@sqlite-log.invalid>\r\n"
            f"Subject: {subject}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
    return head.encode("ascii") + str(text).encode("utf-8", "surrogateescape")


class SQLiteLogAdapter(Adapter):
    """One account that reads (and deletes) the rows of one SQLite table."""

    configspec = """
database = string
table = string(default="log")
username = string
password_hash = string
from_address = string(default="pop3sf log <log@localhost>")
to_address = string(default="%u@localhost")
"""
    blocking = True        # sqlite3 reads the disk: calls run on the worker pool
    fds_per_session = 1    # each logged-in session holds the database file open

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        options = super().validate(config)
        if not _IDENTIFIER.fullmatch(options["table"]):
            raise ConfigError(f"table = {options['table']!r}: not a plain SQL identifier")
        if not os.path.isabs(options["database"]):
            raise ConfigError(f"database = {options['database']!r}: must be an absolute path")
        try:
            passwords.scheme_of(options["password_hash"])
        except passwords.UnknownScheme as exc:
            raise ConfigError(f"password_hash: unknown scheme {exc}") from None
        return options

    def check(self) -> None:
        _require_file(self.options["database"])

    def probe(self) -> None:
        try:
            with contextlib.closing(self.connect()) as db:
                db.execute(f"SELECT count(*) FROM {self.options['table']}").fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"database = {self.options['database']!r}: {exc}") from None

    def apply(self, options: dict[str, Any]) -> None:
        # Sessions read self.options when they start, so new options need no more than a check.
        _require_file(options["database"])

    def connect(self) -> sqlite3.Connection:
        """A connection usable from any worker thread (a session's calls never overlap);
        ``mode=rw``: never create a missing database."""
        uri = Path(self.options["database"]).as_uri() + "?mode=rw"
        return sqlite3.connect(uri, uri=True, timeout=5, check_same_thread=False)

    def new_session(self, peer: Peer) -> SQLiteLogSession:
        return SQLiteLogSession(self)


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"database = {path!r}: no such file")


class SQLiteLogSession(MailboxSession[None]):
    """One client's view of the table: the snapshot of row ids taken at login."""

    def __init__(self, adapter: SQLiteLogAdapter) -> None:
        self.adapter = adapter
        self.options = adapter.options  # the options this session started with
        self.db: sqlite3.Connection | None = None
        self.read_only = False
        self.sender = self.recipient = ""

    def authenticate(self, credentials: Credentials) -> AuthResult[None]:
        stored: str = self.options["password_hash"]
        username = normalize_secret(self.options["username"])
        if credentials.username != username:
            passwords.dummy_verify(credentials.password_bytes(), like=stored)  # same time
            raise AuthenticationFailed("unknown user")
        passwords.verify_or_deny(stored, credentials.password_bytes())
        return AuthResult(username)  # nothing more to carry: one account, one table

    def login_succeeded(self, account: AuthResult[None], read_only: bool) -> None:
        self.read_only = read_only
        self.sender = self.options["from_address"].replace("%u", account.account_id)
        self.recipient = self.options["to_address"].replace("%u", account.account_id)
        try:
            self.db = self.adapter.connect()
        except sqlite3.Error as exc:
            raise TemporaryFailure(f"cannot open the log database: {exc}") from exc

    def _rows(self, where: str = "", args: Sequence[Any] = ()) -> list[Any]:
        if self.db is None:
            raise TemporaryFailure("not logged in")
        sql = (f"SELECT id, logged_at, level, source, text FROM {self.options['table']}"
               f"{where} ORDER BY id")
        try:
            return self.db.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise TemporaryFailure(f"reading the log table: {exc}") from exc

    def _message(self, row: Sequence[Any]) -> bytes:
        return render(row, self.sender, self.recipient)

    def list_messages(self) -> Sequence[MessageInfo]:
        # Log rows are short: rendering each once here is cheap. A table of big rows would
        # compute sizes in SQL or cache them, as the bundled MySQL adapter does.
        infos = []
        for row in self._rows():
            found = measure(io.BytesIO(self._message(row)))
            infos.append(MessageInfo(str(row[0]), found.size, found.utf8_header,
                                     found.downgraded_size))
        return infos

    def open_message(self, uid: str) -> BinaryIO:
        rows = self._rows(" WHERE id = ?", (int(uid),))
        if not rows:
            raise MessageGone(uid)
        return io.BytesIO(self._message(rows[0]))

    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        if self.read_only or self.db is None:
            return DeleteResult({uid: "read-only session" for uid in uids})
        ids = [int(uid) for uid in uids]
        if not ids:
            return DeleteResult()
        marks = ", ".join("?" * len(ids))
        try:
            with self.db:  # one transaction: all rows go, or none
                self.db.execute(f"DELETE FROM {self.options['table']} WHERE id IN ({marks})",
                                ids)
        except sqlite3.Error as exc:
            raise TemporaryFailure(f"deleting from the log table: {exc}") from exc
        return DeleteResult()

    def connection_closed(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
