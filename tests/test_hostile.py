"""Hostile clients against a real server (docs/protocol.md §2, §13, §14, docs/architecture.md §2).

Every test keeps a *witness*: a logged-in session from another loopback address that sends NOOP
every few milliseconds while the attack runs and must keep getting prompt answers. Attacks come
from 127.0.0.1, the witness from 127.0.0.2, so per-address limits hit only the attacker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import Raw
from pop3sf.adapters.memory import ListAdapter
from test_crash_safety import CliServer

from pop3sf.testing import RunningServer, running_server
from pop3sf.wire import CHUNK

SMALL = b"Subject: small\r\n\r\n" + b"0123456789" * 100 + b"\r\n"
BIG = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20_000          # 20 MB
WITNESS_SOURCE = "127.0.0.2"
MAX_LATENCY = 1.0  # generous: the CI machine has two cores and runs other tests beside us


def make_adapter(**extra: list[bytes]) -> ListAdapter:
    boxes = {"witness": ("{PLAIN}pw", [SMALL]), "alice": ("{PLAIN}secret", [SMALL, BIG])}
    for name, messages in extra.items():
        boxes[name] = ("{PLAIN}pw", messages)
    return ListAdapter.from_messages(boxes)


def connect(port: int, source: str = "127.0.0.1") -> Raw:
    return Raw(socket.create_connection(("127.0.0.1", port), timeout=10,
                                        source_address=(source, 0)))


def login(port: int, user: bytes = b"alice", password: bytes = b"secret",
          source: str = "127.0.0.1") -> Raw:
    c = connect(port, source)
    assert c.line().startswith(b"+OK")
    c.cmd(b"USER " + user)
    reply = c.cmd(b"PASS " + password)
    assert reply.startswith(b"+OK"), reply
    return c


class Witness:
    """A logged-in session that keeps asking NOOP; records every round trip."""

    def __init__(self, srv: RunningServer) -> None:
        self.client = login(srv.port, b"witness", b"pw", WITNESS_SOURCE)
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                reply = self.client.cmd(b"NOOP")
            except (OSError, EOFError) as exc:
                self.failures.append(repr(exc))
                return
            self.latencies.append(time.monotonic() - start)
            if reply != b"+OK":
                self.failures.append(repr(reply))
            time.sleep(0.02)

    def check(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.failures, self.failures
        assert self.latencies, "the witness was starved"
        assert max(self.latencies) < MAX_LATENCY, sorted(self.latencies)[-5:]
        assert self.client.cmd(b"QUIT").startswith(b"+OK")


@contextlib.contextmanager
def witnessed(srv: RunningServer) -> Iterator[Witness]:
    w = Witness(srv)
    yield w
    w.check()


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def connection_count(srv: RunningServer) -> int:
    return int(srv.call(lambda: len(srv.server.connections)))


def buffers(srv: RunningServer) -> list[tuple[int, int]]:
    """(output backlog, input buffer) of every connection, read on the loop thread."""
    return list(srv.call(lambda: [(c.backlog(), len(c.inbuf)) for c in srv.server.connections]))


# -- slow and silent ---------------------------------------------------------------------------

def test_slowloris_before_and_after_login() -> None:
    """One byte at a time never completes a command: the authorization timer (total time to
    log in) and the idle timer (reset only by a complete command) still close the connection."""
    with running_server(adapter=make_adapter(), limits={"authorization_timeout": 1.5,
                                                        "idle_timeout": 1.5}) as srv, \
            witnessed(srv):
        before = connect(srv.port)
        before.line()
        after = login(srv.port)
        start = time.monotonic()
        closed: dict[str, float] = {}
        for i in range(40):
            for name, c in (("before", before), ("after", after)):
                if name in closed:
                    continue
                try:
                    c.send(b"NOOP"[i % 4:i % 4 + 1])
                except OSError:
                    closed[name] = time.monotonic() - start
            if len(closed) == 2:
                break
            time.sleep(0.25)
        for name, c in (("before", before), ("after", after)):
            if name not in closed:
                assert c.closed(3), name
                closed[name] = time.monotonic() - start
        assert closed["before"] < 4 and closed["after"] < 4, closed
        wait_for(lambda: connection_count(srv) == 1, what="only the witness left")


def test_silent_clients_plain_tls_and_mid_handshake(tls_files: dict[str, str],
                                                    client_context: ssl.SSLContext) -> None:
    """Silent plain clients, silent implicit-TLS clients, clients that stop half-way through a
    ClientHello, and clients that go quiet right after STLS: all closed by their timers."""
    with running_server(adapter=make_adapter(), tls=tls_files,
                        limits={"authorization_timeout": 1.5, "tls_handshake_timeout": 1,
                                "max_connections_per_address": 200}) as srv, witnessed(srv):
        assert srv.tls_port is not None
        hello = _client_hello(client_context)
        socks = []
        for i in range(30):
            socks.append(socket.create_connection(("127.0.0.1", srv.port)))
            s = socket.create_connection(("127.0.0.1", srv.tls_port))
            if i % 2:
                s.sendall(hello[: 5 + i])  # a record header and part of the hello, then nothing
            socks.append(s)
            stls = socket.create_connection(("127.0.0.1", srv.port))
            stls.sendall(b"STLS\r\n")
            socks.append(stls)
        wait_for(lambda: connection_count(srv) >= 91, what="all connected")
        start = time.monotonic()
        wait_for(lambda: connection_count(srv) == 1, timeout=8, what="timers to close them")
        assert time.monotonic() - start < 5
        for s in socks:
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(65536):
                    pass
            s.close()


def _client_hello(ctx: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- output the client never reads ---------------------------------------------------------------

def test_clients_that_never_read_their_retr_output() -> None:
    """Ten clients ask for a 20 MB message and never read: each one's backlog stays bounded by
    the threshold plus one chunk (docs/protocol.md §13), and their pipelined commands stay in the
    socket."""
    threshold = 65536
    with running_server(adapter=make_adapter(**{f"r{i}": [BIG] for i in range(10)}),
                        protocol={"output_backlog": threshold}) as srv, witnessed(srv):
        readers = []
        for i in range(10):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"USER r%d\r\nPASS pw\r\nRETR 1\r\n" % i + b"RETR 1\r\n" * 5000)
            readers.append(s)
        wait_for(lambda: connection_count(srv) == 11, what="all logged in")
        for _ in range(10):
            time.sleep(0.2)
            for backlog, inbuf in buffers(srv):
                assert backlog <= threshold + 2 * CHUNK + 65536, backlog
                assert inbuf <= 4 * 8192 + 2 * 256 * 1024, inbuf
        total = sum(b for b, _ in buffers(srv))
        assert total < 11 * (threshold + 2 * CHUNK + 65536)
        for s in readers:
            s.close()
        wait_for(lambda: connection_count(srv) == 1, what="readers gone")


def test_ten_thousand_retr_in_one_write() -> None:
    """10,000 pipelined RETRs in one write: all answered in order, memory bounded throughout,
    and the input is not read faster than the output drains."""
    with running_server(adapter=make_adapter()) as srv, witnessed(srv):
        c = login(srv.port)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        burst = b"RETR 1\r\n" * 10_000
        sender = threading.Thread(target=c.send, args=(burst + b"QUIT\r\n",))
        sender.start()
        time.sleep(0.5)  # not reading yet: the server must hold back, not buffer everything
        for backlog, inbuf in buffers(srv):
            assert backlog < 1024 * 1024 and inbuf < 2 * 1024 * 1024, (backlog, inbuf)
        expected = [line for line in SMALL.split(b"\r\n")[:-1]]
        for i in range(10_000):
            assert c.line() == b"+OK Message follows", i
            assert c.multiline() == expected, i
        assert c.line().startswith(b"+OK")
        assert c.closed()
        sender.join(10)


# -- many connections --------------------------------------------------------------------------

def test_thousands_of_connections_from_one_address() -> None:
    """1,000 connections from one address hit the per-address cap; 1,000 more from two other
    addresses fill the global cap, which sheds only unauthenticated connections of the busiest
    address. A logged-in session elsewhere is never touched and the caps hold throughout."""
    per_address, total = 50, 120
    with running_server(adapter=make_adapter(),
                        limits={"max_connections_per_address": per_address,
                                "max_connections": total}) as srv, witnessed(srv):
        held: list[socket.socket] = []
        greetings: dict[str, int] = {"ok": 0, "refused": 0}

        def group_sizes() -> dict[str, int]:
            return {g: len(m) for g, m in srv.server.admission.by_group.items()}

        def attack(sources: list[str], n: int) -> None:
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=10,
                                             source_address=(sources[i % len(sources)], 0))
                greeting = s.recv(200)
                if greeting.startswith(b"-ERR [SYS/TEMP]"):
                    greetings["refused"] += 1
                    s.close()
                else:
                    assert greeting.startswith(b"+OK"), greeting
                    greetings["ok"] += 1
                    held.append(s)
                if i % 50 == 49:
                    groups = srv.call(group_sizes)
                    assert all(n <= per_address for n in groups.values()), groups
                    assert sum(groups.values()) <= total, groups

        attack(["127.0.0.1"], 1000)
        assert greetings == {"ok": per_address, "refused": 1000 - per_address}
        attack(["127.0.0.3", "127.0.0.4"], 1000)
        stats = srv.call(lambda: dict(srv.server.stats))
        assert stats["shed"] > 0 and stats["refused"] >= 1000 - per_address, stats
        groups = srv.call(group_sizes)
        assert groups[WITNESS_SOURCE] == 1 and sum(groups.values()) <= total, groups
        for s in held:
            s.close()
        wait_for(lambda: connection_count(srv) == 1, what="only the witness left")


# -- TLS abuse ---------------------------------------------------------------------------------

GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\xff\xff" + os.urandom(300),        # a record claiming 64 KiB, then junk
    b"\x80\x2e\x01\x00\x02" + os.urandom(44),           # SSLv2-style hello
    b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x00",        # a truncated ClientHello body
    b"\x15\x03\x03\x00\x02\x02\x28",                    # an alert before any hello
    os.urandom(1),
    os.urandom(70_000),
    b"\x00" * 5000,
]


def test_tls_garbage_on_the_implicit_tls_port(tls_files: dict[str, str],
                                               client_context: ssl.SSLContext) -> None:
    """Non-TLS bytes, broken records and hellos, with and without a half-close: each connection
    ends (an alert at most, never POP3 in clear), none is left behind, and real clients get in."""
    with running_server(adapter=make_adapter(), tls=tls_files,
                        limits={"tls_handshake_timeout": 1}) as srv, witnessed(srv):
        port = srv.tls_port
        assert port is not None

        def one(item: tuple[int, bytes]) -> bytes:
            i, junk = item
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            answer = b""
            with contextlib.suppress(OSError):
                s.sendall(junk)
                if i % 2:
                    s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(65536):
                    answer += chunk
            s.close()
            return answer

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, enumerate(GARBAGE * 4)))
        assert not any(b"+OK" in a for a in answers)
        wait_for(lambda: connection_count(srv) == 1, what="garbage connections closed")
        t = client_context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                       server_hostname="localhost")
        t.settimeout(5)
        assert t.recv(100).startswith(b"+OK")
        t.close()


def test_stls_with_plaintext_pipelined_across_reads(tls_files: dict[str, str]) -> None:
    """Commands injected behind STLS that arrive in later reads are fed to the TLS handshake,
    never executed: the maildrop is untouched and nobody logs in (CVE-2021-38542 class)."""
    adapter = make_adapter()
    with running_server(adapter=adapter, tls=tls_files) as srv, witnessed(srv):
        injected = b"USER alice\r\nPASS secret\r\nDELE 1\r\nDELE 2\r\nQUIT\r\n"
        for padding in (0, 1000, 300_000):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.recv(100)
            s.sendall(b"STLS\r\n")
            time.sleep(0.05)  # the STLS answer is out before the rest arrives
            with contextlib.suppress(OSError):
                s.sendall(b"NOOP\r\n" * (padding // 6) + injected)
            data = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    data += chunk
            assert data.startswith(b"+OK Begin TLS negotiation\r\n")
            assert b"Logged in" not in data and b"signing off" not in data
            s.close()
        assert len(adapter.mailboxes["alice"].messages) == 2
        assert srv.call(lambda: srv.server.stats["logins"]) == 1  # the witness only


# -- TLS policy on the real command --------------------------------------------------------------

def _peer_der(port: int) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as t:
        der = t.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def _new_pair(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


def _cli(tmp_path: Path, cert: Path, key: Path) -> CliServer:
    return CliServer(tmp_path, "type = list\nusers = alice:{PLAIN}secret\n",
                     tls={"certificate": str(cert), "private_key": str(key)})


def test_certificate_reload_on_sighup(tmp_path: Path, client_context: ssl.SSLContext) -> None:
    """Replace the certificate files and send SIGHUP: new handshakes (implicit TLS and STLS)
    present the new certificate, an established TLS session goes on; a broken replacement is
    refused and the working certificate kept."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    first = _new_pair(tmp_path, "first")
    second = _new_pair(tmp_path, "second")
    wrong_key = _new_pair(tmp_path, "third")[1]
    shutil.copy(first[0], cert)
    shutil.copy(first[1], key)
    server = _cli(tmp_path, cert, key)
    server.start()
    try:
        assert server.tls_port is not None
        assert _peer_der(server.tls_port) == _der(first[0])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        established = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.tls_port),
                                                               timeout=10))
        kept = Raw(established)
        assert kept.line().startswith(b"+OK")
        kept.cmd(b"USER alice")
        assert kept.cmd(b"PASS secret").startswith(b"+OK")

        for src, dst in ((second[0], cert), (second[1], key)):
            tmp = dst.with_suffix(".new")
            shutil.copy(src, tmp)
            os.replace(tmp, dst)
        mark = len(server.log)
        server.signal(signal.SIGHUP)
        wait_for(lambda: any("configuration reloaded" in line for line in server.log[mark:]),
                 what="the reload")
        assert _peer_der(server.tls_port) == _der(second[0])
        plain = Raw.connect(server.port)
        plain.line()
        assert plain.cmd(b"STLS").startswith(b"+OK")
        stls = ctx.wrap_socket(plain.sock)
        assert stls.getpeercert(binary_form=True) == _der(second[0])
        stls.close()
        assert kept.cmd(b"NOOP") == b"+OK"  # the session from before the reload goes on

        shutil.copy(wrong_key, key)  # a key that does not match: the reload must not apply it
        mark = len(server.log)
        server.signal(signal.SIGHUP)
        wait_for(lambda: any("reload failed" in line for line in server.log[mark:]),
                 what="the refused reload")
        assert _peer_der(server.tls_port) == _der(second[0])
        assert kept.cmd(b"QUIT").startswith(b"+OK")
    finally:
        assert server.stop() == 0


def test_tls_policy_minimum_version_and_no_renegotiation(tmp_path: Path) -> None:
    cert, key = _new_pair(tmp_path, "policy")
    server = _cli(tmp_path, cert, key)
    server.start()
    try:
        port = server.tls_port
        assert port is not None
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.minimum_version = ctx.maximum_version = version
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as t:
                assert t.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
                assert t.recv(100).startswith(b"+OK")
        old = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                              "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
                             input=b"", capture_output=True, timeout=20)
        assert old.returncode != 0 and b"+OK" not in old.stdout
        # Renegotiation (openssl s_client's "R" command) is refused with an alert.
        proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                                 "-tls1_2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert proc.stdin is not None
        time.sleep(0.5)
        for line in (b"CAPA\r\n", b"R\n", b"NOOP\r\n"):
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(line)
                proc.stdin.flush()
            time.sleep(0.4)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(20)
        assert b"+OK Capability list follows" in out
        assert b"RENEGOTIATING" in out and b"no renegotiation" in out, out[-1500:]
        assert out.split(b"RENEGOTIATING")[1].count(b"+OK") == 0  # NOOP never answered
        assert _peer_der(port) == _der(cert)  # the server is fine
    finally:
        assert server.stop() == 0


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_failed_handshakes_leak_no_descriptors_or_memory(tmp_path: Path) -> None:
    """500 failed handshakes of five kinds against the real command: the process's open
    descriptors return to their number before, and its memory does not keep growing."""
    cert, key = _new_pair(tmp_path, "leak")
    server = _cli(tmp_path, cert, key)
    server.config.write_text(server.config.read_text().replace(
        "[adapter]", "[limits]\nmax_connections_per_address = 1000\ntls_handshake_timeout = 2\n"
        "[adapter]"))
    server.start()
    port = server.tls_port
    assert port is not None
    hello = _client_hello(_no_verify())
    wrong_ca = ssl.create_default_context()  # verifies against the system CAs: aborts
    wrong_ca.check_hostname = False
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.maximum_version = ssl.TLSVersion.TLSv1_1

    def fail_once(i: int) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        with contextlib.suppress(OSError, ssl.SSLError):
            kind = i % 5
            if kind == 0:
                s.sendall(os.urandom(64))
                s.recv(100)
            elif kind == 1:
                s.sendall(hello[: len(hello) // 2])  # half a hello, then gone
            elif kind == 2:
                wrong_ca.wrap_socket(s, server_hostname="localhost")
            elif kind == 3:
                with contextlib.suppress(ValueError):
                    old.wrap_socket(s)
            else:
                s.sendall(b"\x16\x03\x01\x00\x10" + b"\x00" * 16)  # a hello that is no hello
                s.recv(100)
        s.close()

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(fail_once, range(50)))  # warm-up: lazily created objects
        time.sleep(0.5)
        fds, rss = _fd_count(server.pid), _rss_kib(server.pid)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(fail_once, range(500)))
        wait_for(lambda: _fd_count(server.pid) <= fds, timeout=10,
                 what=f"descriptors back to {fds} (now {_fd_count(server.pid)})")
        assert _rss_kib(server.pid) - rss < 20 * 1024, (rss, _rss_kib(server.pid))
        assert _peer_der(port) == _der(cert)
        log = server.text()
        assert log.count("TLS handshake with") >= 300, log[-2000:]
        assert "Traceback" not in log
    finally:
        assert server.stop() == 0


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx
