"""Writing to directory sources (:mod:`pop3sf.adapters.directory`'s on-disk formats).

New message files are named like the original tools named them, ``<time_ns>_<random>.eml`` or
``.txt``, and appear atomically (see :func:`.sources.write_atomic`), so the server never lists a
half-written file. User directories are created 0750 and password files 0640, owned by the
service user when run as root.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import errno
import os
import secrets
import shutil
import string
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pop3sf.adapters.base import AdapterError, normalize_secret
from pop3sf.adapters.directory import (
    PASSWORD_FILE,
    DirectoryAdapter,
    DirectoryAdapterBase,
    MultiUserDirectoryAdapter,
    is_valid_username,
    kind_of,
    read_password_file,
)
from pop3sf.adapters.plaintext import subject_for

from pop3sf import passwords

from .sources import (
    DIR_MODE,
    BadMessage,
    BadName,
    MessageLike,
    MessageSummary,
    SingleUserSource,
    Source,
    SourceError,
    UnknownUser,
    UserExists,
    build_adapter,
    message_bytes,
    password_bytes,
    service_owner,
    write_atomic,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NAME_ALPHABET = string.digits + string.ascii_lowercase
_HEADER_PEEK = 64 * 1024


def new_file_name(kind: str) -> str:
    """``<time_ns>_<40 random [0-9a-z]>.<kind>``, as the original tools named messages."""
    rand = "".join(secrets.choice(_NAME_ALPHABET) for _ in range(40))
    return f"{time.time_ns()}_{rand}.{kind}"


def _encode_for_file(message: MessageLike) -> tuple[str, bytes]:
    if isinstance(message, str):
        if not message.strip():
            raise BadMessage("empty message")
        return "txt", message.encode("utf-8", "surrogateescape")
    return "eml", message_bytes(message)


def _subject(dir_fd: int, name: str, kind: str) -> str:
    if kind == "txt":
        return subject_for(name)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        head = f.read(_HEADER_PEEK)
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    try:
        return " ".join(str(parsed.get("Subject", "")).split())
    except (ValueError, TypeError, IndexError):
        return ""


class _DirectorySourceBase(Source):
    adapter_class: ClassVar[type[DirectoryAdapterBase]]

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        # Sizes measured afresh, in memory: a cache file written here as root could lock out
        # the service user.
        self.adapter = build_adapter(self.adapter_class, {**config, "size_cache_dir": ""})
        super().__init__(self.adapter.options, service_user)
        self.owner = service_owner(service_user)

    def close(self) -> None:
        self.adapter.close()

    def _open_dir(self, path: str) -> int:
        try:
            return os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            raise SourceError(f"directory {path} does not exist") from None

    def _add_to(self, dir_fd: int, message: MessageLike) -> str:
        kind, data = _encode_for_file(message)
        name = new_file_name(kind)
        write_atomic(dir_fd, name, data, owner=self.owner, replace=False)
        return name

    def _list_in(self, dir_fd: int, account: str) -> list[MessageSummary]:
        """What the server lists in the directory, with the sizes it serves (a ``.txt`` file is
        served wrapped, line ends as CRLF), measured by the adapter's own listing."""
        session = self.adapter.session_for(account, os.dup(dir_fd))
        try:
            try:
                infos = session.list_messages()
            except AdapterError as exc:
                raise SourceError(f"cannot list the messages of {account!r}: {exc}") from None
            found = []
            for info in infos:
                name = session.name_of(info.uid)
                kind = kind_of(name or "")
                if name is None or kind is None:
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                date = datetime.datetime.fromtimestamp(st.st_mtime, tz=datetime.UTC)
                found.append(MessageSummary(name, info.size, date, _subject(dir_fd, name, kind)))
            return found
        finally:
            session.connection_closed()


class DirectorySource(SingleUserSource, _DirectorySourceBase):
    """The single-user directory: its one user is the configured ``username``."""

    adapter_class = DirectoryAdapter

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        super().__init__(config, service_user)
        self.directory = os.path.abspath(self.config["directory"])

    def _check_user(self, user: str | None) -> None:
        if user is not None and user != self.config["username"]:
            raise UnknownUser(f"unknown user {user!r} (this source's user is "
                              f"{self.config['username']!r})")

    def add_message(self, user: str | None, message: MessageLike) -> str:
        self._check_user(user)
        fd = self._open_dir(self.directory)
        try:
            return self._add_to(fd, message)
        finally:
            os.close(fd)

    def list_messages(self, user: str | None) -> Sequence[MessageSummary]:
        self._check_user(user)
        fd = self._open_dir(self.directory)
        try:
            return self._list_in(fd, normalize_secret(self.config["username"]))
        finally:
            os.close(fd)



class MultiUserDirectorySource(_DirectorySourceBase):
    """The multi-user directory: one subdirectory per user holding its password file."""

    adapter_class = MultiUserDirectoryAdapter

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        super().__init__(config, service_user)
        self.root = os.path.abspath(self.config["root"])
        self.rounds: int = self.config["bcrypt_rounds"]

    @staticmethod
    def _check_name(name: str | None) -> str:
        if name is None:
            raise BadName("this source has several users: name one")
        if not is_valid_username(name):
            raise BadName(f"invalid user name {name!r}: use 1-64 of A-Z a-z 0-9 _ -")
        return name

    def check_user_name(self, name: str) -> None:
        self._check_name(name)

    def _user_fd(self, name: str | None) -> int:
        """An fd of an existing user's directory (never through a symlink)."""
        name = self._check_name(name)
        root_fd = self._open_dir(self.root)
        try:
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise UnknownUser(f"unknown user {name!r}") from None
            raise
        finally:
            os.close(root_fd)
        if read_password_file(fd) is None:
            os.close(fd)
            raise UnknownUser(f"unknown user {name!r} (no {PASSWORD_FILE})")
        return fd

    def add_message(self, user: str | None, message: MessageLike) -> str:
        fd = self._user_fd(user)
        try:
            return self._add_to(fd, message)
        finally:
            os.close(fd)

    def list_messages(self, user: str | None) -> Sequence[MessageSummary]:
        fd = self._user_fd(user)
        try:
            return self._list_in(fd, self._check_name(user))
        finally:
            os.close(fd)

    def count_messages(self, user: str | None) -> int:
        fd = self._user_fd(user)
        try:
            return sum(1 for name in os.listdir(fd) if kind_of(name) is not None)
        finally:
            os.close(fd)

    def list_users(self) -> Sequence[str]:
        root_fd = self._open_dir(self.root)
        try:
            users = []
            for name in os.listdir(root_fd):
                if not is_valid_username(name):
                    continue
                try:
                    fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
                except OSError:
                    continue
                try:
                    if read_password_file(fd) is not None:
                        users.append(name)
                finally:
                    os.close(fd)
            return sorted(users)
        finally:
            os.close(root_fd)

    def _write_password(self, dir_fd: int, password: str) -> None:
        hashed = passwords.hash_bcrypt(password_bytes(password), rounds=self.rounds)
        write_atomic(dir_fd, PASSWORD_FILE, hashed.encode("ascii") + b"\n", owner=self.owner)

    def add_user(self, name: str, password: str) -> None:
        name = self._check_name(name)
        password_bytes(password)  # refuse an empty password before creating anything
        root_fd = self._open_dir(self.root)
        try:
            try:
                os.mkdir(name, DIR_MODE, dir_fd=root_fd)
            except FileExistsError:
                fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
                try:
                    if read_password_file(fd) is not None:
                        raise UserExists(f"user {name!r} already exists") from None
                    # A directory without a password file (e.g. restored data): adopt it.
                    self._write_password(fd, password)
                finally:
                    os.close(fd)
                return
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
            try:
                os.fchmod(fd, DIR_MODE)
                if self.owner is not None:
                    os.fchown(fd, *self.owner)
                self._write_password(fd, password)
            except BaseException:
                os.close(fd)
                fd = -1
                shutil.rmtree(name, dir_fd=root_fd)
                raise
            finally:
                if fd >= 0:
                    os.close(fd)
            os.fsync(root_fd)
        finally:
            os.close(root_fd)

    def set_password(self, name: str, password: str) -> None:
        fd = self._user_fd(name)
        try:
            self._write_password(fd, password)
        finally:
            os.close(fd)

    def delete_user(self, name: str) -> None:
        os.close(self._user_fd(name))  # exists, is a real directory
        root_fd = self._open_dir(self.root)
        try:
            # Rename away first so the server stops finding the user at once.
            aside = f".deleted-{name}-{os.urandom(4).hex()}"
            os.rename(name, aside, src_dir_fd=root_fd, dst_dir_fd=root_fd)
            os.fsync(root_fd)
            shutil.rmtree(aside, dir_fd=root_fd)  # fd-based: safe against symlink races
        finally:
            os.close(root_fd)


__all__ = ["DirectorySource", "MultiUserDirectorySource", "new_file_name"]
