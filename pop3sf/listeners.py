"""Listening sockets: bound from the config, or inherited from systemd and matched by name."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .config import ConfigError, Listener

log = logging.getLogger("pop3sf.listeners")
BACKLOG = 1024


class ListeningSocket(NamedTuple):
    name: str
    sock: socket.socket
    tls: bool

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def describe(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"{self.name} {host}:{port}{' (implicit TLS)' if self.tls else ''}"


def bind_address(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # [::] and 0.0.0.0 may both be configured
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def open_listeners(listeners: Sequence[Listener],
                   inherited: Mapping[str, list[socket.socket]] | None = None
                   ) -> list[ListeningSocket]:
    """Sockets for every configured listener: inherited ones by name, the rest bound here."""
    inherited = dict(inherited or {})
    activated = bool(inherited)
    result: list[ListeningSocket] = []
    try:
        for listener in listeners:
            socks = inherited.pop(listener.name, None)
            if socks:
                for sock in socks:
                    sock.setblocking(False)
                    result.append(ListeningSocket(listener.name, sock, listener.tls))
                continue
            if activated:
                # Socket-activated: ports come from the socket units (and the service has no
                # privilege to bind 110/995 itself); a disabled socket unit means no listener.
                log.warning("listener %r: no socket passed by systemd (FileDescriptorName=%s); "
                            "not listening", listener.name, listener.name)
                continue
            for host, port in listener.addresses:
                try:
                    sock = bind_address(host, port)
                except OSError as exc:
                    raise ConfigError(f"[listeners][{listener.name}] cannot listen on "
                                      f"{host}:{port}: {exc.strerror or exc}") from None
                result.append(ListeningSocket(listener.name, sock, listener.tls))
    except BaseException:
        for ls in result:
            ls.sock.close()
        raise
    for name, socks in inherited.items():
        log.warning("inherited socket(s) named %r match no [listeners] section; closed", name)
        for sock in socks:
            sock.close()
    return result
