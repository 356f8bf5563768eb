"""Writing to Maildir sources (:mod:`pop3sf.adapters.maildir`): deliveries and passwd-file users.

A message is delivered the way every Maildir writer does it: written and fsynced under ``tmp/``,
then linked into ``new/`` under a unique name ``<secs>.M<usec>P<pid>R<random>.<host>,S=<size>,
W=<size on the wire>`` (so neither pop3sf nor Dovecot has to read it to know its size), and the
directory fsynced. Users are lines of the Dovecot passwd-file, which is rewritten atomically
(temporary file, fsync, rename) under a lock on its directory, keeping its owner and mode;
passwords are stored as ``{BLF-CRYPT}`` bcrypt hashes, which Dovecot verifies too.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import errno
import fcntl
import io
import os
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pop3sf.adapters.base import AdapterError
from pop3sf.adapters.maildir import MaildirAdapter
from pop3sf.adapters.maildir_names import (
    basename_uidl,
    delivery_key,
    is_valid_username,
    split_name,
)
from pop3sf.adapters.passwdfile import PasswdEntry, parse, parse_line
from pop3sf.adapters.plaintext import wrap_plaintext

from pop3sf import passwords
from pop3sf.wire import measure

from .sources import (
    FILE_MODE,
    BadMessage,
    BadName,
    MessageLike,
    MessageSummary,
    Source,
    SourceError,
    UnknownUser,
    UserExists,
    build_adapter,
    fsync_directory,
    message_bytes,
    password_bytes,
    service_owner,
    write_atomic,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_HEADER_PEEK = 64 * 1024
_counter_lock = threading.Lock()
_last_stamp = (0, 0)


def _hostname() -> str:
    """The host part of a Maildir name, with ``/`` and ``:`` escaped as the convention says."""
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name(size: int, vsize: int) -> str:
    """``<secs>.M<usec>P<pid>R<random>.<host>,S=<size>,W=<vsize>``, unique on this host."""
    global _last_stamp
    with _counter_lock:
        now = time.time_ns() // 1000
        stamp = (now // 1_000_000, now % 1_000_000)
        if stamp <= _last_stamp:  # same microsecond in this process: take the next one
            secs, usec = _last_stamp
            stamp = (secs + 1, 0) if usec == 999_999 else (secs, usec + 1)
        _last_stamp = stamp
    secs, usec = stamp
    return (f"{secs}.M{usec}P{os.getpid()}R{secrets.token_hex(4)}.{_hostname()}"
            f",S={size},W={vsize}")


def _as_bytes(message: MessageLike, user: str, from_address: str) -> bytes:
    if not isinstance(message, str):
        data = message_bytes(message)
    else:
        if not message.strip():
            raise BadMessage("empty message")
        first = next(line.strip() for line in message.splitlines() if line.strip())
        to = user if "@" in user else f"{user}@localhost"
        now = datetime.datetime.now(datetime.UTC)
        data = wrap_plaintext(message.encode("utf-8", "surrogateescape"),
                              uid=f"{user}/{time.time_ns()}/{secrets.token_hex(8)}",
                              name=first[:78], date=now, from_addr=from_address, to_addr=to)
    # Maildir files hold Unix line ends, as every local delivery agent writes them.
    return data.replace(b"\r\n", b"\n")


class MaildirSource(Source):
    """Users of a Dovecot passwd-file and their Maildirs, as the ``maildir`` adapter reads them."""

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        self.adapter = build_adapter(MaildirAdapter, config)
        super().__init__(self.adapter.options, service_user)
        self.owner = service_owner(service_user)
        self.passwd_path = os.path.abspath(self.adapter.options["passwd_file"])

    def _maildir(self, entry: PasswdEntry) -> str:
        try:
            return self.adapter.maildir_of(entry)[0]
        except AdapterError as exc:  # outside the root, no home for %h
            raise SourceError(f"Maildir of {entry.user!r}: {exc}") from None

    # --- users --------------------------------------------------------------------------------

    def check_user_name(self, name: str) -> None:
        if not is_valid_username(name):
            raise BadName(f"invalid user name {name!r}: no '/', ':', '%', spaces or leading "
                          "dot; at most one '@'")

    def _entry(self, user: str | None) -> PasswdEntry:
        if user is None:
            raise BadName("this source has several users: name one")
        self.check_user_name(user)
        try:
            entry = self.adapter.passwd.lookup(user)
        except FileNotFoundError:
            entry = None
        if entry is None:
            raise UnknownUser(f"unknown user {user!r}")
        return entry

    def list_users(self) -> Sequence[str]:
        try:
            return sorted(e.user for e in self.adapter.passwd.entries())
        except FileNotFoundError:
            return []

    @contextmanager
    def _editing(self) -> Iterator[dict[str, PasswdEntry]]:
        """The passwd-file's entries to change; written back atomically if the body succeeds.

        Comments, blank lines and the order of lines are kept; only changed lines differ.
        """
        directory, name = os.path.split(self.passwd_path)
        dir_fd = os.open(directory, _DIR_FLAGS & ~os.O_NOFOLLOW)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)  # one editor at a time (other pop3sf-admins)
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=dir_fd), "rb") as f:
                    text = f.read().decode("utf-8", "surrogateescape")
            except FileNotFoundError:
                st, text = None, ""
            entries = parse(text, self.passwd_path)
            before = dict(entries)
            yield entries
            lines = _merge(text, before, entries)
            mode = stat.S_IMODE(st.st_mode) if st is not None else FILE_MODE
            owner = self.owner if st is None else \
                ((st.st_uid, st.st_gid) if os.geteuid() == 0 else None)
            write_atomic(dir_fd, name, lines.encode("utf-8", "surrogateescape"), owner=owner,
                         mode=mode)
        finally:
            os.close(dir_fd)

    def _hash(self, password: str) -> str:
        return "{BLF-CRYPT}" + passwords.hash_bcrypt(password_bytes(password),
                                                     rounds=self.adapter.options["bcrypt_rounds"])

    def add_user(self, name: str, password: str) -> None:
        self.check_user_name(name)
        secret = self._hash(password)
        with self._editing() as entries:
            if any(existing.lower() == name.lower() for existing in entries):
                raise UserExists(f"user {name!r} already exists")
            entry = PasswdEntry(name, secret)
            self._maildir(entry)  # e.g. mail_location uses %h: such a line would need a home
            entries[name] = entry

    def set_password(self, name: str, password: str) -> None:
        secret = self._hash(password)
        canonical = self._entry(name).user
        with self._editing() as entries:
            old = entries.get(canonical)
            if old is None:
                raise UnknownUser(f"unknown user {name!r}")
            entries[canonical] = PasswdEntry(old.user, secret, old.uid, old.gid, old.gecos,
                                             old.home, old.shell, old.extra, old.lineno)

    def delete_user(self, name: str) -> None:
        """Remove the user's line, then their Maildir (never through a symlink)."""
        entry = self._entry(name)
        maildir = self._maildir(entry)
        with self._editing() as entries:
            if entries.pop(entry.user, None) is None:
                raise UnknownUser(f"unknown user {name!r}")
        parent, base = os.path.split(maildir)
        try:
            parent_fd = os.open(parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            aside = f".deleted-{base}-{secrets.token_hex(4)}"
            try:
                os.rename(base, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            except FileNotFoundError:
                return
            os.fsync(parent_fd)
            if stat.S_ISDIR(os.stat(aside, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                shutil.rmtree(aside, dir_fd=parent_fd)
            else:  # a symlink or file where the Maildir was: remove just that
                os.unlink(aside, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)

    # --- messages -----------------------------------------------------------------------------

    def _mail_owner(self, maildir_fd: int | None) -> tuple[int, int] | None:
        """Whose new files are: the Maildir's owner's (vmail) when root, else nobody's change."""
        if os.geteuid() != 0:
            return None
        if maildir_fd is not None:
            st = os.fstat(maildir_fd)
            return st.st_uid, st.st_gid
        return self.owner

    def _ensure_maildir(self, path: str) -> int:
        """The Maildir's fd, creating it (0700, with new/ cur/ tmp/) on first delivery."""
        try:
            return os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            pass
        owner = self._mail_owner(None)
        created = []
        missing = path
        while not os.path.exists(missing):
            created.append(missing)
            missing = os.path.dirname(missing)
        for directory in reversed(created):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                continue
            if owner is not None:
                os.chown(directory, *owner, follow_symlinks=False)
        return os.open(path, _DIR_FLAGS)

    def add_message(self, user: str | None, message: MessageLike) -> str:
        entry = self._entry(user)
        data = _as_bytes(message, entry.user, self.adapter.options["from_address"])
        maildir = self._maildir(entry)
        vsize = measure(io.BytesIO(data)).size
        fd = self._ensure_maildir(maildir)
        try:
            owner = self._mail_owner(fd)
            mode = stat.S_IMODE(os.fstat(fd).st_mode) & 0o666 or 0o600
            subdirs = {}
            try:
                for sub in ("tmp", "new", "cur"):
                    try:
                        os.mkdir(sub, 0o700, dir_fd=fd)
                        if owner is not None:
                            os.chown(sub, *owner, dir_fd=fd, follow_symlinks=False)
                    except FileExistsError:
                        pass
                    subdirs[sub] = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                name = unique_name(len(data), vsize)
                write_atomic(subdirs["tmp"], name, data, owner=owner, mode=mode, replace=False)
                try:  # link: never replaces an existing message, as Maildir writers do
                    os.link(name, name, src_dir_fd=subdirs["tmp"], dst_dir_fd=subdirs["new"],
                            follow_symlinks=False)
                finally:
                    os.unlink(name, dir_fd=subdirs["tmp"])
                fsync_directory(subdirs["new"])
            finally:
                for sub_fd in subdirs.values():
                    os.close(sub_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SourceError(f"{maildir}: new/, cur/ or tmp/ is a symlink") from exc
            raise
        finally:
            os.close(fd)
        return basename_uidl(name)

    def list_messages(self, user: str | None) -> Sequence[MessageSummary]:
        entry = self._entry(user)
        self._maildir(entry)
        session = self.adapter.session_for(entry)
        try:
            try:
                infos = session.list_messages()
            except AdapterError as exc:
                raise SourceError(f"cannot list the Maildir of {entry.user!r}: {exc}") from None
            found = []
            for info in infos:
                where = session.location(info.uid)
                if where is None:
                    continue
                sub, name = where
                date, subject = _date_and_subject(session.path, sub, name)
                found.append(MessageSummary(info.uid, info.size, date, subject))
            return found
        finally:
            session.connection_closed()


def _merge(text: str, before: Mapping[str, PasswdEntry], after: Mapping[str, PasswdEntry]) -> str:
    """The file's lines with removed users' lines dropped (repeats too, so none takes over),
    changed entries rewritten in place, new ones appended; everything else kept as it was."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parsed = parse_line(line, lineno)
        if parsed is None or parsed.user not in before:
            out.append(line)
        elif parsed.user not in after:
            continue
        elif lineno == before[parsed.user].lineno and after[parsed.user] != before[parsed.user]:
            out.append(after[parsed.user].to_line())
        else:
            out.append(line)
    out.extend(entry.to_line() for user, entry in after.items() if user not in before)
    return "".join(f"{line}\n" for line in out)


def _date_and_subject(maildir: str, sub: str, name: str) -> tuple[datetime.datetime, str]:
    path = os.path.join(maildir, sub, name)
    when = delivery_key(split_name(name)[0])
    subject = ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if when is None:
                when = (int(os.fstat(f.fileno()).st_mtime), 0)
            head = f.read(_HEADER_PEEK)
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        subject = " ".join(str(parsed.get("Subject", "")).split())
    except (OSError, ValueError, TypeError, IndexError):
        pass
    secs = when[0] if when is not None else 0
    return datetime.datetime.fromtimestamp(secs, tz=datetime.UTC), subject


__all__ = ["MaildirSource", "unique_name"]
