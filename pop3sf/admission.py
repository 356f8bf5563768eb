"""Who gets in: connections filed by address group, the per-address and global caps, shedding,
and the re-filing of a connection once a trusted proxy names its client (docs/protocol.md §15,
docs/deployment.md).
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .config import Listener, Settings
from .connection import Connection
from .proxy import VERSIONS, Header
from .replies import ERR_BUSY, ERR_TEMP
from .throttle import address_group, in_networks, normalize_address

log = logging.getLogger("pop3sf.server")


class Entry(NamedTuple):
    """A connection the caps let in: whom it is from and how it is to be filed."""

    address: str
    port: int
    group: str
    proxy_versions: tuple[int, ...]


class Admission:
    """The connections by address group (IPv6: /64) and the caps a new one must pass."""

    def __init__(self, settings: Callable[[], Settings], connections: Mapping[Connection, Any],
                 capacity: Callable[[], int], verifying: Callable[[Connection], bool],
                 stats: collections.Counter[str], count_from: Callable[[str], int],
                 changed: Callable[[str, int], None]) -> None:
        self.settings = settings  # read anew each time: a reload replaces them
        self.connections = connections
        self.capacity = capacity
        self.verifying = verifying
        self.stats = stats
        #: Connections open from a group, and the hook told of every change: with processes
        #: > 1 the server counts them across processes (pop3sf.child).
        self.count_from = count_from
        self.changed = changed
        self.by_group: dict[str, dict[Connection, None]] = {}

    def admit(self, ls_name: str, tls: bool, sock: socket.socket, addr: Any) -> Entry | None:
        """The new connection's entry, or None when it was refused (and its socket closed)."""
        address = normalize_address(addr[0]) if isinstance(addr, tuple) else "local"
        port = addr[1] if isinstance(addr, tuple) else 0
        group = address_group(address, 64)
        proxied = self._proxy_listener(ls_name)
        if proxied is not None:
            if not in_networks(address, proxied.trusted_proxies):
                self.stats["proxy_refused"] += 1
                log.warning("refused %s on %s: not a trusted proxy", address, ls_name,
                            extra={"POP3SF_CLIENT": address, "POP3SF_EVENT": "refused"})
                sock.close()  # no greeting: whoever it is, it must not learn what listens
                return None
            # Filed apart until its header names the client (then proxied() re-files it):
            # a cap per proxy would lump every client together.
            group = f"via {address}"
        elif self.count_from(group) >= self.settings().limits.max_connections_per_address:
            self._refuse(sock, tls, address, "too many connections from this address")
            return None
        if len(self.connections) >= self.capacity() and not self._shed():
            self._refuse(sock, tls, address, "server full")
            return None
        return Entry(address, port, group, VERSIONS[proxied.proxy_protocol] if proxied else ())

    def file(self, conn: Connection) -> None:
        self.by_group.setdefault(conn.group, {})[conn] = None
        self.changed(conn.group, 1)

    def unfile(self, conn: Connection) -> None:
        members = self.by_group.get(conn.group)
        if members is not None and conn in members:
            del members[conn]
            self.changed(conn.group, -1)
            if not members:
                del self.by_group[conn.group]

    def _proxy_listener(self, name: str) -> Listener | None:
        """The listener's settings when it takes PROXY headers, else None."""
        for listener in self.settings().listeners:
            if listener.name == name:
                return listener if listener.proxy_protocol != "no" else None
        return None

    def proxied(self, conn: Connection, header: Header) -> str | None:
        """A trusted proxy named the client: from now on its address is the connection's
        everywhere (caps, shedding, penalties, plaintext policy, logs, the adapter's Peer).
        Returns why the connection is refused (the per-address cap), or None."""
        proxy_address = conn.address
        if header.source is not None:
            address = header.source[0]  # canonical already; IPv4-mapped IPv6 becomes IPv4
            conn.address = normalize_address(address) if ":" in address else address
            conn.port = header.source[1]
        listener = self._proxy_listener(conn.listener)
        conn.proxy_tls = header.tls and listener is not None and listener.proxy_tls_trusted
        conn.proxied_by = proxy_address
        self.unfile(conn)
        conn.group = address_group(conn.address, 64)
        self.file(conn)
        extra = {"POP3SF_CLIENT": conn.address, "POP3SF_PROXY": proxy_address}
        if self.count_from(conn.group) > self.settings().limits.max_connections_per_address:
            self.stats["refused"] += 1
            log.warning("refused %s (via %s): too many connections from this address",
                        conn.address, proxy_address, extra={**extra, "POP3SF_EVENT": "refused"})
            if not conn.tls_listener:
                conn.write(ERR_BUSY)
                conn.flush()
            return "too many connections from this address"
        log.info("connect %s:%d on %s via %s%s%s", conn.address, conn.port, conn.listener,
                 proxy_address, " (LOCAL)" if header.source is None else "",
                 " (TLS at the proxy)" if conn.proxy_tls else "",
                 extra={**extra, "POP3SF_EVENT": "connect"})
        return None

    def _refuse(self, sock: socket.socket, tls: bool, address: str, why: str) -> None:
        self.stats["refused"] += 1
        log.warning("refused %s: %s", address, why,
                    extra={"POP3SF_CLIENT": address, "POP3SF_EVENT": "refused"})
        if not tls:
            try:
                sock.send(ERR_BUSY)
            except OSError:
                pass
        sock.close()

    def _shed(self) -> bool:
        """Close the oldest not-yet-authenticated connection of the busiest address."""
        for group in sorted(self.by_group, key=lambda g: len(self.by_group[g]), reverse=True):
            for conn in self.by_group[group]:
                if not (conn.authenticated or conn.closed or self.verifying(conn)):
                    self.stats["shed"] += 1
                    log.warning("shedding %s to admit a new connection (server full)",
                                conn.address, extra={"POP3SF_CLIENT": conn.address,
                                                     "POP3SF_EVENT": "shed"})
                    if not (conn.tls_listener or conn.ssl or conn.proxy_versions):
                        conn.write(ERR_TEMP)
                        conn.flush()
                    conn.close("shed: server full")
                    return True
        return False
