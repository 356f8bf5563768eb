"""The server: accepts connections and owns what spans sessions.

Admission and shedding are :mod:`.admission`'s; here: auth in-flight caps and penalties
(docs/protocol.md §7), worker pools (docs/architecture.md §4), reload and graceful shutdown
(docs/protocol.md §17).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import Any

from pop3sf.adapters import Adapter

from .accounts import Accounts
from .admission import Admission
from .config import ConfigError, Settings, adapter_error
from .connection import Connection
from .control import ControlServer
from .listeners import ListeningSocket
from .logs import counted
from .loop import EventLoop, Timer
from .proxy import Header
from .readcache import ReadCache
from .session import Session
from .throttle import Penalties, VerificationGate, address_group, in_networks
from .tls import make_context
from .workers import WorkerPool, run_inline

log = logging.getLogger("pop3sf.server")

FD_RESERVE = 64
ACCEPTS_PER_EVENT = 64
#: After the shutdown grace period, how long to wait for adapter calls still running (their
#: sessions' cleanup and commits) before exiting anyway.
STUCK_WAIT = 5.0


def raise_nofile_limit() -> int:
    """Raise the soft fd limit to the hard one; return it (the connection cap derives from it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Server:
    """Everything that spans sessions: listeners, admission and shedding, the worker pools,
    penalties and the verification gate, account holds, reload and graceful shutdown.

    Sessions reach it only through the :class:`~pop3sf.host.Host` interface.
    """

    def __init__(self, settings: Settings, adapter: Adapter | None = None) -> None:
        self.settings = settings
        self.loop = EventLoop()
        self.adapter = adapter if adapter is not None else \
            settings.adapter_class(settings.adapter_config)
        self.tls_context = make_context(settings.tls, settings.source)
        auth = settings.auth
        self.penalties = Penalties(auth.penalty_initial, auth.penalty_max, auth.penalty_decay,
                                   auth.penalty_table_size)
        workers = settings.workers
        cores = max(2, os.cpu_count() or 2)
        # More mailbox threads than cores only make Python threads fight over the GIL (TOP in
        # the benchmark: 42 us per command with 2 threads, 85 with 8); raise it for slow I/O.
        self.pools = {
            "auth": WorkerPool(self.loop, "auth", workers.auth_threads or cores,
                               workers.call_timeout, workers.max_stuck_calls),
            "mail": WorkerPool(self.loop, "mail", workers.mailbox_threads or cores,
                               workers.call_timeout, workers.max_stuck_calls),
        }
        self.verifications = VerificationGate(self.penalties, self.loop, self._auth_refusal)
        self.listeners: list[ListeningSocket] = []
        self.connections: dict[Connection, Session] = {}
        self.sessions_alive = 0
        self.accounts = Accounts()
        self.commits_in_flight = 0
        self.stopping = False
        self.gave_up = False  # shutdown stopped waiting for stuck adapter calls
        self._stop_timer: Timer | None = None
        #: What serve_forever found not given back when it ended (see leaks()).
        self.leaked: list[str] = []
        self.nofile = raise_nofile_limit()
        self.started = False
        self.stats = collections.Counter[str]()
        self.admission = Admission(lambda: self.settings, self.connections,
                                   lambda: self.max_connections, self.verifications.is_running,
                                   self.stats, self.connections_from,
                                   self.group_changed)
        #: Commands by verb (b"?" for unknown ones), for pop3sf.metrics.
        self.commands = collections.Counter[bytes]()
        self.on_tick: list[Callable[[], None]] = []
        self.control: ControlServer | None = None  # pop3sf-admin who/kick
        #: Per-command debug logging costs even when filtered out; decided once.
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.read_cache = ReadCache()

    # -- limits ---------------------------------------------------------------------------------
    @property
    def max_connections(self) -> int:
        spare = self.nofile - FD_RESERVE - 2 * sum(p.size for p in self.pools.values())
        derived = max(16, spare // (1 + self.adapter.fds_per_session))
        configured = self.settings.limits.max_connections
        return min(configured, derived) if configured else derived

    def plaintext_allowed(self, address: str) -> bool:
        return in_networks(address, self.settings.auth.plaintext_auth_networks)

    @staticmethod
    def penalty_group(address: str) -> str:
        return address_group(address, 48)

    # -- start and run --------------------------------------------------------------------------
    def start(self, listeners: list[ListeningSocket]) -> None:
        self.listeners = listeners
        for ls in listeners:
            self.loop.selector.register(ls.sock, 1, lambda _m, ls=ls: self._accept(ls))
        self.adapter.start()
        self.started = True
        if self.settings.server.control_socket:
            self.control = ControlServer.open(self.loop, self.connections,
                                              self.settings.server.control_socket)
        self.loop.call_later(1.0, self._tick)

    def _tick(self) -> None:
        for callback in self.on_tick:
            try:
                callback()
            except Exception:
                log.exception("periodic callback failed")
        if not self.stopping or self.connections:
            self.loop.call_later(1.0, self._tick)

    def status(self) -> str:
        logged_in = sum(1 for c in self.connections if c.authenticated)
        return (f"{len(self.connections)} connections, {logged_in} logged in, "
                f"{self.pools['auth'].stuck + self.pools['mail'].stuck} stuck adapter calls")

    def calls_pending(self) -> int:
        return sum(pool.pending() for pool in self.pools.values())

    def _stopped(self) -> bool:
        """Stopping, and every session's end has been told to its adapter (or we gave up)."""
        return self.stopping and (self.gave_up or not (
            self.connections or self.commits_in_flight or self.calls_pending()))

    def serve_forever(self) -> None:
        try:
            self.loop.run(until=self._stopped)
            if self._stop_timer is not None:
                self._stop_timer.cancel()
            for pool in self.pools.values():
                pool.shutdown()
            self.leaked = self.leaks()
            if self.leaked:
                log.error("resources not given back at exit: %s", "; ".join(self.leaked))
        finally:
            self.close()

    def leaks(self) -> list[str]:
        """Per-session bookkeeping still held: empty once every session has ended, except what
        calls still stuck in an adapter hold (a session each, at most)."""
        found = []
        stuck = self.calls_pending()
        gate = self.verifications
        if self.connections:
            found.append(f"{len(self.connections)} connections")
        if self.sessions_alive > stuck:
            found.append(f"{self.sessions_alive} adapter sessions not closed ({stuck} stuck)")
        if gate.total or gate.running or gate.waiting:
            found.append(f"{gate.total} verifications in flight, {len(gate.waiting)} queues")
        held = self.accounts.user_sessions
        if sum(held.values()) > stuck or len(self.accounts.locks) > stuck:
            found.append(f"accounts still held: {sorted(held)} ({stuck} stuck)")
        if self.commits_in_flight > stuck:
            found.append(f"{self.commits_in_flight} commits")
        if self.admission.by_group:
            found.append(f"{len(self.admission.by_group)} address groups")
        own = [self._tick, *(pool.check_deadlines for pool in self.pools.values())]
        timers = [cb for cb in self.loop.pending_timers() if cb not in own]
        if timers:
            found.append(f"{len(timers)} timers still armed: {timers[:3]}")
        return found

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        for ls in self.listeners:
            try:
                self.loop.selector.unregister(ls.sock)
            except (KeyError, ValueError):
                pass
            ls.sock.close()
        self.listeners = []
        for conn in list(self.connections):
            conn.close("server stopped")
        for pool in self.pools.values():
            pool.shutdown()
        if self.started:
            self.started = False
            try:
                self.adapter.close()
            except Exception:
                log.exception("adapter close() failed")
        self.loop.close()

    # -- accepting ------------------------------------------------------------------------------
    def _accept(self, ls: ListeningSocket) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, addr = ls.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", ls.name, exc)
                return
            self._admit(ls, sock, addr)

    def _admit(self, ls: ListeningSocket, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(False)
        if self.stopping:
            sock.close()
            return
        entry = self.admission.admit(ls.name, ls.tls, sock, addr)
        if entry is None:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.limits.tcp_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
        except OSError:
            pass
        conn = Connection(self, sock, entry.address, entry.port, ls.name, entry.group, ls.tls,
                          entry.proxy_versions)
        session = self.connections[conn] = Session(self, conn)
        self.admission.file(conn)
        self.stats["connections"] += 1
        self.sessions_alive += 1
        if not entry.proxy_versions:
            log.info("connect %s:%d on %s", entry.address, entry.port, ls.name,
                     extra={"POP3SF_CLIENT": entry.address, "POP3SF_EVENT": "connect"})
        conn.start(session)

    def proxied(self, conn: Connection, header: Header) -> str | None:
        return self.admission.proxied(conn, header)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.pop(conn, None)
        self.admission.unfile(conn)

    # With [server] processes > 1 these count across processes (pop3sf.child.ChildServer).
    def connections_from(self, group: str) -> int:
        """Connections open from an address group, for max_connections_per_address."""
        return len(self.admission.by_group.get(group, ()))

    def group_changed(self, group: str, delta: int) -> None:
        """A connection from *group* was filed (+1) or unfiled (-1)."""

    # -- adapter calls --------------------------------------------------------------------------
    def call_adapter(self, pool: str, func: Callable[..., Any], args: tuple[Any, ...],
                     done: Callable[[Any, BaseException | None], None],
                     inline: bool = False) -> None:
        """On a worker of ``pool``, or on the loop for a call that can't block."""
        self.stats["adapter_calls"] += 1
        if self.adapter.blocking and not inline:
            self.pools[pool].submit(func, args, done)
        else:
            run_inline(func, args, done)

    def _auth_refusal(self, group: str) -> str | None:
        """Why a verification whose turn came can't start now, or None."""
        stuck = sum(p.stuck for p in self.pools.values())
        if stuck >= self.settings.workers.max_stuck_calls:
            return f"{stuck} adapter calls are stuck"
        if self.stopping:
            return "server shutting down"
        auth = self.settings.auth
        if self.verifications.total >= auth.max_auth_in_flight:
            return "too many authentications in flight"
        if self.verifications.running[group] >= auth.max_auth_in_flight_per_address:
            return "too many authentications in flight from this address"
        return None

    # -- what sessions tell ------------------------------------------------------------------
    def session_released(self, session: object) -> None:
        """The adapter session was told the connection is over (or there was none)."""
        self.accounts.release(session)
        self.sessions_alive -= 1

    def commit_started(self) -> None:
        self.commits_in_flight += 1

    def commit_finished(self) -> None:
        self.commits_in_flight -= 1

    # -- reload and shutdown --------------------------------------------------------------------
    def reload(self, settings: Settings) -> None:
        """Apply new settings, or raise :class:`ConfigError` and change nothing (protocol §17).

        A different adapter type refuses the whole reload: the running adapter serves on, and
        the next reload compares against what really runs. Settings only a restart can apply
        (listeners, worker pools and call timeout, the service user, group and pidfile, the log
        output) keep their running values, with a warning; everything else applies to new
        sessions and commands, the log level and the certificates included.
        """
        old = self.settings
        if settings.adapter_type != old.adapter_type:
            raise ConfigError(f"{settings.source}: [adapter] type changed from "
                              f"{old.adapter_type!r} to {settings.adapter_type!r}: that needs a "
                              "restart; the running adapter keeps serving")
        try:
            context = make_context(settings.tls, settings.source)
        except ConfigError as exc:
            log.error("reload: keeping the old configuration: %s", exc)
            raise
        try:
            self.adapter.reload(settings.adapter_config)
        except ConfigError as exc:
            raise adapter_error(settings.source, settings.adapter_type, exc) from None
        except Exception as exc:
            log.error("reload: adapter refused the new configuration, keeping the old: %s", exc)
            raise ConfigError(str(exc)) from exc
        running = dataclasses.replace(
            settings,
            listeners=old.listeners,
            metrics=old.metrics,
            server=old.server._replace(shutdown_grace=settings.server.shutdown_grace),
            logging=old.logging._replace(level=settings.logging.level),
            workers=old.workers._replace(max_stuck_calls=settings.workers.max_stuck_calls),
        )
        kept = [name for name, new, now in (
            ("[listeners]", settings.listeners, old.listeners),
            ("[metrics]", settings.metrics, old.metrics),
            ("[server] user/group/pidfile/control_socket/processes", settings.server,
             running.server),
            ("[logging] target/file/queue_size", settings.logging, running.logging),
            ("[workers] auth_threads/mailbox_threads/call_timeout", settings.workers,
             running.workers)) if new != now]
        if kept:
            log.warning("reload: %s changed; that needs a restart (running values kept)",
                        ", ".join(kept))
        auth = settings.auth
        self.penalties.initial, self.penalties.maximum = auth.penalty_initial, auth.penalty_max
        self.penalties.decay, self.penalties.size = auth.penalty_decay, auth.penalty_table_size
        if settings.logging.level != old.logging.level:
            logging.getLogger().setLevel(settings.logging.level.upper())
        self.tls_context = context
        self.settings = running
        self.debug = log.isEnabledFor(logging.DEBUG)
        log.info("configuration reloaded from %s", settings.source)

    def shutdown(self) -> None:
        """Stop accepting; tell idle clients; let work under way finish (docs/protocol.md §17)."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down: %s", counted(len(self.connections), "connection"))
        for ls in self.listeners:
            self.loop.selector.unregister(ls.sock)
            ls.sock.close()
        self.listeners = []
        for session in list(self.connections.values()):
            session.shutdown()
        self._stop_timer = self.loop.call_later(self.settings.server.shutdown_grace,
                                                self._grace_over)

    def _grace_over(self) -> None:
        for conn, session in list(self.connections.items()):
            if not session.committing():  # a QUIT whose commit started finishes before exit
                conn.close("shutdown grace period over")
        self._stop_timer = self.loop.call_later(STUCK_WAIT, self._give_up)

    def _give_up(self) -> None:
        """Adapter calls still running after the grace period: exit without them (a commit
        that never returns is never answered, so no client is told anything false)."""
        self._stop_timer = None
        log.error("shutdown: %d adapter calls still running, %d commits unfinished; "
                  "exiting without them", self.calls_pending(), self.commits_in_flight)
        self.gave_up = True
        for conn in list(self.connections):
            conn.close("shutdown: adapter call still running")

    def request_stop(self) -> None:
        """Thread-safe: begin a graceful shutdown."""
        self.loop.call_soon_threadsafe(self.shutdown)
