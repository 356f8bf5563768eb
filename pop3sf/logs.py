"""Logging behind a bounded queue (SPEC §P13): the loop never waits for journald or stderr.

Records go into a ``queue.Queue``; a listener thread writes them out. When the queue is full the
record is dropped and counted, and the count is reported once the queue has room again.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CountingQueueHandler(logging.handlers.QueueHandler):
    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0
        self.reported = 0

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


class Logging:
    """The running log pipeline; :meth:`stop` flushes what is queued."""

    def __init__(self, handler: CountingQueueHandler,
                 listener: logging.handlers.QueueListener) -> None:
        self.handler = handler
        self.listener = listener

    def stop(self) -> None:
        self.listener.stop()
        logging.getLogger().removeHandler(self.handler)


def wants_journald(target: str, daemonized: bool = False) -> bool:
    if target == "journald":
        return True
    if target == "stderr":
        return False
    from . import systemd

    # auto: a daemon's stderr is /dev/null; under systemd the journal gets structured fields
    return daemonized or systemd.under_systemd()


def output_handler(target: str, daemonized: bool = False) -> logging.Handler:
    if wants_journald(target, daemonized):
        from . import systemd

        return systemd.journal_handler()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def setup_logging(target: str, level: str, queue_size: int, daemonized: bool = False) -> Logging:
    q: queue.Queue[logging.LogRecord] = queue.Queue(queue_size)
    handler = CountingQueueHandler(q)
    listener = logging.handlers.QueueListener(q, output_handler(target, daemonized),
                                              respect_handler_level=True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, CountingQueueHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    listener.start()
    return Logging(handler, listener)
