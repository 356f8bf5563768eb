"""Authentication under attack (SPEC §P6, §P7, §P13): no user enumeration by answer or time,
penalties that engage, delay processing, decay and survive a hang-up, in-flight caps, secrets
never logged (in-process and through the real command), plaintext refused outside the allowed
networks, and IPv4-mapped IPv6 clients sharing their IPv4 address's limits.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Raw
from faulty import FaultyAdapter
from pop3sf.adapters import AuthResult, Credentials, MailboxSession, Peer
from pop3sf.adapters.memory import ListAdapter, ListSession

from pop3sf import passwords
from pop3sf.config import settings_from_dict
from pop3sf.listeners import ListeningSocket
from pop3sf.server import Server
from pop3sf.testing import RunningServer, running_server, server_config

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def attempt(port: int, user: bytes, password: bytes, source: str = "127.0.0.1",
            host: str = "127.0.0.1") -> tuple[bytes, float]:
    """One USER/PASS login on a fresh connection: (answer to PASS, seconds PASS took)."""
    c = Raw(socket.create_connection((host, port), timeout=30, source_address=(source, 0)))
    try:
        c.line()
        c.cmd(b"USER " + user)
        start = time.monotonic()
        reply = c.cmd(b"PASS " + password)
        return reply, time.monotonic() - start
    finally:
        c.close()


# -- no enumeration ----------------------------------------------------------------------------

def _compare_unknown_and_wrong(port: int, user: bytes, rounds: int = 7) -> tuple[float, float]:
    wrong: list[float] = []
    unknown: list[float] = []
    for i in range(rounds):  # interleaved, so load on the machine hits both alike
        for who, samples in ((user, wrong), (b"nosuchuser%d" % i, unknown)):
            reply, took = attempt(port, who, b"wrong password %d" % i)
            assert reply == b"-ERR [AUTH] Authentication failed"
            samples.append(took)
    return statistics.median(wrong), statistics.median(unknown)


def test_unknown_user_and_wrong_password_same_answer_and_time() -> None:
    adapter = ListAdapter.from_messages({
        "alice": (passwords.hash_bcrypt(b"right", rounds=10), [MESSAGE]),
        "bob": ("{PLAIN}bobs", [])})
    assert adapter.blocking  # bcrypt runs on the auth pool
    with running_server(adapter=adapter, auth={"penalty_initial": 0}) as srv:
        wrong, unknown = _compare_unknown_and_wrong(srv.port, b"alice")
        assert wrong > 0.01  # the bcrypt check really ran
        assert abs(wrong - unknown) < 0.35 * max(wrong, unknown), (wrong, unknown)


# -- penalties ---------------------------------------------------------------------------------

class RecordingAdapter(ListAdapter):
    """A list adapter that notes when each authentication was actually *processed*."""

    def __init__(self) -> None:
        super().__init__({})
        self.calls: list[tuple[float, str]] = []

    def new_session(self, peer: Peer) -> MailboxSession:
        adapter = self

        class Recording(ListSession):
            def authenticate(self, credentials: Credentials) -> AuthResult:
                adapter.calls.append((time.monotonic(), peer.address))
                return super().authenticate(credentials)

        return Recording(self)


def recording_adapter() -> RecordingAdapter:
    adapter = RecordingAdapter()
    other = ListAdapter.from_messages({"alice": ("{PLAIN}secret", [MESSAGE])})
    adapter.mailboxes = other.mailboxes
    adapter.blocking = False
    return adapter


def test_penalty_engages_doubles_caps_delays_processing_and_decays() -> None:
    adapter = recording_adapter()
    with running_server(adapter=adapter, auth={"penalty_initial": 0.4, "penalty_max": 1.0,
                                               "penalty_decay": 2}) as srv:
        delays = []
        for i in range(4):  # 0 (first failure is answered at once), 0.4, 0.8, 1.0 (capped)
            sent = time.monotonic()
            reply, took = attempt(srv.port, b"alice", b"wrong%d" % i)
            assert reply.startswith(b"-ERR [AUTH]")
            processed = adapter.calls[-1][0]
            delays.append(processed - sent)  # the adapter saw the attempt only after the delay
            assert took >= processed - sent - 0.05
        assert delays[0] < 0.3
        assert 0.3 < delays[1] < 0.9 and 0.7 < delays[2] < 1.4 and 0.9 < delays[3] < 1.6, delays
        # Another address is not delayed by this one's failures.
        reply, took = attempt(srv.port, b"alice", b"secret", source="127.0.0.2")
        assert reply.startswith(b"+OK") and took < 0.3
        # The same wrong password again does not count again.
        before = srv.call(lambda: srv.server.penalties.delay("127.0.0.1"))
        time.sleep(1.1)
        attempt(srv.port, b"alice", b"wrong3")
        after = srv.call(lambda: srv.server.penalties.delay("127.0.0.1"))
        assert after <= before + 0.05
        # Decay: failures are forgotten with time (one per penalty_decay seconds).
        time.sleep(4.2)
        reply, took = attempt(srv.port, b"alice", b"secret")
        assert reply.startswith(b"+OK") and took < 0.9, took


def test_client_that_hangs_up_before_the_verdict_is_still_penalised() -> None:
    """A bcrypt verification on the worker pool outlives the client; its failure still counts
    and delays the next attempt from that address."""
    adapter = ListAdapter.from_messages({
        "alice": (passwords.hash_bcrypt(b"right", rounds=12), [MESSAGE])})
    with running_server(adapter=adapter, auth={"penalty_initial": 1}) as srv:
        for i in range(3):
            c = Raw.connect(srv.port)
            c.line()
            c.cmd(b"USER alice")
            c.send(b"PASS wrong%d\r\n" % i)
            c.close()  # gone before bcrypt answers
        deadline = time.monotonic() + 10
        while not srv.call(lambda: srv.server.penalties.delay("127.0.0.1")):
            assert time.monotonic() < deadline, "hang-ups were never penalised"
            time.sleep(0.05)
        start = time.monotonic()
        reply, _ = attempt(srv.port, b"alice", b"right")
        assert reply.startswith(b"+OK")
        assert time.monotonic() - start > 0.9  # delayed by the recorded failures


def test_authentications_in_flight_are_capped_per_address_and_globally() -> None:
    adapter = FaultyAdapter({"authenticate": "hang:1"})
    with running_server(adapter=adapter, auth={"max_auth_in_flight_per_address": 2,
                                               "max_auth_in_flight": 3,
                                               "penalty_initial": 0}) as srv:
        users = iter(range(100))

        def pending(source: str) -> Raw:
            c = Raw(socket.create_connection(("127.0.0.1", srv.port), timeout=10,
                                             source_address=(source, 0)))
            c.line()
            c.cmd(b"USER u%d" % next(users))
            c.send(b"PASS pw\r\n")
            return c

        first = [pending("127.0.0.1") for _ in range(2)]
        time.sleep(0.2)
        third = pending("127.0.0.1")
        assert third.line().startswith(b"-ERR [SYS/TEMP]")  # per-address cap
        other = pending("127.0.0.2")
        time.sleep(0.2)
        fourth = pending("127.0.0.3")
        assert fourth.line().startswith(b"-ERR [SYS/TEMP]")  # global cap
        for c in [*first, other]:
            assert c.line().startswith(b"+OK"), "an admitted attempt failed"


# -- secrets never logged ----------------------------------------------------------------------

SECRET = "Pw-" + os.urandom(6).hex()


def _secret_forms(user: str = "alice") -> list[str]:
    pw = SECRET.encode()
    return [SECRET, base64.b64encode(pw).decode(),
            base64.b64encode(b"\0" + user.encode() + b"\0" + pw).decode(),
            base64.b64encode(user.encode() + b"\0" + user.encode() + b"\0" + pw).decode()]


def _secret_sessions(port: int) -> None:
    """Every way a password travels: right and wrong, USER/PASS, AUTH PLAIN (initial and
    continuation), AUTH LOGIN, an aborted exchange, an over-long line, bad base64."""
    pw = SECRET.encode()
    plain = base64.b64encode(b"\0alice\0" + pw)
    scripts = [
        [b"USER alice", b"PASS " + pw, b"QUIT"],
        [b"USER alice", b"PASS x" + pw],
        [b"USER nobody", b"PASS " + pw],
        [b"AUTH PLAIN " + plain, b"QUIT"],
        [b"AUTH PLAIN", plain, b"QUIT"],
        [b"AUTH PLAIN " + base64.b64encode(b"\0alice\0x" + pw)],
        [b"AUTH LOGIN", base64.b64encode(b"alice"), base64.b64encode(pw), b"QUIT"],
        [b"AUTH LOGIN " + base64.b64encode(b"alice"), base64.b64encode(b"x" + pw)],
        [b"AUTH PLAIN", b"*"],
        [b"AUTH PLAIN", plain + b"%%"],
        [b"USER alice", b"PASS " + pw + b"x" * 9000],
        [b"PASS " + pw],
        [b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0" + pw)],
    ]
    for script in scripts:
        c = Raw.connect(port)
        c.line()
        for line in script:
            with contextlib.suppress(EOFError, OSError):
                c.cmd(line)
        c.close()


def _scan(text: str) -> None:
    for form in _secret_forms():
        assert form not in text, f"secret form {form!r} leaked into the log"


def test_secrets_never_in_log_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    adapter = ListAdapter.from_messages({"alice": ("{PLAIN}" + SECRET, [MESSAGE])})
    with running_server(adapter=adapter, auth={"penalty_initial": 0}) as srv:
        _secret_sessions(srv.port)
    assert any("login 127.0.0.1 alice" in r.getMessage() for r in caplog.records)  # it logged
    assert any("login failed" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        _scan(record.getMessage())
        _scan(repr(record.args))
        if record.exc_info:
            _scan(logging.Formatter().formatException(record.exc_info))


def test_backend_errors_are_scrubbed_of_the_password(caplog: pytest.LogCaptureFixture) -> None:
    """An adapter whose exception text repeats the password: logged as type and scrubbed text."""
    class Leaky(FaultyAdapter):
        def new_session(self, peer: Peer) -> MailboxSession:
            class Session(MailboxSession):
                def authenticate(self, credentials: Credentials) -> AuthResult:
                    raise RuntimeError(f"backend said: bad login {credentials.password}")

                def list_messages(self) -> Any:
                    return []

                def open_message(self, uid: str) -> Any:
                    raise NotImplementedError

                def delete_messages(self, uids: Any) -> Any:
                    raise NotImplementedError

            return Session()

    caplog.set_level(logging.DEBUG)
    with running_server(adapter=Leaky()) as srv:
        reply, _ = attempt(srv.port, b"alice", SECRET.encode())
        assert reply.startswith(b"-ERR [SYS/TEMP]")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in text and "backend said" in text
    _scan(text)


def test_secrets_never_in_the_real_commands_debug_log(tmp_path: Path) -> None:
    """The real ``pop3sf`` at level debug, logging to stderr: the whole stream is scanned."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "mail").mkdir()
    user = tmp_path / "mail" / "alice"
    user.mkdir()
    (user / ".pop3sf_password_bcrypt").write_text(passwords.hash_bcrypt(SECRET.encode(), 4))
    (user / "1.eml").write_bytes(MESSAGE)
    config = tmp_path / "pop3sf.conf"
    config.write_text(textwrap.dedent(f"""\
        [server]
        user = root
        shutdown_grace = 1
        [logging]
        target = stderr
        level = debug
        [listeners]
            [[pop3]]
            addresses = 127.0.0.1:{port}
        [auth]
        penalty_initial = 0
        [adapter]
        type = directory_multi
        root = {tmp_path / "mail"}
        """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "INVOCATION_ID", "JOURNAL_STREAM")}
    proc = subprocess.Popen([sys.executable, "-m", "pop3sf", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while not any("listening on" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        _secret_sessions(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        reader.join(5)
    log = "".join(lines)
    assert "DEBUG" in log and "login 127.0.0.1 alice" in log and "login failed" in log, log[-2000:]
    _scan(log)


# -- plaintext policy --------------------------------------------------------------------------

def test_plaintext_auth_refused_outside_allowed_networks_and_never_verified() -> None:
    adapter = recording_adapter()
    with running_server(adapter=adapter,
                        auth={"plaintext_auth_networks": ["127.0.0.2/32"]}) as srv:
        refused = [
            [b"USER alice", b"PASS secret"],
            [b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret")],
            [b"AUTH PLAIN"],
            [b"AUTH LOGIN"],
            [b"PASS secret"],
        ]
        for script in refused:
            c = Raw.connect(srv.port)
            c.line()
            answers = [c.cmd(line) for line in script]
            assert all(a.startswith(b"-ERR [AUTH]") for a in answers), (script, answers)
            assert c.cmd(b"AUTH").startswith(b"+OK")
            assert c.multiline() == []  # no mechanism offered here
            c.close()
        assert adapter.calls == []  # the password never reached the adapter
        reply, _ = attempt(srv.port, b"alice", b"secret", source="127.0.0.2")
        assert reply.startswith(b"+OK")
        assert [address for _, address in adapter.calls] == ["127.0.0.2"]


# -- IPv4-mapped IPv6 --------------------------------------------------------------------------

@contextlib.contextmanager
def dual_stack_server(adapter: ListAdapter, **sections: Any) -> Iterator[RunningServer]:
    """A server on one '::' socket with IPV6_V6ONLY off: IPv4 clients arrive as ::ffff:a.b.c.d."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    sock.listen(128)
    sock.setblocking(False)
    settings = settings_from_dict(server_config("list", {}, **sections), "<test>")
    server = Server(settings, adapter)
    server.start([ListeningSocket("pop3", sock, False)])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    running = RunningServer(server, "127.0.0.1", sock.getsockname()[1], None, thread)
    thread.start()
    try:
        yield running
    finally:
        running.stop()


def test_ipv4_mapped_addresses_share_ipv4_limits() -> None:
    adapter = ListAdapter.from_messages({"alice": ("{PLAIN}secret", [MESSAGE])})
    with dual_stack_server(adapter, limits={"max_connections_per_address": 2},
                           auth={"penalty_initial": 1}) as srv:
        held = [Raw.connect(srv.port) for _ in range(2)]
        for c in held:
            assert c.line().startswith(b"+OK")
        peers = srv.call(lambda: sorted(c.address for c in srv.server.connections))
        assert peers == ["127.0.0.1", "127.0.0.1"]  # normalised at accept
        assert srv.call(lambda: list(srv.server.by_group)) == ["127.0.0.1"]
        extra = Raw.connect(srv.port)
        assert extra.line().startswith(b"-ERR [SYS/TEMP]")  # the IPv4 address's cap
        v6 = Raw.connect(srv.port, "::1")  # a different address: its own limits
        assert v6.line().startswith(b"+OK")
        v6.close()
        # Plaintext is allowed (127.0.0.0/8 matches the normalised address) and a failure is
        # penalised under the IPv4 address.
        held[0].cmd(b"USER alice")
        assert held[0].cmd(b"PASS wrong").startswith(b"-ERR [AUTH]")
        assert srv.call(lambda: srv.server.penalties.delay("127.0.0.1")) > 0.5
        assert srv.call(lambda: srv.server.penalties.delay("::ffff:127.0.0.1")) == 0
        held[1].cmd(b"USER alice")
        start = time.monotonic()
        assert held[1].cmd(b"PASS secret").startswith(b"+OK")
        assert time.monotonic() - start > 0.5  # the IPv4 penalty applied to the mapped client
