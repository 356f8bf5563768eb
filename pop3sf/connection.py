"""One client socket: non-blocking I/O, TLS through memory BIOs, lines in, bytes out, timers.

TLS runs through ``ssl.MemoryBIO`` so handshakes never block and there is no hidden buffer to
drain: every read empties the ``SSLObject`` (docs/protocol.md §2). The connection owns the input
buffer and its one line scanner: the session takes lines one by one (:meth:`next_line`) or looks
ahead at pipelined ones (:meth:`lines_ahead`, :meth:`consume`). Output goes to one byte buffer
whose size the session watches for backpressure; five deadlines share one loop timer
(docs/protocol.md §13, §14).

On a listener behind a load balancer (``proxy_protocol``) the PROXY header is read first, before
the greeting or the TLS handshake, under ``proxy_header_timeout``; what follows it in the buffer
is the client's first bytes (docs/deployment.md).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import proxy
from .lines import LineBuffer
from .loop import Timer

if TYPE_CHECKING:
    from .host import Handler, Host

log = logging.getLogger("pop3sf.connection")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
#: Under glibc's mmap threshold (128 KiB): a larger recv buffer is an mmap, an mremap and a munmap
#: per read, a tenth of a login's kernel time; a client's commands never need more.
RECV_SIZE = 64 * 1024
#: "No deadline": one shared float (each ``float("inf")`` is a new object, per connection).
NEVER = float("inf")


class Connection:
    """One client's socket, buffers and timers; everything runs on the loop thread.

    The connection knows bytes and lines, never commands: what a line means is the
    session's (its :class:`Handler`) business.
    """

    __slots__ = (
        "server", "sock", "fd", "address", "port", "listener", "group", "tls_listener",
        "created", "inbuf", "outbuf", "ssl", "bio_in", "bio_out", "handshaking", "closed",
        "eof", "events", "reading_paused", "session", "timer",
        "auth_deadline", "handshake_deadline", "idle_deadline", "stall_deadline",
        "close_when_flushed", "bytes_out", "proxy_versions", "proxy_deadline", "proxied_by",
        "proxy_tls", "__weakref__",
    )

    def __init__(self, server: Host, sock: socket.socket, address: str, port: int,
                 listener: str, group: str, tls_listener: bool,
                 proxy_versions: tuple[int, ...] = ()) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.port = port
        self.listener = listener
        self.group = group
        self.tls_listener = tls_listener
        self.created = time.monotonic()
        self.inbuf = LineBuffer(server.settings.protocol.max_line_length)
        self.outbuf = bytearray()
        self.ssl: ssl.SSLObject | None = None
        self.bio_in: ssl.MemoryBIO | None = None
        self.bio_out: ssl.MemoryBIO | None = None
        self.handshaking = False
        self.closed = False
        self.eof = False
        self.events = READ
        self.reading_paused = False
        self.session: Handler | None = None
        self.timer: Timer | None = None
        limits = server.settings.limits
        self.auth_deadline = self.created + limits.authorization_timeout
        self.handshake_deadline = NEVER
        self.idle_deadline = self.created + limits.idle_timeout
        self.stall_deadline = NEVER
        self.close_when_flushed = False
        self.bytes_out = 0
        self.proxy_versions = proxy_versions  # non-empty while a PROXY header is awaited
        self.proxy_deadline = (self.created + limits.proxy_header_timeout if proxy_versions
                               else NEVER)
        self.proxied_by: str | None = None  # the load balancer's address, once it named us
        self.proxy_tls = False  # the header's SSL TLV, on a listener that trusts it

    @property
    def authenticated(self) -> bool:
        return self.session is not None and self.session.authenticated

    @property
    def secure(self) -> bool:
        """TLS here, or at a trusted proxy that said so (``proxy_tls_trusted``)."""
        return self.ssl is not None or self.proxy_tls

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, session: Handler) -> None:
        self.session = session
        self.server.loop.selector.register(self.sock, READ, self.on_event)
        self._arm()
        if not self.proxy_versions:
            self._begin()

    def _begin(self) -> None:
        """The greeting, or the implicit-TLS handshake that comes before it."""
        assert self.session is not None
        if self.tls_listener:
            early = bytes(self.inbuf)  # sent right after a PROXY header: TLS records
            self.start_tls()
            if early:
                self._received(early)
        else:
            self.session.start()
            if self.inbuf:
                self.session.on_input()

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.events:
            self.server.loop.selector.unregister(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.inbuf.reset()
        self.outbuf = bytearray()
        self.ssl = self.bio_in = self.bio_out = None
        if self.session is not None:
            self.session.on_close(reason)
        self.server.connection_closed(self)

    # -- timers ------------------------------------------------------------------------------
    def _next_deadline(self) -> float:
        deadline = min(self.idle_deadline, self.stall_deadline, self.handshake_deadline,
                       self.proxy_deadline)
        if not self.authenticated:
            deadline = min(deadline, self.auth_deadline)
        return deadline

    def _arm(self) -> None:
        deadline = self._next_deadline()
        if self.timer is None or self.timer.cancelled:
            self.timer = self.server.loop.call_at(deadline, self._on_timer)
        else:
            self.server.loop.rearm(self.timer, deadline)

    def touch(self) -> None:
        """A complete command arrived: reset the idle timer (cheap: no heap push)."""
        self.idle_deadline = time.monotonic() + self.server.settings.limits.idle_timeout
        # Later is all a command can make it: the armed timer re-arms itself when it fires.

    def _on_timer(self) -> None:
        now = time.monotonic()
        if self.closed:
            return
        if now >= self.proxy_deadline:
            log.warning("%s: no PROXY header within %s s; closed", self.address,
                        self.server.settings.limits.proxy_header_timeout,
                        extra={"POP3SF_CLIENT": self.address, "POP3SF_EVENT": "proxy-timeout"})
            self.close("PROXY header timeout")
        elif now >= self.handshake_deadline:
            self.close("TLS handshake timeout")
        elif not self.authenticated and now >= self.auth_deadline:
            self.close("authorization timeout")
        elif now >= self.stall_deadline:
            self.close("send stalled")
        elif now >= self.idle_deadline:
            if self.session is not None and self.session.busy():
                self.idle_deadline = now + self.server.settings.limits.idle_timeout
            else:
                self.close("idle timeout")
        if not self.closed:
            self.timer = None
            self._arm()

    # -- TLS ---------------------------------------------------------------------------------
    def start_tls(self) -> None:
        """Begin a server-side handshake; bytes already buffered in plaintext are discarded."""
        ctx = self.server.tls_context
        assert ctx is not None
        self.inbuf.reset()
        self.bio_in, self.bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self.bio_in, self.bio_out, server_side=True)
        self.handshaking = True
        self.handshake_deadline = time.monotonic() + \
            self.server.settings.limits.tls_handshake_timeout
        self._arm()

    def _handshake(self) -> None:
        assert self.ssl is not None
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._pump_tls_out()
            return
        except (ssl.SSLError, OSError) as exc:
            self._pump_tls_out()
            self.flush()
            log.info("TLS handshake with %s failed: %s", self.address,
                     getattr(exc, "reason", None) or exc,
                     extra={"POP3SF_CLIENT": self.address, "POP3SF_EVENT": "tls-failed"})
            self.close("TLS handshake failed")
            return
        self.handshaking = False
        self.handshake_deadline = NEVER
        self._pump_tls_out()
        assert self.session is not None
        self.session.tls_established()

    def _pump_tls_out(self) -> None:
        if self.bio_out is not None and self.bio_out.pending:
            self.outbuf += self.bio_out.read()

    # -- input -------------------------------------------------------------------------------
    def on_event(self, mask: int) -> None:
        if mask & WRITE:
            self.flush()
            if (not self.closed and self.session is not None
                    and len(self.outbuf) < self.server.settings.protocol.output_backlog):
                self.session.on_drain()
        if mask & READ and not self.closed:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read error: {exc.strerror or exc}")
            return
        if not data:
            self.eof = True
            self._set_events(self.events & ~READ)
            if self.ssl is not None and self.handshaking:
                self.close("EOF during TLS handshake")
                return
            if self.proxy_versions:
                self.close("EOF before the PROXY header")
                return
        elif self.proxy_versions:
            self.inbuf += data
            self._proxy_header()
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        """Bytes from the socket (empty at EOF): into the TLS object or the input buffer."""
        if data and self.ssl is not None:
            assert self.bio_in is not None
            self.bio_in.write(data)
            if self.handshaking:
                self._handshake()
                if self.handshaking or self.closed:
                    self.flush()
                    return
            self._read_tls()
            if self.closed:
                return
        elif data:
            self.inbuf += data
        if len(self.inbuf) > 4 * self.inbuf.limit + RECV_SIZE:
            self.reading_paused = True
            self._set_events(self.events & ~READ)
        assert self.session is not None
        self.session.on_input()

    def _proxy_header(self) -> None:
        """Parse what arrived so far as a PROXY header; once complete, the server re-files the
        connection under the client's address and the session (or TLS) begins."""
        result = proxy.parse(self.inbuf, self.proxy_versions)
        if result is proxy.NEED_MORE:
            return
        if isinstance(result, proxy.Invalid):
            log.warning("%s: bad PROXY header: %s; closed", self.address, result.reason,
                        extra={"POP3SF_CLIENT": self.address, "POP3SF_EVENT": "proxy-invalid"})
            self.close("bad PROXY header")
            return
        assert isinstance(result, proxy.Done)
        del self.inbuf[:result.consumed]
        self.proxy_versions = ()
        self.proxy_deadline = NEVER
        why = self.server.proxied(self, result.header)
        if why is not None:
            self.close(why)
            return
        self._begin()

    def _read_tls(self) -> None:
        assert self.ssl is not None
        while True:
            try:
                chunk = self.ssl.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.eof = True
                break
            except ssl.SSLError as exc:
                self.close(f"TLS error: {exc.reason or exc}")
                return
            if not chunk:
                self.eof = True
                break
            self.inbuf += chunk
        self._pump_tls_out()

    def next_line(self) -> bytes | None:
        """The next complete line without its line end, TOO_LONG, or None."""
        line = self.inbuf.next_line()
        self.maybe_resume_reading()
        return line

    def lines_ahead(self) -> Iterator[tuple[bytes, int]]:
        """See :meth:`LineBuffer.lines_ahead`; :meth:`consume` takes what was answered."""
        return self.inbuf.lines_ahead()

    def consume(self, end: int) -> None:
        """Take the lines up to ``end`` (from :meth:`lines_ahead`): they were answered."""
        del self.inbuf[:end]
        self.maybe_resume_reading()
        self.touch()

    def use_auth_line_limit(self, on: bool) -> None:
        """SASL responses may be longer than commands (RFC 5034 §4)."""
        protocol = self.server.settings.protocol
        self.inbuf.limit = protocol.max_auth_line_length if on else protocol.max_line_length

    def maybe_resume_reading(self) -> None:
        if self.reading_paused and len(self.inbuf) <= self.inbuf.limit + RECV_SIZE:
            self.reading_paused = False
            if not self.eof:
                self._set_events(self.events | READ)

    # -- output ------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if self.ssl is not None and not self.handshaking:
            view = memoryview(data)
            while view:
                n = self.ssl.write(view)
                view = view[n:]
            self._pump_tls_out()
        else:
            self.outbuf += data

    def backlog(self) -> int:
        return len(self.outbuf)

    def flush(self) -> None:
        if self.closed:
            return
        buf = self.outbuf
        if buf:
            try:
                sent = self.sock.send(buf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.debug("send to %s failed: %s", self.address, exc)
                self.close("write error")
                return
            if sent:
                del buf[:sent]
                self.bytes_out += sent
                self.stall_deadline = NEVER
        if buf:
            if self.stall_deadline == NEVER:
                self.stall_deadline = time.monotonic() + \
                    self.server.settings.limits.send_stall_timeout
                self._arm()
            self._set_events(self.events | WRITE)
            return
        self.stall_deadline = NEVER
        self._set_events(self.events & ~WRITE)
        if self.close_when_flushed:
            self.close(self.session.close_reason if self.session else "")

    def _set_events(self, events: int) -> None:
        if events == self.events or self.closed:
            return
        selector = self.server.loop.selector
        if not events:  # EOF and nothing to send: a registered fd would spin on its EOF
            selector.unregister(self.sock)
        elif not self.events:
            selector.register(self.sock, events, self.on_event)
        else:
            selector.modify(self.sock, events, self.on_event)
        self.events = events

    def finish(self) -> None:
        """Close once everything written so far has been sent."""
        self.close_when_flushed = True
        self.flush()
