"""The control socket: ``pop3sf-admin who`` and ``kick`` ask the running server over Unix.

The loop serves it like a POP3 listener, never waiting on it: one JSON request line in (at
most :data:`MAX_REQUEST` bytes), JSON reply lines out, then the connection is closed. At most
:data:`MAX_CLIENTS` at once, each with a deadline, so a stalled or hostile client costs the
POP3 sessions nothing; a long ``who`` is encoded a batch at a time as the client reads it, so
10,000 sessions do not hold up the loop either. Who may ask is left to the file system: the
socket is mode 0660 in a directory created 0750, so only root and the service group connect.

Requests: ``{"command": "who"}`` and ``{"command": "kick", "target": ACCOUNT_OR_ADDRESS}``.
Reply: one line per session (for kick: those it ended), then the status line that ends every
reply, ``{"ok": true, "count": N}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import struct
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .loop import Timer
from .throttle import normalize_address

if TYPE_CHECKING:
    from .connection import Connection
    from .loop import EventLoop
    from .session import Session

log = logging.getLogger("pop3sf.control")

MAX_REQUEST = 4096
MAX_CLIENTS = 4
CLIENT_TIMEOUT = 5.0
BATCH = 200  # sessions encoded per write while a reply drains
KICK_REASON = "kicked by admin"


def session_info(session: Session) -> dict[str, Any]:
    """What ``who`` shows of one connection."""
    conn = session.conn
    return {
        "account": session.account,
        "address": conn.address,
        "port": conn.port,
        "listener": conn.listener,
        "tls": conn.secure,
        "proxy": conn.proxied_by,  # the load balancer that named the client, if any
        "since": int(session.logged_in_at) if session.authenticated else None,
        "bytes_out": conn.bytes_out,
        "read_only": session.read_only,
    }


def prepare_directory(path: str, uid: int, gid: int) -> None:
    """As root, before privileges are dropped: create the socket's directory for the service
    user (0750, owned by it and its group), so it can create and remove the socket later."""
    directory = os.path.dirname(path)
    if not path or os.geteuid() != 0 or os.path.isdir(directory):
        return
    try:
        os.makedirs(directory, mode=0o750)
        os.chown(directory, uid, gid)
    except OSError as exc:  # the server says it again when it opens the socket
        log.warning("cannot prepare the control socket directory %s: %s", directory, exc)


class ControlServer:
    """The listening socket and its few clients, all on the loop thread."""

    def __init__(self, loop: EventLoop, sessions: Mapping[Connection, Session], path: str,
                 sock: socket.socket) -> None:
        self.loop = loop
        self.sessions = sessions  # the server's, kept up to date by it
        self.path = path
        self.sock = sock
        self.identity = _identity(path)
        self.clients: set[_Client] = set()
        self.timeout = CLIENT_TIMEOUT
        loop.selector.register(sock, selectors.EVENT_READ, self._accept)

    @classmethod
    def open(cls, loop: EventLoop, sessions: Mapping[Connection, Session],
             path: str) -> ControlServer | None:
        """Bind ``path`` (replacing a stale socket) or log why not: pop3sf serves mail without
        its control socket, only ``who`` and ``kick`` are then unavailable."""
        try:
            sock = bind(path)
        except OSError as exc:
            log.warning("control socket %s unavailable (pop3sf-admin who/kick will not work): "
                        "%s", path, exc.strerror or exc)
            return None
        log.info("control socket listening on %s", path)
        return cls(loop, sessions, path, sock)

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        try:
            self.loop.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        if _identity(self.path) == self.identity:  # never remove a successor's socket
            try:
                os.unlink(self.path)
            except OSError as exc:
                log.warning("cannot remove the control socket %s: %s", self.path, exc)

    def _accept(self, _mask: int) -> None:
        for _ in range(MAX_CLIENTS * 2):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control socket accept failed: %s", exc)
                return
            sock.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                try:  # best effort: a full send buffer on a fresh socket is not possible
                    sock.send(_reply({"ok": False, "error": "busy: too many control clients"}))
                except OSError:
                    pass
                sock.close()
                continue
            self.clients.add(_Client(self, sock))

    # -- requests -----------------------------------------------------------------------------
    def handle(self, line: bytes, peer: str) -> Iterator[bytes]:
        """The reply to one request line, in pieces to send one after the other."""
        import json  # here, not at start-up: the control socket is for the admin's rare use

        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return _error("bad request: not a JSON line")
        if not isinstance(request, dict):
            return _error("bad request: not a JSON object")
        command = request.get("command")
        if command == "who":
            return self.who()
        if command == "kick":
            target = request.get("target")
            if not isinstance(target, str) or not target.strip():
                return _error("bad request: kick needs a target")
            ended = self.kick(target.strip(), peer)
            return iter([b"".join(map(_reply, ended)) + _reply({"ok": True, "count": len(ended)})])
        return _error(f"unknown command {command!r}")

    def who(self) -> Iterator[bytes]:
        """The logged-in sessions as the request found them (those gone since are left out)."""
        chosen = [s for s in self.sessions.values() if s.authenticated and not s.conn.closed]
        count = 0
        for start in range(0, len(chosen), BATCH):
            batch = [s for s in chosen[start:start + BATCH] if not s.conn.closed]
            count += len(batch)
            yield b"".join(_reply(session_info(c)) for c in batch)
        yield _reply({"ok": True, "count": count})

    def kick(self, target: str, peer: str) -> list[dict[str, Any]]:
        """End the account's sessions (a login still in progress too), or every connection
        from the address, like a dropped connection: deletions marked without QUIT are
        discarded."""
        address = normalize_address(target.strip("[]"))
        chosen = [s for s in self.sessions.values() if not s.conn.closed and (
            s.conn.address == address or s.account == target)]
        log.info("kick %s (asked by %s): ending %d connection(s)", target, peer, len(chosen),
                 extra={"POP3SF_EVENT": "kick"})
        ended = [session_info(s) for s in chosen]
        for session in chosen:
            session.conn.close(KICK_REASON)
        return ended


class _Client:
    """One control connection: read a line, answer, close; a deadline bounds all of it."""

    __slots__ = ("control", "sock", "inbuf", "outbuf", "pending", "timer", "events")

    def __init__(self, control: ControlServer, sock: socket.socket) -> None:
        self.control = control
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = b""
        self.pending: Iterator[bytes] | None = None
        self.events = selectors.EVENT_READ
        loop = control.loop
        self.timer: Timer = loop.call_later(control.timeout, self._timed_out)
        loop.selector.register(sock, self.events, self._on_event)

    def close(self) -> None:
        self.timer.cancel()
        self.pending = None
        if self.events:
            self.control.loop.selector.unregister(self.sock)
            self.events = 0
        self.sock.close()
        self.control.clients.discard(self)

    def _timed_out(self) -> None:
        log.info("control client timed out")
        if self.pending is None:  # still waiting for the request: say why (best effort)
            try:
                self.sock.send(_reply({"ok": False, "error": "timed out"}))
            except OSError:
                pass
        self.close()

    def _on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        elif mask & selectors.EVENT_READ:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(MAX_REQUEST + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.inbuf += data
        end = self.inbuf.find(b"\n", 0, MAX_REQUEST + 1)
        if end >= 0:
            self._answer(self.control.handle(bytes(self.inbuf[:end]), _peer(self.sock)))
        elif len(self.inbuf) > MAX_REQUEST:
            self._answer(_error(f"request longer than {MAX_REQUEST} bytes"))
        elif not data:
            self._answer(_error("incomplete request (no newline)"))

    def _answer(self, reply: Iterator[bytes]) -> None:
        self.pending = reply
        self.inbuf = bytearray()
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self._flush()

    def _flush(self) -> None:
        """Send what is buffered, encoding at most one more piece per call: a long reply
        takes turns with the POP3 sessions."""
        if not self.outbuf:
            piece = next(self.pending, None) if self.pending is not None else None
            if piece is None:
                self.close()
                return
            self.outbuf = piece
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        self.outbuf = self.outbuf[sent:]
        if self.events != selectors.EVENT_WRITE:
            self.events = selectors.EVENT_WRITE
            self.control.loop.selector.modify(self.sock, self.events, self._on_event)


def _reply(reply: dict[str, Any]) -> bytes:
    import json

    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def _error(message: str) -> Iterator[bytes]:
    return iter([_reply({"ok": False, "error": message})])


def _peer(sock: socket.socket) -> str:
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return "unknown peer"
    return f"uid {uid} pid {pid}"


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def bind(path: str) -> socket.socket:
    """A listening socket at ``path``, mode 0660 from the moment the name appears (bound under
    a temporary name, then renamed over the old one). A stale socket of a server that died is
    replaced; a live one, or a file that is not a socket, is left alone."""
    # exist_ok: with processes > 1 the children create it at the same moment
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    if os.path.lexists(path):
        if _identity(path) is None:
            raise OSError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("replacing the stale control socket %s", path)
            else:
                raise OSError(f"another server is answering on {path}")
    temporary = path + "~"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        sock.bind(temporary)
        os.chmod(temporary, 0o660)
        sock.listen(MAX_CLIENTS * 2)
        os.rename(temporary, path)
    except BaseException:
        sock.close()
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    sock.setblocking(False)
    return sock


# -- the client side (pop3sf-admin) ------------------------------------------------------------

MAX_REPLY = 256 * 1024 * 1024


def ask(path: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request; return its status line with the session lines as ``sessions``.
    Raises OSError (FileNotFoundError, ConnectionRefusedError, PermissionError, TimeoutError)
    or ValueError for a reply cut short or not from pop3sf."""
    import json

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(_reply(request))
        except (BrokenPipeError, ConnectionResetError):
            pass  # turned away at once (busy): the reason is already waiting to be read
        data = bytearray()
        while len(data) <= MAX_REPLY:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    *lines, status = [json.loads(line) for line in data.splitlines()] or [None]
    if not isinstance(status, dict) or "ok" not in status:
        raise ValueError("the reply ended early or is not from pop3sf")
    return {**status, "sessions": lines}
