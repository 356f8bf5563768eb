"""Running by hand: ``pop3sf --daemon`` (python-daemon), pidfile and dropping privileges.

Under systemd none of this is used: the unit runs pop3sf in the foreground (``Type=notify``),
as ``User=pop3sf``, with sockets passed in. By hand, the CLI must call things in this order::

    settings = load_config(path, resolve=False)     # errors -> stderr, exit 78; the adapter
                                                    # is checked as the service user (cli)
    refuse_daemon_under_systemd()                   # only with --daemon; DaemonError -> exit 1
    check_pidfile(pidfile)                          # only with --daemon; before binding, so
                                                    # "already running" beats EADDRINUSE
    sockets = pop3sf.systemd.listen_fds() or bind the configured listeners (still root)
    ctx = daemonize(pidfile, [s.fileno() for s in sockets],
                    pidfile_owner=settings.service_user)        # forks; parent exits 0
                                                    # (optional on_sighup/on_sigterm handlers)
    ... now set up logging (journal_handler() etc.) -- never before daemonize()
    drop_privileges(settings.service_user, group)   # after binding and after logging is set up
    ... only now import and build the adapter; start threads (worker pool, log queue listener)
    and the loop

No thread may be started before :func:`daemonize` (fork keeps only the calling thread), and no
log record may be written before it either (python-daemon closes the fds a log handler holds;
the next accepted client gets the old fd number and receives the log records).
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import logs, systemd
from .config import lookup_account

__all__ = [
    "DaemonError",
    "PidfileError",
    "PrivilegeError",
    "check_pidfile",
    "daemonize",
    "drop_privileges",
    "refuse_daemon_under_systemd",
]

log = logging.getLogger("pop3sf.daemon")

SignalHandler = Callable[[int, FrameType | None], Any]


class DaemonError(Exception):
    """Starting as a daemon is impossible; the message is meant for the admin (exit 1)."""


class PidfileError(DaemonError):
    """Another pop3sf holds the pidfile, or the pidfile can't be handled."""


class PrivilegeError(DaemonError):
    """The configured user or group does not exist, or switching to it failed."""


def refuse_daemon_under_systemd() -> None:
    """Raise :class:`DaemonError` if ``--daemon`` was asked for under systemd.

    A forking daemon under a ``Type=notify`` unit would be killed as the main process exits.
    """
    if systemd.under_systemd():
        raise DaemonError(
            "--daemon is for starting pop3sf by hand; under systemd it runs in the foreground "
            "(use 'systemctl start pop3sf.socket pop3sf-tls.socket' or drop --daemon)")


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PidfileError(f"cannot read pidfile {path}: {exc.strerror}") from exc
    try:
        return int(text.split()[0]) if text else 0
    except ValueError:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True             # exists, owned by someone else
    return True


def check_pidfile(path: str, owner: str | None = None) -> None:
    """Before forking: refuse a live pid in *path*, remove a stale pidfile, create its directory.

    python-daemon's own lock fails only after the fork, where the error is invisible and the shell
    already saw exit status 0; and it never treats a dead pid as stale. With *owner* (a user
    name) and running as root, a newly created directory belongs to that user, so the daemon can
    still remove the pidfile after dropping privileges.
    """
    path = os.path.abspath(path)
    pid = _read_pid(path)
    if pid is not None:
        if pid > 0 and pid != os.getpid() and _alive(pid):
            raise PidfileError(f"pop3sf is already running as pid {pid} (pidfile {path})")
        logs.log_early(log, logging.WARNING, "removing stale pidfile %s (%s; did pop3sf crash "
                       "or get killed?)", path,
                       f"pid {pid} not running" if pid else "no readable pid")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PidfileError(f"cannot remove stale pidfile {path}: {exc.strerror}") from exc
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o755)
        except OSError as exc:
            raise PidfileError(f"cannot create pidfile directory {directory}: "
                               f"{exc.strerror}") from exc
        if owner and os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(owner)
            except KeyError:
                pass                # drop_privileges() reports the unknown user
            else:
                os.chown(directory, entry.pw_uid, entry.pw_gid)
    if not os.access(directory, os.W_OK):
        raise PidfileError(f"pidfile directory {directory} is not writable")


def daemonize(pidfile: str, keep_fds: list[int], on_sighup: SignalHandler | None = None,
              on_sigterm: SignalHandler | None = None, umask: int = 0o027, *,
              pidfile_owner: str | None = None) -> Any:
    """Detach into the background with python-daemon and return the open ``DaemonContext``.

    Checks *pidfile* first (:func:`check_pidfile`; raises :class:`PidfileError` in the calling
    process, before any fork). Then: double fork and setsid, working directory ``/``, *umask*,
    stdio on ``/dev/null``, every fd closed except *keep_fds* (the listening sockets), the pid
    written to *pidfile* (removed when the context closes, also at exit; with *pidfile_owner*,
    owned by that user so it can still do so after privileges are dropped). Only the daemon
    returns; the parent exits 0.

    Signals: SIGHUP -> *on_sighup* (None: ignored, e.g. until the event loop installs its own
    handlers; python-daemon leaves SIGHUP at its default action, which would kill the daemon),
    SIGTERM and SIGINT -> *on_sigterm* (None: python-daemon's ``terminate``, a ``SystemExit``),
    SIGTSTP/SIGTTIN/SIGTTOU ignored. *pidfile_owner*: see :func:`check_pidfile`.
    """
    check_pidfile(pidfile, pidfile_owner)
    # Imported here: python-daemon 2.3.2 allocates a set of every possible fd number at import.
    import daemon
    import daemon.pidfile

    signal_map: dict[int, Any] = {
        signal.SIGHUP: on_sighup,
        signal.SIGTERM: on_sigterm or "terminate",
        signal.SIGINT: on_sigterm or "terminate",
        signal.SIGTSTP: None,
        signal.SIGTTIN: None,
        signal.SIGTTOU: None,
    }
    context = daemon.DaemonContext(
        detach_process=True,                 # never trust the ppid == 1 autodetection
        working_directory="/",
        umask=umask,                          # python-daemon's default would be 0
        pidfile=daemon.pidfile.TimeoutPIDLockFile(os.path.abspath(pidfile), acquire_timeout=0),
        files_preserve=list(keep_fds),
        signal_map=signal_map,
    )
    context.open()
    if pidfile_owner and os.geteuid() == 0:
        # Written as root with the daemon's umask: let the service user read (lockfile checks
        # the pid before removing) and remove it at exit, after privileges are dropped.
        try:
            entry = pwd.getpwnam(pidfile_owner)
            os.chown(os.path.abspath(pidfile), entry.pw_uid, entry.pw_gid)
        except (KeyError, OSError):
            pass
    return context


def drop_privileges(user: str, group: str | None = None) -> None:
    """Become *user* (and *group*, default the user's primary group) with its supplementary
    groups, e.g. ``ssl-cert`` for the snakeoil key. Call after binding, before any thread starts.

    Not root (under systemd ``User=`` already did this): a no-op, with a warning if the current
    user is not *user*. Raises :class:`PrivilegeError` for an unknown user or group.
    """
    if os.geteuid() != 0:
        current = _user_name(os.geteuid())
        if current != user:
            log.warning("not running as root: staying user %s instead of switching to %s",
                        current, user)
        return
    try:
        entry, gid = lookup_account(user, group)
    except LookupError as exc:
        raise PrivilegeError(exc.args[0]) from None
    try:
        os.initgroups(entry.pw_name, gid)
        os.setgid(gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {user}: {exc.strerror}") from exc
    if entry.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError(f"could regain root after switching to {user}")
    os.environ["HOME"] = entry.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = entry.pw_name
    log.info("running as user %s (uid %d, gid %d)", user, entry.pw_uid, gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)

