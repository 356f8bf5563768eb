"""A client's session on a MySQL/MariaDB source (the adapters are in :mod:`.mysql`).

It keeps the snapshot of rows listed at login, streams a message with ``SUBSTRING`` queries in
chunks, and deletes at QUIT in one transaction restricted to the account's rows. A read-write
session holds the account's ``GET_LOCK`` on a connection of its own, never pooled (MySQL locks
belong to connections and are re-entrant), and re-checks it still holds it before deleting.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from pop3sf.wire import measure

from .base import (
    AuthResult,
    Credentials,
    DeleteResult,
    MailboxSession,
    MaildropInUse,
    MessageGone,
    MessageInfo,
    Peer,
    PermanentFailure,
    TemporaryFailure,
)
from .mysql_driver import close_quietly
from .mysql_sql import (
    RowStream,
    chunk_sql,
    decode_row,
    listing_sql,
    lock_name,
    message_info,
    plaintext_subject,
    to_bytes,
)
from .plaintext import PlaintextMessage

if TYPE_CHECKING:
    from .mysql import MySQLAdapterBase

log = logging.getLogger("pop3sf.adapters.mysql")

#: How many ids go into one ``DELETE ... IN (...)``.
DELETE_BATCH = 500


@dataclass(frozen=True)
class _Row:
    id: int
    plaintext: bool
    timestamp: int
    length: int



class MySQLSession(MailboxSession[int]):
    """One client's view of the table; keeps the login snapshot and the lock connection.

    What a login found is the users table's id of the account (None for the single-user table).
    """

    def __init__(self, adapter: MySQLAdapterBase, peer: Peer) -> None:
        self.adapter = adapter
        self.peer = peer
        self.account: str | None = None
        self.user_id: int | None = None
        self.read_only = False
        self.rows: dict[str, _Row] = {}
        self.lock_conn: Any = None
        self.lock_name: str | None = None

    # SQL fragments restricting statements to this account's rows.
    def _owner(self) -> tuple[str, tuple[Any, ...]]:
        if self.adapter.multi_user:
            return " AND user_id = %s", (self.user_id,)
        return "", ()

    @property
    def _table(self) -> str:
        return str(self.adapter.options["messages_sql"])

    def authenticate(self, credentials: Credentials) -> AuthResult[int]:
        return self.adapter.authenticate(credentials)

    def login_succeeded(self, account: AuthResult[int], read_only: bool) -> None:
        self.account, self.user_id = account.account_id, account.found
        self.read_only = read_only
        if read_only or not self.adapter.options["cross_instance_lock"]:
            return
        o = self.adapter.options
        name = lock_name(o["database"], o["messages_table"], account.account_id)
        conn = self.adapter.pool.open_connection()
        try:
            with self.adapter.guard("taking the account lock"):
                self.adapter.execute(conn, "SET SESSION wait_timeout = %s",
                                     (int(o["lock_idle_timeout"]),))
                try:
                    got = self.adapter.fetch_all(conn, "SELECT GET_LOCK(%s, 0)", (name,))[0][0]
                except self.adapter.driver.Error as exc:
                    if self.adapter.driver.errno(exc) != 1235:
                        raise
                    log.error("mysql: the database refuses GET_LOCK (%s); on Galera set "
                              "cross_instance_lock = no (docs/mysql.md)", exc)
                    raise PermanentFailure("GET_LOCK not supported by the database") from exc
        except BaseException:
            close_quietly(conn)
            raise
        if got is None or int(got) != 1:
            close_quietly(conn)
            if got is None:
                raise TemporaryFailure("GET_LOCK failed")
            raise MaildropInUse("account in use by another session")
        self.lock_conn, self.lock_name = conn, name

    def list_messages(self) -> Sequence[MessageInfo]:
        adapter = self.adapter
        adapter.ensure_schema()
        where, args = self._owner()
        sql, sql_args, prefix = listing_sql(self._table, where, adapter.dialect())
        with adapter.guard("listing messages"):
            result = adapter.query(sql, (*sql_args, *args))
        infos: list[MessageInfo] = []
        rows: dict[str, _Row] = {}
        for listed in map(decode_row, result):
            if listed.too_large:  # never listed with a wrong size; kept in the table
                adapter.report_too_large(listed.id, listed.length,
                                         f"left out of the listing of {self.account}")
                continue
            row = _Row(listed.id, listed.plaintext, listed.timestamp, listed.length)
            uid = str(row.id)
            rows[uid] = row
            if row.plaintext:
                infos.append(self._plaintext_info(row, listed.crc))
            elif listed.size is None:  # not countable in SQL (result over max_allowed_packet)
                with self._open(row) as stream:
                    found = measure(stream)
                infos.append(MessageInfo(uid, *found))
            else:
                infos.append(message_info(uid, listed.size, row.length, listed.head, prefix))
        self.rows = rows
        return infos

    def _plaintext_info(self, row: _Row, crc: int) -> MessageInfo:
        o = self.adapter.options
        key = (o["database"], o["messages_table"], row.id, row.length, crc, row.timestamp,
               o["from_address"], o["to_address"], self.account)
        found = self.adapter.plaintext_sizes.get(key)
        if found is None:
            with self._open(row) as stream:
                found = measure(stream)
            self.adapter.plaintext_sizes.put(key, found)
        return MessageInfo(str(row.id), found.size, found.utf8_header, found.downgraded_size)

    def open_message(self, uid: str) -> BinaryIO:
        row = self.rows.get(uid)
        if row is None:
            raise MessageGone("no such message")
        where, args = self._owner()
        with self.adapter.guard("opening a message"):
            found = self.adapter.query(
                f"SELECT LENGTH(CAST(message AS BINARY)) FROM {self._table} "
                f"WHERE id = %s{where}", (row.id, *args))
        if not found:
            raise MessageGone("message no longer exists")
        if found[0][0] is None:
            self.adapter.report_too_large(row.id, row.length, "not sent")
            raise TemporaryFailure("message larger than the database's max_allowed_packet")
        return self._open(row, int(found[0][0]))

    def _open(self, row: _Row, length: int | None = None) -> BinaryIO:
        adapter = self.adapter
        where, args = self._owner()
        sql = chunk_sql(self._table, where)

        def fetch(pos: int, size: int) -> bytes | None:
            with adapter.guard("reading a message"):
                found = adapter.query(sql, (pos + 1, size, row.id, *args))
            if found and found[0][0] is None:  # over max_allowed_packet: never send it cut
                adapter.report_too_large(row.id, length, "its sending was stopped")
                raise TemporaryFailure("message larger than the database's max_allowed_packet")
            return to_bytes(found[0][0]) if found else None

        length = row.length if length is None else length
        stream = RowStream(fetch, length, adapter.chunk_for(length))
        if not row.plaintext:
            return stream  # type: ignore[return-value]
        o = adapter.options
        account = self.account or ""
        date = datetime.datetime.fromtimestamp(row.timestamp, tz=datetime.UTC)
        return PlaintextMessage(stream, uid=str(row.id),  # type: ignore[arg-type, return-value]
                                name=plaintext_subject(row.id), date=date,
                                from_addr=adapter.address(o["from_address"], account),
                                to_addr=adapter.address(o["to_address"], account),
                                chunk=min(o["chunk_size"], 256 * 1024))

    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        failed: dict[str, str] = {}
        ids: list[int] = []
        for uid in uids:
            row = self.rows.get(uid)
            if row is None:
                failed[uid] = "not in this session's listing"
            else:
                ids.append(row.id)
        if not ids:
            return DeleteResult(failed)
        if self.read_only:
            raise PermanentFailure("read-only session")
        if self.lock_conn is not None:
            with self.adapter.guard("deleting messages"):
                self._delete_on(self.lock_conn, ids, check_lock=True)
        else:
            committing: list[bool] = []

            def run(conn: Any) -> None:
                self._delete_on(conn, ids, check_lock=False, committing=committing)

            with self.adapter.guard("deleting messages"):
                self.adapter.pool.run(run, retry=True)
        return DeleteResult(failed)

    def _delete_on(self, conn: Any, ids: list[int], check_lock: bool,
                   committing: list[bool] | None = None) -> None:
        if committing:  # a COMMIT was sent on a connection that died: don't guess, give up
            raise TemporaryFailure("connection lost while committing deletions")
        adapter = self.adapter
        where, args = self._owner()
        adapter.execute(conn, "START TRANSACTION")
        try:
            if check_lock:
                held = adapter.fetch_all(conn, "SELECT IS_USED_LOCK(%s) = CONNECTION_ID()",
                                         (self.lock_name,))[0][0]
                if held is None or int(held) != 1:
                    log.error("mysql: account lock of %s lost before QUIT; nothing deleted",
                              self.account)
                    raise TemporaryFailure("account lock lost; nothing deleted")
            for start in range(0, len(ids), DELETE_BATCH):
                batch = ids[start:start + DELETE_BATCH]
                marks = ", ".join(["%s"] * len(batch))
                adapter.execute(conn, f"DELETE FROM {self._table} WHERE id IN ({marks}){where}",
                                (*batch, *args))
            if committing is not None:
                committing.append(True)
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise

    def connection_closed(self) -> None:
        conn, self.lock_conn = self.lock_conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            self.adapter.fetch_all(conn, "SELECT RELEASE_LOCK(%s)", (self.lock_name,))
        close_quietly(conn)
