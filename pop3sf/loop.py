"""The event loop: one thread, a selector, a timer heap and a wake-up fd (docs/architecture.md §2).

Nothing here sleeps except ``select()`` itself. Worker threads and signal handlers hand work back
with :meth:`EventLoop.call_soon_threadsafe`, which writes one byte to a socketpair only when the
loop might be asleep, so a burst of results costs one wake-up.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pop3sf.loop")

Callback = Callable[[], Any]


def _nothing() -> None:
    pass


class Timer:
    """A cancellable timer whose deadline may be moved later without touching the heap."""

    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callback) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Its heap entry stays until the deadline, so let go of what the callback holds (a
        finished worker call's closure and session) now, not a minute later."""
        self.cancelled = True
        self.callback = _nothing


class EventLoop:
    """The one thread that owns sockets, timers and session state (docs/architecture.md §4).

    A selector for I/O, a heap of timers whose deadlines may move later for free, a queue of
    callbacks to run soon, and :meth:`call_soon_threadsafe`, the only way other threads (worker
    results, signals) reach it. Callbacks must never block; an exception in one is logged and
    the loop goes on.
    """

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._ready: collections.deque[Callback] = collections.deque()
        self._threadsafe: collections.deque[Callback] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeups)
        self._signal_handlers: dict[int, Callback] = {}
        self.running = False
        self.thread_id: int | None = None

    # -- scheduling -----------------------------------------------------------------------
    def call_soon(self, callback: Callback) -> None:
        self._ready.append(callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        self._threadsafe.append(callback)
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def call_at(self, deadline: float, callback: Callback) -> Timer:
        timer = Timer(deadline, callback)
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def rearm(self, timer: Timer, deadline: float) -> None:
        """Move a timer; only an earlier deadline costs a heap entry."""
        if deadline < timer.deadline:
            heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        timer.deadline = deadline

    def pending_timers(self) -> list[Callback]:
        """The callbacks of timers still armed (for leak checks)."""
        return [timer.callback for _, _, timer in self._timers if not timer.cancelled]

    # -- signals ---------------------------------------------------------------------------
    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run ``callback`` on the loop when the signal arrives (main thread only)."""
        self._signal_handlers[signum] = callback
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signum, lambda _s, _f: self._threadsafe.append(callback))

    # -- running ---------------------------------------------------------------------------
    def _drain_wakeups(self, _mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._wake_lock:
            self._wake_pending = False

    def run(self, until: Callable[[], bool] | None = None) -> None:
        self.running = True
        self.thread_id = threading.get_ident()
        timers, ready, threadsafe = self._timers, self._ready, self._threadsafe
        select = self.selector.select
        while self.running and not (until and until()):
            if ready or threadsafe:
                timeout: float | None = 0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            else:
                timeout = None
            for key, mask in select(timeout):
                try:
                    key.data(mask)
                except Exception:
                    log.exception("error in I/O callback")
            while threadsafe:
                ready.append(threadsafe.popleft())
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    _, _, timer = heapq.heappop(timers)
                    if timer.cancelled:
                        continue
                    if timer.deadline > now:  # moved later: wait for the new deadline
                        heapq.heappush(timers, (timer.deadline, next(self._seq), timer))
                        continue
                    timer.cancelled = True
                    ready.append(timer.callback)
            for _ in range(len(ready)):
                callback = ready.popleft()
                try:
                    callback()
                except Exception:
                    log.exception("error in callback")

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
