"""Dovecot-compatible passwd-files (the maildir adapter's users), reread when they change.

The format is Dovecot's: one user per line, ``user:password:uid:gid:gecos:home:shell:extra``,
where every field after the password may be left out and ``extra`` (the rest of the line,
colons included) holds space-separated ``key=value`` fields such as ``userdb_mail=...``.
Blank lines and lines starting with ``#`` are ignored; user names may be ``user@domain``.

The file is stat'ed on every lookup and parsed again when its (mtime, size, inode) changes, so
``pop3sf-admin`` or a Dovecot admin tool editing it takes effect at the next login without a
reload. Writers replace it atomically (write a temporary file, rename), so a reader always sees
a whole file.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PasswdEntry:
    """One user line. ``extra`` maps lowercased keys to values (``""`` for bare flags)."""

    user: str
    password: str
    uid: str = ""
    gid: str = ""
    gecos: str = ""
    home: str = ""
    shell: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)
    lineno: int = 0

    def to_line(self) -> str:
        """The entry as a passwd-file line (no newline); trailing empty fields left out."""
        extra = " ".join(k if v == "" and "=" not in k else f"{k}={v}"
                         for k, v in self.extra.items())
        fields = [self.user, self.password, self.uid, self.gid, self.gecos, self.home,
                  self.shell, extra]
        while len(fields) > 2 and fields[-1] == "":
            fields.pop()
        return ":".join(fields)


def parse_extra(text: str) -> dict[str, str]:
    extra: dict[str, str] = {}
    for item in text.split():
        key, _, value = item.partition("=")
        if key:
            extra[key.lower()] = value
    return extra


def parse_line(line: str, lineno: int = 0) -> PasswdEntry | None:
    """One line of a passwd-file; None for comments, blank and malformed lines."""
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    user, sep, rest = line.partition(":")
    if not sep or not user:
        return None
    parts = rest.split(":", 6)
    parts += [""] * (7 - len(parts))
    password, uid, gid, gecos, home, shell, extra = parts
    return PasswdEntry(user, password, uid, gid, gecos, home, shell, parse_extra(extra), lineno)


def parse(data: str, source: str = "passwd-file") -> dict[str, PasswdEntry]:
    """All entries by user name. A repeated name keeps its first line, as Dovecot does."""
    entries: dict[str, PasswdEntry] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        entry = parse_line(line, lineno)
        if entry is None:
            if line.strip() and not line.lstrip().startswith("#"):
                log.warning("%s line %d: no user:password, ignored", source, lineno)
            continue
        if entry.user in entries:
            log.warning("%s line %d: user %r repeated, keeping line %d", source, lineno,
                        entry.user, entries[entry.user].lineno)
            continue
        entries[entry.user] = entry
    return entries


def read(path: str) -> dict[str, PasswdEntry]:
    with open(path, "rb") as f:
        return parse(f.read().decode("utf-8", "surrogateescape"), path)


class PasswdFile:
    """A passwd-file kept parsed in memory and reloaded when it changes on disk (thread-safe).

    ``lookup`` raises :class:`OSError` when the file can't be read; the last good contents are
    not used then, since a removed or unreadable file must not keep old passwords valid.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._version: tuple[int, int, int, int] | None = None
        self._entries: dict[str, PasswdEntry] = {}
        self._lower: dict[str, str] = {}

    def _refresh(self) -> dict[str, PasswdEntry]:
        st = os.stat(self.path)
        version = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        with self._lock:
            if version != self._version:
                with open(self.path, "rb") as f:
                    st2 = os.fstat(f.fileno())
                    entries = parse(f.read().decode("utf-8", "surrogateescape"), self.path)
                self._entries = entries
                self._lower = {}
                for name in entries:
                    self._lower.setdefault(name.lower(), name)
                self._version = (st2.st_mtime_ns, st2.st_size, st2.st_ino, st2.st_dev)
            return self._entries

    def lookup(self, name: str) -> PasswdEntry | None:
        """The entry for ``name``; failing an exact match, a case-insensitive one (Dovecot
        lowercases login names by default, ``auth_username_format = %Lu``)."""
        entries = self._refresh()
        entry = entries.get(name)
        if entry is None:
            with self._lock:
                canonical = self._lower.get(name.lower())
            entry = entries.get(canonical) if canonical is not None else None
        return entry

    def snapshot(self) -> Mapping[str, PasswdEntry]:
        """The current entries by name; the same object until the file changes."""
        return self._refresh()

    def entries(self) -> list[PasswdEntry]:
        return list(self._refresh().values())

    def __iter__(self) -> Iterator[PasswdEntry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self._refresh())
