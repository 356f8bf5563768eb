"""The adapter contract: how a data source becomes a POP3 maildrop (SPEC §A1–A4).

An adapter is the bridge between pop3sf's server and your data. You write two classes:

* an :class:`Adapter` subclass, built **once** from its validated config section. It owns what is
  shared between connections (a database pool, a cache) and lives from :meth:`Adapter.start` to
  :meth:`Adapter.close`; :meth:`Adapter.reload` is called on SIGHUP with the new section.
* a :class:`MailboxSession` subclass, one per client connection, handed out by
  :meth:`Adapter.new_session`. Its methods run on worker threads, **one at a time** for a given
  session, so a session needs no locking of its own state. If none of your calls can ever block
  (an in-memory list), set ``Adapter.blocking = False`` and they run inline on the event loop.

The server owns the protocol: message numbers, deletion marks, the snapshot taken at login,
per-account exclusivity, limits, response codes. The adapter only authenticates, lists (uid and
exact size, without reading bodies), opens messages as binary streams and, at QUIT, deletes the
uids it is given.

Raise the exceptions below to tell the server what happened; anything else is treated as a
temporary failure (``-ERR [SYS/TEMP]``) and logged with its traceback.

Register your adapter under the entry point group ``pop3sf.adapters`` (or name it by dotted path
``package.module:Class`` in ``/etc/pop3sf.conf``) and check it with :mod:`pop3sf.testing`.
"""

from __future__ import annotations

import abc
import os
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar, NamedTuple


class AdapterError(Exception):
    """Base of the exceptions the server understands."""


class AuthenticationFailed(AdapterError):
    """Wrong user name or password: ``-ERR [AUTH]`` (the message is not shown to the client)."""


class TemporaryFailure(AdapterError):
    """The backend is unavailable; trying later may work: ``-ERR [SYS/TEMP]``."""


class PermanentFailure(AdapterError):
    """The maildrop can't be served and retrying won't help: ``-ERR [SYS/PERM]``."""


class MaildropInUse(AdapterError):
    """Another process holds this account's lock: ``-ERR [IN-USE]``.

    Raise it only from :meth:`MailboxSession.login_succeeded` (after credentials verified).
    """


class MessageGone(AdapterError):
    """The message was removed by someone else since the login snapshot."""


class ConfigurationError(AdapterError):
    """The adapter's config section is unusable; the message names the problem."""


def probe_directory(path: str, key: str) -> None:
    """Raise :class:`ConfigurationError` unless this process can list and enter *path*."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as exc:
        raise ConfigurationError(f"{key} = {path!r}: cannot open: {exc.strerror}") from exc
    if not os.access(path, os.X_OK):
        raise ConfigurationError(f"{key} = {path!r}: cannot open its files: permission denied")


@dataclass(frozen=True)
class Peer:
    """Who is connected: the normalised client address and the listener it came through."""

    address: str
    port: int
    listener: str = ""
    tls: bool = False


@dataclass(frozen=True)
class Credentials:
    """What the client presented.

    ``username`` and ``password`` are text: UTF-8 (NFC-normalised) when the client enabled
    ``UTF8``, otherwise the raw octets decoded as UTF-8 with ``surrogateescape``, so that
    :meth:`password_bytes` gives back exactly what was sent.
    """

    username: str
    password: str = field(repr=False)
    mechanism: str = "USER"

    def password_bytes(self) -> bytes:
        return self.password.encode("utf-8", "surrogateescape")


def normalize_secret(text: str) -> str:
    """NFC, the one normalisation the server and ``pop3sf-admin`` apply to names and passwords."""
    return unicodedata.normalize("NFC", text)


@dataclass(frozen=True)
class AuthResult:
    """A verified login. ``account_id`` is canonical: the key for locks, penalties and logs."""

    account_id: str


class MessageInfo(NamedTuple):
    """One message of a listing.

    ``size`` is the exact number of octets RETR will send before dot-stuffing: CRLF line ends,
    with a final CRLF added when the message lacks one (use :func:`pop3sf.wire.measure`).
    ``utf8_header`` is true when the header section holds octets >= 0x80; ``downgraded_size`` is
    then the size after the RFC 6858 downgrade (None if the adapter can't supply it).
    """

    uid: str
    size: int
    utf8_header: bool = False
    downgraded_size: int | None = None


@dataclass(frozen=True)
class DeleteResult:
    """What :meth:`MailboxSession.delete_messages` could not delete, uid -> reason."""

    failed: Mapping[str, str] = field(default_factory=dict)


class MailboxSession(abc.ABC):
    """One client connection's view of the data source."""

    @abc.abstractmethod
    def authenticate(self, credentials: Credentials) -> AuthResult:
        """Verify credentials or raise :class:`AuthenticationFailed`.

        Unknown users must cost the same time as wrong passwords (run a dummy verification of
        the same scheme), so that answers and timing don't reveal which names exist.
        """

    def login_succeeded(self, account: AuthResult, read_only: bool) -> None:
        """Called once the server granted the login; take cross-process locks here.

        Raise :class:`MaildropInUse` if another process holds the account (read-only sessions
        should not take or respect the lock).
        """

    @abc.abstractmethod
    def list_messages(self) -> Sequence[MessageInfo]:
        """The maildrop, oldest first, without reading bodies. Called once, at login."""

    @abc.abstractmethod
    def open_message(self, uid: str) -> BinaryIO:
        """A binary stream of the message's bytes (the server normalises and closes it).

        Raise :class:`MessageGone` if it no longer exists.
        """

    @abc.abstractmethod
    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        """Delete these messages, as one transaction where the source allows. Only at QUIT."""

    def connection_closed(self) -> None:
        """Always called last, however the session ended: release locks and handles here."""


class Adapter(abc.ABC):
    """Built once from its config section; hands out one :class:`MailboxSession` per client."""

    #: configobj configspec lines for this adapter's keys in the ``[adapter]`` section.
    configspec: ClassVar[str] = ""
    #: Whether ``XPRO`` read-only sessions are offered.
    allows_read_only: bool = True
    #: False if no call can block; the server then calls the session inline on its loop.
    blocking: bool = True
    #: File descriptors a logged-in session keeps open (a directory fd, a DB connection): the
    #: connection cap derived from the open-files limit counts them beside the socket.
    fds_per_session: int = 0

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def check(self) -> None:
        """Verify the config against the system (paths exist, files readable) without side
        effects; raise :class:`ConfigurationError`. ``pop3sf --check-config`` calls it."""

    def probe(self) -> None:
        """Reach the data source once, as the service would: log in to the database, open the
        mail directory. Raise :class:`ConfigurationError` saying why it failed.
        ``pop3sf --check-config`` calls it after :meth:`check` (not with ``--no-connect``)."""

    def start(self) -> None:
        """Open shared resources (pools). Called once before the first session; should run
        :meth:`check` first."""

    def reload(self, config: Mapping[str, Any]) -> None:
        """Apply a changed config section (SIGHUP). Raise :class:`ConfigurationError` to keep
        the old one."""
        self.config = config

    def close(self) -> None:
        """Release shared resources at shutdown."""

    @abc.abstractmethod
    def new_session(self, peer: Peer) -> MailboxSession:
        """A session object for one connection."""
