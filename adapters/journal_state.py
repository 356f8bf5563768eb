"""What each journal account has deleted: DELE hides, the journal itself is never written.

One small text file per account in the adapter's ``state_directory`` (by default
``/var/lib/pop3sf/journal``, inside the service's ``StateDirectory``), one UIDL a line. It is
replaced atomically (a temporary file, fsync, rename, fsync of the directory), so a crash leaves
the old set or the new one, never a torn file. UIDLs carry their time
(:func:`.journal_render.uid_time`), so the set is pruned of entries that have left the
account's window every time it is written, and stays as small as the window.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Collection

from .base import TemporaryFailure
from .journal_render import uid_time

SUFFIX = ".hidden"


class HiddenStore:
    """The hidden sets of all accounts under one directory (thread-safe within a process; the
    server lets one read-write session per account at a time)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def _path(self, account: str) -> str:
        return os.path.join(self.directory, account + SUFFIX)

    def load(self, account: str) -> set[str]:
        """The account's hidden UIDLs; empty if it never deleted anything."""
        try:
            with open(self._path(account), encoding="ascii", errors="replace") as f:
                return {line.strip() for line in f if line.strip()}
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise TemporaryFailure(f"cannot read {self._path(account)}: {exc.strerror}") from exc

    def hide(self, account: str, uids: Collection[str], cutoff: float) -> None:
        """Add *uids* to the account's set, dropping those older than *cutoff* (Unix time)."""
        with self._lock:
            keep = {uid for uid in self.load(account) | set(uids)
                    if (uid_time(uid) or 0.0) >= cutoff}
            self._write(account, "".join(f"{uid}\n" for uid in sorted(keep)).encode("ascii"))

    def _write(self, account: str, data: bytes) -> None:
        path = self._path(account)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(self.directory, 0o750, exist_ok=True)  # by the server, at first use
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise TemporaryFailure(f"cannot write {path}: {exc.strerror}") from exc
