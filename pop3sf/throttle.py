"""Client addresses and the failed-login penalty (SPEC §P7, §P9).

Addresses are normalised once, at accept (IPv4-mapped IPv6 becomes IPv4), and every limit keys
on a *group*: the IPv4 address itself, or an IPv6 /64 for connection caps and /48 for penalties,
since one IPv6 client commonly holds a whole prefix.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Iterable

from .config import Network


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


def in_networks(address: str, networks: Iterable[Network]) -> bool:
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
    """

    def __init__(self, initial: float, maximum: float, decay: float, size: int) -> None:
        self.initial, self.maximum, self.decay, self.size = initial, maximum, decay, size
        self._table: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._key = os.urandom(32)

    def _current(self, entry: _Entry, now: float) -> float:
        return max(0.0, entry.failures - (now - entry.last) // self.decay)

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
        now = time.monotonic()
        entry = self._table.pop(group, None) or _Entry()
        self._table[group] = entry  # most recent last: the LRU end
        digest = hmac.new(self._key, user + b"\0" + password, hashlib.sha256).digest()
        if digest in entry.recent:
            return
        entry.recent.append(digest)
        entry.failures = self._current(entry, now) + 1
        entry.last = now
        while len(self._table) > self.size:
            self._table.popitem(last=False)

    def record_success(self, group: str) -> None:
        self._table.pop(group, None)
