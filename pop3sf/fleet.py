"""The supervising parent of ``[server] processes = N`` (docs/architecture.md §8).

The parent binds (or inherits) the listeners, drops privileges, and forks N children that
each run a full :class:`~pop3sf.child.ChildServer` on the shared listening sockets: the kernel
spreads the accepts. The parent itself never starts the adapter or a thread (so a fork at
any time is safe: no lock can be held by a thread that does not exist in the child)
and logs synchronously, since it has no client to delay. On its own small event loop it:

* holds the authoritative penalty table and verification gate (:mod:`pop3sf.gatekeeper`),
  which the children tell every failure and ask for a penalised group's turn over
  their channels, so N processes give an attacker no more guesses than one;
* restarts a child that died, after a backoff that grows while it keeps dying;
* reports ``READY=1`` once every child listens, forwards reloads and reports ``READY=1`` once
  every child reloaded, and pets the watchdog only while every child is alive and beating; a
  child silent for too long is killed and restarted;
* on SIGTERM or SIGINT stops every child gracefully and exits when the last one has.

A child that fails before the fleet was ever ready (a broken adapter, a bad certificate) ends
the whole start with that child's exit status, so ``RestartPreventExitStatus=78`` still works.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from .channel import Channel, channel_pair
from .config import ConfigError, Settings, load_config
from .gatekeeper import Gatekeeper
from .listeners import ListeningSocket
from .loop import EventLoop, Timer
from .shared import SharedState

log = logging.getLogger("pop3sf.fleet")

#: Restart backoff: 1 s, doubling per death within RESET_AFTER, at most MAX_BACKOFF.
MAX_BACKOFF = 30.0
RESET_AFTER = 60.0
#: A child whose loop has not beaten for this long (or the watchdog interval, if longer) is
#: hung: the parent stops petting the watchdog and kills it.
HANG_AFTER = 10.0
#: After SIGTERM, how long past the grace period before stragglers are killed.
STOP_MARGIN = 8.0

#: The child's body: (index, channel socket, shared state) -> exit status. Never returns into
#: the parent's loop: the caller ends the process with os._exit().
ChildMain = Callable[[int, socket.socket, SharedState], int]


@dataclasses.dataclass
class Child:
    index: int
    pid: int = 0
    channel: Channel | None = None
    started: float = 0.0
    ready: bool = False
    reloading: bool = False
    beat: float = 0.0
    stats: tuple[int, int, int] = (0, 0, 0)
    deaths: int = 0
    restart: Timer | None = None
    snapshot: dict[str, Any] | None = None      # its last metrics (pop3sf.metrics)


class Supervisor:
    """Forks, watches and restarts the serving processes; see the module docstring."""

    def __init__(self, settings: Settings, path: str, listeners: list[ListeningSocket],
                 child_main: ChildMain, notify: Callable[[str], None],
                 watchdog: float | None = None) -> None:
        self.settings = settings
        self.path = path
        self.listeners = listeners
        self.child_main = child_main
        self.notify = notify
        self.watchdog = watchdog
        self.count = settings.server.processes
        self.loop = EventLoop()
        self.shared = SharedState(self.count)
        self.gatekeeper = Gatekeeper(settings.auth, self.loop, self.shared)
        self.children = [Child(i) for i in range(self.count)]
        self.stopping = False
        self.was_ready = False
        self.status = 0
        self._last_ping = 0.0
        self._last_status = ""
        self._kill_timer: Timer | None = None
        #: Extra handlers for child messages.
        self.on_message: dict[str, Callable[[Child, list[str]], None]] = {}
        #: Metrics: what dead children had counted, and restarts.
        self.retired: dict[str, Any] = {}
        self.restarts = 0
        self.metrics: Any = None                     # a pop3sf.metrics.MetricsServer

    # -- running ---------------------------------------------------------------------------
    def run(self) -> int:
        """Fork the children and supervise until the last one is gone; the exit status."""
        loop = self.loop
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for child in self.children:
            self._spawn(child)
        if self.settings.metrics.listen:
            self._open_metrics()
        loop.call_later(1.0, self._tick)
        try:
            loop.run(until=lambda: self.stopping and not any(c.pid for c in self.children))
        finally:
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            for child in self.children:
                if child.channel is not None:
                    child.channel.close()
            self._close_listeners()
            self._close_metrics()
            self.shared.close()
            loop.close()
        return self.status

    def _spawn(self, child: Child) -> None:
        child.restart = None
        if self.stopping:
            return
        parent_end, child_end = channel_pair()
        pid = os.fork()
        if pid == 0:                                   # the child: never returns
            status = 70
            try:
                parent_end.close()
                self._forget_parent_state()
                status = self.child_main(child.index, child_end, self.shared)
            except BaseException:
                log.critical("process %d failed", child.index, exc_info=True)
            finally:
                logging.shutdown()
                os._exit(status)
        child_end.close()
        child.pid, child.started, child.ready, child.beat = pid, time.monotonic(), False, 0.0
        child.channel = Channel(self.loop, parent_end,
                                lambda words: self._message(child, words),
                                lambda: self._lost(child))
        log.info("process %d started (pid %d)", child.index, pid)

    def _forget_parent_state(self) -> None:
        """In a new child: drop the parent's signal handling, loop and channels (its own
        objects; the fds are this process's copies)."""
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for other in self.children:
            if other.channel is not None:
                other.channel.sock.close()
        self.loop.close()
        root = logging.getLogger()
        for handler in list(root.handlers):       # the child sets up its own, with a queue
            root.removeHandler(handler)
        os.environ.pop("NOTIFY_SOCKET", None)     # only the parent speaks to systemd
        os.environ.pop("WATCHDOG_USEC", None)

    # -- children's messages ---------------------------------------------------------------
    def _message(self, child: Child, words: list[str]) -> None:
        kind = words[0]
        try:
            if child.channel is not None and self.gatekeeper.handle(child.pid, child.channel,
                                                                    words):
                pass
            elif kind == "beat":
                child.beat = time.monotonic()
                child.stats = (int(words[1]), int(words[2]), int(words[3]))
            elif kind == "ready":
                child.ready = True
                child.beat = time.monotonic()
                self._maybe_ready()
            elif kind == "metrics":
                child.snapshot = json.loads(" ".join(words[1:]))
            elif kind == "reloaded":
                child.reloading = False
                self._maybe_ready()
            elif kind in self.on_message:
                self.on_message[kind](child, words)
            else:
                log.warning("process %d sent an unknown message %.40r", child.index, kind)
        except (IndexError, ValueError):
            log.warning("process %d sent a malformed message %.80r", child.index,
                        " ".join(words))

    def _maybe_ready(self) -> None:
        if all(c.ready and not c.reloading for c in self.children):
            first = not self.was_ready
            self.was_ready = True
            self.notify("READY=1\nSTATUS=" + self.describe())
            if first:
                log.info("%d processes serving", self.count)

    def describe(self) -> str:
        conns = sum(c.stats[0] for c in self.children if c.pid)
        logged = sum(c.stats[1] for c in self.children if c.pid)
        stuck = sum(c.stats[2] for c in self.children if c.pid)
        alive = sum(1 for c in self.children if c.pid)
        return (f"{alive}/{self.count} processes, {conns} connections, {logged} logged in, "
                f"{stuck} stuck adapter calls")

    # -- deaths and restarts ---------------------------------------------------------------
    def _lost(self, child: Child) -> None:
        """The child's channel closed (it exited or is exiting): give back its places at the
        gate, so its verifications in flight don't hold the group's turn forever."""
        self.gatekeeper.forget(child.pid)
        child.channel = None

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.children if c.pid == pid), None)
            if child is not None:
                self._exited(child, os.waitstatus_to_exitcode(wait_status))

    def _exited(self, child: Child, code: int) -> None:
        if child.channel is not None:
            child.channel.close()
            self._lost(child)
        child.pid, child.ready, child.reloading = 0, False, False
        self.shared.counts.clear(child.index)
        self.shared.verifying.clear(child.index)
        if child.snapshot is not None:
            from . import metrics

            self.retired = metrics.merge([self.retired, metrics.counters_only(child.snapshot)])
            child.snapshot = None
        how = f"signal {-code}" if code < 0 else f"status {code}"
        if self.stopping:
            if code != 0:
                log.warning("process %d exited with %s", child.index, how)
                self.status = self.status or 1
            return
        if not self.was_ready:
            log.error("process %d exited with %s while starting; stopping", child.index, how)
            self.status = code if code > 0 else 1
            self.stop()
            return
        now = time.monotonic()
        child.deaths = child.deaths + 1 if now - child.started < RESET_AFTER else 1
        delay = min(MAX_BACKOFF, 2.0 ** (child.deaths - 1))
        log.error("process %d exited with %s; restarting it in %.0f s", child.index, how, delay)
        self.restarts += 1
        child.restart = self.loop.call_later(delay, lambda: self._spawn(child))

    # -- periodic: watchdog, status, hung children ----------------------------------------
    def _tick(self) -> None:
        self.gatekeeper.unmark()
        now = time.monotonic()
        hang = max(HANG_AFTER, 2 * (self.watchdog or 0))
        for child in self.children:
            if child.pid and child.ready and now - child.beat > hang and not self.stopping:
                log.error("process %d (pid %d) has not answered for %.0f s; killing it",
                          child.index, child.pid, now - child.beat)
                self._kill(child.pid, signal.SIGKILL)
                child.beat = now
        healthy = all(c.pid and c.ready and now - c.beat <= hang for c in self.children)
        state = []
        if self.watchdog and healthy and now - self._last_ping >= self.watchdog:
            self._last_ping = now
            state.append("WATCHDOG=1")
        status = self.describe()
        if status != self._last_status and self.was_ready:
            self._last_status = status
            state.append("STATUS=" + status)
        if state:
            self.notify("\n".join(state))
        if self.metrics is not None:
            self.metrics.expire()
        if not self.stopping:
            self.loop.call_later(1.0, self._tick)

    # -- signals ---------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: reload our own part (penalties, caps), then every child's."""
        if self.stopping:
            return
        self.notify("RELOADING=1")
        try:
            settings = load_config(self.path, resolve=False)
        except ConfigError as exc:
            log.error("reload failed, old configuration kept: %s", exc)
            self.notify("READY=1")
            return
        if settings.server.processes != self.count:
            log.warning("reload: [server] processes changed; that needs a restart "
                        "(%d processes kept)", self.count)
        logging.getLogger().setLevel(settings.logging.level.upper())
        self.gatekeeper.reload(settings.auth)
        self.settings = dataclasses.replace(self.settings, auth=settings.auth)
        for child in self.children:
            if child.channel is not None and child.ready:
                child.reloading = True
                child.channel.send("reload")
        self._maybe_ready()

    def stop(self) -> None:
        """SIGTERM/SIGINT: every child shuts down gracefully (docs/protocol.md §17)."""
        if self.stopping:
            return
        self.stopping = True
        self.notify("STOPPING=1")
        log.info("stopping %d processes", sum(1 for c in self.children if c.pid))
        self._close_listeners()
        self._close_metrics()
        for child in self.children:
            if child.restart is not None:
                child.restart.cancel()
                child.restart = None
            if child.pid:
                self._kill(child.pid, signal.SIGTERM)
        margin = self.settings.server.shutdown_grace + STOP_MARGIN
        self._kill_timer = self.loop.call_later(margin, self._kill_stragglers)

    def _kill_stragglers(self) -> None:
        for child in self.children:
            if child.pid:
                log.error("process %d did not stop in time; killing it", child.index)
                self._kill(child.pid, signal.SIGKILL)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # -- metrics ---------------------------------------------------------------------------
    def _open_metrics(self) -> None:
        from . import metrics

        assert self.settings.metrics.listen is not None
        self.metrics = metrics.endpoint(self.loop, self.settings.metrics.listen,
                                        self.metrics_snapshot)

    def metrics_snapshot(self) -> dict[str, Any]:
        """Every child's last snapshot (at most a second old), what dead ones had counted,
        and the parent's own gate and penalties: a scrape never waits for a child."""
        from . import metrics

        own = metrics.snapshot({}, {}, 0, 0, {}, self.gatekeeper.gate,
                               self.gatekeeper.penalties)
        own["processes"] = sum(1 for c in self.children if c.pid)
        own["restarts"] = self.restarts
        live = [c.snapshot for c in self.children if c.pid and c.snapshot is not None]
        return metrics.merge([self.retired, *live, own])

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _close_listeners(self) -> None:
        for ls in self.listeners:
            ls.sock.close()
        self.listeners = []
