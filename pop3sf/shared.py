"""What the processes of ``[server] processes = N`` share without asking the parent.

Two checks sit on a synchronous path of the loop (admitting a connection, claiming an account)
and must hold across processes, so they use shared kernel objects the parent creates before it
forks, never a round trip and never a wait (docs/architecture.md §8):

* :class:`GroupCounts`: connections per address group for ``max_connections_per_address``, one
  row of counters per child in a shared anonymous mapping. A child writes only its own row, so
  no lock is needed; a reader sums the rows. A dead child's row is zeroed by the parent. Groups
  land in slots by a keyed hash: two groups sharing a slot share a cap (stricter, never looser).
  Two processes admitting the same group's last allowed connection in the same microsecond may
  both succeed: the cap can be exceeded by at most N − 1.
* :class:`PenaltyMarks`: which groups failed lately, so that only those go through the
  parent's verification gate (pop3sf.child.RemoteGate).
* :class:`AccountLocks`: the per-account read-write lock and ``max_sessions_per_user`` as POSIX
  record locks on bytes of one memfd, at offsets from a keyed hash of the account. Taken with
  ``F_SETLK`` (never waits), per process, and released by the kernel when a process dies, so a
  crashed child never leaves an account locked.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile

#: Counter slots per child (4 bytes each, touched lazily by the kernel).
SLOTS = 1 << 18
#: Bytes per account in the lock file: byte 0 the read-write lock, 1... the per-user slots
#: (max_sessions_per_user is at most 100000).
ACCOUNT_SPAN = 1 << 17


class GroupCounts:
    """Per address group counts summed over every process (see the module docstring): open
    connections, or verifications running without the parent's gate. Each row ends with the
    row's grand total."""

    def __init__(self, processes: int, slots: int = SLOTS) -> None:
        self.processes = processes
        self.slots = slots
        self._width = slots + 1
        self._key = os.urandom(16)
        self._mem = mmap.mmap(-1, processes * self._width * 4)   # MAP_SHARED | MAP_ANONYMOUS
        self._counts = memoryview(self._mem).cast("i")
        self.row = -1                                              # a child sets its own

    def _slot(self, group: str) -> int:
        digest = hashlib.blake2b(group.encode(), key=self._key, digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.slots

    def total(self, group: str) -> int:
        slot, counts, width = self._slot(group), self._counts, self._width
        return sum(counts[row * width + slot] for row in range(self.processes))

    def grand_total(self) -> int:
        counts, width = self._counts, self._width
        return sum(counts[row * width + self.slots] for row in range(self.processes))

    def add(self, group: str, delta: int) -> None:
        """Only the owning child writes its row."""
        base = self.row * self._width
        index = base + self._slot(group)
        self._counts[index] = max(0, self._counts[index] + delta)
        self._counts[base + self.slots] = max(0, self._counts[base + self.slots] + delta)

    def clear(self, row: int) -> None:
        """A child is gone: what it counted is gone with it (called by the parent)."""
        size = self._width * 4
        self._mem[row * size:(row + 1) * size] = bytes(size)

    def close(self) -> None:
        self._counts.release()
        self._mem.close()


class PenaltyMarks:
    """Which address groups have a penalty: one byte per slot of a keyed hash, shared. A child
    sets its group's mark the moment it sees a wrong password (before the parent hears of it);
    the parent clears a slot once no group in it is penalised any more. An unmarked group's
    verification may start in the child without asking the parent (the caps still count every
    process); a marked one, or a colliding one, goes through the parent's gate."""

    def __init__(self, slots: int = 1 << 16) -> None:
        self.slots = slots
        self._key = os.urandom(16)
        self._mem = mmap.mmap(-1, slots)

    def slot(self, group: str) -> int:
        digest = hashlib.blake2b(group.encode(), key=self._key, digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.slots

    def marked(self, group: str) -> bool:
        return self._mem[self.slot(group)] != 0

    def mark(self, group: str) -> None:
        self._mem[self.slot(group)] = 1

    def unmark(self, slot: int) -> None:
        self._mem[slot] = 0

    def close(self) -> None:
        self._mem.close()


class AccountLocks:
    """Cross-process account locks as byte-range locks on a memfd (see the module docstring)."""

    def __init__(self) -> None:
        try:
            self.fd = os.memfd_create("pop3sf-accounts", os.MFD_CLOEXEC)
        except (AttributeError, OSError):            # no memfd (old kernel, seccomp)
            with tempfile.TemporaryFile() as f:
                self.fd = os.dup(f.fileno())     # unlinked; lives as long as the fd
            os.set_inheritable(self.fd, False)
        self._key = os.urandom(16)

    def base(self, account: str) -> int:
        digest = hashlib.blake2b(account.encode("utf-8", "surrogateescape"), key=self._key,
                                 digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> 20) * ACCOUNT_SPAN   # < 2**61

    def try_lock(self, offset: int) -> bool:
        """Take one byte for this process, or False if another process holds it."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError:
            return False
        return True

    def unlock(self, offset: int) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)
        except OSError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SharedState:
    """Everything the parent makes before forking and every child inherits."""

    def __init__(self, processes: int) -> None:
        self.counts = GroupCounts(processes)
        #: Verifications running that started without the parent (unpenalised groups).
        self.verifying = GroupCounts(processes, 1 << 16)
        self.marks = PenaltyMarks()
        self.locks = AccountLocks()
        #: The key the penalty table hashes (user, password) with: the parent's, so a child's
        #: digests match the parent's table.
        self.penalty_key = os.urandom(32)

    def close(self) -> None:
        self.counts.close()
        self.verifying.close()
        self.marks.close()
        self.locks.close()
