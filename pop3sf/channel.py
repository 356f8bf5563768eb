"""The parent↔child message channel of ``[server] processes = N`` (docs/architecture.md §8).

One ``SOCK_SEQPACKET`` socketpair per child: every ``send`` is one message, delivered whole and
in order, so no framing is needed. Both ends live on an :class:`~pop3sf.loop.EventLoop` and
never block it: a full socket buffer queues the message and waits for the socket to become
writable. A message is one line of space-separated ASCII words; its first word is its kind.
"""

from __future__ import annotations

import collections
import selectors
import socket
from collections.abc import Callable

from .loop import EventLoop

#: The longest message either side sends (a metrics snapshot is the biggest).
MAX_MESSAGE = 65536
READS_PER_EVENT = 64


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(parent end, child end), close-on-exec, message-preserving."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


class Channel:
    """One end of a socketpair on the loop: ``send(...)`` never blocks; every message read is
    handed to ``on_message(words)``, and ``on_lost()`` is called once when the other side is
    gone (EOF or an error), after which sends are dropped."""

    def __init__(self, loop: EventLoop, sock: socket.socket,
                 on_message: Callable[[list[str]], None], on_lost: Callable[[], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.on_lost = on_lost
        self.outbox: collections.deque[bytes] = collections.deque()
        self.closed = False
        sock.setblocking(False)
        loop.selector.register(sock, selectors.EVENT_READ, self._ready)

    def send(self, *words: str) -> None:
        if self.closed:
            return
        data = " ".join(words).encode("ascii", "replace")[:MAX_MESSAGE]
        if self.outbox:
            self.outbox.append(data)
            return
        try:
            self.sock.send(data)
        except BlockingIOError:
            self.outbox.append(data)
            self.loop.selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                      self._ready)
        except OSError:
            self._lost()

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ:
            for _ in range(READS_PER_EVENT):
                if self.closed:
                    return
                try:
                    data = self.sock.recv(MAX_MESSAGE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data = b""
                if not data:
                    self._lost()
                    return
                self.on_message(data.decode("ascii", "replace").split(" "))

    def _flush(self) -> None:
        while self.outbox and not self.closed:
            try:
                self.sock.send(self.outbox[0])
            except BlockingIOError:
                return
            except OSError:
                self._lost()
                return
            self.outbox.popleft()
        if not self.closed:
            self.loop.selector.modify(self.sock, selectors.EVENT_READ, self._ready)

    def _lost(self) -> None:
        if self.closed:
            return
        self.close()
        self.on_lost()

    def close(self) -> None:
        """Let go of the socket (idempotent); what is still queued is dropped."""
        if self.closed:
            return
        self.closed = True
        self.outbox.clear()
        try:
            self.loop.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
