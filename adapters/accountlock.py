"""A maildrop lock that every pop3sf process on the same filesystem respects (docs/deployment.md).

The server's own account lock (docs/protocol.md §8) lives in one process's memory, so two
instances behind a load balancer, or two daemons on one spool, would serve one maildrop twice
and the second QUIT would try to delete what the first already did. The directory and Maildir
sources therefore also hold, for each read-write session, ``flock(LOCK_EX | LOCK_NB)`` on a lock
file inside the maildrop itself:

* ``flock``, not ``fcntl`` record locks: a flock belongs to the open file, so two sessions of
  one process exclude each other too, and closing some other descriptor of the file (a second
  session failing to lock it) does not drop the first one's lock, as it would with POSIX locks;
* inside the maildrop, not in ``/run``: instances on other machines that share the maildrop
  (NFS, whose client maps flock onto its lock manager) see the same file;
* the kernel releases it when the holder's descriptor closes, the process exits or is killed
  (SIGKILL included): no stale lock, nothing to clean up; the file itself is left in place,
  because unlinking a lock file races with the next locker;
* read-only (XPRO) sessions take no lock, as they take no in-process lock: they delete nothing,
  and a message deleted under them is answered as gone;
* a maildrop this process may not write (permissions, a read-only filesystem) and that has no
  lock file yet is served without one, with a warning: the lock exists to keep two sessions from
  deleting the same messages, and whoever can't create a file there can't delete there either.
  An existing lock file is still locked (read-only descriptors can be flocked locally), so an
  administrator can pre-create it.

Taken in ``login_succeeded`` (a worker thread), released in ``connection_closed``; a lock held
elsewhere raises :class:`MaildropInUse`, which the client sees as ``-ERR [IN-USE]``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat

from .base import MaildropInUse, TemporaryFailure

log = logging.getLogger("pop3sf.adapters.accountlock")

_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_WARNED_MAX = 1000
_warned: set[str] = set()


def lock_maildrop(dir_fd: int, name: str, where: str) -> int | None:
    """Open (creating it if need be) ``name`` in the directory ``dir_fd`` and lock it
    exclusively without waiting; return the descriptor that holds the lock, or None for a
    maildrop this process can't write to (see the module's docstring).

    Raises :class:`MaildropInUse` when another session, in this process or any other, holds
    it, and :class:`TemporaryFailure` when the file can't be opened or is not a regular file.
    """
    try:
        # Read-only: a descriptor open for writing would stop the filesystem from being
        # remounted read-only under a session. (NFS wants write access: see _flock.)
        fd = os.open(name, os.O_RDONLY | os.O_CREAT | _FLAGS, 0o660, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise TemporaryFailure(_why(where, name, exc)) from exc
        try:
            fd = os.open(name, os.O_RDONLY | _FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            _warn_unlocked(where, name, exc)
            return None
        except OSError as exc2:
            raise TemporaryFailure(_why(where, name, exc2)) from exc2
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TemporaryFailure(f"lock file {where}/{name} is not a regular file")
        fd = _flock(fd, name, dir_fd)
    except BlockingIOError:
        os.close(fd)
        raise MaildropInUse("maildrop locked by another pop3sf session") from None
    except OSError as exc:
        os.close(fd)
        raise TemporaryFailure(_why(where, name, exc)) from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def _flock(fd: int, name: str, dir_fd: int) -> int:
    """Lock ``fd`` exclusively; over NFS, which implements that as a write lock and refuses it
    on a read-only descriptor (EBADF), through a read-write one instead."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
    writable = os.open(name, os.O_RDWR | _FLAGS, dir_fd=dir_fd)
    try:
        fcntl.flock(writable, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(writable)
        raise  # the caller closes fd
    os.close(fd)
    return writable


def unlock_maildrop(fd: int | None) -> None:
    """Give the lock back (closing the descriptor releases it)."""
    if fd is not None:
        os.close(fd)


def _warn_unlocked(where: str, name: str, exc: OSError) -> None:
    """Once per maildrop (up to a bound): a silent fallback would hide a lost guarantee."""
    if where in _warned or len(_warned) >= _WARNED_MAX:
        return
    _warned.add(where)
    log.warning("cannot create %s/%s (%s): sessions there are not excluded across processes; "
                "this process can't delete there either. Create the file, writable by the "
                "service user, to have them excluded", where, name, exc.strerror or exc)


def _why(where: str, name: str, exc: OSError) -> str:
    return (f"cannot lock {where}/{name}: {exc.strerror or exc} (the service user needs to "
            "create and write that file; or set cross_instance_lock = no)")
