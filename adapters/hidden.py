"""What an account has deleted from a source pop3sf must not change: a per-account hidden set.

Some sources are read-only to pop3sf (a table another program owns, an append-only journal), yet
a client that deletes a message expects it gone at the next login. Such adapters remember the
deleted uids here and leave them out of their listings. One file per account under a state
directory (``/var/lib/pop3sf/hidden`` by default: the unit's ``StateDirectory``), one uid per
line after a first line naming the account; it is rewritten atomically (temporary file, fsync,
rename, fsync of the directory), so a crash leaves the old set or the new one, never half.

API::

    store = HiddenStore("/var/lib/pop3sf/hidden", namespace="sql-...")
    hidden = store.hidden(account)                # frozenset of uids, empty if none
    store.hide(account, uids, keep=listed_uids)   # add uids; forget those no longer listed
    store.hide(account, uids, keep=lambda uid: ...)  # or keep those a predicate accepts
    store.forget(account)                         # everything listed again

``keep`` bounds the file: uids that the source no longer returns at all can never come back
(sources' uids are stable), so they are dropped when the set is next written. Writes of one
store are serialised by a lock; the server already runs one read-write session per account.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable

#: Mode of the directories and files: the service user (and its group, for pop3sf-admin).
DIR_MODE = 0o750
FILE_MODE = 0o640


class HiddenStore:
    """The hidden uids of every account of one source, kept in ``directory/namespace``."""

    def __init__(self, directory: str, namespace: str) -> None:
        if not os.path.isabs(directory):
            raise ValueError(f"hidden-set directory {directory!r} must be an absolute path")
        if not namespace or "/" in namespace or namespace.startswith("."):
            raise ValueError(f"bad hidden-set namespace {namespace!r}")
        self.directory = directory
        self.path = os.path.join(directory, namespace)
        self._lock = threading.Lock()

    def _file(self, account: str) -> str:
        """A file name safe for any account name (a hash; the name itself is the first line)."""
        digest = hashlib.sha256(account.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return os.path.join(self.path, digest + ".hidden")

    def hidden(self, account: str) -> frozenset[str]:
        """The uids ``account`` has deleted (empty if none, or if the file can't be read:
        OSError propagates so the caller can fail the login rather than resurrect mail)."""
        try:
            with open(self._file(account), encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return frozenset()
        return frozenset(line for line in lines[1:] if line)

    def hide(self, account: str, uids: Iterable[str],
             keep: Iterable[str] | Callable[[str], bool] | None = None) -> None:
        """Add ``uids`` to ``account``'s set; with ``keep`` (the uids the source still has, or
        a predicate such as "not older than the window"), drop the others. Atomic: readers see
        the old set or the new one."""
        with self._lock:
            current = set(self.hidden(account)) | set(uids)
            if callable(keep):
                current = {uid for uid in current if keep(uid)}
            elif keep is not None:
                current &= set(keep)
            os.makedirs(self.path, mode=DIR_MODE, exist_ok=True)
            data = "".join(f"{line}\n" for line in [f"# {account}", *sorted(current)])
            _write_atomic(self._file(account), data.encode("utf-8", "surrogateescape"))

    def forget(self, account: str) -> None:
        """Remove ``account``'s set: everything it hid is listed again."""
        with self._lock:
            try:
                os.unlink(self._file(account))
            except FileNotFoundError:
                pass

    def check_writable(self) -> str | None:
        """Why hidden sets could not be written here (for ``--check-config``), or None."""
        probe = self.path if os.path.isdir(self.path) else self.directory
        while not os.path.isdir(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"{probe} is not writable by this user"
        return None


def _write_atomic(path: str, data: bytes) -> None:
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
