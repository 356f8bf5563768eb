"""Bounded worker pools for adapter calls (SPEC §A3).

Authentication and mailbox I/O get separate pools, so a bcrypt storm can't starve logged-in
sessions. A call that outlives its timeout is *abandoned*: Python can't kill a thread, so the
thread is counted as stuck and replaced, and :attr:`WorkerPool.stuck` lets the server refuse new
logins while too many are stuck.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .loop import EventLoop, Timer

log = logging.getLogger("pop3sf.workers")

Done = Callable[[Any, BaseException | None], None]


class CallTimeout(Exception):
    """The adapter call did not finish within its per-call timeout."""


class Call:
    """One submitted call; ``done`` runs on the loop exactly once (result, timeout or error)."""

    __slots__ = ("func", "args", "done", "finished", "abandoned", "deadline", "started")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], done: Done,
                 deadline: float) -> None:
        self.func = func
        self.args = args
        self.done = done
        self.finished = False
        self.abandoned = False
        self.deadline = deadline
        self.started = 0.0


class WorkerPool:
    def __init__(self, loop: EventLoop, name: str, threads: int, timeout: float) -> None:
        self.loop = loop
        self.name = name
        self.size = threads
        self.timeout = timeout
        self.queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.stuck = 0
        self._lock = threading.Lock()
        # Calls in flight, oldest first: with one timeout per pool that is also deadline order,
        # so one loop timer (for the oldest) watches them all and nothing is left behind.
        self.in_flight: dict[Call, None] = {}
        self._timer: Timer | None = None
        for _ in range(threads):
            self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, name=f"pop3sf-{self.name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def submit(self, func: Callable[..., Any], args: tuple[Any, ...], done: Done) -> Call:
        """Run ``func(*args)`` on a worker; ``done(result, error)`` then runs on the loop."""
        call = Call(func, args, done, time.monotonic() + self.timeout)
        self.in_flight[call] = None
        if self._timer is None:
            self._timer = self.loop.call_at(call.deadline, self._check_deadlines)
        self.queue.put(call)
        return call

    def _check_deadlines(self) -> None:
        self._timer = None
        now = time.monotonic()
        for call in list(self.in_flight):
            if call.deadline > now:
                self._timer = self.loop.call_at(call.deadline, self._check_deadlines)
                break
            del self.in_flight[call]
            self._expire(call)

    def _expire(self, call: Call) -> None:
        if call.finished:
            return
        call.finished = call.abandoned = True
        with self._lock:
            self.stuck += 1
        log.error("adapter call %s on the %s pool exceeded %.1f s; abandoned (%d stuck)",
                  getattr(call.func, "__qualname__", call.func), self.name, self.timeout,
                  self.stuck)
        self._spawn()  # keep the pool's capacity; the stuck thread exits when it returns
        call.done(None, CallTimeout(f"{self.name} call timed out"))

    def _work(self) -> None:
        while True:
            call = self.queue.get()
            if call is None:
                return
            call.started = time.monotonic()
            try:
                result: Any = call.func(*call.args)
                error: BaseException | None = None
            except BaseException as exc:  # reported to the session, never lost
                result, error = None, exc
            self.loop.call_soon_threadsafe(functools.partial(self._finish, call, result, error))
            if call.abandoned:
                return  # a replacement was spawned when this call was abandoned

    def _finish(self, call: Call, result: Any, error: BaseException | None) -> None:
        if call.abandoned:
            with self._lock:
                self.stuck -= 1
            self.threads = [t for t in self.threads if t.is_alive()]
            log.warning("abandoned %s call returned late (%d still stuck)", self.name, self.stuck)
            return
        call.finished = True
        self.in_flight.pop(call, None)
        call.done(result, error)

    def shutdown(self) -> None:
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
