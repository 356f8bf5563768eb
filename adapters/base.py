"""The adapter contract and the adapter author's kit (docs/adapters.md is the guide).

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
temporary failure (``-ERR [SYS/TEMP]``) and logged with its traceback (docs/adapters.md#errors).

The kit: declare your keys as configobj ``configspec`` lines and read them, validated and with
defaults, from ``self.options``; raise :class:`ConfigError` naming the key for anything else
wrong; carry what ``authenticate`` found to ``login_succeeded`` in :attr:`AuthResult.found`.

Register your adapter under the entry point group ``pop3sf.adapters`` (or name it by dotted path
``package.module:Class`` in ``/etc/pop3sf.conf``) and check it with :mod:`pop3sf.testing`.
"""

from __future__ import annotations

import abc
import os
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar, Generic, NamedTuple, TypeVar


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


class ConfigError(AdapterError):
    """A configuration that can't be used; the message says what is wrong and what is allowed.

    pop3sf's one configuration error: the server's own checks and adapters raise it, and it ends
    a start or ``--check-config`` with exit status 78 (EX_CONFIG) or makes a reload keep the old
    configuration. An adapter's message names the key (``"root = '/x': not a directory"``) but
    not the file or section: the server puts ``<file>: [adapter] (<type>):`` in front.
    """


#: The name adapters have always raised; the same class as :class:`ConfigError`.
ConfigurationError = ConfigError


def validate_options(configspec: str, config: Mapping[str, Any],
                     allow_unknown: bool = True) -> dict[str, Any]:
    """*config* checked against configobj *configspec* lines, converted, defaults filled in.

    The first problem is a :class:`ConfigError` naming the key and what is allowed. Unknown keys
    are an error only with *allow_unknown* false: the server rejects them when it reads the file,
    while programs building an adapter from a bigger dict (the admin tools) may pass extras.
    """
    from configobj import ConfigObj, flatten_errors, get_extra_values
    from validate import Validator

    if not isinstance(configspec, str):  # a bug in the adapter, not in the admin's file
        raise TypeError(f"configspec must be str, not {type(configspec).__name__}")
    spec = ConfigObj(configspec.splitlines(), list_values=False, _inspec=True)
    obj = ConfigObj(dict(config), configspec=spec, interpolation=False)
    result = obj.validate(Validator(), preserve_errors=True, copy=True)
    if result is not True:
        for _sections, key, error in flatten_errors(obj, result):
            problem = "is missing" if error is False else f"is invalid: {error}"
            raise ConfigError(f"{key} {problem} (allowed: {spec.get(key, '?')})")
    extra = get_extra_values(obj)
    if extra and not allow_unknown:
        raise ConfigError(f"has an unknown key or section {extra[0][1]!r}")
    return dict(obj)


def require_directory(path: str, key: str) -> None:
    """Raise :class:`ConfigError` unless *path* is absolute and an existing directory (a check
    without side effects, for :meth:`Adapter.check`)."""
    if not os.path.isabs(path):
        raise ConfigError(f"{key} = {path!r}: must be an absolute path")
    if not os.path.isdir(path):
        raise ConfigError(f"{key} = {path!r}: not an existing directory")


def probe_directory(path: str, key: str) -> None:
    """Raise :class:`ConfigError` unless this process can list and enter *path* (for
    :meth:`Adapter.probe`: run as the service user, it finds permissions only root has)."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as exc:
        raise ConfigError(f"{key} = {path!r}: cannot open: {exc.strerror}") from exc
    if not os.access(path, os.X_OK):
        raise ConfigError(f"{key} = {path!r}: cannot open its files: permission denied")


@dataclass(frozen=True, slots=True)
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


def encodable(name: str) -> bool:
    """Whether a client's name can be sent to a database as UTF-8 (not: undecodable octets,
    kept as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: What an adapter's authentication found: a passwd entry, a row id, an open directory.
Found = TypeVar("Found")


@dataclass(frozen=True)
class AuthResult(Generic[Found]):
    """A verified login. ``account_id`` is canonical: the key for locks, penalties and logs.

    ``found`` carries what the check looked up to :meth:`MailboxSession.login_succeeded`, which
    the server calls with this very object once it granted the login: read it there instead of
    keeping it on the session in ``authenticate``. A login can still be refused after a good
    password (the account in use, a limit), and a client may try again, so state set in
    ``authenticate`` could belong to an attempt that never became the login. Only something that
    must be released (an open descriptor) goes on the session in ``authenticate`` too, so that
    :meth:`MailboxSession.connection_closed` releases it either way (docs/adapters.md#login).
    """

    account_id: str
    found: Found | None = field(default=None, compare=False, repr=False)


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


class MailboxSession(abc.ABC, Generic[Found]):
    """One client connection's view of the data source (``Found``: see :class:`AuthResult`)."""

    #: Empty, so that a session class may declare ``__slots__`` (no per-session ``__dict__``:
    #: there is one session per connection); without them it has a ``__dict__`` as usual.
    __slots__ = ()

    @abc.abstractmethod
    def authenticate(self, credentials: Credentials) -> AuthResult[Found]:
        """Verify credentials or raise :class:`AuthenticationFailed`.

        Unknown users must cost the same time as wrong passwords (run a dummy verification of
        the same scheme), so that answers and timing don't reveal which names exist.
        """

    def login_succeeded(self, account: AuthResult[Found], read_only: bool) -> None:
        """Called once the server granted the login, with what :meth:`authenticate` returned;
        record ``account.found`` and take cross-process locks here.

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
    """Built once from its config section; hands out one :class:`MailboxSession` per client.

    The config section is validated against :attr:`configspec` once, in ``__init__``, into
    :attr:`options`; read the keys from there. Life cycle: ``__init__`` (no side effects: also
    run by ``--check-config`` and the admin tools), :meth:`check`, :meth:`probe` (check only),
    :meth:`start`, :meth:`reload` any number of times, :meth:`close`.
    """

    #: configobj configspec lines for this adapter's keys in the ``[adapter]`` section.
    configspec: ClassVar[str] = ""
    #: Whether ``XPRO`` read-only sessions are offered.
    allows_read_only: bool = True
    #: False if no call can block; the server then calls the session inline on its loop.
    blocking: bool = True
    #: File descriptors a logged-in session keeps open (a directory fd, a DB connection): the
    #: connection cap derived from the open-files limit counts them beside the socket.
    fds_per_session: int = 0
    #: True: ``login_succeeded`` and ``list_messages`` run in the same worker call as a
    #: successful ``authenticate``, before the server takes its account lock; if the lock is
    #: then refused, ``connection_closed`` follows. One worker round trip per login instead of
    #: two; right for any session whose ``login_succeeded`` takes only what it can give back
    #: (see docs/adapters.md#login).
    list_with_login: bool = False
    #: True: ``connection_closed`` never blocks (it closes local descriptors), so the server
    #: calls it on its loop when that is all there is to do (a QUIT with nothing to delete, a
    #: dropped connection): no worker round trip at logout.
    closes_inline: bool = False
    #: True: a unique id always names the same octets (a Maildir file never changes), so the
    #: server may keep recent TOP answers and answer a repeat without reading the message.
    immutable_messages: bool = False

    def __init__(self, config: Mapping[str, Any]) -> None:
        #: The section as given (without ``type``).
        self.config: Mapping[str, Any] = config
        #: The section validated against :attr:`configspec`, defaults filled in.
        self.options: dict[str, Any] = self.validate(config)

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The options of a config section, or :class:`ConfigError`. Extend it (call
        ``super()``) for checks across keys; keep it free of side effects: reload runs it on a
        section that may be refused."""
        return validate_options(self.configspec, config)

    def check(self) -> None:
        """Verify the options against the system (paths exist, files readable) without side
        effects; raise :class:`ConfigError`. ``pop3sf --check-config`` and :meth:`start`
        call it."""

    def probe(self) -> None:
        """Reach the data source once, as the service would: log in to the database, open the
        mail directory. Raise :class:`ConfigError` saying why it failed.
        ``pop3sf --check-config`` calls it after :meth:`check` (not with ``--no-connect``)."""

    def start(self) -> None:
        """Called once before the first session: runs :meth:`check`. Extend it (call
        ``super()`` first) to open shared resources (pools)."""
        self.check()

    def reload(self, config: Mapping[str, Any]) -> None:
        """Apply a changed config section (SIGHUP), validated as in ``__init__``; a
        :class:`ConfigError` keeps the old one. Override :meth:`apply`, not this."""
        options = self.validate(config)
        self.apply(options)
        self.config, self.options = config, options

    def apply(self, options: dict[str, Any]) -> None:
        """Put new, validated *options* into effect: check them (as :meth:`check` would) and
        replace what depends on changed keys; ``self.options`` still holds the old ones.
        Raise :class:`ConfigError` before changing anything to keep the old configuration."""

    def close(self) -> None:
        """Release shared resources at shutdown."""

    @abc.abstractmethod
    def new_session(self, peer: Peer) -> MailboxSession[Any]:
        """A session object for one connection."""

    def preview_session(self, account: str) -> MailboxSession[Any]:
        """A read-only session of *account* without its password, for ``pop3sf-admin
        preview`` (docs/adapters.md#admin): as if the account had logged in with
        ``read_only=True`` (``login_succeeded`` done). The caller, on a started adapter, calls
        ``list_messages()`` once, ``open_message(uid)`` for any listed uid, and always
        ``connection_closed()``. Raise :class:`AuthenticationFailed` (its message is shown)
        for an unknown account. Not overridden: the adapter can't preview."""
        raise NotImplementedError(f"{type(self).__name__} has no preview_session")
