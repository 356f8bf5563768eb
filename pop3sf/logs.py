"""Logging behind a bounded queue: the loop never waits for journald or stderr.

What is logged, and at which level: docs/protocol.md §18.

Records go into a ``queue.Queue``; a writer thread writes them out in batches. When the queue is
full the record is dropped and counted, and the count is reported once the queue has room again.

Where records go is decided before ``--daemon`` detaches (:func:`resolve_target`), so a target
that cannot work is reported on the terminal instead of losing every line afterwards. Until the
configured logging runs, :func:`bootstrap` sends warnings and errors to stderr, prefixed with
their syslog priority when stderr is the journal, so journald records them at that priority.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
import threading
import time

from . import systemd
from .config import ConfigError, LoggingSection

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BOOT_FORMAT = "pop3sf: %(levelword)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"


#: How long the writer waits after a batch before taking the next one: under load one wake-up
#: of its thread carries many records (a wake-up per record cost a login a tenth of its CPU);
#: idle, the thread just blocks. Log lines are at most this late.
BATCH_DELAY = 0.05


class CountingQueueHandler(logging.handlers.QueueHandler):
    def __init__(self, q: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(q)
        self.dropped = 0
        self.reported = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The message merged now (its arguments may change later); no copy of the record, which
        this handler alone sees, unless it carries an exception to render."""
        if record.exc_info or record.stack_info:
            return super().prepare(record)
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def report_drops(self) -> None:
        """Log how many records were lost since the last report (call it from a loop timer)."""
        lost = self.dropped - self.reported
        if lost:
            self.reported = self.dropped
            logging.getLogger("pop3sf.logs").warning("%d log records dropped (queue full)",
                                                     lost)


class BatchWriter:
    """The thread that takes records off the queue and hands them to the output handler."""

    def __init__(self, q: queue.Queue[logging.LogRecord | None], output: logging.Handler) -> None:
        self.queue = q
        self.output = output
        self.thread = threading.Thread(target=self._run, name="pop3sf-log", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while True:
            record = self.queue.get()
            while record is not None:
                if record.levelno >= self.output.level:
                    self.output.handle(record)
                try:
                    record = self.queue.get_nowait()
                except queue.Empty:
                    break
            else:
                return
            time.sleep(BATCH_DELAY)


class Logging:
    """The running log pipeline; :meth:`stop` flushes what is queued."""

    def __init__(self, handler: CountingQueueHandler, writer: BatchWriter) -> None:
        self.handler = handler
        self.writer = writer

    def stop(self) -> None:
        self.writer.stop()
        logging.getLogger().removeHandler(self.handler)


class PriorityFormatter(logging.Formatter):
    """With *journal* set, every line starts ``<N>`` (N the record's syslog priority): journald
    reads that prefix from a service's stderr (``SyslogLevelPrefix=``, on by default) and
    would otherwise store every line, errors included, at priority 6."""

    def __init__(self, fmt: str, journal: bool) -> None:
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        record.levelword = record.levelname.lower()
        text = super().format(record)
        if not self.journal:
            return text
        prefix = f"<{systemd._priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def stderr_handler(fmt: str = FORMAT) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PriorityFormatter(fmt, systemd.stderr_is_journal()))
    return handler


class _BootHandler(logging.StreamHandler):
    """Marks the handler :func:`bootstrap` installed."""


def bootstrap() -> None:
    """Log warnings and errors to stderr until :func:`setup_logging` or :func:`end_bootstrap`
    (before detaching: stderr then becomes /dev/null)."""
    end_bootstrap()
    handler = _BootHandler(sys.stderr)
    handler.setFormatter(PriorityFormatter(BOOT_FORMAT, systemd.stderr_is_journal()))
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)


def end_bootstrap() -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _BootHandler):
            root.removeHandler(old)


def journald_running() -> bool:
    return os.path.exists(systemd.JOURNAL_SOCKET)


def resolve_target(section: LoggingSection, daemonized: bool, source: str = "") -> str:
    """The output records will go to (``journald``, ``syslog``, ``file`` or ``stderr``).

    Raises :class:`ConfigError` when that output cannot take them: called before detaching, so
    the admin reads why on the terminal rather than the daemon logging into nothing.
    """
    try:
        return _resolve_target(section, daemonized)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def _resolve_target(section: LoggingSection, daemonized: bool) -> str:
    target = section.target
    if target == "auto":
        if systemd.under_systemd():
            return "journald"
        if not daemonized:
            return "stderr"
        if journald_running():
            return "journald"
        if os.path.exists(SYSLOG_SOCKET):
            return "syslog"
        raise ConfigError(f"[logging] target = auto: neither journald ({systemd.JOURNAL_SOCKET}) "
                          f"nor syslog ({SYSLOG_SOCKET}) is there to log to after detaching; "
                          "set target = file with file = PATH")
    if target == "stderr" and daemonized:
        raise ConfigError("[logging] target = stderr: --daemon detaches from standard error; "
                          "use auto, journald, syslog or file")
    if target == "journald" and not journald_running():
        raise ConfigError(f"[logging] target = journald: journald is not running "
                          f"({systemd.JOURNAL_SOCKET} missing)")
    if target == "syslog" and not os.path.exists(SYSLOG_SOCKET):
        raise ConfigError(f"[logging] target = syslog: no syslog daemon ({SYSLOG_SOCKET} missing)")
    if target == "file":
        path = section.file
        where = path if os.path.exists(path) else os.path.dirname(path)
        if not os.access(where, os.W_OK) or os.path.isdir(path):
            raise ConfigError(f"[logging] file = {path!r}: cannot be written ({where} is not a "
                              "writable " + ("file)" if where == path else "directory)"))
    return target


def output_handler(target: str, file: str = "") -> logging.Handler:
    """The handler behind the queue for a target :func:`resolve_target` returned."""
    if target == "journald":
        return systemd.journal_handler()
    if target == "syslog":
        syslog = logging.handlers.SysLogHandler(SYSLOG_SOCKET,
                                                logging.handlers.SysLogHandler.LOG_DAEMON)
        syslog.append_nul = False           # as syslog(3) sends them
        handler: logging.Handler = syslog
        handler.setFormatter(logging.Formatter("pop3sf[%(process)d]: %(message)s"))
        return handler
    if target == "file":
        # Reopened when logrotate moves the file away (copytruncate needs no reopening).
        handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        return handler
    return stderr_handler()


def setup_logging(target: str, level: str, queue_size: int, file: str = "") -> Logging:
    q: queue.Queue[logging.LogRecord | None] = queue.Queue(queue_size)
    handler = CountingQueueHandler(q)
    writer = BatchWriter(q, output_handler(target, file))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, CountingQueueHandler | _BootHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    writer.start()
    replay_early()
    return Logging(handler, writer)


def replay_early() -> None:
    """What was said before logging existed comes first in its log, once (with processes = N
    the parent replays it before forking, so no child repeats it)."""
    while _early:
        record = _early.pop(0)
        logging.getLogger(record.name).handle(record)


#: Records logged before detaching, replayed into the log once it is set up (see log_early).
_early: list[logging.LogRecord] = []


def log_early(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """Log *msg* now (the admin's terminal, before ``--daemon`` detaches) and again into the
    daemon's own log once :func:`setup_logging` has set it up."""
    logger.log(level, msg, *args)
    _early.append(logger.makeRecord(logger.name, level, "(early)", 0, msg, args, None))


def counted(n: int, noun: str) -> str:
    """``1 message``, ``2 messages``: log lines and replies read as written by a person."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
