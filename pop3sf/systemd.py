"""systemd integration: inherited sockets, sd_notify, the watchdog and journald (see pop3sf(8)).

Nothing here needs systemd to be running or python3-systemd to be installed: socket passing,
notifications and journald's native datagram protocol are small wire protocols implemented
directly (so they never block and never raise, and start-up doesn't import python3-systemd's
journal module, 30 ms of CPU).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "FIELD_PREFIX",
    "journal_handler",
    "listen_fds",
    "notify",
    "notify_status",
    "stderr_is_journal",
    "under_systemd",
    "watchdog_interval",
]

SD_LISTEN_FDS_START = 3
#: Record attributes (``logger.info(..., extra={...})``) named like this become journal fields.
FIELD_PREFIX = "POP3SF_"
JOURNAL_SOCKET = "/run/systemd/journal/socket"

log = logging.getLogger("pop3sf.systemd")

_activated = False          # listen_fds() found sockets passed to this process
_last_status = 0.0          # monotonic time of the last STATUS= sent by notify_status()


# --------------------------------------------------------------------------- socket activation

def listen_fds(unset_env: bool = True) -> dict[str, list[socket.socket]]:
    """The listening sockets systemd passed us, by ``FileDescriptorName=`` (``LISTEN_FDNAMES``).

    Sockets are matched to listeners by name, never by position: systemd does not keep the order
    stable. Several fds with one name (a socket unit with several ``ListenStream=``) all belong to
    that name; an fd without a name is called ``"unknown"`` as in sd_listen_fds_with_names(3).
    The sockets are non-blocking and close-on-exec. With *unset_env* the ``LISTEN_*`` variables
    are removed from ``os.environ`` (and so from children), unlike python3-systemd, which only
    clears the C environment and leaves ``os.environ`` stale. Returns ``{}`` when nothing was
    passed to this process.
    """
    global _activated
    env = os.environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    if unset_env:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    try:
        if pid is None or count is None or int(pid) != os.getpid():
            return {}
        n = int(count)
    except ValueError:
        return {}
    namelist = names.split(":") if names else []
    result: dict[str, list[socket.socket]] = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        name = namelist[i] if i < len(namelist) and namelist[i] else "unknown"
        try:
            os.set_inheritable(fd, False)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                log.warning("inherited fd %d (%s) is not a socket; ignored", fd, name)
                continue
            sock = socket.socket(fileno=fd)   # family and type are read from the fd
        except OSError as exc:
            log.warning("inherited fd %d (%s) is unusable: %s", fd, name, exc)
            continue
        sock.setblocking(False)
        result.setdefault(name, []).append(sock)
    if result:
        _activated = True
    return result


def under_systemd() -> bool:
    """True when systemd started this process as a service (or passed it sockets).

    ``NOTIFY_SOCKET`` (a ``Type=notify`` service), sockets for this pid, a stderr that *is* the
    journal stream, or ``INVOCATION_ID`` with init as parent. ``INVOCATION_ID`` alone is not
    enough: a shell in a desktop terminal inherits it from the terminal's user service.
    """
    env = os.environ
    if _activated or env.get("NOTIFY_SOCKET"):
        return True
    if env.get("LISTEN_PID", "") == str(os.getpid()):
        return True
    if stderr_is_journal():
        return True
    return bool(env.get("INVOCATION_ID")) and os.getppid() == 1


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (``JOURNAL_STREAM`` names its device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- sd_notify

def notify(state: str) -> None:
    """Send *state* (``"READY=1"``, ``"STATUS=..."``, ``"WATCHDOG=1"``...) to ``NOTIFY_SOCKET``.

    One non-blocking datagram: a slow or absent service manager never stalls the event loop, and
    nothing is raised (a lost notification is better than a crashed server). A no-op when
    ``NOTIFY_SOCKET`` is unset, i.e. not under systemd.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not state:
        return
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        return          # e.g. vsock: (systemd >= 253), not ours to speak
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8", "replace"),
                        socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, addr)
    except OSError:
        pass


def notify_status(text: str, *, force: bool = False, min_interval: float = 1.0) -> bool:
    """``STATUS=text`` at most once per *min_interval* seconds; True if sent."""
    global _last_status
    now = time.monotonic()
    if not force and now - _last_status < min_interval:
        return False
    _last_status = now
    notify("STATUS=" + text.replace("\n", " "))
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None if not asked.

    ``WATCHDOG_PID``, when set, must be this process (a child must not ping for its parent).
    """
    usec, wpid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    try:
        if wpid and int(wpid) != os.getpid():
            return None
        value = int(usec) if usec else 0
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


# --------------------------------------------------------------------------- journald

def journal_fields(record: logging.LogRecord) -> dict[str, str]:
    """The record's structured fields: ``extra`` keys that are upper-case and start ``POP3SF_``."""
    fields = {}
    for key, value in record.__dict__.items():
        if value is not None and key.startswith(FIELD_PREFIX) and _valid_field(key):
            fields[key] = value if isinstance(value, str) else str(value)
    return fields


def _valid_field(name: str) -> bool:
    return (0 < len(name) <= 64 and not name[0].isdigit()
            and all(c == "_" or c.isdigit() or "A" <= c <= "Z" for c in name))


def _priority(levelno: int) -> int:
    """syslog priority of a logging level (as systemd.journal.JournalHandler maps them)."""
    for limit, prio in ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                        (logging.ERROR, 3), (logging.CRITICAL, 2)):
        if levelno <= limit:
            return prio
    return 1


def _common_fields(record: logging.LogRecord, identifier: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "PRIORITY": str(_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": identifier,
        "LOGGER": record.name,
        "THREAD_NAME": record.threadName or "",
        "CODE_FILE": record.pathname,
        "CODE_LINE": record.lineno,
        "CODE_FUNC": record.funcName,
    }
    message_id = getattr(record, "MESSAGE_ID", None)
    if message_id is not None:
        fields["MESSAGE_ID"] = getattr(message_id, "hex", str(message_id))
    fields.update(journal_fields(record))
    return fields


class _NativeJournalHandler(logging.Handler):
    """The journal's native protocol over its datagram socket.

    One socket, opened lazily; in a forked (daemonized) process it is reopened and the inherited
    fd number forgotten unclosed, so a handler used before python-daemon closed every fd cannot
    write into whatever reuses that number, such as a client connection (NOTES trap 2).
    """

    def __init__(self, identifier: str, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self._sock: socket.socket | None = None
        self._pid = os.getpid()

    @staticmethod
    def encode(message: str, fields: Mapping[str, Any]) -> bytes:
        out = bytearray()
        for key, value in {"MESSAGE": message, **fields}.items():
            data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
            if b"\n" in data:
                out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
            else:
                out += key.encode() + b"=" + data + b"\n"
        return bytes(out)

    def _socket(self) -> socket.socket:
        if self._sock is not None and self._pid != os.getpid():
            # Forked (daemonized) since: the fd number may have been closed and reused for a
            # client connection, so forget it without closing it.
            self._sock.detach()
            self._sock = None
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._pid = os.getpid()
        return self._sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = _common_fields(record, self.identifier)
            msg = self.format(record)
            data = self.encode(msg, fields)
            try:
                self._socket().sendto(data, self.path)
            except FileNotFoundError:
                return          # no journald: dropped silently, like libsystemd
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:     # too big for one datagram: shorten
                    raise
                self._socket().sendto(self.encode(msg[:32000] + " [truncated]", fields),
                                      self.path)
        except Exception:
            self.close_socket()
            self.handleError(record)

    def close_socket(self) -> None:
        if self._sock is not None:
            if self._pid == os.getpid():
                self._sock.close()
            else:
                self._sock.detach()
            self._sock = None

    def close(self) -> None:
        self.close_socket()
        super().close()


def journal_handler(identifier: str = "pop3sf") -> logging.Handler:
    """A logging handler writing to journald with ``SYSLOG_IDENTIFIER=identifier``.

    Priorities follow log levels; ``extra={"POP3SF_USER": ..., "POP3SF_CLIENT": ...}`` keys
    (upper-case, ``POP3SF_`` prefix) become journal fields; ``exc_info`` ends up in ``MESSAGE``
    through the formatter. Create it only after daemonizing (see :mod:`pop3sf.daemon`) and put it
    behind a ``QueueHandler`` so the event loop never waits for journald (docs/protocol.md §18).
    """
    handler = _NativeJournalHandler(identifier)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler
