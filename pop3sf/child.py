"""One serving process of ``[server] processes = N``: a :class:`Server` whose limits are shared.

The parent (:mod:`pop3sf.fleet`) owns the authoritative penalty table and verification gate;
the child asks it over its :class:`~pop3sf.channel.Channel` when a verification may start and
tells it every failure, so N processes give an attacker no more guesses than one
(docs/architecture.md §8). Connection caps and account locks go through
:mod:`pop3sf.shared` instead, since they are decided synchronously.

Verifications of a group without a penalty mark start here without asking (pop3sf.shared).
Messages, child → parent: ``ready``, ``beat CONNS LOGGED STUCK``, ``reloaded``, ``req ID GROUP``,
``fin ID``, ``cancel ID GROUP``, ``fail GROUP HEXDIGEST``, ``metrics`` + text (pop3sf.metrics).
Parent → child: ``go ID``, ``no ID WHY``, ``reload``, ``scrape``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import select
import selectors
import socket
from collections.abc import Callable

from pop3sf.adapters import Adapter

from .accounts import Accounts
from .channel import Channel
from .config import ConfigError, Settings, load_config
from .listeners import ListeningSocket
from .loop import EventLoop
from .replies import ERR_IN_USE, ERR_TEMP
from .server import Server
from .shared import AccountLocks, SharedState
from .throttle import Penalties, VerificationGate, _Waiter

log = logging.getLogger("pop3sf.server")


class RemotePenalties(Penalties):
    """Failures go to the parent's table; this process keeps none of its own."""

    def __init__(self, settings: Settings, shared: SharedState, channel: Channel) -> None:
        auth = settings.auth
        super().__init__(auth.penalty_initial, auth.penalty_max, auth.penalty_decay,
                         auth.penalty_table_size)
        self._key = shared.penalty_key
        self.marks = shared.marks
        self.channel = channel

    def record_digest(self, group: str, digest: bytes) -> None:
        self.marks.mark(group)          # every process sends this group to the gate from now
        self.channel.send("fail", group, digest.hex())


class RemoteGate(VerificationGate):
    """The verification gate, asked of the parent: ``request`` sends ``req`` and waits for
    ``go`` or ``no`` without blocking; ``finished``/``cancel`` give the place back.

    A group without a penalty mark (:class:`~pop3sf.shared.PenaltyMarks`) and under the
    in-flight caps, counted over every process, starts at once without asking: the parent's
    queue matters only once the group has failed. ``refusal`` is checked here either way
    (stuck calls and shutdown are this process's own business); the parent checks the caps
    that span processes for what it gates.
    """

    def __init__(self, penalties: Penalties, loop: EventLoop,
                 refusal: Callable[[str], str | None], channel: Channel,
                 shared: SharedState, caps: Callable[[], tuple[int, int]]) -> None:
        super().__init__(penalties, loop, refusal)
        self.channel = channel
        self.marks = shared.marks
        self.verifying = shared.verifying
        self.caps = caps                                      # (in flight, per address)
        self._local: set[object] = set()                      # keys started without asking
        self._ids = itertools.count(1)
        self._asked: dict[int, tuple[_Waiter, str]] = {}     # id -> (waiter, group), waiting
        self._key_ids: dict[object, int] = {}                 # key -> id, waiting or running

    def request(self, key: object, group: str, start: Callable[[], None],
                refuse: Callable[[str], None]) -> None:
        if self.channel.closed:
            refuse("server shutting down")
            return
        total, per_address = self.caps()
        if (not self.marks.marked(group) and self.verifying.total(group) < per_address
                and self.verifying.grand_total() < total):
            why = self.refusal(group)
            if why is not None:
                refuse(why)
                return
            self._local.add(key)
            self.verifying.add(group, 1)
            self._hold(key, group)
            start()
            return
        ident = next(self._ids)
        self._asked[ident] = (_Waiter(key, start, refuse), group)
        self._key_ids[key] = ident
        self.waiting.setdefault(group, collections.deque()).append(self._asked[ident][0])
        self.channel.send("req", str(ident), group)

    def answered(self, words: list[str]) -> None:
        """``go ID`` or ``no ID WHY...`` from the parent."""
        ident = int(words[1])
        entry = self._asked.pop(ident, None)
        if entry is None:               # cancelled meanwhile (the parent was told): should a
            if words[0] == "go":        # "go" cross the "cancel", give the place back at once
                self.channel.send("fin", str(ident))
            return
        waiter, group = entry
        self._unqueue(waiter, group)
        if words[0] == "no":
            self._key_ids.pop(waiter.key, None)
            waiter.refuse(" ".join(words[2:]))
            return
        why = self.refusal(group)
        if why is not None:
            self._key_ids.pop(waiter.key, None)
            self.channel.send("fin", str(ident))
            waiter.refuse(why)
            return
        self._hold(waiter.key, group)
        waiter.start()

    def finished(self, key: object) -> None:
        group = self._release(key)
        if group is None:
            return
        if key in self._local:
            self._local.discard(key)
            self.verifying.add(group, -1)
            return
        self.channel.send("fin", str(self._key_ids.pop(key)))

    def cancel(self, key: object, group: str) -> None:
        ident = self._key_ids.get(key)
        entry = self._asked.pop(ident, None) if ident is not None else None
        if entry is not None:
            del self._key_ids[key]
            self._unqueue(entry[0], group)
            self.channel.send("cancel", str(ident), group)
            return
        self.finished(key)

    def parent_lost(self) -> None:
        """No parent to ask: refuse whatever waits (the server shuts down)."""
        for ident in list(self._asked):
            waiter, group = self._asked.pop(ident)
            self._key_ids.pop(waiter.key, None)
            self._unqueue(waiter, group)
            waiter.refuse("server shutting down")
        for key in list(self._holders):
            self.finished(key)
        self.running.clear()

    def _unqueue(self, waiter: _Waiter, group: str) -> None:
        queue = self.waiting.get(group)
        if queue is not None:
            try:
                queue.remove(waiter)
            except ValueError:
                pass
            if not queue:
                del self.waiting[group]


class SharedAccounts(Accounts):
    """:class:`Accounts`, plus the same claims as record locks other processes see."""

    __slots__ = ("shared", "held", "offsets")

    def __init__(self, shared: AccountLocks) -> None:
        super().__init__()
        self.shared = shared
        self.held: dict[object, list[int]] = {}   # holder -> its locked offsets
        self.offsets: set[int] = set()            # every offset this process holds

    def claim(self, holder: object, account: str, read_only: bool, per_user: int) -> bytes | None:
        problem = super().claim(holder, account, read_only, per_user)
        if problem is not None:
            return problem
        base = self.shared.base(account)
        taken: list[int] = []
        for slot in range(base + 1, base + 1 + per_user):
            if slot not in self.offsets and self.shared.try_lock(slot):
                taken.append(slot)
                break
        else:
            problem = ERR_TEMP
        if problem is None and not read_only:
            if self.shared.try_lock(base):
                taken.append(base)
            else:
                problem = ERR_IN_USE
        if problem is not None:
            for offset in taken:
                self.shared.unlock(offset)
            super().release(holder)
            return problem
        self.held[holder] = taken
        self.offsets.update(taken)
        return None

    def release(self, holder: object) -> None:
        for offset in self.held.pop(holder, ()):
            self.offsets.discard(offset)
            self.shared.unlock(offset)
        super().release(holder)


class ChildServer(Server):
    """A :class:`Server` that shares penalties, the gate, caps and account locks with the
    other processes, and reports to the parent: ``ready`` once listening, ``beat`` every tick
    (the parent's watchdog and STATUS), ``reloaded`` after a reload."""

    def __init__(self, settings: Settings, index: int, sock: socket.socket,
                 shared: SharedState, adapter: Adapter | None = None) -> None:
        super().__init__(settings, adapter)
        self.index = index
        self.processes = shared.counts.processes
        self.channel = Channel(self.loop, sock, self._message, self._parent_lost)
        self.penalties = RemotePenalties(settings, shared, self.channel)
        self.gate = RemoteGate(self.penalties, self.loop, self._auth_refusal, self.channel,
                               shared, self._caps)
        self.verifications = self.gate
        self.accounts = SharedAccounts(shared.locks)
        self.counts = shared.counts
        self.counts.row = index
        shared.verifying.row = index
        self.on_reload: Callable[[], None] = lambda: None
        self.on_tick.append(self._beat)
        self.on_message: dict[str, Callable[[list[str]], None]] = {
            "go": self.gate.answered, "no": self.gate.answered,
            "reload": lambda _w: self.on_reload()}

    def start(self, listeners: list[ListeningSocket]) -> None:
        super().start(listeners)
        exclusive(self.loop, listeners)

    def _caps(self) -> tuple[int, int]:
        auth = self.settings.auth
        return auth.max_auth_in_flight, auth.max_auth_in_flight_per_address

    @property
    def max_connections(self) -> int:
        """A configured total is split between the processes; the fd-derived one is each's."""
        configured = self.settings.limits.max_connections
        own = super().max_connections
        if configured:
            own = min(own, max(1, -(-configured // self.processes)))
        return own

    def connections_from(self, group: str) -> int:
        return self.counts.total(group)

    def group_changed(self, group: str, delta: int) -> None:
        super().group_changed(group, delta)
        self.counts.add(group, delta)

    def reload_from(self, path: str) -> None:
        """The parent passed on a SIGHUP: reload this process, then say so (either way)."""
        try:
            self.reload(child_settings(load_config(path), self.index))
        except ConfigError as exc:
            log.error("reload failed, old configuration kept: %s", exc)
        self.channel.send("reloaded")

    def ready(self) -> None:
        self.channel.send("ready")
        self._beat()

    def _beat(self) -> None:
        logged_in = sum(1 for c in self.connections if c.authenticated)
        stuck = sum(p.stuck for p in self.pools.values())
        self.channel.send("beat", str(len(self.connections)), str(logged_in), str(stuck))
        if self.settings.metrics.listen:
            from . import metrics

            self.channel.send("metrics", json.dumps(metrics.of_server(self, shared=True),
                                                    separators=(",", ":")))

    def _message(self, words: list[str]) -> None:
        handler = self.on_message.get(words[0])
        if handler is None:
            log.warning("unknown message from the parent process: %.40r", words[0])
            return
        handler(words)

    def _parent_lost(self) -> None:
        if not self.stopping:
            log.error("the supervising process is gone; shutting down")
        self.gate.parent_lost()
        self.shutdown()

    def close(self) -> None:
        self.channel.close()
        super().close()


def child_settings(settings: Settings, index: int) -> Settings:
    """Process *index*'s own settings (at start and at every reload, so a reload sees no
    change): its control socket is ``PATH.index`` (0: ``PATH``), and pools left at 0
    ("one thread per core") get their share of the cores, as one process would have them
    all: more threads than cores only fight over the CPUs (bcrypt) and each GIL."""
    server, workers = settings.server, settings.workers
    if index and server.control_socket:
        server = server._replace(control_socket=f"{server.control_socket}.{index}")
    share = max(1, max(2, os.cpu_count() or 2) // server.processes)
    workers = workers._replace(auth_threads=workers.auth_threads or share,
                                  mailbox_threads=workers.mailbox_threads or share)
    return dataclasses.replace(settings, server=server, workers=workers)


def exclusive(loop: EventLoop, listeners: list[ListeningSocket]) -> None:
    """Wake only one waiting process per new connection (``EPOLLEXCLUSIVE``), not all N: the
    others would each pay a wake-up and a failed ``accept()``. A busy process is not waiting,
    so the connection goes to one that is. Without epoll (or the flag) every process wakes,
    which is correct, only dearer."""
    flag = getattr(select, "EPOLLEXCLUSIVE", 0)
    epoll = getattr(loop.selector, "_selector", None)
    if not flag or not isinstance(loop.selector, selectors.EpollSelector) or epoll is None:
        return
    for ls in listeners:
        try:
            epoll.unregister(ls.sock.fileno())
            epoll.register(ls.sock.fileno(), select.EPOLLIN | flag)
        except OSError:
            epoll.register(ls.sock.fileno(), select.EPOLLIN)
