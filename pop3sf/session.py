"""The POP3 state machine (RFC 1939, 2449, 2595, 3206, 5034, 6856; SPEC §P).

One command at a time, strictly in order: while an adapter call is in flight, a penalty delay
runs, a TLS handshake is under way or the output backlog is above its threshold, the session
simply stops taking lines from the connection's input buffer. Everything answerable from the
login snapshot (STAT, LIST, UIDL, DELE, RSET, NOOP) is answered on the loop thread without a
worker round trip.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import traceback
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from pop3sf import __version__, sasl
from pop3sf.adapters import (
    AuthenticationFailed,
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
from pop3sf.wire import CHUNK, HeaderTooLarge, WireEncoder

from .connection import TOO_LONG, WRITE
from .logs import counted
from .workers import CallTimeout

if TYPE_CHECKING:
    from .connection import Connection
    from .server import Server

log = logging.getLogger("pop3sf.session")

AUTHORIZATION, TRANSACTION, UPDATE = 0, 1, 2
_UID_OK = re.compile(rb"[\x21-\x7e]{1,70}\Z")
_LIST_BATCH = 512

# Human texts never start with "[" (RESP-CODES) and never echo client input (SPEC §P2).
OK = b"+OK\r\n"
ERR_STATE = b"-ERR Command not valid in this state\r\n"
ERR_UNKNOWN = b"-ERR Unknown command\r\n"
ERR_SYNTAX = b"-ERR Syntax error in arguments\r\n"
ERR_NO_MSG = b"-ERR No such message\r\n"
ERR_DELETED = b"-ERR Message already deleted\r\n"
ERR_GONE = b"-ERR Message no longer exists\r\n"
ERR_AUTH = b"-ERR [AUTH] Authentication failed\r\n"
ERR_PLAINTEXT = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections\r\n"
ERR_TEMP = b"-ERR [SYS/TEMP] Temporary server failure, try again later\r\n"
ERR_PERM = b"-ERR [SYS/PERM] The maildrop cannot be served\r\n"
ERR_IN_USE = b"-ERR [IN-USE] The maildrop is already in use\r\n"
ERR_READ_ONLY = b"-ERR [X-POP3SF-READ-ONLY] The maildrop is read-only in this session\r\n"
ERR_TOO_LONG = b"-ERR Line too long\r\n"
ERR_TOO_MANY_BAD = b"-ERR Too many bad commands, closing connection\r\n"
ERR_NEEDS_UTF8 = b"-ERR [UTF8] This message needs UTF8; enable it with the UTF8 command\r\n"
#: Pipelined RETR/TOP of messages up to this size are read in batches (see _read_batch).
_BATCH_SMALL = 128 * 1024
_NONE: frozenset[int] = frozenset()
_BATCH_TOP = 1000
_TOP_READ = 16 * 1024
_BATCH_MAX = 64
_BATCH_BYTES = 2 * 1024 * 1024


def _error_reply(error: BaseException) -> bytes:
    if isinstance(error, MessageGone):
        return ERR_GONE
    if isinstance(error, PermanentFailure):
        return ERR_PERM
    if isinstance(error, MaildropInUse):
        return ERR_IN_USE
    return ERR_TEMP


class Retrieval:
    """A RETR/TOP in progress: its stream and encoder live on whichever thread reads next."""

    __slots__ = ("uid", "encoder", "stream", "started", "eof", "read_size")

    def __init__(self, uid: str, encoder: WireEncoder, read_size: int = CHUNK) -> None:
        self.uid = uid
        self.encoder = encoder
        self.read_size = read_size
        self.stream: Any = None
        self.started = False
        self.eof = False


class Session:
    __slots__ = (
        "server", "conn", "adapter", "state", "user", "utf8", "read_only", "waiting",
        "sasl", "account", "infos", "uids", "sizes", "refuse", "downgrade", "deleted",
        "live_count", "live_size", "producer", "retrieval", "bad_commands", "processing",
        "close_reason", "finished", "started_greeting", "retrieved",
        "deleted_count", "mechanism", "in_flight", "finalize_pending", "drain_scheduled",
        "answers", "line", "calls", "holds_account",
        "logged_in_at",
    )

    def __init__(self, server: Server, conn: Connection) -> None:
        self.server = server
        self.conn = conn
        self.adapter: MailboxSession | None = None
        self.state = AUTHORIZATION
        self.user: str | None = None
        self.utf8 = False
        self.read_only = False
        self.waiting: str | None = None
        self.sasl: sasl.Exchange | None = None
        self.account: str | None = None
        self.holds_account = False  # the server's per-account lock and session slot
        self.infos: list[MessageInfo] = []
        self.uids: list[str] = []
        self.sizes: list[int] = []
        # Message-number sets, shared empty until needed: 10,000 idle sessions are the norm.
        self.refuse: AbstractSet[int] = _NONE
        self.downgrade: AbstractSet[int] = _NONE
        self.deleted: AbstractSet[int] = _NONE
        self.live_count = 0
        self.live_size = 0
        self.producer: Iterator[bytes] | None = None
        self.retrieval: Retrieval | None = None
        self.bad_commands = 0
        self.processing = False
        self.close_reason = ""
        self.finished = False
        self.started_greeting = False
        self.retrieved = 0
        self.deleted_count = 0
        self.mechanism = ""
        self.in_flight = False
        self.finalize_pending = False
        self.drain_scheduled = False
        #: Exact command line -> its answer, for commands answered from the snapshot alone
        #: (STAT, NOOP, LIST n, UIDL n); cleared by DELE and RSET. Pipelined runs of them are
        #: answered straight from the input buffer (see _answer_run).
        self.answers: dict[bytes, bytes] | None = None
        self.line = b""
        self.calls = 0  # adapter calls that went to a worker: reported at logout
        self.logged_in_at = 0.0  # wall-clock time of the login, for pop3sf-admin who

    # -- hooks from the connection -------------------------------------------------------------
    def start(self) -> None:
        self.started_greeting = True
        self.conn.write(b"+OK pop3sf ready\r\n")
        self.conn.flush()

    def tls_established(self) -> None:
        if not self.started_greeting:  # implicit TLS: greet now
            self.start()
            return
        # STLS: forget everything learned before the handshake (SPEC §P5).
        self.user = None
        self.utf8 = False
        self.read_only = False
        self.bad_commands = 0
        self.waiting = None
        self.conn.flush()

    def busy(self) -> bool:
        """Work in progress that the idle timer must not cut (a call, a retrieval, output)."""
        return self.in_flight or self.retrieval is not None or self.conn.backlog() > 0

    def on_input(self) -> None:
        if self.conn.eof and self.waiting == "verification":
            # Gone while its attempt waited for its turn: nothing verified, nothing to answer,
            # and a dead connection must not hold the address's place in the queue.
            self.conn.close("client left during the login delay")
            return
        self._process()

    def on_drain(self) -> None:
        self.drain_scheduled = False
        if self.conn.closed or \
                self.conn.backlog() >= self.server.settings.protocol.output_backlog:
            return
        if self.retrieval is not None and not self.in_flight:
            self._next_chunk()
        if self.producer is not None:
            self._pump()
        self._process()

    def on_close(self, reason: str) -> None:
        self.close_reason = reason
        conn = self.conn
        extra = {"POP3SF_CLIENT": conn.address, "POP3SF_EVENT": "disconnect"}
        if self.account is not None:
            extra["POP3SF_USER"] = self.account
            if self.state == TRANSACTION and self.deleted and not self.read_only:
                log.info("%s %s: session ended without QUIT, %s discarded", conn.address,
                         self.account, counted(len(self.deleted), "marked deletion"),
                         extra=extra)
            log.info("logout %s %s: retrieved=%d deleted=%d bytes=%d calls=%d%s", conn.address,
                     self.account, self.retrieved, self.deleted_count, conn.bytes_out,
                     self.calls,
                     f" ({reason})" if reason else "",
                     extra={**extra, "POP3SF_BYTES": conn.bytes_out})
        else:
            log.debug("disconnect %s%s", conn.address, f" ({reason})" if reason else "",
                      extra=extra)
        self.producer = None
        server = self.server
        server.verifications.cancel(conn, server.penalty_group(conn.address))
        if self.waiting != "commit":
            # The client is gone: its account is free now, not when the adapter's cleanup
            # ends, so an immediate reconnect is not refused with [IN-USE].
            server.release_account(self)
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
        retrieval, self.retrieval = self.retrieval, None

        def cleanup() -> None:
            if retrieval is not None and retrieval.stream is not None:
                retrieval.stream.close()
            if adapter is not None:
                adapter.connection_closed()

        self.server.call_adapter("mail", cleanup, (), lambda _r, e: self._released(e))

    def _released(self, error: BaseException | None) -> None:
        if isinstance(error, CallTimeout):
            return  # the adapter session is released when the call returns
        if error is not None:
            log.error("connection_closed failed for %s: %r", self.conn.address, error)
        self.server.session_released(self)

    # -- the command loop ----------------------------------------------------------------------
    def _process(self) -> None:
        if self.processing:
            return
        conn = self.conn
        threshold = self.server.settings.protocol.output_backlog
        self.processing = True
        held_back = False  # stopped by the output backlog, with input possibly waiting
        try:
            while (not conn.closed and self.waiting is None and not self.in_flight
                   and self.producer is None and self.retrieval is None
                   and not conn.close_when_flushed):
                if conn.backlog() >= threshold:
                    held_back = True
                    break
                if self.answers and self._answer_run():
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
        if ((self.retrieval is not None or self.producer is not None or held_back)
                and not self.in_flight and not self.drain_scheduled and not conn.closed
                and not conn.events & WRITE and conn.backlog() < threshold):
            # Everything went out at once, so no write event will come to continue.
            self.drain_scheduled = True
            self.server.loop.call_soon(self.on_drain)

    def _answer_run(self) -> bool:
        """Answer a run of already-answered commands from the input buffer in one pass.

        A pipelined burst of LIST n / UIDL n costs a dict lookup per line instead of a full
        dispatch; anything else stops the run and goes the ordinary way.
        """
        conn = self.conn
        if conn.discarding:
            return False
        buf, limit, answers = conn.inbuf, conn.line_limit, self.answers
        assert answers is not None
        out: list[bytes] = []
        pos = 0
        while len(out) < 1024:
            end = buf.find(b"\n", pos, pos + limit)
            if end < 0:
                break
            line = buf[pos:end]
            answer = answers.get(bytes(line[:-1] if line[-1:] == b"\r" else line))
            if answer is None:
                break
            out.append(answer)
            pos = end + 1
        if not out:
            return False
        del buf[:pos]
        conn.maybe_resume_reading()
        conn.touch()
        conn.write(b"".join(out))
        return True

    def _answer(self, answer: bytes) -> None:
        """Reply, and remember the reply for this exact line (see _answer_run)."""
        self.conn.write(answer)
        answers = self.answers
        if answers is None:
            answers = self.answers = {}
        if len(answers) < 4096 and len(self.line) <= 32:  # a bounded cache, whatever the input
            answers[self.line] = answer

    def _dispatch(self, line: bytes) -> None:
        conn = self.conn
        if line is TOO_LONG:
            conn.write(ERR_TOO_LONG)
            self._count_bad()
            return
        conn.touch()
        if self.sasl is not None:
            self._sasl_step(line)
            return
        self.line = line
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        handler = _COMMANDS[self.state].get(verb)
        if handler is None:
            if self.server.debug:
                log.debug("%s: bad command", conn.address)
            known = any(verb in table for table in _COMMANDS)
            conn.write(ERR_STATE if known else ERR_UNKNOWN)
            self._count_bad()
            return
        if verb == b"PASS":  # the rest of the line verbatim, spaces included (SPEC §P2)
            arg = line[5:]
            args = [arg] if arg else []
        else:
            args = rest.split()
        if self.server.debug:
            log.debug("%s: %s", conn.address, verb.decode("ascii", "replace"))
        handler(self, args)

    def _count_bad(self) -> None:
        self.bad_commands += 1
        if self.bad_commands >= self.server.settings.limits.max_bad_commands:
            self.conn.write(ERR_TOO_MANY_BAD)
            self.close_reason = "too many bad commands"
            self.conn.finish()

    def _reply(self, data: bytes) -> None:
        self.conn.write(data)

    # -- adapter calls -------------------------------------------------------------------------
    def _call(self, pool: str, func: Callable[..., Any], args: tuple[Any, ...],
              done: Callable[[Any, BaseException | None], None]) -> None:
        """Run one adapter call; ``done`` gets its outcome on the loop, even a late one."""
        self.in_flight = True
        self.calls += 1
        self.server.call_adapter(pool, func, args, lambda r, e: self._returned(done, r, e))

    def _returned(self, done: Callable[[Any, BaseException | None], None], result: Any,
                  error: BaseException | None) -> None:
        if isinstance(error, CallTimeout):
            self._timed_out()
            return
        self.in_flight = False
        done(result, error)
        if self.finalize_pending and not self.in_flight:
            self.finalize_pending = False
            self._finalize()
        elif not self.conn.closed:
            self._process()

    def _timed_out(self) -> None:
        """The call is abandoned but may still return: the session ends now (releasing what
        the server holds for it), and its late outcome, when it comes, goes through ``done``
        on the closed connection and then ends the adapter session. A commit is different:
        its answer must say what happened, so the client waits for the real outcome."""
        if self.waiting == "commit":
            log.error("%s %s: the commit is taking longer than the call timeout; its answer "
                      "waits for the outcome", self.conn.address, self.account)
            return
        if not self.conn.closed:
            self.conn.write(ERR_TEMP)
            self.conn.flush()
            self.close_reason = "adapter call timed out"
            self.conn.close(self.close_reason)

    def _adapter_session(self) -> MailboxSession:
        if self.adapter is None:
            conn = self.conn
            peer = Peer(conn.address, conn.port, conn.listener, conn.ssl is not None)
            self.adapter = self.server.adapter.new_session(peer)
        return self.adapter

    def _log_adapter_error(self, what: str, error: BaseException) -> None:
        if isinstance(error, MessageGone | AuthenticationFailed):
            return
        if isinstance(error, TemporaryFailure | PermanentFailure | MaildropInUse):
            log.warning("%s %s: %s: %s: %s", self.conn.address, self.account or "-", what,
                        type(error).__name__, error)
        else:
            log.error("%s %s: %s failed:\n%s", self.conn.address, self.account or "-", what,
                      "".join(traceback.format_exception(error)).rstrip())

    # -- AUTHORIZATION -------------------------------------------------------------------------
    def plaintext_allowed(self) -> bool:
        return self.conn.ssl is not None or self.server.plaintext_allowed(self.conn.address)

    def capabilities(self) -> bytes:
        lines = [b"+OK Capability list follows", b"TOP", b"UIDL"]
        if self.plaintext_allowed():
            lines.append(b"USER")
        lines += [b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE"]
        if self.plaintext_allowed():
            lines.append(b"SASL " + " ".join(sasl.MECHANISMS).encode())
        if (self.state == AUTHORIZATION and self.conn.ssl is None
                and self.server.tls_context is not None):
            lines.append(b"STLS")  # only valid before login (RFC 2595 §4)
        lines += [b"UTF8 USER", b"LANG"]
        impl = b"IMPLEMENTATION pop3sf"
        if self.server.settings.protocol.implementation_version:
            impl += b" " + __version__.encode()
        lines.append(impl)
        if self.server.adapter.allows_read_only:
            lines.append(b"X-POP3SF-READ-ONLY")
        lines.append(b".")
        return b"\r\n".join(lines) + b"\r\n"

    def cmd_capa(self, args: list[bytes]) -> None:
        self._reply(ERR_SYNTAX if args else self.capabilities())

    def cmd_quit(self, args: list[bytes]) -> None:
        if self.state == TRANSACTION:
            self._update()
            return
        self._reply(b"+OK pop3sf signing off\r\n")
        self.close_reason = "QUIT"
        self.conn.finish()

    def cmd_stls(self, args: list[bytes]) -> None:
        conn = self.conn
        if args:
            self._reply(ERR_SYNTAX)
        elif conn.ssl is not None:
            self._reply(b"-ERR Already using TLS\r\n")
        elif self.server.tls_context is None:
            self._reply(b"-ERR TLS is not available\r\n")
        else:
            self._reply(b"+OK Begin TLS negotiation\r\n")
            self.waiting = "tls"
            conn.start_tls()  # discards whatever was pipelined behind STLS (SPEC §P5)

    def cmd_utf8(self, args: list[bytes]) -> None:
        if args:
            self._reply(ERR_SYNTAX)
            return
        self.utf8 = True
        self._reply(b"+OK UTF8 enabled\r\n")

    def cmd_lang(self, args: list[bytes]) -> None:
        if not args:
            self._reply(b"+OK Language listing follows\r\nen English\r\n.\r\n")
        elif len(args) == 1 and args[0].lower() in (b"en", b"*", b"i-default"):
            self._reply(b"+OK en Language is English\r\n")
        else:
            self._reply(b"-ERR Unsupported language\r\n")

    def cmd_xpro(self, args: list[bytes]) -> None:
        if args:
            self._reply(ERR_SYNTAX)
            self._count_bad()
        elif not self.server.adapter.allows_read_only:
            self._reply(b"-ERR [X-POP3SF-READ-ONLY] Read-only mode is not available\r\n")
        else:
            self.read_only = True
            self._reply(b"+OK Read-only mode\r\n")

    def _text(self, raw: bytes) -> str | None:
        """Client text: strict UTF-8 once UTF8 is on; otherwise octets kept losslessly."""
        if self.utf8:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
        return sasl.to_text(raw)

    def cmd_user(self, args: list[bytes]) -> None:
        if not self.plaintext_allowed():
            self._reply(ERR_PLAINTEXT)
            return
        if len(args) != 1:
            self._reply(ERR_SYNTAX)
            return
        name = self._text(args[0])
        if name is None:
            self._reply(b"-ERR Invalid UTF-8 in user name\r\n")
            return
        self.user = name
        self._reply(b"+OK Send your password\r\n")

    def cmd_pass(self, args: list[bytes]) -> None:
        if not self.plaintext_allowed():
            self._reply(ERR_PLAINTEXT)
            return
        if self.user is None:
            self._reply(b"-ERR Send USER first\r\n")
            return
        user, self.user = self.user, None
        password = self._text(args[0] if args else b"")
        if password is None:
            self._reply(b"-ERR Invalid UTF-8 in password\r\n")
            return
        self._authenticate(Credentials(user, password, "USER"))

    def cmd_auth(self, args: list[bytes]) -> None:
        allowed = self.plaintext_allowed()
        if not args:
            mechs = b"".join(m.encode() + b"\r\n" for m in sasl.MECHANISMS) if allowed else b""
            self._reply(b"+OK Supported mechanisms follow\r\n" + mechs + b".\r\n")
            return
        if not allowed:
            self._reply(ERR_PLAINTEXT)
            return
        mechanism = args[0].upper().decode("ascii", "replace")
        if mechanism not in sasl.MECHANISMS or len(args) > 2:
            self._reply(b"-ERR Unsupported authentication mechanism\r\n"
                        if len(args) <= 2 else ERR_SYNTAX)
            return
        exchange = sasl.Exchange(mechanism)
        try:
            initial = sasl.decode_response(args[1]) if len(args) == 2 else None
            challenge, creds = exchange.start(initial)
        except sasl.SaslError as exc:
            self._reply(b"-ERR " + str(exc).encode() + b"\r\n")
            return
        self._sasl_continue(exchange, challenge, creds)

    def _sasl_continue(self, exchange: sasl.Exchange, challenge: bytes,
                       creds: tuple[str, str] | None) -> None:
        if creds is not None:
            self.sasl = None
            self.conn.line_limit = self.server.settings.protocol.max_line_length
            self._authenticate(Credentials(creds[0], creds[1], exchange.mechanism))
            return
        self.sasl = exchange
        self.conn.line_limit = self.server.settings.protocol.max_auth_line_length
        self._reply(challenge)

    def _sasl_step(self, line: bytes) -> None:
        exchange = self.sasl
        assert exchange is not None
        try:
            challenge, creds = exchange.step(sasl.decode_response(line))
        except sasl.SaslError as exc:
            self.sasl = None
            self.conn.line_limit = self.server.settings.protocol.max_line_length
            self._reply(b"-ERR " + str(exc).encode() + b"\r\n")
            return
        self._sasl_continue(exchange, challenge, creds)

    def _authenticate(self, creds: Credentials) -> None:
        """Queue the verification: the penalty delays its *processing*, not just the answer."""
        self.mechanism = creds.mechanism
        self.waiting = "verification"
        server, conn = self.server, self.conn
        server.verifications.request(conn, server.penalty_group(conn.address),
                                     lambda: self._verify(creds), self._verification_refused)

    def _verification_refused(self, why: str) -> None:
        self.waiting = None
        log.warning("%s: login refused: %s", self.conn.address, why)
        self._reply(ERR_TEMP)
        self._process()

    def _verify(self, creds: Credentials) -> None:
        self.waiting = None
        self._call("auth", self._do_authenticate, (creds,),
                   lambda r, e: self._verified(creds, r, e))

    def _do_authenticate(self, creds: Credentials) -> AuthResult:
        return self._adapter_session().authenticate(creds)

    def _verified(self, creds: Credentials, result: Any, error: BaseException | None) -> None:
        conn = self.conn
        server = self.server
        if error is None and not (isinstance(result, AuthResult) and
                                  isinstance(result.account_id, str) and result.account_id):
            error = TemporaryFailure(f"authenticate() returned {type(result).__name__}, "
                                     "not an AuthResult with an account_id")
        if isinstance(error, AuthenticationFailed):
            # Recorded even when the client already left, before the next attempt may start.
            server.penalties.record_failure(server.penalty_group(conn.address),
                                            creds.username.encode("utf-8", "replace"),
                                            creds.password_bytes())
            server.verifications.finished(conn)
            log.info("%s: login failed for %s (%s)", conn.address, _printable(creds.username),
                     creds.mechanism,
                     extra={"POP3SF_CLIENT": conn.address, "POP3SF_EVENT": "auth-failed"})
            if not conn.closed:
                self._reply(ERR_AUTH)
            return
        server.verifications.finished(conn)
        if error is not None:
            log.error("%s: authentication backend failed: %s: %s", conn.address,
                      type(error).__name__, _scrub(str(error), creds))
            if not conn.closed:
                self._reply(_error_reply(error) if not isinstance(error, MaildropInUse)
                            else ERR_TEMP)
            return
        if conn.closed:
            return
        account = result.account_id
        problem = server.claim_account(self, account, self.read_only)
        if problem is not None:
            self._end_login(problem)
            return
        self.account = account
        self._call("mail", self._do_login, (result,), self._listed)

    def _do_login(self, result: AuthResult) -> list[MessageInfo]:
        adapter = self._adapter_session()
        adapter.login_succeeded(result, self.read_only)
        return list(adapter.list_messages())

    def _listed(self, result: Any, error: BaseException | None) -> None:
        if error is None:
            try:
                self._snapshot(result)
            except (TypeError, ValueError) as exc:
                error = TemporaryFailure(f"list_messages() returned garbage: {exc}")
        if error is not None:
            self._log_adapter_error("login", error)
            self.server.release_account(self)
            self.account = None  # never logged in
            self._end_login(_error_reply(error))
            return
        if self.conn.closed:
            return
        self.state = TRANSACTION
        self.conn.authenticated = True
        self.logged_in_at = time.time()
        self.server.logged_in(self)
        log.info("login %s %s (%s%s): %s, %d octets", self.conn.address, self.account,
                 self.mechanism, ", read-only" if self.read_only else "",
                 counted(self.live_count, "message"),
                 self.live_size, extra={"POP3SF_CLIENT": self.conn.address,
                                        "POP3SF_USER": self.account, "POP3SF_EVENT": "login"})
        mode = " (read-only)" if self.read_only else ""
        self._reply(f"+OK Logged in{mode}, {counted(self.live_count, 'message')} "
                    f"({self.live_size} octets)\r\n".encode())

    def _end_login(self, reply: bytes) -> None:
        """A login that can't proceed: release the adapter session first (SPEC §A4), then
        answer and close."""
        if self.conn.closed:
            return
        self.close_reason = "login refused"
        self.waiting = "closing"
        conn = self.conn

        def answer(_r: Any, _e: BaseException | None) -> None:
            conn.write(reply)
            conn.finish()

        adapter, self.adapter = self.adapter, None
        if adapter is None:
            answer(None, None)
        else:
            self._call("mail", adapter.connection_closed, (), answer)

    def _snapshot(self, listing: Any) -> None:
        infos = [MessageInfo(*m) if not isinstance(m, MessageInfo) else m for m in listing]
        limit = self.server.settings.limits.max_messages
        if limit and len(infos) > limit:
            infos = infos[-limit:]  # the newest N
        policy = self.server.settings.protocol.non_utf8_clients
        seen: set[str] = set()
        uids: list[str] = []
        sizes: list[int] = []
        refuse: set[int] = set()
        downgrade: set[int] = set()
        for i, info in enumerate(infos):
            if not isinstance(info.uid, str) or not isinstance(info.size, int) or info.size < 0:
                raise ValueError(f"message {i + 1}: uid must be str and size an int >= 0")
            raw = info.uid.encode("utf-8", "surrogateescape")
            uid = info.uid if _UID_OK.match(raw) else hashlib.sha1(raw).hexdigest()
            if uid in seen:
                n = 1
                while f"{uid[:60]}.{n}" in seen:
                    n += 1
                log.warning("%s: duplicate uid %r from the adapter made unique", self.account,
                            uid)
                uid = f"{uid[:60]}.{n}"
            seen.add(uid)
            uids.append(uid)
            size = info.size
            if info.utf8_header and not self.utf8 and policy != "send":
                if policy == "downgrade" and info.downgraded_size is not None:
                    downgrade.add(i)
                    size = info.downgraded_size
                else:
                    refuse.add(i)
            sizes.append(size)
        self.infos, self.uids, self.sizes = infos, uids, sizes
        self.refuse, self.downgrade = refuse or _NONE, downgrade or _NONE
        self.live_count, self.live_size = len(sizes), sum(sizes)

    # -- TRANSACTION ---------------------------------------------------------------------------
    def _index(self, args: list[bytes], nargs: int) -> int | bytes:
        """The 0-based index named by args[0], or the -ERR answer."""
        if len(args) != nargs or not all(a.isdigit() and len(a) <= 10 for a in args):
            return ERR_SYNTAX
        n = int(args[0]) - 1
        if not 0 <= n < len(self.infos):
            return ERR_NO_MSG
        if n in self.deleted:
            return ERR_DELETED
        return n

    def _message(self, args: list[bytes], nargs: int = 1) -> int | None:
        """The 0-based index named by args[0], or None after answering -ERR."""
        n = self._index(args, nargs)
        if isinstance(n, bytes):
            self._reply(n)
            return None
        return n

    def cmd_stat(self, args: list[bytes]) -> None:
        if args:
            self._reply(ERR_SYNTAX)
        else:
            self._answer(f"+OK {self.live_count} {self.live_size}\r\n".encode())

    def cmd_noop(self, args: list[bytes]) -> None:
        if args:
            self._reply(ERR_SYNTAX)
        else:
            self._answer(OK)

    def _listing(self, values: list[Any], header: bytes) -> Iterator[bytes]:
        yield header
        deleted = self.deleted
        batch: list[str] = []
        for i, value in enumerate(values):
            if i not in deleted:
                batch.append(f"{i + 1} {value}\r\n")
                if len(batch) >= _LIST_BATCH:
                    yield "".join(batch).encode()
                    batch = []
        batch.append(".\r\n")
        yield "".join(batch).encode()

    def _list_or_uidl(self, args: list[bytes], values: list[Any], what: bytes) -> None:
        if args:
            n = self._message(args)
            if n is not None:
                self._answer(f"+OK {n + 1} {values[n]}\r\n".encode())
            return
        self.producer = self._listing(values, b"+OK " + what + b" follows\r\n")
        self._pump()

    def cmd_list(self, args: list[bytes]) -> None:
        self._list_or_uidl(args, self.sizes, b"scan listing")

    def cmd_uidl(self, args: list[bytes]) -> None:
        self._list_or_uidl(args, self.uids, b"unique-id listing")

    def _pump(self) -> None:
        threshold = self.server.settings.protocol.output_backlog
        while self.producer is not None and self.conn.backlog() < threshold:
            chunk = next(self.producer, None)
            if chunk is None:
                self.producer = None
            else:
                self.conn.write(chunk)

    def cmd_dele(self, args: list[bytes]) -> None:
        if self.read_only:
            self._reply(ERR_READ_ONLY)
            return
        n = self._message(args)
        if n is not None:
            self.answers = None
            if not self.deleted:
                self.deleted = set()
            assert isinstance(self.deleted, set)
            self.deleted.add(n)
            self.live_count -= 1
            self.live_size -= self.sizes[n]
            self._reply(f"+OK Message {n + 1} deleted\r\n".encode())

    def cmd_rset(self, args: list[bytes]) -> None:
        if self.read_only:
            self._reply(ERR_READ_ONLY)
        elif args:
            self._reply(ERR_SYNTAX)
        else:
            self.answers = None
            self.deleted = _NONE
            self.live_count, self.live_size = len(self.sizes), sum(self.sizes)
            self._reply(f"+OK {counted(self.live_count, 'message')} ({self.live_size} octets)\r\n"
                        .encode())

    def cmd_retr(self, args: list[bytes]) -> None:
        n = self._message(args)
        if n is not None:
            self._retrieve(n, None)

    def cmd_top(self, args: list[bytes]) -> None:
        n = self._message(args, 2)
        if n is not None:
            self._retrieve(n, int(args[1]))

    def _retrieve(self, n: int, top_lines: int | None) -> None:
        if n in self.refuse:
            self._reply(ERR_NEEDS_UTF8)
            return
        if self._batchable(n, top_lines) and self.server.adapter.blocking:
            jobs, ends = self._pipelined_retrievals([(n, top_lines)])
            if len(jobs) > 1:
                self._retrieve_batch(jobs, ends)
                return
        self._stream(n, top_lines)

    def _stream(self, n: int, top_lines: int | None) -> None:
        encoder = WireEncoder(top_lines=top_lines, downgrade=n in self.downgrade)
        self.retrieval = Retrieval(self.infos[n].uid, encoder,
                                   CHUNK if top_lines is None else _TOP_READ)
        if top_lines is None:
            self.retrieved += 1
        self._next_chunk()

    # A run of pipelined RETR/TOP of small messages is read in one worker call: a worker round
    # trip costs more CPU than reading a small message. Each message's output in a batch is
    # capped (_BATCH_SMALL): a TOP of a few lines can still be a 20 MB line, or a whole message
    # without a blank line; the batch stops there and that one streams like any big message.
    def _batchable(self, n: int, top_lines: int | None) -> bool:
        """Small enough to read whole in a batch: a small message, or a short TOP."""
        return self.sizes[n] <= _BATCH_SMALL if top_lines is None else top_lines <= _BATCH_TOP

    def _pipelined_retrievals(self, jobs: list[tuple[int, int | None]]
                              ) -> tuple[list[tuple[int, int | None]], list[int]]:
        """The RETR/TOP commands queued right behind this one, and where each one's line ends
        in the input buffer. The lines stay there until their answers are written."""
        conn = self.conn
        ends: list[int] = []
        if conn.discarding or self.sasl is not None:
            return jobs, ends
        buf, limit = conn.inbuf, conn.line_limit
        total = min(self.sizes[jobs[0][0]], _BATCH_SMALL)
        pos = 0
        while len(jobs) < _BATCH_MAX:
            end = buf.find(b"\n", pos, pos + limit)
            if end < 0:
                break
            line = bytes(buf[pos:end]).removesuffix(b"\r")
            verb, _, rest = line.partition(b" ")
            verb = verb.upper()
            if verb not in (b"RETR", b"TOP"):
                break
            args = rest.split()
            n = self._index(args, 1 if verb == b"RETR" else 2)
            if isinstance(n, bytes) or n in self.refuse:
                break
            top = None if verb == b"RETR" else int(args[1])
            if not self._batchable(n, top) or total > _BATCH_BYTES:
                break
            total += min(self.sizes[n], _BATCH_SMALL)
            jobs.append((n, top))
            pos = end + 1
            ends.append(pos)
        return jobs, ends

    def _retrieve_batch(self, jobs: list[tuple[int, int | None]], ends: list[int]) -> None:
        work = [(self.infos[n].uid, WireEncoder(top_lines=top, downgrade=n in self.downgrade),
                 _BATCH_SMALL if top is None else _TOP_READ) for n, top in jobs]
        self._call("mail", self._read_batch, (work,),
                   lambda r, e: self._batch_read(jobs, ends, r, e))

    def _read_batch(self, work: list[tuple[str, WireEncoder, int]]
                    ) -> list[bytes | BaseException | None]:
        """Each message's complete output or exception, in order; None for one whose output
        passed the cap (it and those after it are left for the ordinary way)."""
        results: list[bytes | BaseException | None] = []
        session = self._adapter_session()
        for uid, encoder, size in work:
            try:
                stream = session.open_message(uid)
                try:
                    parts = []
                    out = 0
                    while not encoder.done and out <= _BATCH_SMALL:
                        data = stream.read(size)
                        if not data:
                            break
                        parts.append(encoder.feed(data))
                        out += len(parts[-1])
                    if out > _BATCH_SMALL:
                        results.append(None)
                        return results
                    parts.append(encoder.finish())
                finally:
                    stream.close()
                results.append(b"".join(parts))
            except Exception as exc:  # answered per message, like separate commands
                results.append(exc)
        return results

    def _batch_read(self, jobs: list[tuple[int, int | None]], ends: list[int], results: Any,
                    error: BaseException | None) -> None:
        if self.conn.closed:
            return
        if error is not None:
            self._log_adapter_error("retrieving", error)
            self._reply(_error_reply(error))
            return  # the commands behind it are still in the input buffer
        out: list[bytes] = []
        for result in results:
            if isinstance(result, bytes):
                out += (b"+OK Message follows\r\n", result, b".\r\n")
            elif result is not None:
                if isinstance(result, HeaderTooLarge | TypeError):
                    result = PermanentFailure(str(result))
                self._log_adapter_error("retrieving", result)
                out.append(_error_reply(result))
        done = sum(1 for result in results if result is not None)
        self.retrieved += sum(1 for i, result in enumerate(results)
                              if jobs[i][1] is None and isinstance(result, bytes))
        consumed = len(results) - 1  # commands answered (or started) after the first
        if consumed:
            del self.conn.inbuf[:ends[consumed - 1]]
            self.conn.maybe_resume_reading()
        self.conn.write(b"".join(out))
        if done < len(results):  # over the cap: stream this one
            self._stream(*jobs[done])

    def _next_chunk(self) -> None:
        retrieval = self.retrieval
        assert retrieval is not None
        self._call("mail", self._read_chunk, (retrieval,), self._chunk_read)

    def _read_chunk(self, r: Retrieval) -> bytes:
        if r.stream is None:
            r.stream = self._adapter_session().open_message(r.uid)
        data = r.stream.read(r.read_size)
        at_end = not data
        if data and len(data) < r.read_size:
            # Probably the end: confirm it here rather than in another worker round trip.
            more = r.stream.read(r.read_size)
            if more:
                data += more
            else:
                at_end = True
        out = r.encoder.feed(data) if data else b""
        if at_end or r.encoder.done:
            out += r.encoder.finish()
            r.eof = True
            stream, r.stream = r.stream, None
            stream.close()
        return out

    def _chunk_read(self, out: Any, error: BaseException | None) -> None:
        r = self.retrieval
        if r is None or self.conn.closed:
            return
        if error is None and not isinstance(out, bytes):
            error = TypeError("open_message() stream returned non-bytes")
        if error is not None:
            self.retrieval = None
            if isinstance(error, HeaderTooLarge):
                error = PermanentFailure(str(error))
            self._log_adapter_error(f"retrieving {r.uid}", error)
            if r.started:  # the +OK and part of the message are out: only closing is honest
                self.close_reason = "retrieval failed mid-message"
                self.conn.close(self.close_reason)
            else:
                self._reply(_error_reply(error))
            return
        if not r.started:
            r.started = True
            self.conn.write(b"+OK Message follows\r\n")
        self.conn.write(out)
        if r.eof:
            self.conn.write(b".\r\n")
            self.retrieval = None
        elif self.conn.backlog() < self.server.settings.protocol.output_backlog:
            self._next_chunk()

    # -- UPDATE --------------------------------------------------------------------------------
    def _update(self) -> None:
        """QUIT: commit the deletions and end the adapter session *before* answering, so the
        client's next login finds the account (and any cross-process lock) free."""
        self.state = UPDATE
        self.close_reason = "QUIT"
        uids = [] if self.read_only else [self.infos[i].uid for i in sorted(self.deleted)]
        self.waiting = "commit"
        self.server.commit_started(self)
        adapter, self.adapter = self._adapter_session(), None
        self._call("mail", _commit, (adapter, uids),
                   lambda r, e: self._committed(len(uids), r, e))

    def _committed(self, count: int, result: Any, error: BaseException | None) -> None:
        self.server.commit_finished(self)
        if error is None and not isinstance(result, DeleteResult):
            error = TemporaryFailure(f"delete_messages() returned {type(result).__name__}")
        if error is not None:
            self._log_adapter_error("deleting", error)
            reply = b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n"
        elif result.failed:
            log.warning("%s %s: %d of %d deletions failed: %s", self.conn.address,
                        self.account, len(result.failed), count,
                        "; ".join(f"{k}: {v}" for k, v in list(result.failed.items())[:5]))
            self.deleted_count = count - len(result.failed)
            reply = b"-ERR Some deleted messages not removed\r\n"
        else:
            self.deleted_count = count
            left = counted(self.live_count, "message")
            reply = f"+OK pop3sf signing off ({left} left)\r\n".encode()
        self.server.release_account(self)
        if not self.conn.closed:
            self._reply(reply)
            self.conn.finish()

    def shutdown(self) -> None:
        """Server stopping: idle sessions are told and closed; work in progress continues."""
        if self.conn.closed or self.waiting == "commit" or self.retrieval is not None:
            return
        self.conn.write(b"-ERR [SYS/TEMP] Server shutting down\r\n")
        self.close_reason = "server shutdown"
        self.conn.finish()


def _commit(adapter: MailboxSession, uids: list[str]) -> DeleteResult:
    """The UPDATE state on a worker: delete what was marked, then end the adapter session."""
    try:
        return adapter.delete_messages(uids) if uids else DeleteResult()
    finally:
        try:
            adapter.connection_closed()
        except Exception:
            log.exception("connection_closed failed after QUIT")


def _printable(name: str) -> str:
    """A client-supplied name made safe for one log line."""
    return "".join(c if c.isprintable() else "?" for c in name[:64]) or "''"


def _scrub(text: str, creds: Credentials) -> str:
    """An exception message with the password taken out (SPEC §P13)."""
    if creds.password and creds.password in text:
        text = text.replace(creds.password, "********")
    return text[:300]


def _table(**commands: Callable[[Session, list[bytes]], None]) -> dict[bytes, Any]:
    return {name.encode(): func for name, func in commands.items()}


_COMMON = {"CAPA": Session.cmd_capa, "QUIT": Session.cmd_quit, "LANG": Session.cmd_lang}
_COMMANDS: tuple[dict[bytes, Any], ...] = (
    _table(**_COMMON, USER=Session.cmd_user, PASS=Session.cmd_pass, AUTH=Session.cmd_auth,
           STLS=Session.cmd_stls, UTF8=Session.cmd_utf8, XPRO=Session.cmd_xpro),
    _table(**_COMMON, STAT=Session.cmd_stat, LIST=Session.cmd_list, RETR=Session.cmd_retr,
           DELE=Session.cmd_dele, NOOP=Session.cmd_noop, RSET=Session.cmd_rset,
           TOP=Session.cmd_top, UIDL=Session.cmd_uidl),
    {},
)
