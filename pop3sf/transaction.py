"""The TRANSACTION and UPDATE states: commands answered from the login snapshot, RETR/TOP handed
to :mod:`.retrieval`, and the commit at QUIT (docs/protocol.md §9, §11).

Each ``cmd_*`` function is a handler for the session's dispatch; the command table has already
checked state, read-only mode and argument count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

from pop3sf.adapters import DeleteResult, MailboxSession

from . import calls, retrieval
from .commands import COMMIT, LISTING, UPDATE
from .logs import counted
from .replies import OK

log = logging.getLogger("pop3sf.session")


class TransactionSession(retrieval.ReadingSession, Protocol):
    """What these commands need of the session, besides what a retrieval needs."""

    state: int
    read_only: bool
    line: bytes
    producer: Iterator[bytes] | None
    deleted_count: int

    def describe(self) -> str: ...
    def detach_adapter(self) -> MailboxSession: ...


def _message(session: TransactionSession, args: list[bytes]) -> int | None:
    """The 0-based index named by args[0], or None after answering -ERR."""
    n = session.drop.index(args)
    if isinstance(n, bytes):
        session.reply(n)
        return None
    return n


def _answer(session: TransactionSession, answer: bytes) -> None:
    """Reply, and remember the reply for this exact line (the session's answer run)."""
    session.conn.write(answer)
    session.drop.remember(session.line, answer)


def answer_run(session: TransactionSession) -> bool:
    """Answer a pipelined run of already-answered commands in one pass: a dict lookup per
    line instead of a dispatch; anything else stops the run and goes the ordinary way."""
    answers = session.drop.answers
    assert answers is not None
    out: list[bytes] = []
    end = 0
    for line, end_of_line in session.conn.lines_ahead():
        answer = answers.get(line)
        if answer is None or len(out) >= 1024:
            break
        out.append(answer)
        end = end_of_line
    if not out:
        return False
    session.conn.consume(end)
    session.conn.write(b"".join(out))
    session.host.commands[b"(pipelined)"] += len(out)
    return True


def cmd_stat(session: TransactionSession, args: list[bytes]) -> None:
    _answer(session, f"+OK {session.drop.live_count} {session.drop.live_size}\r\n".encode())


def cmd_noop(session: TransactionSession, args: list[bytes]) -> None:
    _answer(session, OK)


def _list_or_uidl(session: TransactionSession, args: list[bytes], values: list[Any],
                  what: bytes) -> None:
    if args:
        n = _message(session, args)
        if n is not None:
            _answer(session, f"+OK {n + 1} {values[n]}\r\n".encode())
        return
    session.producer = session.drop.listing(values, b"+OK " + what + b" follows\r\n")
    session.blocked = LISTING
    pump(session)


def cmd_list(session: TransactionSession, args: list[bytes]) -> None:
    _list_or_uidl(session, args, session.drop.sizes, b"scan listing")


def cmd_uidl(session: TransactionSession, args: list[bytes]) -> None:
    _list_or_uidl(session, args, session.drop.uids, b"unique-id listing")


def pump(session: TransactionSession) -> None:
    """Write the listing under way while the output backlog allows."""
    threshold = session.host.settings.protocol.output_backlog
    conn = session.conn
    while session.producer is not None and conn.backlog() < threshold:
        chunk = next(session.producer, None)
        if chunk is None:
            session.producer = None
            session.blocked = None
        else:
            conn.write(chunk)


def cmd_dele(session: TransactionSession, args: list[bytes]) -> None:
    n = _message(session, args)
    if n is not None:
        session.drop.delete(n)
        session.reply(f"+OK Message {n + 1} deleted\r\n".encode())


def cmd_rset(session: TransactionSession, args: list[bytes]) -> None:
    session.drop.reset()
    session.reply(f"+OK {session.drop.summary()}\r\n".encode())


def cmd_retr(session: TransactionSession, args: list[bytes]) -> None:
    n = _message(session, args)
    if n is not None:
        retrieval.retrieve(session, n, None)


def cmd_top(session: TransactionSession, args: list[bytes]) -> None:
    n = _message(session, args)
    if n is not None:
        retrieval.retrieve(session, n, int(args[1]))


# -- UPDATE ------------------------------------------------------------------------------------

def commit(session: TransactionSession) -> None:
    """QUIT: commit the deletions and end the adapter session *before* answering, so the
    client's next login finds the account (and any cross-process lock) free."""
    session.state = UPDATE
    session.close_reason = "QUIT"
    uids = [] if session.read_only else session.drop.marked_uids()
    session.blocked = COMMIT
    session.host.commit_started()
    calls.run(session, "mail", _delete_and_close, (session.detach_adapter(), uids),
                      lambda r, e: _committed(session, len(uids), r, e), DeleteResult,
                      inline=not uids and session.host.adapter.closes_inline)


def _committed(session: TransactionSession, count: int, result: Any,
               error: BaseException | None) -> None:
    host = session.host
    host.commit_finished()
    if error is not None:
        calls.log_failure(session, "deleting", error)
        reply = b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n"
    elif result.failed:
        log.warning("%s: %d of %d deletions failed: %s", session.describe(),
                    len(result.failed), count,
                    "; ".join(f"{k}: {v}" for k, v in list(result.failed.items())[:5]))
        session.deleted_count = count - len(result.failed)
        reply = b"-ERR Some deleted messages not removed\r\n"
    else:
        session.deleted_count = count
        left = counted(session.drop.live_count, "message")
        reply = f"+OK pop3sf signing off ({left} left)\r\n".encode()
    host.accounts.release(session)
    if not session.conn.closed:
        session.reply(reply)
        session.conn.finish()


def _delete_and_close(adapter: MailboxSession, uids: list[str]) -> DeleteResult:
    """On a worker: delete what was marked, then end the adapter session."""
    try:
        return adapter.delete_messages(uids) if uids else DeleteResult()
    finally:
        try:
            adapter.connection_closed()
        except Exception:
            log.exception("connection_closed failed after QUIT")
