"""Timers, caps, shedding and penalties with short values (docs/protocol.md §7, §14, §15)."""

from __future__ import annotations

import socket
import time

from conftest import Raw
from test_protocol import make_adapter

from pop3sf.testing import running_server
from pop3sf.throttle import Penalties, address_group, normalize_address


def test_authorization_timeout() -> None:
    with running_server(adapter=make_adapter(), limits={"authorization_timeout": 0.5}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        start = time.monotonic()
        c.cmd(b"CAPA")  # activity does not extend the authorization timer
        assert c.closed(5)
        assert 0.3 < time.monotonic() - start < 3


def test_idle_timeout_closes_without_reply_and_commits_nothing() -> None:
    adapter = make_adapter()
    with running_server(adapter=adapter, limits={"idle_timeout": 0.6}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        c.cmd(b"USER alice")
        c.cmd(b"PASS secret")
        c.cmd(b"DELE 1")
        for _ in range(3):  # each complete command resets the idle timer
            time.sleep(0.3)
            assert c.cmd(b"NOOP") == b"+OK"
        assert c.closed(5)
        assert c.buf == b""  # autologout: no reply
        assert len(adapter.mailboxes["alice"].messages) == 3


def test_send_stall_timeout() -> None:
    big = b"Subject: big\r\n\r\n" + b"z" * 20_000_000
    from pop3sf.adapters.memory import ListAdapter

    adapter = ListAdapter.from_messages({"alice": ("{PLAIN}secret", [big])})
    with running_server(adapter=adapter, limits={"send_stall_timeout": 0.5}) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"USER alice\r\nPASS secret\r\nRETR 1\r\n")
        time.sleep(0.3)
        assert srv.call(lambda: len(srv.server.connections)) == 1
        deadline = time.monotonic() + 5
        while srv.call(lambda: len(srv.server.connections)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.call(lambda: len(srv.server.connections)) == 0
        s.close()


def test_per_address_cap() -> None:
    with running_server(adapter=make_adapter(),
                        limits={"max_connections_per_address": 3}) as srv:
        held = [Raw.connect(srv.port) for _ in range(3)]
        for c in held:
            assert c.line().startswith(b"+OK")
        extra = Raw.connect(srv.port)
        assert extra.line().startswith(b"-ERR [SYS/TEMP]")
        assert extra.closed()


def test_global_cap_sheds_oldest_unauthenticated_of_busiest_address() -> None:
    with running_server(adapter=make_adapter(), limits={"max_connections": 3}) as srv:
        logged = Raw.connect(srv.port)
        logged.line()
        logged.cmd(b"USER alice")
        assert logged.cmd(b"PASS secret").startswith(b"+OK")
        oldest = Raw.connect(srv.port)
        oldest.line()
        newer = Raw.connect(srv.port)
        newer.line()
        newcomer = Raw.connect(srv.port)
        assert newcomer.line().startswith(b"+OK")
        assert oldest.line().startswith(b"-ERR [SYS/TEMP]")
        assert oldest.closed()
        assert logged.cmd(b"NOOP") == b"+OK"  # a logged-in session is never shed
        assert newer.cmd(b"CAPA").startswith(b"+OK")


def test_global_cap_refuses_when_nobody_can_be_shed() -> None:
    with running_server(adapter=make_adapter(bob="{PLAIN}pw"),
                        limits={"max_connections": 2}) as srv:
        held = []
        for user, pw in ((b"alice", b"secret"), (b"bob", b"pw")):
            c = Raw.connect(srv.port)
            held.append(c)
            c.line()
            c.cmd(b"USER " + user)
            assert c.cmd(b"PASS " + pw).startswith(b"+OK")
        refused = Raw.connect(srv.port)
        assert refused.line().startswith(b"-ERR [SYS/TEMP]")


def test_per_user_session_cap_counts_read_only() -> None:
    with running_server(adapter=make_adapter(), limits={"max_sessions_per_user": 2}) as srv:
        results, held = [], []
        for _ in range(3):
            c = Raw.connect(srv.port)
            held.append(c)
            c.line()
            c.cmd(b"XPRO")
            c.cmd(b"USER alice")
            results.append(c.cmd(b"PASS secret"))
        assert [r[:3] for r in results] == [b"+OK", b"+OK", b"-ER"]
        assert results[2].startswith(b"-ERR [SYS/TEMP]")


def test_penalty_delays_processing_of_next_attempt() -> None:
    with running_server(adapter=make_adapter(),
                        auth={"penalty_initial": 1, "penalty_max": 2}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        c.cmd(b"USER alice")
        start = time.monotonic()
        assert c.cmd(b"PASS wrong1").startswith(b"-ERR [AUTH]")
        assert time.monotonic() - start < 0.5  # the first failure is answered at once
        c.cmd(b"USER alice")
        start = time.monotonic()
        assert c.cmd(b"PASS secret").startswith(b"+OK")  # right password, still delayed
        assert time.monotonic() - start >= 0.9


def test_penalty_recorded_when_client_leaves_during_verification() -> None:
    from faulty import FaultyAdapter

    adapter = FaultyAdapter({"authenticate": "hang:0.5"})
    with running_server(adapter=adapter, auth={"penalty_initial": 1}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        c.cmd(b"USER u")
        c.send(b"PASS wrong\r\n")
        c.close()  # gone before the failure is known
        time.sleep(0.8)
        assert srv.call(lambda: srv.server.penalties.delay("127.0.0.1")) > 0


def test_penalty_model() -> None:
    p = Penalties(initial=2, maximum=15, decay=60, size=3)
    assert p.delay("a") == 0
    p.record_failure("a", b"u", b"x")
    assert 1.9 < p.delay("a") <= 2
    p.record_failure("a", b"u", b"x")  # the same wrong password again: not counted
    assert p.delay("a") <= 2
    for pw in (b"1", b"2", b"3", b"4", b"5"):
        p.record_failure("a", b"u", pw)
    assert 14 < p.delay("a") <= 15  # capped
    now = time.monotonic()
    assert p.delay("a", now + 600) == 0  # decays
    for key in "bcd":
        p.record_failure(key, b"u", b"x")
    assert p.delay("a") == 0  # LRU-bounded table


def test_address_normalisation() -> None:
    assert normalize_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert normalize_address("fe80::1%eth0") == "fe80::1"
    assert address_group("192.0.2.7", 64) == "192.0.2.7"
    assert address_group("2001:db8:1:2:3::4", 64) == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:2:3::4", 48) == "2001:db8:1::/48"


def test_ipv6_listener_per_address_cap() -> None:
    with running_server(adapter=make_adapter(),
                        listeners={"pop3": {"addresses": ["[::1]:0"]}},
                        limits={"max_connections_per_address": 1}) as srv:
        first = Raw.connect(srv.port, "::1")
        assert first.line().startswith(b"+OK")
        second = Raw.connect(srv.port, "::1")
        assert second.line().startswith(b"-ERR [SYS/TEMP]")
