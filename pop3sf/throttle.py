"""Client addresses and the failed-login penalty (docs/protocol.md §7, §15).

Addresses are normalised once, at accept (IPv4-mapped IPv6 becomes IPv4), and every limit keys
on a *group*: the IPv4 address itself, or an IPv6 /64 for connection caps and /48 for penalties,
since one IPv6 client commonly holds a whole prefix.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Callable

from .config import Network
from .loop import EventLoop, Timer


def normalize_address(address: str) -> str:
    """``::ffff:192.0.2.1`` -> ``192.0.2.1``; IPv6 zone ids dropped."""
    address = address.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def address_group(address: str, v6_prefix: int) -> str:
    if ":" not in address:
        return address
    try:
        return str(ipaddress.ip_network(f"{address}/{v6_prefix}", strict=False))
    except ValueError:
        return address


@functools.lru_cache(maxsize=4096)
def in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    """Cached: asked at every USER/PASS/AUTH and CAPA, for the few addresses that log in."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


class _Entry:
    __slots__ = ("failures", "last", "recent")

    def __init__(self) -> None:
        self.failures = 0.0
        self.last = 0.0
        self.recent: collections.deque[bytes] = collections.deque(maxlen=4)


class Penalties:
    """Per-group failure record: the delay before that group's next attempt is processed.

    The delay starts at ``initial`` and doubles per failure up to ``maximum``; failures decay by
    one per ``decay`` seconds. A retry of the same wrong password does not count again: the
    table keeps an HMAC of (user, password) under a per-process random key, never the password.
    A success does not clear the record: an attacker holding one valid account would otherwise
    reset the penalty between guesses at others.
    """

    def __init__(self, initial: float, maximum: float, decay: float, size: int) -> None:
        self.initial, self.maximum, self.decay, self.size = initial, maximum, decay, size
        self._table: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._key = os.urandom(32)
        #: Failures recorded (a repeated wrong password counts once), for pop3sf.metrics.
        self.recorded = 0

    def _current(self, entry: _Entry, now: float) -> float:
        return max(0.0, entry.failures - (now - entry.last) // self.decay)

    def penalized(self, group: str) -> bool:
        """True while the group has failures that have not decayed yet."""
        entry = self._table.get(group)
        return entry is not None and self._current(entry, time.monotonic()) >= 1

    def delay(self, group: str, now: float | None = None) -> float:
        """Seconds to wait before processing this group's next attempt."""
        entry = self._table.get(group)
        if entry is None:
            return 0.0
        now = time.monotonic() if now is None else now
        failures = self._current(entry, now)
        if failures < 1:
            return 0.0
        wait = min(self.maximum, self.initial * 2 ** (int(failures) - 1))
        return max(0.0, entry.last + wait - now)

    def record_failure(self, group: str, user: bytes, password: bytes) -> None:
        self.record_digest(group, self.digest(user, password))

    def digest(self, user: bytes, password: bytes) -> bytes:
        """What identifies a (user, password) attempt in the table: an HMAC, never the secret."""
        return hmac.new(self._key, user + b"\0" + password, hashlib.sha256).digest()

    def record_digest(self, group: str, digest: bytes) -> None:
        """Count a failure identified by :meth:`digest` (a child process sends only that)."""
        now = time.monotonic()
        entry = self._table.pop(group, None) or _Entry()
        self._table[group] = entry  # most recent last: the LRU end
        if digest in entry.recent:
            return
        self.recorded += 1
        entry.recent.append(digest)
        entry.failures = self._current(entry, now) + 1
        entry.last = now
        while len(self._table) > self.size:
            self._table.popitem(last=False)


class _Waiter:
    __slots__ = ("key", "start", "refuse")

    def __init__(self, key: object, start: Callable[[], None],
                 refuse: Callable[[str], None]) -> None:
        self.key, self.start, self.refuse = key, start, refuse


class VerificationGate:
    """When each password verification may start: the penalty and the in-flight caps apply at
    that moment, not when the command arrived.

    Attempts wait in one queue per penalty group. While a group is penalised its verifications
    run one at a time, each only once the delay since the last failure has passed, so parallel
    connections, disconnects and successes with another account can't raise the group's rate of
    wrong-password verifications above what the penalty allows. ``refusal(group)`` says why an
    attempt whose turn came can't start (stuck calls, caps); it is then refused, not retried.
    """

    def __init__(self, penalties: Penalties, loop: EventLoop,
                 refusal: Callable[[str], str | None]) -> None:
        self.penalties = penalties
        self.loop = loop
        self.refusal = refusal
        self.waiting: dict[str, collections.deque[_Waiter]] = {}
        self.running: collections.Counter[str] = collections.Counter()
        self._holders: dict[object, str] = {}  # key -> group, for verifications running
        self._timers: dict[str, Timer] = {}

    def request(self, key: object, group: str, start: Callable[[], None],
                refuse: Callable[[str], None]) -> None:
        """Run ``start()`` when the group's turn allows, or ``refuse(why)``; one per ``key``."""
        self.waiting.setdefault(group, collections.deque()).append(_Waiter(key, start, refuse))
        self._pump(group)

    @property
    def total(self) -> int:
        """Verifications running, all groups."""
        return len(self._holders)

    def is_running(self, key: object) -> bool:
        return key in self._holders

    def _hold(self, key: object, group: str) -> None:
        """``key``'s verification starts: it counts against its group until released."""
        self.running[group] += 1
        self._holders[key] = group

    def _release(self, key: object) -> str | None:
        """``key``'s verification no longer counts; its group, or None if it held nothing."""
        group = self._holders.pop(key, None)
        if group is not None:
            self.running[group] -= 1
            if self.running[group] <= 0:
                del self.running[group]
        return group

    def finished(self, key: object) -> None:
        """The verification of ``key`` ended (its result arrived, or its session did)."""
        group = self._release(key)
        if group is None:
            return
        if group in self.waiting:
            self.loop.call_soon(lambda: self._pump(group))

    def cancel(self, key: object, group: str) -> None:
        """``key``'s session ended: drop its waiting attempt and end its verification."""
        queue = self.waiting.get(group)
        if queue is not None:
            for waiter in queue:
                if waiter.key is key:
                    queue.remove(waiter)
                    break
            if not queue:
                self._forget(group)
        self.finished(key)

    def _pump(self, group: str) -> None:
        queue = self.waiting.get(group)
        while queue:
            delay = self.penalties.delay(group)
            if delay > 0:
                if group not in self._timers:
                    self._timers[group] = self.loop.call_later(delay, lambda: self._wake(group))
                return
            if self.running[group] and self.penalties.penalized(group):
                return  # one at a time while penalised: finished() pumps again
            waiter = queue.popleft()
            why = self.refusal(group)
            if why is not None:
                waiter.refuse(why)
                continue
            self._hold(waiter.key, group)
            waiter.start()
        if queue is not None and not queue:
            self._forget(group)

    def _wake(self, group: str) -> None:
        self._timers.pop(group, None)
        self._pump(group)

    def _forget(self, group: str) -> None:
        self.waiting.pop(group, None)
        timer = self._timers.pop(group, None)
        if timer is not None:
            timer.cancel()
