"""One interface to feed every bundled data source: add messages, manage users.

Programs that produce mail for pop3sf (a report generator, a monitoring script) call
:func:`open_source` with the ``[adapter]`` section of ``/etc/pop3sf.conf`` and then
:meth:`Source.add_message`; ``pop3sf-admin`` is the same from the shell. Writes to files are
atomic (a dot-prefixed temporary file, fsync, rename, fsync of the directory) and, when run as
root, owned by the service user with mode 0640, so the server can read what root wrote.

A source class is built as ``cls(adapter_config, service_user=...)``. Sources are registered
like adapters, under the same name in the entry point group ``pop3sf.admin_sources`` (the
bundled ones in setup.py), so a third-party adapter can bring its own ``pop3sf-admin`` support;
a ``module:Class`` adapter type finds no source. Modules are imported only when used (the MySQL
one needs its driver). See docs/adapters.md#admin.
"""

from __future__ import annotations

import abc
import datetime
import email.message
import os
import pwd
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO, ClassVar, NamedTuple, TypeVar

from pop3sf.adapters import load_object, registered
from pop3sf.adapters.base import Adapter, ConfigError, normalize_secret

#: A message to add: a parsed message, RFC 5322 bytes, or plain text to be wrapped.
MessageLike = email.message.Message | bytes | str

#: The entry point group of sources: adapter type -> the source class writing to its data.
GROUP = "pop3sf.admin_sources"

FILE_MODE = 0o640
DIR_MODE = 0o750


class SourceError(Exception):
    """Something about the source or the request is wrong; the message says what."""


class UnknownUser(SourceError):
    """The user does not exist in this source."""


class UserExists(SourceError):
    """A user of that name already exists."""


class BadName(SourceError):
    """The user name is not allowed by this source."""


class BadMessage(SourceError):
    """The message can't be stored (empty, not a message)."""


class NotSupported(SourceError):
    """This source can't do that (e.g. manage users of a single-user source)."""


class MessageSummary(NamedTuple):
    """One stored message, as ``message list`` shows it."""

    id: str
    size: int
    date: datetime.datetime
    subject: str


class Source(abc.ABC):
    """A bundled data source as the tools see it. ``user`` is None for single-user sources."""

    #: Whether the source has users that the tools manage (add, passwd, del, list).
    has_users: ClassVar[bool] = True

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        self.config = config
        self.service_user = service_user

    @abc.abstractmethod
    def add_message(self, user: str | None, message: MessageLike) -> str:
        """Store a message for ``user``; returns the new message's id in the source."""

    @abc.abstractmethod
    def list_messages(self, user: str | None) -> Sequence[MessageSummary]:
        """The user's messages as the server lists them, oldest first."""

    def count_messages(self, user: str | None) -> int:
        """How many messages deleting the user would delete: also those the server doesn't
        list right now (a file still being written, a row it cannot read)."""
        return len(self.list_messages(user))

    def check_user_name(self, name: str) -> None:
        """Raise :class:`BadName` if ``name`` can't be a user of this source (before prompts)."""

    def list_users(self) -> Sequence[str]:
        raise NotSupported(f"{type(self).__name__} has no users to list")

    def add_user(self, name: str, password: str) -> None:
        raise NotSupported(f"{type(self).__name__} has no users to add")

    def set_password(self, name: str, password: str) -> None:
        raise NotSupported(f"{type(self).__name__} has no users whose password can be changed")

    def delete_user(self, name: str) -> None:
        """Remove the user and all their messages."""
        raise NotSupported(f"{type(self).__name__} has no users to delete")

    def close(self) -> None:
        """Release connections (database sources)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(adapter_type: str, adapter_config: Mapping[str, Any],
                service_user: str | None = None) -> Source:
    """The :class:`Source` writing to the data of the adapter ``adapter_type`` configured so."""
    known = registered(GROUP)
    if adapter_type not in known:
        raise SourceError(f"no tool support for adapter type {adapter_type!r} "
                          f"(supported: {', '.join(sorted(known))})")
    try:
        cls = load_object(adapter_type, GROUP, "source")
    except ConfigError as exc:
        raise SourceError(str(exc)) from exc
    source: Source = cls(adapter_config, service_user=service_user)
    return source


_A = TypeVar("_A", bound=Adapter)


def build_adapter(adapter_class: type[_A], config: Mapping[str, Any]) -> _A:
    """The adapter a source reads through, built from the same ``[adapter]`` section as the
    server's (so the tools write where the server reads); a config problem is a
    :class:`SourceError`."""
    try:
        return adapter_class(config)
    except ConfigError as exc:
        raise SourceError(f"[adapter]: {exc}") from exc


# --- helpers for sources ------------------------------------------------------------------


def summarize(uid: str, size: int, stream: BinaryIO) -> MessageSummary:
    """A listed message as ``message list`` and ``preview`` show it: its Date and Subject read
    from the header section of *stream* (closed after), the size as listed."""
    import email.parser
    import email.policy
    import email.utils

    try:
        head = stream.read(256 * 1024).replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    finally:
        stream.close()
    msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    try:
        date = email.utils.parsedate_to_datetime(str(msg.get("Date", "")))
    except (TypeError, ValueError):
        date = datetime.datetime.fromtimestamp(0, datetime.UTC)
    subject = " ".join(str(msg.get("Subject", "")).split())
    return MessageSummary(uid, size, date, subject)


def password_bytes(password: str) -> bytes:
    """A password as it will be hashed: NFC (as the server normalises logins), UTF-8."""
    if not password:
        raise SourceError("empty password")
    return normalize_secret(password).encode("utf-8", "surrogateescape")


def message_bytes(message: email.message.Message | bytes) -> bytes:
    data = message.as_bytes() if isinstance(message, email.message.Message) else bytes(message)
    if not data.strip():
        raise BadMessage("empty message")
    return data


def service_owner(service_user: str | None) -> tuple[int, int] | None:
    """(uid, gid) to give new files: the service user's, when running as root; else None."""
    if not service_user or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(service_user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def fsync_directory(path: str | int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if isinstance(path, str) \
        else path
    try:
        os.fsync(fd)
    finally:
        if isinstance(path, str):
            os.close(fd)


def write_atomic(dir_fd: int, name: str, data: bytes, *, owner: tuple[int, int] | None = None,
                 mode: int = FILE_MODE, replace: bool = True) -> None:
    """Write ``name`` in the directory ``dir_fd`` so readers see all of it or nothing.

    With ``replace=False`` an existing ``name`` is an error (:class:`FileExistsError`).
    """
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:  # link + unlink: fails instead of overwriting
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(tmp, dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    os.fsync(dir_fd)


class SingleUserSource(Source):
    """A source whose one user lives in the config: there are no users to manage."""

    has_users = False

    def list_users(self) -> Sequence[str]:
        return [self.config["username"]]

    def _single(self) -> NotSupported:
        return NotSupported("a single-user source has its one user in the config (username, "
                            "password_hash); make a hash with `pop3sf-admin hash`")

    def add_user(self, name: str, password: str) -> None:
        raise self._single()

    def set_password(self, name: str, password: str) -> None:
        raise self._single()

    def delete_user(self, name: str) -> None:
        raise self._single()

