"""Bounded worker pools for adapter calls (docs/architecture.md §4, docs/protocol.md §16).

Authentication and mailbox I/O get separate pools, so a bcrypt storm can't starve logged-in
sessions. A call's time starts when a worker picks it up: time spent waiting in the queue is the
pool's congestion, not the adapter's slowness. A call that outlives its timeout is *abandoned*:
Python can't kill a thread, so its ``done`` hears :class:`CallTimeout` at once and then, when the
thread finally returns, the late result as well, so whoever made the call can release what the
call held. The pool replaces an abandoned thread only while the total stays within
``threads + max_stuck``: a storm of slow calls can't multiply the threads competing for the CPU.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .loop import EventLoop, Timer

log = logging.getLogger("pop3sf.workers")

Done = Callable[[Any, BaseException | None], None]
#: Workers run this much nicer than the loop: a pool busy hashing passwords (which releases
#: the GIL) must not make the loop wait for a core to greet a client or answer a NOOP.
WORKER_NICE = 5


#: Upper bounds (seconds) of the adapter-call latency histogram (pop3sf.metrics).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Latency:
    """Adapter-call durations as histogram buckets: plain ints on the loop thread, read by the
    metrics endpoint; one bisect per call."""

    __slots__ = ("buckets", "total", "count")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)     # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


class CallTimeout(Exception):
    """The adapter call did not finish within its per-call timeout (it may still finish)."""


class Call:
    """One submitted call. ``done`` runs on the loop once with the outcome; a call that timed
    out gets ``done(None, CallTimeout)`` first and ``done(result, error)`` when it returns."""

    __slots__ = ("func", "args", "done", "abandoned", "replaced", "returned", "started")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], done: Done) -> None:
        self.func = func
        self.args = args
        self.done = done
        self.abandoned = False
        self.replaced = False  # a new thread took the abandoned one's place: it exits after
        self.returned = False  # the worker is done with it (the result may still be on its way)
        self.started = 0.0  # set by the worker; 0.0 while queued


class WorkerPool:
    """``size`` threads taking calls from one queue; calls report back on the loop thread.

    A call's timeout counts from when a worker picks it up. A call past it is abandoned: its
    ``done`` hears :class:`CallTimeout` at once and the real outcome when the thread returns,
    and a replacement thread starts while the pool holds fewer than ``size + max_stuck``.
    """

    def __init__(self, loop: EventLoop, name: str, threads: int, timeout: float,
                 max_stuck: int = 16) -> None:
        self.loop = loop
        self.name = name
        self.size = threads
        self.timeout = timeout
        self.max_threads = threads + max_stuck
        self.queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        #: Abandoned calls whose thread has not returned yet (loop thread only).
        self.stuck = 0
        #: Calls submitted and not yet answered, oldest first (abandoned ones leave it).
        self.in_flight: dict[Call, None] = {}
        #: Durations of calls answered in time, counted from when a worker picked them up.
        self.latency = Latency()
        self._timer: Timer | None = None
        self._lock = threading.Lock()  # replaced vs returned: one thread per free slot
        self.nice: int | None = None
        try:
            self.nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICE)
        except OSError:
            pass
        for _ in range(threads):
            self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, name=f"pop3sf-{self.name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def pending(self) -> int:
        """Calls whose outcome has not come back yet, stuck ones included."""
        return len(self.in_flight) + self.stuck

    def submit(self, func: Callable[..., Any], args: tuple[Any, ...], done: Done) -> Call:
        """Run ``func(*args)`` on a worker; ``done(result, error)`` then runs on the loop."""
        call = Call(func, args, done)
        self.in_flight[call] = None
        if self._timer is None:  # nothing submitted now can time out sooner than this
            self._timer = self.loop.call_later(self.timeout, self.check_deadlines)
        self.queue.put(call)
        return call

    def check_deadlines(self) -> None:
        """One timer per pool, armed while calls may be running (it outlives them by at most
        one timeout: re-arming it per call would fill the loop's heap with dead entries)."""
        self._timer = None
        now = time.monotonic()
        next_check = None
        for call in list(self.in_flight):
            started = call.started
            deadline = started + self.timeout if started else now + self.timeout
            if deadline <= now:
                del self.in_flight[call]
                self._expire(call)
            elif next_check is None or deadline < next_check:
                next_check = deadline
        if next_check is not None:
            self._timer = self.loop.call_at(next_check, self.check_deadlines)

    def _expire(self, call: Call) -> None:
        call.abandoned = True
        self.stuck += 1
        self.threads = [t for t in self.threads if t.is_alive()]
        with self._lock:
            if not call.returned and len(self.threads) < self.max_threads:
                call.replaced = True
                self._spawn()
        log.error("adapter call %s on the %s pool exceeded %.1f s; abandoned (%d stuck, "
                  "%d threads)", getattr(call.func, "__qualname__", call.func), self.name,
                  self.timeout, self.stuck, len(self.threads))
        call.done(None, CallTimeout(f"{self.name} call timed out"))

    def _work(self) -> None:
        if self.nice is not None:
            try:  # Linux: per thread. The loop then wins the CPU whenever it has work.
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError:
                pass
        while True:
            call = self.queue.get()
            if call is None:
                return
            call.started = time.monotonic()
            try:
                result: Any = call.func(*call.args)
                error: BaseException | None = None
            except BaseException as exc:  # reported to the caller, never lost
                result, error = None, exc
            with self._lock:
                call.returned = True
                replaced = call.replaced
            self.loop.call_soon_threadsafe(functools.partial(self._finish, call, result, error))
            if replaced:
                return  # its replacement serves the queue now

    def _finish(self, call: Call, result: Any, error: BaseException | None) -> None:
        if call.abandoned:
            self.stuck -= 1
            log.warning("abandoned %s call returned late (%d still stuck)", self.name,
                        self.stuck)
        else:
            del self.in_flight[call]
            self.latency.observe(time.monotonic() - call.started)
        call.done(result, error)

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _ in self.threads:
            self.queue.put(None)


def run_inline(func: Callable[..., Any], args: tuple[Any, ...], done: Done) -> None:
    """For adapters that never block: the same contract, on the loop thread."""
    try:
        result = func(*args)
    except Exception as exc:
        done(None, exc)
        return
    done(result, None)
