"""Test kit for adapter authors: a real server on loopback, and one conformance suite for all.

``running_server`` starts pop3sf in a thread of the test process with real sockets (port 0, read
back), so tests talk to it with :mod:`poplib` exactly as mail clients do::

    with running_server("directory_multi", {"root": str(tmp)}) as srv:
        pop = srv.pop3(); pop.user("alice"); pop.pass_("secret")

:class:`AdapterConformance` is a pytest base class: subclass it, provide ``make_source`` (a fresh
data source holding the given messages for one user), and every protocol-level check runs
against your adapter the same way it runs against the bundled ones.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pop3sf.adapters import Adapter

from .config import settings_from_dict
from .connection import Connection, Handler
from .listeners import ListeningSocket, bind_address
from .loop import EventLoop
from .server import Server
from .session import Session
from .wire import wire_bytes


@dataclass
class RunningServer:
    server: Server
    host: str
    port: int
    tls_port: int | None
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def pop3(self, timeout: float = 10.0) -> poplib.POP3:
        return poplib.POP3(self.host, self.port, timeout=timeout)

    def pop3_ssl(self, context: Any, timeout: float = 10.0) -> poplib.POP3_SSL:
        assert self.tls_port is not None, "start the server with tls=... for a TLS listener"
        return poplib.POP3_SSL(self.host, self.tls_port, context=context, timeout=timeout)

    def call(self, func: Any) -> Any:
        """Run ``func()`` on the server's loop thread and return its result (for inspection)."""
        result: list[Any] = []
        done = threading.Event()

        def run() -> None:
            result.append(func())
            done.set()

        self.server.loop.call_soon_threadsafe(run)
        if not done.wait(10):
            raise TimeoutError("server loop did not answer")
        return result[0]

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread.is_alive():
            self.server.request_stop()
            self.thread.join(timeout)
        if self.errors:
            raise self.errors[0]


def server_config(adapter_type: str, adapter_config: Mapping[str, Any],
                  tls: Mapping[str, str] | None = None,
                  **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict: one plain listener (and an implicit-TLS one with ``tls``) on loopback."""
    listeners: dict[str, Any] = {"pop3": {"addresses": ["127.0.0.1:0"]}}
    if tls:
        listeners["pop3s"] = {"addresses": ["127.0.0.1:0"], "tls": True}
    config: dict[str, Any] = {
        "logging": {"target": "stderr", "level": "debug"},
        "listeners": listeners,
        "adapter": {"type": adapter_type, **adapter_config},
        "server": {"shutdown_grace": 2},
    }
    if tls:
        config["tls"] = dict(tls)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


@contextlib.contextmanager
def running_server(adapter_type: str = "list", adapter_config: Mapping[str, Any] | None = None,
                   *, adapter: Adapter | None = None, tls: Mapping[str, str] | None = None,
                   **sections: Mapping[str, Any]) -> Iterator[RunningServer]:
    """A pop3sf server on 127.0.0.1 in a background thread; stopped gracefully on exit.

    ``sections`` override config sections, e.g. ``limits={"idle_timeout": 1}``. ``adapter``
    passes a ready adapter instance (e.g. ``ListAdapter.from_messages(...)``).
    """
    settings = settings_from_dict(server_config(adapter_type, adapter_config or {}, tls,
                                                **sections), "<test>")
    server = Server(settings, adapter)
    listeners = []
    for listener in settings.listeners:
        for host, port in listener.addresses:
            listeners.append(ListeningSocket(listener.name, bind_address(host, port),
                                             listener.tls))
    server.start(listeners)
    ports = {ls.name: ls.address[1] for ls in listeners}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:  # surfaced by stop()
            errors.append(exc)

    thread = threading.Thread(target=run, name="pop3sf-test-server", daemon=True)
    running = RunningServer(server, "127.0.0.1", ports["pop3"], ports.get("pop3s"), thread,
                            errors)
    files_before = open_files()
    thread.start()
    try:
        yield running
    except BaseException:
        running.stop()
        raise
    running.stop()
    assert_released(server, files_before)


def open_files() -> set[str]:
    """This process's descriptors on files and directories (not sockets, pipes or devices)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            found.add(f"{fd} -> {target}")
    return found


def assert_released(server: Server, files_before: set[str], wait: float = 5.0) -> None:
    """After a stopped server: every per-session resource was given back, on whatever path
    the sessions ended — counters, account holds, verification queues, adapter sessions,
    timers (checked by the server as it stops), worker threads and descriptors."""
    assert not server.leaked, f"resources not released: {server.leaked}"
    stuck = server.calls_pending()
    deadline = time.monotonic() + wait
    while True:
        threads = [t for pool in server.pools.values() for t in pool.threads if t.is_alive()]
        files = open_files() - files_before
        if (len(threads) <= stuck and (stuck or not files)) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(threads) <= stuck, f"{len(threads)} worker threads alive, {stuck} calls stuck"
    assert stuck or not files, f"descriptors left open: {sorted(files)}"


# --- the conformance suite -------------------------------------------------------------------

SAMPLE_MESSAGES: tuple[bytes, ...] = (
    b"From: a@example.org\r\nSubject: one\r\n\r\nfirst body\r\n",
    b"From: b@example.org\nSubject: two\n\nline 1\n.starts with a dot\nline 3\n",
    b"Subject: three\r\n\r\n" + (b"x" * 998 + b"\r\n") * 300 + b"last line without newline",
)


class AdapterConformance:
    """Protocol-level checks every adapter must pass. Subclass in a test module and define:

    * ``adapter_type`` and ``make_source(tmp_path, user, password, messages) -> dict`` returning
      the adapter's config section for a fresh source holding ``messages`` (oldest first) for
      ``user`` with ``password``;
    * optionally ``supports_delete = False`` for sources that cannot delete;
    * optionally ``expected_message(raw)`` when the adapter serves ``raw`` rendered into another
      message (a row made into a mail): the message it serves, before line-end normalisation.
    """

    adapter_type = "list"
    supports_delete = True
    user = "conformance"
    password = "s3cret pass"

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        raise NotImplementedError

    @contextlib.contextmanager
    def _server(self, tmp_path: Any,
                messages: Sequence[bytes] = SAMPLE_MESSAGES) -> Iterator[RunningServer]:
        config = self.make_source(tmp_path, self.user, self.password, list(messages))
        with running_server(self.adapter_type, config) as srv:
            yield srv

    def expected_message(self, raw: bytes) -> bytes:
        return raw

    def _login(self, srv: RunningServer) -> poplib.POP3:
        return login_when_free(srv, self.user, self.password)

    def test_conformance_stat_list_sizes_match_retr(self, tmp_path: Any) -> None:
        with self._server(tmp_path) as srv:
            pop = self._login(srv)
            count, total = pop.stat()
            assert count == len(SAMPLE_MESSAGES)
            _, listing, _ = pop.list()
            sizes = [int(line.split()[1]) for line in listing]
            assert sum(sizes) == total
            for i, raw in enumerate(SAMPLE_MESSAGES, 1):
                _, lines, _ = pop.retr(i)
                body = b"".join(line + b"\r\n" for line in lines)  # poplib unstuffs
                assert body == wire_bytes(self.expected_message(raw)), \
                    f"message {i} differs on the wire"
                assert len(body) == sizes[i - 1], f"message {i}: LIST size != RETR octets"
            pop.quit()

    def test_conformance_uidl_stable_and_valid(self, tmp_path: Any) -> None:
        with self._server(tmp_path) as srv:
            pop = self._login(srv)
            first = pop.uidl()[1]
            pop.quit()
            pop = self._login(srv)
            assert pop.uidl()[1] == first
            uids = [line.split()[1] for line in first]
            assert len(set(uids)) == len(uids)
            assert all(1 <= len(u) <= 70 and all(0x21 <= c <= 0x7E for c in u) for u in uids)
            pop.quit()

    def test_conformance_top(self, tmp_path: Any) -> None:
        with self._server(tmp_path) as srv:
            pop = self._login(srv)
            _, lines, _ = pop.top(2, 1)
            assert lines[-1] == b"line 1" and lines[-2] == b""
            pop.quit()

    def test_conformance_wrong_password_and_unknown_user(self, tmp_path: Any) -> None:
        with self._server(tmp_path) as srv:
            for user, password in ((self.user, "wrong"), ("nobody-here", "wrong")):
                pop = srv.pop3()
                pop.user(user)
                try:
                    pop.pass_(password)
                except poplib.error_proto as exc:
                    assert exc.args[0].startswith(b"-ERR [AUTH]")
                else:
                    raise AssertionError("bad credentials were accepted")
                pop.close()

    def test_conformance_dele_quit_commits_and_drop_does_not(self, tmp_path: Any) -> None:
        if not self.supports_delete:
            return
        with self._server(tmp_path) as srv:
            pop = self._login(srv)
            keep = pop.uidl()[1]
            pop.dele(1)
            pop.close()  # dropped without QUIT: nothing deleted
            pop = self._login(srv)
            assert pop.uidl()[1] == keep
            pop.dele(1)
            pop.quit()
            pop = self._login(srv)
            assert pop.uidl()[1] == [b"%d %s" % (i, line.split()[1])
                                     for i, line in enumerate(keep[1:], 1)]
            pop.quit()

    def test_conformance_in_use(self, tmp_path: Any) -> None:
        with self._server(tmp_path) as srv:
            first = self._login(srv)
            second = srv.pop3()
            second.user(self.user)
            try:
                second.pass_(self.password)
            except poplib.error_proto as exc:
                assert exc.args[0].startswith(b"-ERR [IN-USE]")
            else:
                raise AssertionError("a second read-write session was allowed")
            first.quit()


class MemoryConnection(Connection):
    """A connection without a socket, for driving a session in memory: the test feeds the
    client's bytes with :meth:`feed` and reads what the server sent from :attr:`sent`. The
    line scanner, buffers, limits and the session above are the real ones."""

    def __init__(self, server: Server, address: str = "192.0.2.1") -> None:
        super().__init__(server, _NoSocket(), address, 50000, "memory", address, False)  # type: ignore[arg-type]
        self.sent = bytearray()

    def start(self, session: Handler) -> None:
        self.session = session
        session.start()

    def feed(self, data: bytes) -> bytes:
        """The client sends ``data``; return what the server answers to it."""
        assert self.session is not None
        before = len(self.sent)
        if data:
            self.inbuf += data
        else:
            self.eof = True
        self.session.on_input()
        _run_ready(self.server.loop)
        return bytes(self.sent[before:])

    def flush(self) -> None:
        if not self.closed:
            self.sent += self.outbuf
            self.bytes_out += len(self.outbuf)
            self.outbuf.clear()
            if self.close_when_flushed:
                self.close(self.session.close_reason if self.session else "")

    def _set_events(self, events: int) -> None:
        self.events = events

    def close(self, reason: str = "") -> None:
        self.events = 0  # nothing registered with the selector
        super().close(reason)


class _NoSocket:
    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def _run_ready(loop: EventLoop) -> None:
    """Run what the session scheduled on the loop (inline adapters: everything)."""
    loop.run(until=lambda: not (loop._ready or loop._threadsafe))


@contextlib.contextmanager
def session_in_memory(adapter: Adapter, **sections: Mapping[str, Any]
                      ) -> Iterator[MemoryConnection]:
    """A session of a real (not started) server on a :class:`MemoryConnection`; the adapter
    should not block (``blocking = False``), so every call completes inside ``feed``."""
    settings = settings_from_dict(server_config("list", {}, None, **sections), "<test>")
    server = Server(settings, adapter)
    conn = MemoryConnection(server)
    server.connections[conn] = session = Session(server, conn)
    server.sessions_alive += 1
    conn.start(session)
    try:
        yield conn
    finally:
        conn.close("test over")
        _run_ready(server.loop)
        server.loop.close()


def login_when_free(srv: RunningServer, user: str, password: str,
                    wait: float = 5.0) -> poplib.POP3:
    """Log in; a session dropped just before may hold the account a moment longer (its end
    is told to the adapter on a worker thread), so [IN-USE] is retried for ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        pop = srv.pop3()
        pop.user(user)
        try:
            pop.pass_(password)
            return pop
        except poplib.error_proto as exc:
            pop.close()
            if b"[IN-USE]" not in exc.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
