"""Authentication under attack (docs/protocol.md §7, §18): no user enumeration by answer or time,
penalties that engage, delay processing, decay and survive a hang-up, in-flight caps, secrets
never logged (in-process and through the real command), plaintext refused outside the allowed
networks, and IPv4-mapped IPv6 clients sharing their IPv4 address's limits.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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


@contextlib.contextmanager
def real_daemon(base: Path, user: str, config: str,
                level: str = "info") -> Iterator[tuple[int, list[str]]]:
    """The real ``pop3sf`` command in the foreground as ``user``, logging to stderr, on a port
    the kernel picks: yields (port, stderr lines so far). ``config`` is appended."""
    path = base / "pop3sf.conf"
    path.write_text(textwrap.dedent(f"""\
        [server]
        user = {user}
        shutdown_grace = 1
        [listeners]
            [[pop3]]
            addresses = 127.0.0.1:0
        [logging]
        target = stderr
        level = {level}
        """) + config)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "INVOCATION_ID", "JOURNAL_STREAM")}
    proc = subprocess.Popen([sys.executable, "-m", "pop3sf", "--config", str(path)],
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
        port = int(next(ln for ln in lines if "listening on" in ln).split(":")[-1])
        c = Raw.connect(port)
        assert c.line().startswith(b"+OK"), "".join(lines)  # started, privileges dropped
        c.close()
        yield port, lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        reader.join(5)


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
        cheap, unknown = _compare_unknown_and_wrong(srv.port, b"bob")  # padded to bcrypt
        assert 0.5 < cheap / unknown < 2.0, (cheap, unknown)


# -- account probing: broken, unknown and wrong-password accounts look alike -------------------
#
# The real daemon runs as ``nobody`` (root reads every file, so an unreadable password file needs
# another user), serving a world-readable tree outside pytest's 0700 tmp_path.

PROBE_ROUNDS = 15
#: What the daemon answers every failed login, whatever the cause.
ERR_AUTH = b"-ERR [AUTH] Authentication failed"


@pytest.fixture
def world_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pop3sf-probe-"))
    os.chmod(d, 0o755)
    yield d
    for sub in d.rglob("*"):
        if sub.is_dir() and not sub.is_symlink():
            sub.chmod(0o755)
    shutil.rmtree(d, ignore_errors=True)


def _fresh_sources() -> Iterator[str]:
    """A new loopback address for every attempt: no attempt is delayed by an earlier one's
    penalty, so what is timed is the verification alone."""
    for i in range(60000):
        yield f"127.{20 + i // 62500}.{i // 250 % 250}.{1 + i % 250}"


def _probe(port: int, cases: dict[str, tuple[bytes, bytes]]) -> dict[str, float]:
    """Median seconds PASS took per case, interleaved round by round (load hits all alike, in
    a different order each round); every answer must be the same bytes."""
    sources = _fresh_sources()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for i in range(PROBE_ROUNDS):
        order = order[1:] + order[:1]
        for name in order:
            user, password = cases[name]
            reply, took = attempt(port, user, password + b"%d" % i, source=next(sources))
            assert reply == ERR_AUTH, (name, reply)
            samples[name].append(took)
    return {name: statistics.median(times) for name, times in samples.items()}


def _penalised_alike(port: int, cases: dict[str, tuple[bytes, bytes]], delay: float) -> None:
    """Each case from its own address, twice: every second attempt waits out the penalty the
    first one earned (a broken account's failure counts like any other)."""
    took: dict[str, float] = {}

    def twice(name: str, source: str) -> None:
        user, password = cases[name]
        assert attempt(port, user, password + b"a", source=source)[0] == ERR_AUTH
        reply, took[name] = attempt(port, user, password + b"b", source=source)
        assert reply == ERR_AUTH, (name, reply)

    threads = [threading.Thread(target=twice, args=(name, f"127.19.0.{i + 1}"))
               for i, name in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(took) == set(cases)
    assert all(t > delay * 0.9 for t in took.values()), took


def _assert_alike(medians: dict[str, float], reference: str = "unknown user") -> None:
    ref = medians[reference]
    assert ref > 0.01, medians  # the dummy verification really ran
    for name, median in medians.items():
        assert 0.5 < median / ref < 2.0 and abs(median - ref) < 0.5 * ref, (name, medians)


def _logged(lines: list[str], account: str, cause: str) -> bool:
    return any(account in line and cause in line and ("WARNING" in line or "ERROR" in line)
               for line in lines)


def _unreadable(path: Path) -> None:
    """Unreadable for the daemon: root-owned 0600/0700 (it runs as nobody), or 000 when the
    tests don't run as root (the daemon then stays this user)."""
    path.chmod((0o700 if path.is_dir() else 0o600) if os.geteuid() == 0 else 0)


PROBE_DAEMON = "[auth]\npenalty_initial = 0.5\npenalty_max = 1\n"


def test_directory_multi_broken_accounts_look_like_unknown_ones(world_dir: Path) -> None:
    root = world_dir / "mail"
    root.mkdir(mode=0o755)

    def user(name: str, stored: bytes | str) -> Path:
        d = root / name
        d.mkdir(mode=0o755)
        f = d / ".pop3sf_password_bcrypt"
        f.write_bytes(stored.encode() if isinstance(stored, str) else stored)
        f.chmod(0o644)
        return d

    for name in ("alice", "bob", "carol"):
        user(name, passwords.hash_bcrypt(b"right", rounds=9))
    user("plain", "{PLAIN}right")
    user("garbled", b"\x00\xff\xfe not a hash \x80\x81\n")
    _unreadable(user("nopwread", passwords.hash_bcrypt(b"right", rounds=9)) /
                ".pop3sf_password_bcrypt")
    _unreadable(user("nodirread", passwords.hash_bcrypt(b"right", rounds=9)))
    cases = {"unknown user": (b"nosuchuser", b"right"), "wrong password": (b"alice", b"wrong"),
             "{PLAIN} user": (b"plain", b"wrong"), "garbled password file": (b"garbled", b"x"),
             "unreadable password file": (b"nopwread", b"right"),
             "unreadable user directory": (b"nodirread", b"right")}
    with real_daemon(world_dir, "nobody", PROBE_DAEMON +
                     f"[adapter]\ntype = directory_multi\nroot = {root}\nbcrypt_rounds = 9\n") \
            as (port, lines):
        medians = _probe(port, cases)
        _penalised_alike(port, cases, 0.5)
        assert attempt(port, b"alice", b"right", source="127.18.0.1")[0].startswith(b"+OK")
    _assert_alike(medians)
    for account, cause in (("nopwread", "Permission denied"), ("nodirread", "Permission denied"),
                           ("garbled", "unknown scheme")):
        assert _logged(lines, account, cause), (account, "".join(lines)[-3000:])


@pytest.mark.skipif(not passwords.crypt_available(), reason="no libcrypt")
def test_maildir_accounts_of_any_scheme_look_like_unknown_ones(world_dir: Path) -> None:
    slow = "{SHA512-CRYPT}" + str(passwords.crypt(b"right", "$6$rounds=100000$saltsalt"))
    lines_ = [f"{name}@example.org:{slow}::::{world_dir}/{name}::" for name in ("a", "b", "c")]
    lines_ += [f"plain@example.org:{{PLAIN}}right::::{world_dir}/plain::",
               f"ssha@example.org:{passwords.hash_salted('SSHA512', b'right', b'salt')}::::"
               f"{world_dir}/ssha::",
               f"md4@example.org:{{MD4}}0123456789abcdef::::{world_dir}/md4::"]
    passwd = world_dir / "passwd"
    passwd.write_text("\n".join(lines_) + "\n")
    passwd.chmod(0o644)
    cases = {"unknown user": (b"nobody@example.org", b"right"),
             "wrong password": (b"a@example.org", b"wrong"),
             "{PLAIN} user": (b"plain@example.org", b"wrong"),
             "{SSHA512} user": (b"ssha@example.org", b"wrong"),
             "unknown scheme": (b"md4@example.org", b"wrong")}
    with real_daemon(world_dir, "nobody", PROBE_DAEMON +
                     f"[adapter]\ntype = maildir\npasswd_file = {passwd}\n") as (port, lines):
        medians = _probe(port, cases)
        _penalised_alike(port, cases, 0.5)
    _assert_alike(medians)
    assert _logged(lines, "md4@example.org", "unknown scheme"), "".join(lines)[-3000:]


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
    (tmp_path / "mail").mkdir()
    user = tmp_path / "mail" / "alice"
    user.mkdir()
    (user / ".pop3sf_password_bcrypt").write_text(passwords.hash_bcrypt(SECRET.encode(), 4))
    (user / "1.eml").write_bytes(MESSAGE)
    with real_daemon(tmp_path, "root", "[auth]\npenalty_initial = 0\n[adapter]\n"
                     f"type = directory_multi\nroot = {tmp_path / 'mail'}\n", level="debug") \
            as (port, lines):
        _secret_sessions(port)
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
        assert srv.call(lambda: list(srv.server.admission.by_group)) == ["127.0.0.1"]
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
