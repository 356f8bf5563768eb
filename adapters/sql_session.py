"""A client's session on a ``type = sql`` source (the adapter is :mod:`.sql`).

Rendered rows become plain-text messages whose header is built from the listing's columns alone
(date, subject, sender, the id and the account), so its exact length is known at LIST time
without the body, and RETR renders the very same octets: :func:`render_header` is a pure
function of those values. The body's size comes from the database (:mod:`.sql_query`), so a
message's size is ``len(header) + the body's wire size``. Complete RFC 5322 messages (a
``message`` column) are sent as stored.
"""

from __future__ import annotations

import datetime
import decimal
import email.utils
import hashlib
import hmac
import io
import logging
import re
from collections.abc import Collection, Sequence
from email.header import Header
from operator import itemgetter
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from pop3sf import passwords
from pop3sf.wire import measure, wire_bytes

from .base import (
    AuthenticationFailed,
    AuthResult,
    Credentials,
    DeleteResult,
    MailboxSession,
    MessageGone,
    MessageInfo,
    TemporaryFailure,
    encodable,
    normalize_secret,
)
from .mysql_sql import message_info, to_bytes
from .sql_query import HEADER_PREFIX, Query, Shape, body_sql, listing_args, listing_sql

if TYPE_CHECKING:
    from .sql import SQLAdapter

log = logging.getLogger("pop3sf.adapters.sql")

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
#: Longest Subject kept (characters); a header line may not exceed 998 octets.
SUBJECT_MAX = 400


class Row(NamedTuple):
    """One listed row: the id as the database gave it and the columns that render it (the
    date as the database gave it too: it is turned into a header only at RETR)."""

    key: Any
    date: Any
    subject: Any
    sender: Any


def to_datetime(value: Any) -> datetime.datetime:
    """A ``date`` column as an aware datetime (naive values are UTC); ValueError if it isn't
    a date: a datetime, a date, Unix seconds, or ISO 8601 text."""
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime.datetime):
        d = value
    elif isinstance(value, datetime.date):
        d = datetime.datetime(value.year, value.month, value.day)
    elif isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool):
        return _from_seconds(float(value))
    elif isinstance(value, str):
        text = value.strip()
        try:
            return _from_seconds(float(text))
        except ValueError:
            d = datetime.datetime.fromisoformat(text)
    else:
        raise ValueError(f"not a date: {type(value).__name__}")
    return d.replace(tzinfo=datetime.UTC) if d.tzinfo is None else d


def _from_seconds(seconds: float) -> datetime.datetime:
    if not _MIN_SECONDS <= seconds < _MAX_SECONDS:
        raise ValueError(f"{seconds} seconds is outside years 1-9999")
    return _EPOCH + datetime.timedelta(seconds=seconds)


_MIN_SECONDS = -62135596800.0  # 0001-01-01
_MAX_SECONDS = 253402300800.0  # 10000-01-01


def timestamp_of(value: Any) -> float:
    """Unix seconds of a ``date`` column (what the listing is sorted by); ValueError as
    :func:`to_datetime`. Numbers, the common case, cost no datetime at all."""
    if type(value) is float or type(value) is int:
        if not _MIN_SECONDS <= value < _MAX_SECONDS:
            raise ValueError(f"{value} seconds is outside years 1-9999")
        return float(value)
    return to_datetime(value).timestamp()


def format_date(d: datetime.datetime) -> str:
    """RFC 5322 date in UTC, independent of the locale: always 31 characters."""
    u = d.astimezone(datetime.UTC)
    return (f"{_DAYS[u.weekday()]}, {u.day:02d} {_MONTHS[u.month - 1]} {u.year:04d} "
            f"{u.hour:02d}:{u.minute:02d}:{u.second:02d} +0000")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def encode_subject(value: Any) -> str:
    """One line: whitespace (line breaks too) collapsed; RFC 2047 when not ASCII."""
    text = " ".join(_text(value).split())[:SUBJECT_MAX]
    if text.isascii():
        return text
    return Header(text, "utf-8").encode(linesep="\r\n")


def subject_length(value: Any) -> int:
    """``len(encode_subject(value))``; a plain ASCII line (the usual subject) is its own
    encoding, checked with C-speed string methods instead of split and join."""
    if (type(value) is str and len(value) <= SUBJECT_MAX and value.isascii()
            and value.isprintable() and "  " not in value and value[:1] != " "
            and value[-1:] != " "):
        return len(value)
    return len(encode_subject(value))


def encode_address(value: Any, fallback: str) -> str:
    """A mailbox (``Name <addr>`` or ``addr``) for From/To; ``fallback`` when unusable."""
    text = " ".join(_text(value).split())
    name, addr = email.utils.parseaddr(text)
    if not addr or not addr.isascii():
        if fallback == text:
            return "undisclosed-recipients:;"
        return encode_address(fallback, fallback)
    try:
        return email.utils.formataddr((name, addr), charset="utf-8")
    except (UnicodeError, ValueError):
        return addr


_HEADER = ("Date: {date}\r\nFrom: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
           "Message-ID: <{digest}@sql.pop3sf.invalid>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
#: The header's length without its variable parts (the date is always 31 characters, the
#: Message-ID's digest 32): LIST adds the lengths of subject, sender and recipient.
HEADER_BASE = len(_HEADER.format(date="", sender="", recipient="", subject="", digest="")) + 31 + 32


def render_header(row: Row, uid: str, sender: str, recipient: str, tag: str) -> bytes:
    """The header section of a rendered row, blank line included: a pure function of the row's
    listing columns, so LIST's size (:data:`HEADER_BASE` plus the variable parts) and RETR's
    octets agree."""
    digest = hashlib.sha256(f"{tag}\0{uid}".encode("utf-8", "surrogateescape")).hexdigest()
    date = format_date(to_datetime(row.date)) if row.date is not None else format_date(_EPOCH)
    return _HEADER.format(date=date, sender=sender, recipient=recipient,
                          subject=encode_subject(row.subject),
                          digest=digest[:32]).encode("ascii")


_UID = re.compile(r"[!-~]{1,70}")


def uid_of(key: Any) -> str:
    """The UIDL of a row id: its text when that is a valid UIDL, else a hash of it."""
    if type(key) is int:
        return str(key)
    text = _text(key)
    if _UID.fullmatch(text):
        return text
    return "h" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:40]


_tuple_new = tuple.__new__


class SQLSession(MailboxSession[None]):
    """One client's view: the snapshot of rows listed at login."""

    def __init__(self, adapter: SQLAdapter) -> None:
        self.adapter = adapter
        self.account = ""
        self.read_only = False
        self.rows: dict[str, tuple[Any, ...]] = {}
        self.seen: list[str] = []  # deletion = hide: every uid listed, hidden ones too
        self.infos: list[MessageInfo] = []
        self.shape: Shape | None = None
        self.queries: dict[str, Query] = adapter.queries
        self.hidden = adapter.hidden
        self.deletion: str = adapter.options["deletion"]
        self.sender = self.recipient = ""
        self.tag = ""

    # --- login -------------------------------------------------------------------------------

    def authenticate(self, credentials: Credentials) -> AuthResult[None]:
        adapter = self.adapter
        password = credentials.password_bytes()
        if not adapter.multi_user:
            stored: str = adapter.options["password_hash"]
            username = normalize_secret(adapter.options["username"])
            if not hmac.compare_digest(credentials.username.encode("utf-8", "surrogateescape"),
                                       username.encode("utf-8", "surrogateescape")):
                passwords.dummy_verify(password, like=stored)
                raise AuthenticationFailed("unknown user")
            passwords.verify_or_deny(stored, password)
            return AuthResult(username)
        name = credentials.username
        rows: list[Any] = []
        if 0 < len(name) <= 255 and encodable(name):
            rows = adapter.password_rows(name)
        like = adapter.reference_hash()
        if len(rows) != 1 or rows[0][0] is None:
            if len(rows) > 1:
                log.warning("sql: password_query returned %d rows for %r; login denied",
                            len(rows), name)
            passwords.dummy_verify(password, like=like)
            raise AuthenticationFailed("unknown user")
        stored = _text(rows[0][0]).strip()
        adapter.saw_hash(stored)
        passwords.verify_or_deny(stored, password, like=like, account=name)
        canonical = rows[0][1]
        return AuthResult(name if canonical is None else normalize_secret(_text(canonical)))

    def login_succeeded(self, account: AuthResult[None], read_only: bool) -> None:
        o = self.adapter.options
        self.account = account.account_id
        self.read_only = read_only
        self.sender = encode_address(o["from_address"].replace("%u", self.account),
                                     "pop3sf <pop3sf@localhost>")
        self.recipient = encode_address(o["to_address"].replace("%u", self.account),
                                        "undisclosed-recipients:;")
        self.tag = self.account

    # --- listing -----------------------------------------------------------------------------

    def list_messages(self) -> Sequence[MessageInfo]:
        adapter = self.adapter
        shape = self.shape = adapter.shape()
        # What this snapshot was listed with: a reload swaps the adapter's, not these.
        self.queries, self.hidden = adapter.queries, adapter.hidden
        self.deletion = adapter.options["deletion"]
        query = adapter.queries["list_query"]
        driver = adapter.driver
        mariadb = getattr(driver, "mariadb", None) is not False
        sql = listing_sql(adapter.dialect, query, shape, mariadb)
        result = adapter.fetch(sql, listing_args(adapter.dialect, query, {"user": self.account}),
                               query.key)
        hidden: frozenset[str] = frozenset()
        if self.hidden is not None:
            try:
                hidden = self.hidden.hidden(self.account)
            except OSError as exc:
                log.error("sql: cannot read the hidden set of %s: %s", self.account, exc)
                raise TemporaryFailure("cannot read the hidden set") from exc
        listed: list[tuple[Any, str, tuple[Any, ...], MessageInfo]] = []
        seen: list[str] | None = [] if self.hidden is not None else None
        bad: list[Any] = []
        if shape.raw:
            self._raw_rows(result, shape, listed, seen, hidden, bad)
        else:
            self._rendered_rows(result, shape, listed, seen, hidden, bad)
        if bad:
            log.error("sql: list_query: %d rows left out: a NULL id, or a date that is not a "
                      "date (first: id %r, date %r); use a timestamp, Unix seconds or ISO 8601 "
                      "text", len(bad), bad[0][0], bad[0][1])
        try:
            listed.sort(key=itemgetter(0))
        except TypeError:  # ids of mixed types: compare their text
            listed.sort(key=lambda item: (item[0][0], _text(item[0][1])))
        self.rows = {uid: row for _, uid, row, _ in listed}  # Row's fields, as plain tuples
        if len(self.rows) != len(listed):
            log.warning("sql: list_query returned %d rows but %d distinct ids for %s; rows "
                        "sharing an id are served as one", len(listed), len(self.rows),
                        self.account)
        self.seen = seen or []
        self.infos = [info for _, _, _, info in listed]
        return self.infos

    def _rendered_rows(self, result: list[Any], shape: Shape, listed: list[Any],
                       seen: list[str] | None, hidden: frozenset[str], bad: list[Any]) -> None:
        """Rows of ``id, date, subject, sender, size``: the hot loop of a big listing, so
        it allocates little: the database's row tuple is kept as the snapshot's row."""
        senders: dict[Any, int] = {}
        base = HEADER_BASE + len(self.recipient)
        default_sender = len(self.sender)
        with_sender = shape.sender
        append = listed.append
        for r in result:
            key, date, subject, sender, size = r
            if key is None:
                bad.append((key, "id is NULL"))
                continue
            uid = str(key) if type(key) is int else uid_of(key)
            if seen is not None:  # deletion = hide: what the set may keep (hidden ones too)
                seen.append(uid)
                if uid in hidden:
                    continue
            try:
                when = timestamp_of(date)
            except (ValueError, TypeError, OverflowError):
                bad.append((key, date))
                continue
            if size is None:  # the database could not count: measure the octets once
                size = len(wire_bytes(self._body(key)))
            if with_sender:
                m = senders.get(sender)
                if m is None:
                    m = senders[sender] = len(encode_address(sender, self.sender))
            else:
                m = default_sender
            # tuple.__new__: a MessageInfo without NamedTuple's Python-level __new__, which
            # is a third of the listing's cost at 100,000 rows.
            size += base + subject_length(subject) + m
            append(((when, key), uid, r, _tuple_new(MessageInfo, (uid, size, False, None))))

    def _raw_rows(self, result: list[Any], shape: Shape, listed: list[Any],
                  seen: list[str] | None, hidden: frozenset[str], bad: list[Any]) -> None:
        """Rows of ``id, date, size, length, header prefix`` (complete messages)."""
        for key, date, size, length, head in result:
            if key is None:
                bad.append((key, "id is NULL"))
                continue
            uid = uid_of(key)
            if seen is not None:
                seen.append(uid)
                if uid in hidden:
                    continue
            try:
                when = timestamp_of(date) if shape.date else 0.0
            except (ValueError, TypeError, OverflowError):
                when = 0.0  # the order only: the message carries its own Date
            if size is None:  # the database could not count: measure the octets once
                info = MessageInfo(uid, *measure(io.BytesIO(self._body(key))))
            else:
                info = message_info(uid, size, length or 0,
                                    None if head is None else to_bytes(head), HEADER_PREFIX)
            listed.append(((when, key), uid, (key, date, None, None), info))

    # --- messages ----------------------------------------------------------------------------

    def open_message(self, uid: str) -> BinaryIO:
        found_row = self.rows.get(uid)
        if found_row is None:
            raise MessageGone("not in this session's listing")
        row = Row(*found_row[:4])
        body = self._body(row.key)
        shape = self.shape
        assert shape is not None
        if shape.raw:
            return io.BytesIO(body)
        sender = encode_address(row.sender, self.sender) if shape.sender else self.sender
        return io.BytesIO(render_header(row, uid, sender, self.recipient, self.tag) + body)

    def _body(self, key: Any) -> bytes:
        """The octets of one row's body, as the listing measured them."""
        adapter = self.adapter
        query = self.queries["body_query"]
        found = adapter.fetch(body_sql(adapter.dialect, query, self.shape or adapter.shape()),
                              query.args({"id": key, "user": self.account}), query.key)
        if not found:
            raise MessageGone("the row no longer exists")
        if len(found) > 1:
            log.error("sql: body_query returned %d rows for id %r; sending none", len(found),
                      key)
            raise TemporaryFailure("body_query returned several rows")
        value = found[0][0]
        return value.encode("utf-8", "surrogateescape") if isinstance(value, str) \
            else to_bytes(value)

    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        adapter = self.adapter
        mode = self.deletion
        known = [uid for uid in uids if uid in self.rows]
        failed = {uid: "not in this session's listing" for uid in uids if uid not in self.rows}
        if not known:
            return DeleteResult(failed)
        if self.read_only or mode == "read_only":
            failed.update({uid: "deletion = read_only" for uid in known})
            return DeleteResult(failed)
        if mode == "hide":
            assert self.hidden is not None
            try:
                self.hidden.hide(self.account, known, keep=self.seen)
            except OSError as exc:
                log.error("sql: cannot write the hidden set of %s: %s", self.account, exc)
                raise TemporaryFailure("cannot write the hidden set") from exc
            return DeleteResult(failed)
        query = self.queries["delete_query"]
        adapter.execute_many(query.text, [query.args({"id": self.rows[uid][0],
                                                      "user": self.account})
                                          for uid in known], query.key)
        return DeleteResult(failed)

