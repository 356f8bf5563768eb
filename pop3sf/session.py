"""The POP3 state machine: dispatch from the command table, and the session's state transitions.

A session takes one command at a time, strictly in order. While something is under way (an
adapter call, a login waiting for its turn, a TLS handshake, a listing or a retrieval being
written, the commit) the session is ``blocked`` and leaves the following lines in the
connection's input buffer; it reads on once the work is done and the output backlog is below its
threshold. Everything answerable from the login snapshot (STAT, LIST, UIDL, DELE, RSET, NOOP) is
answered on the loop thread without asking the adapter (docs/protocol.md §4, §12).

The parts: :mod:`.login` (USER/PASS, SASL, verification), :mod:`.maildrop` (the snapshot and
deletion marks), :mod:`.retrieval` (RETR/TOP), :mod:`.calls` (every adapter call).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from pop3sf import __version__
from pop3sf.adapters import MailboxSession, Peer

from . import calls, login, retrieval, transaction
from .commands import (
    AUTHORIZATION,
    CLOSING,
    COMMANDS,
    COMMIT,
    LISTING,
    RETRIEVAL,
    TRANSACTION,
    VERIFICATION,
    Command,
    arguments_fit,
    capabilities,
    parse,
)
from .connection import WRITE, Connection
from .host import Host
from .lines import TOO_LONG
from .login import Login
from .logs import counted
from .maildrop import Maildrop
from .replies import (
    ERR_PLAINTEXT,
    ERR_READ_ONLY,
    ERR_SHUTDOWN,
    ERR_STATE,
    ERR_SYNTAX,
    ERR_TEMP,
    ERR_TOO_LONG,
    ERR_TOO_MANY_BAD,
    ERR_UNKNOWN,
)
from .workers import CallTimeout

log = logging.getLogger("pop3sf.session")



class Session:
    """One client's POP3 session, from greeting to commit.

    The connection calls the ``on_*`` hooks on the loop thread; the session answers through
    ``conn.write`` and hands adapter work to :func:`.calls.run`. It holds the state transitions
    (AUTHORIZATION, TRANSACTION, UPDATE) and delegates the rest to its parts.
    """

    __slots__ = (
        "host", "conn", "adapter", "state", "utf8", "read_only", "blocked", "login", "account",
        "maildrop", "producer", "retrieval", "bad_commands", "processing", "close_reason",
        "finished", "started_greeting", "retrieved", "deleted_count", "mechanism",
        "finalize_pending", "drain_scheduled", "line", "in_flight", "call_count", "logged_in_at",
    )

    def __init__(self, host: Host, conn: Connection) -> None:
        self.host = host
        self.conn = conn
        self.adapter: MailboxSession | None = None
        self.state = AUTHORIZATION
        self.utf8 = False
        self.read_only = False
        self.blocked: str | None = None
        self.login: Login | None = None  # a login under way (USER given, SASL exchange, ...)
        self.account: str | None = None
        self.maildrop: Maildrop | None = None
        self.producer: Iterator[bytes] | None = None  # a LIST/UIDL answer being written
        self.retrieval: retrieval.Retrieval | None = None
        self.bad_commands = 0
        self.processing = False
        self.close_reason = ""
        self.finished = False
        self.started_greeting = False
        self.retrieved = 0
        self.deleted_count = 0
        self.mechanism = ""
        self.finalize_pending = False
        self.drain_scheduled = False
        self.line = b""
        self.in_flight = False  # an adapter call has not returned (see calls.run)
        self.call_count = 0  # adapter calls made: reported at logout
        self.logged_in_at = 0.0  # wall-clock time of the login, for pop3sf-admin who

    @property
    def authenticated(self) -> bool:
        return self.state != AUTHORIZATION

    def describe(self) -> str:
        return f"{self.conn.address} {self.account or '-'}"

    def reply(self, data: bytes) -> None:
        self.conn.write(data)

    def adapter_session(self) -> MailboxSession:
        """The adapter's session, made on first use (on a worker: new_session may do I/O)."""
        if self.adapter is None:
            conn = self.conn
            peer = Peer(conn.address, conn.port, conn.listener, conn.secure)
            self.adapter = self.host.adapter.new_session(peer)
        return self.adapter

    # -- hooks from the connection -------------------------------------------------------------
    def start(self) -> None:
        self.started_greeting = True
        self.conn.write(b"+OK pop3sf ready\r\n")
        self.conn.flush()

    def tls_established(self) -> None:
        if not self.started_greeting:  # implicit TLS: greet now
            self.start()
            return
        # STLS: forget everything learned before the handshake (docs/protocol.md §2).
        self.login = None
        self.utf8 = False
        self.read_only = False
        self.bad_commands = 0
        self.blocked = None
        self.conn.flush()

    def busy(self) -> bool:
        """Work in progress that the idle timer must not cut (a call, a retrieval, output)."""
        return self.in_flight or self.blocked == RETRIEVAL or self.conn.backlog() > 0

    def on_input(self) -> None:
        if self.conn.eof and self.blocked == VERIFICATION:
            # Gone while its attempt waited for its turn: nothing verified, nothing to answer,
            # and a dead connection must not hold the address's place in the queue.
            self.conn.close("client left during the login delay")
            return
        self.process()

    def on_drain(self) -> None:
        self.drain_scheduled = False
        if self.conn.closed or self.conn.backlog() >= self.host.settings.protocol.output_backlog:
            return
        if self.retrieval is not None and not self.in_flight:
            retrieval.next_chunk(self)
        if self.producer is not None:
            transaction.pump(self)
        self.process()

    def on_close(self, reason: str) -> None:
        self.close_reason = reason
        conn = self.conn
        extra = {"POP3SF_CLIENT": conn.address, "POP3SF_EVENT": "disconnect"}
        if self.account is not None:
            extra["POP3SF_USER"] = self.account
            drop = self.maildrop
            if self.state == TRANSACTION and drop and drop.deleted and not self.read_only:
                log.info("%s %s: session ended without QUIT, %s discarded", conn.address,
                         self.account, counted(len(drop.deleted), "marked deletion"),
                         extra=extra)
            log.info("logout %s %s: retrieved=%d deleted=%d bytes=%d calls=%d%s", conn.address,
                     self.account, self.retrieved, self.deleted_count, conn.bytes_out,
                     self.call_count, f" ({reason})" if reason else "",
                     extra={**extra, "POP3SF_BYTES": conn.bytes_out})
        else:
            log.debug("disconnect %s%s", conn.address, f" ({reason})" if reason else "",
                      extra=extra)
        self.producer = None
        host = self.host
        host.stats["bytes_out"] += conn.bytes_out
        host.verifications.cancel(conn, host.penalty_group(conn.address))
        if self.blocked != COMMIT:
            # The client is gone: its account is free now, not when the adapter's cleanup
            # ends, so an immediate reconnect is not refused with [IN-USE].
            host.accounts.release(self)
        if self.in_flight:
            self.finalize_pending = True
        else:
            self._finalize()

    def _finalize(self) -> None:
        """Tell the adapter the connection is over, then release the account's locks."""
        if self.finished:
            return
        self.finished = True
        adapter = self.adapter
        reading, self.retrieval = self.retrieval, None

        def cleanup() -> None:
            if reading is not None and reading.stream is not None:
                reading.stream.close()
            if adapter is not None:
                adapter.connection_closed()

        inline = self.host.adapter.closes_inline and (reading is None or reading.stream is None)
        self.host.call_adapter("mail", cleanup, (), lambda _r, e: self._released(e), inline)

    def _released(self, error: BaseException | None) -> None:
        if isinstance(error, CallTimeout):
            return  # the adapter session is released when the call returns
        if error is not None:
            log.error("connection_closed failed for %s: %r", self.conn.address, error)
        self.host.session_released(self)

    # -- adapter call outcomes (calls.CallOwner) ------------------------------------------------
    def call_settled(self) -> None:
        if self.finalize_pending and not self.in_flight:
            self.finalize_pending = False
            self._finalize()
        elif not self.conn.closed:
            self.process()

    def call_timed_out(self) -> None:
        """The call is abandoned but may still return: the session ends now (releasing what
        the server holds for it), and its late outcome, when it comes, goes through ``done``
        on the closed connection and then ends the adapter session. A commit is different:
        its answer must say what happened, so the client waits for the real outcome."""
        if self.blocked == COMMIT:
            log.error("%s: the commit is taking longer than the call timeout; its answer "
                      "waits for the outcome", self.describe())
            return
        if not self.conn.closed:
            self.conn.write(ERR_TEMP)
            self.conn.flush()
            self.close_reason = "adapter call timed out"
            self.conn.close(self.close_reason)

    # -- the command loop ----------------------------------------------------------------------
    def process(self) -> None:
        """Answer the commands waiting in the input buffer, until blocked or out of input."""
        if self.processing:
            return
        conn = self.conn
        threshold = self.host.settings.protocol.output_backlog
        self.processing = True
        held_back = False  # stopped by the output backlog, with input possibly waiting
        try:
            while not conn.closed and self.blocked is None and not conn.close_when_flushed:
                if conn.backlog() >= threshold:
                    held_back = True
                    break
                drop = self.maildrop
                if drop is not None and drop.answers and transaction.answer_run(self):
                    continue
                line = conn.next_line()
                if line is None:
                    if conn.eof:
                        conn.finish()
                    break
                self._dispatch(line)
        finally:
            self.processing = False
        conn.flush()
        if ((self.blocked in (RETRIEVAL, LISTING) or held_back) and not self.in_flight
                and not self.drain_scheduled and not conn.closed
                and not conn.events & WRITE and conn.backlog() < threshold):
            # Everything went out at once, so no write event will come to continue.
            self.drain_scheduled = True
            self.host.loop.call_soon(self.on_drain)

    def _dispatch(self, line: bytes) -> None:
        conn = self.conn
        if line is TOO_LONG:
            conn.write(ERR_TOO_LONG)
            self.count_bad()
            return
        conn.touch()
        if self.login is not None and self.login.exchange is not None:
            self.login.sasl_step(line)
            return
        self.line = line
        command, args = parse(line)
        self.host.commands[command.verb if command is not None else b"?"] += 1
        problem = self._refusal(command, args)
        if problem is not None:
            conn.write(problem)
            if problem in (ERR_STATE, ERR_UNKNOWN):
                if self.host.debug:
                    log.debug("%s: bad command", conn.address)
                self.count_bad()
            return
        assert command is not None
        if self.host.debug:
            log.debug("%s: %s", conn.address, command.verb.decode())
        _HANDLERS[command.verb](self, args)

    def _refusal(self, command: Command | None, args: list[bytes]) -> bytes | None:
        """The table's checks, in order; None when the handler may run."""
        if command is None:
            return ERR_UNKNOWN
        if self.state not in command.states:
            return ERR_STATE
        if command.plaintext and not self.plaintext_allowed():
            return ERR_PLAINTEXT
        if command.writes and self.read_only:
            return ERR_READ_ONLY
        if not arguments_fit(command, args):
            return ERR_SYNTAX
        return None

    def count_bad(self) -> None:
        self.bad_commands += 1
        if self.bad_commands >= self.host.settings.limits.max_bad_commands:
            self.conn.write(ERR_TOO_MANY_BAD)
            self.close_reason = "too many bad commands"
            self.conn.finish()

    def plaintext_allowed(self) -> bool:
        return self.conn.secure or self.host.plaintext_allowed(self.conn.address)

    # -- commands in any state -----------------------------------------------------------------
    def _offers(self, command: Command) -> bool:
        if command.plaintext or command.verb == b"AUTH":
            return self.plaintext_allowed()
        if command.verb == b"STLS":  # only before login (RFC 2595 §4)
            return (self.state == AUTHORIZATION and not self.conn.secure
                    and self.host.tls_context is not None)
        if command.verb == b"XPRO":
            return self.host.adapter.allows_read_only
        return True

    def cmd_capa(self, args: list[bytes]) -> None:
        version = self.host.settings.protocol.implementation_version
        self.reply(capabilities(self._offers, __version__ if version else ""))

    def cmd_quit(self, args: list[bytes]) -> None:
        if self.state == TRANSACTION:
            transaction.commit(self)
            return
        self.reply(b"+OK pop3sf signing off\r\n")
        self.close_reason = "QUIT"
        self.conn.finish()

    def cmd_lang(self, args: list[bytes]) -> None:
        if not args:
            self.reply(b"+OK Language listing follows\r\nen English\r\n.\r\n")
        elif len(args) == 1 and args[0].lower() in (b"en", b"*", b"i-default"):
            self.reply(b"+OK en Language is English\r\n")
        else:
            self.reply(b"-ERR Unsupported language\r\n")

    # -- AUTHORIZATION: see login.py ----------------------------------------------------------
    def logged_in(self, maildrop: Maildrop) -> None:
        """The login flow's end: the session enters TRANSACTION with this snapshot."""
        self.login = None
        self.blocked = None
        self.maildrop = maildrop
        self.state = TRANSACTION
        self.logged_in_at = time.time()
        self.host.stats["logins"] += 1
        self.host.stats["login " + self.mechanism] += 1
        mode = " (read-only)" if self.read_only else ""
        self.reply(f"+OK Logged in{mode}, {maildrop.summary()}\r\n".encode())

    def end_login(self, reply: bytes) -> None:
        """A login that can't proceed: release the adapter session first, then answer and
        close (docs/adapters.md: connection_closed comes before the next login can start)."""
        if self.conn.closed:
            return
        self.close_reason = "login refused"
        self.blocked = CLOSING
        conn = self.conn

        def answer(_r: Any, _e: BaseException | None) -> None:
            conn.write(reply)
            conn.finish()

        adapter, self.adapter = self.adapter, None
        if adapter is None:
            answer(None, None)
        else:
            calls.run(self, "mail", adapter.connection_closed, (), answer)

    # -- TRANSACTION and UPDATE: see transaction.py -------------------------------------------
    @property
    def drop(self) -> Maildrop:
        assert self.maildrop is not None
        return self.maildrop

    def detach_adapter(self) -> MailboxSession:
        """The adapter session, no longer the session's to close (the commit closes it)."""
        adapter, self.adapter = self.adapter_session(), None
        return adapter

    def committing(self) -> bool:
        return self.blocked == COMMIT

    def shutdown(self) -> None:
        """Server stopping: idle sessions are told and closed; work in progress continues."""
        if self.conn.closed or self.blocked not in (None, VERIFICATION):
            return  # work under way finishes; the grace period bounds it
        if not self.started_greeting:  # a PROXY header or a TLS handshake still awaited:
            self.conn.close("server shutdown")  # no POP3 reply may come before the greeting
            return
        self.conn.write(ERR_SHUTDOWN)
        self.close_reason = "server shutdown"
        self.conn.finish()


_HANDLERS: dict[bytes, Callable[[Session, list[bytes]], None]] = {
    verb: getattr(Session, name, None) or getattr(login, name, None) or getattr(transaction, name)
    for verb in COMMANDS for name in ["cmd_" + verb.decode().lower()]}
