"""The login flow: USER/PASS and SASL give credentials; the verification gate decides when they
are checked; the adapter checks them and lists the maildrop (docs/protocol.md §7).

The penalty delays the *verification*, not just the answer, and limits apply when a verification
starts, so parallel connections from one address can't guess faster than one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from pop3sf import sasl
from pop3sf.adapters import (
    AuthenticationFailed,
    AuthResult,
    Credentials,
    MailboxSession,
    MaildropInUse,
    MessageInfo,
    TemporaryFailure,
)

from . import calls
from .commands import CALL, TLS, VERIFICATION
from .connection import Connection
from .logs import counted
from .maildrop import Maildrop
from .replies import ERR_AUTH, ERR_IN_USE, ERR_PLAINTEXT, ERR_SYNTAX, ERR_TEMP, error_reply

log = logging.getLogger("pop3sf.session")


class LoginSession(calls.CallOwner, Protocol):
    """What the login flow needs of its session."""

    conn: Connection
    utf8: bool
    read_only: bool
    account: str | None
    mechanism: str
    blocked: str | None
    login: Login | None

    def reply(self, data: bytes) -> None: ...
    def count_bad(self) -> None: ...
    def process(self) -> None: ...
    def plaintext_allowed(self) -> bool: ...
    def adapter_session(self) -> MailboxSession: ...
    def logged_in(self, maildrop: Maildrop) -> None: ...
    def end_login(self, reply: bytes) -> None: ...


# -- the AUTHORIZATION commands, for the session's dispatch --------------------------------------

def cmd_stls(session: LoginSession, args: list[bytes]) -> None:
    if session.conn.secure:
        session.reply(b"-ERR Already using TLS\r\n")
    elif session.host.tls_context is None:
        session.reply(b"-ERR TLS is not available\r\n")
    else:
        session.reply(b"+OK Begin TLS negotiation\r\n")
        session.blocked = TLS
        session.conn.start_tls()  # discards whatever was pipelined behind STLS


def cmd_utf8(session: LoginSession, args: list[bytes]) -> None:
    session.utf8 = True
    session.reply(b"+OK UTF8 enabled\r\n")


def cmd_xpro(session: LoginSession, args: list[bytes]) -> None:
    if args:
        session.reply(ERR_SYNTAX)
        session.count_bad()
    elif not session.host.adapter.allows_read_only:
        session.reply(b"-ERR [X-POP3SF-READ-ONLY] Read-only mode is not available\r\n")
    else:
        session.read_only = True
        session.reply(b"+OK Read-only mode\r\n")


def _login(session: LoginSession) -> Login:
    if session.login is None:
        session.login = Login(session)
    return session.login


def cmd_user(session: LoginSession, args: list[bytes]) -> None:
    _login(session).user(args[0])


def cmd_pass(session: LoginSession, args: list[bytes]) -> None:
    _login(session).password(args[0] if args else b"")


def cmd_auth(session: LoginSession, args: list[bytes]) -> None:
    _login(session).auth(args)


class Login:
    """One login under way: the name from USER, or the SASL exchange, then the verification."""

    __slots__ = ("session", "name", "exchange")

    def __init__(self, session: LoginSession) -> None:
        self.session = session
        self.name: str | None = None  # from USER, waiting for PASS
        self.exchange: sasl.Exchange | None = None

    def _text(self, raw: bytes) -> str | None:
        """Client text: strict UTF-8 once UTF8 is on; otherwise octets kept losslessly."""
        if self.session.utf8:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
        return sasl.to_text(raw)

    # -- USER/PASS -----------------------------------------------------------------------------
    def user(self, raw: bytes) -> None:
        name = self._text(raw)
        if name is None:
            self.session.reply(b"-ERR Invalid UTF-8 in user name\r\n")
            return
        self.name = name
        self.session.reply(b"+OK Send your password\r\n")

    def password(self, raw: bytes) -> None:
        if self.name is None:
            self.session.reply(b"-ERR Send USER first\r\n")
            return
        user, self.name = self.name, None
        password = self._text(raw)
        if password is None:
            self.session.reply(b"-ERR Invalid UTF-8 in password\r\n")
            return
        self._authenticate(Credentials(user, password, "USER"))

    # -- SASL ----------------------------------------------------------------------------------
    def auth(self, args: list[bytes]) -> None:
        session = self.session
        allowed = session.plaintext_allowed()
        if not args:
            mechs = b"".join(m.encode() + b"\r\n" for m in sasl.MECHANISMS) if allowed else b""
            session.reply(b"+OK Supported mechanisms follow\r\n" + mechs + b".\r\n")
            return
        if not allowed:
            session.reply(ERR_PLAINTEXT)
            return
        mechanism = args[0].upper().decode("ascii", "replace")
        if mechanism not in sasl.MECHANISMS:
            session.reply(b"-ERR Unsupported authentication mechanism\r\n")
            return
        exchange = sasl.Exchange(mechanism)
        try:
            initial = sasl.decode_response(args[1]) if len(args) == 2 else None
            challenge, creds = exchange.start(initial)
        except sasl.SaslError as exc:
            session.reply(b"-ERR " + str(exc).encode() + b"\r\n")
            return
        self._continue(exchange, challenge, creds)

    def sasl_step(self, line: bytes) -> None:
        """A client response in the SASL exchange (any line, not a command)."""
        exchange = self.exchange
        assert exchange is not None
        try:
            challenge, creds = exchange.step(sasl.decode_response(line))
        except sasl.SaslError as exc:
            self._exchange(None)
            self.session.reply(b"-ERR " + str(exc).encode() + b"\r\n")
            return
        self._continue(exchange, challenge, creds)

    def _continue(self, exchange: sasl.Exchange, challenge: bytes,
                  creds: tuple[str, str] | None) -> None:
        if creds is not None:
            self._exchange(None)
            self._authenticate(Credentials(creds[0], creds[1], exchange.mechanism))
            return
        self._exchange(exchange)
        self.session.reply(challenge)

    def _exchange(self, exchange: sasl.Exchange | None) -> None:
        """SASL responses may be longer than command lines (RFC 5034 §4)."""
        self.exchange = exchange
        self.session.conn.use_auth_line_limit(exchange is not None)

    # -- verification --------------------------------------------------------------------------
    def _authenticate(self, creds: Credentials) -> None:
        """Queue the verification: the penalty delays its *processing*, not just the answer."""
        session = self.session
        session.mechanism = creds.mechanism
        session.blocked = VERIFICATION
        host, conn = session.host, session.conn
        host.verifications.request(conn, host.penalty_group(conn.address),
                                   lambda: self._verify(creds), self._refused)

    def _refused(self, why: str) -> None:
        session = self.session
        session.blocked = None
        log.warning("%s: login refused: %s", session.conn.address, why)
        session.reply(ERR_TEMP)
        session.process()

    def _verify(self, creds: Credentials) -> None:
        session = self.session
        session.blocked = CALL
        early = session.read_only if session.host.adapter.list_with_login else None
        calls.run(session, "auth", _check_password, (session.adapter_session, creds, early),
                          lambda r, e: self._verified(creds, r, e), Checked)

    def _verified(self, creds: Credentials, checked: Any, error: BaseException | None) -> None:
        session = self.session
        conn, host = session.conn, session.host
        result: Any = checked.result if error is None else None
        if error is None and not (isinstance(result, AuthResult) and
                                  isinstance(result.account_id, str) and result.account_id):
            error = TemporaryFailure(f"authenticate() returned {type(result).__name__}, not an "
                                     "AuthResult with an account_id")
        if isinstance(error, AuthenticationFailed):
            # Recorded even when the client already left, before the next attempt may start.
            host.penalties.record_failure(host.penalty_group(conn.address),
                                          creds.username.encode("utf-8", "replace"),
                                          creds.password_bytes())
            host.verifications.finished(conn)
            host.stats["login_failed " + creds.mechanism] += 1
            log.info("%s: login failed for %s (%s)", conn.address, _printable(creds.username),
                     creds.mechanism,
                     extra={"POP3SF_CLIENT": conn.address, "POP3SF_EVENT": "auth-failed"})
            session.blocked = None
            session.reply(ERR_AUTH)
            return
        host.verifications.finished(conn)
        if error is not None:
            log.error("%s: authentication backend failed: %s: %s", conn.address,
                      type(error).__name__, _scrub(str(error), creds))
            session.blocked = None
            session.reply(ERR_TEMP if isinstance(error, MaildropInUse) else error_reply(error))
            return
        if conn.closed:
            return
        account = result.account_id
        problem = host.accounts.claim(session, account, session.read_only,
                                      host.settings.limits.max_sessions_per_user)
        if problem is not None:
            log.warning("%s: %s: %s", conn.address, account,
                        "already in use" if problem is ERR_IN_USE else "too many sessions")
            session.end_login(problem)
            return
        session.account = account
        if checked.listing is None:
            calls.run(session, "mail", _list_messages, (session.adapter_session, result,
                                                       session.read_only), self._listed)
        elif isinstance(checked.listing, BaseException):
            self._listed(None, checked.listing)
        else:
            self._listed(checked.listing, None)

    def _listed(self, listing: Any, error: BaseException | None) -> None:
        session = self.session
        maildrop = None
        if error is None:
            settings = session.host.settings
            try:
                maildrop = Maildrop(listing, settings.limits.max_messages,
                                    settings.protocol.non_utf8_clients, session.utf8,
                                    session.account or "")
            except (TypeError, ValueError) as exc:
                error = TemporaryFailure(f"list_messages() returned garbage: {exc}")
        if error is not None or maildrop is None:
            assert error is not None
            calls.log_failure(session, "login", error)
            session.host.accounts.release(session)
            session.account = None  # never logged in
            session.end_login(error_reply(error))
            return
        if not session.conn.closed:
            conn = session.conn
            log.info("login %s %s (%s%s): %s, %d octets", conn.address, session.account,
                     session.mechanism, ", read-only" if session.read_only else "",
                     counted(maildrop.live_count, "message"), maildrop.live_size,
                     extra={"POP3SF_CLIENT": conn.address, "POP3SF_USER": session.account,
                            "POP3SF_EVENT": "login"})
            session.logged_in(maildrop)


# -- on a worker thread ------------------------------------------------------------------------

# The adapter's session is made here, on first use: new_session() may do I/O.

class Checked(NamedTuple):
    result: Any  # an AuthResult, if the adapter keeps its contract
    #: With Adapter.list_with_login: the listing, or what login_succeeded/list_messages raised.
    listing: list[MessageInfo] | BaseException | None = None


def _check_password(adapter: Callable[[], MailboxSession], creds: Credentials,
                    early: bool | None) -> Checked:
    """authenticate(); with ``early`` (the read-only flag) also log in and list right away."""
    session = adapter()
    result = session.authenticate(creds)
    if early is None or not isinstance(result, AuthResult):
        return Checked(result)
    try:
        return Checked(result, _list_messages(adapter, result, early))
    except Exception as exc:  # reported like a failed listing, after the account claim
        return Checked(result, exc)


def _list_messages(adapter: Callable[[], MailboxSession], result: AuthResult,
                   read_only: bool) -> list[MessageInfo]:
    session = adapter()
    session.login_succeeded(result, read_only)
    return list(session.list_messages())


def _printable(name: str) -> str:
    """A client-supplied name made safe for one log line."""
    return "".join(c if c.isprintable() else "?" for c in name[:64]) or "''"


def _scrub(text: str, creds: Credentials) -> str:
    """An exception message with the password taken out (docs/protocol.md §18)."""
    if creds.password and creds.password in text:
        text = text.replace(creds.password, "********")
    return text[:300]
