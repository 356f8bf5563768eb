"""Adapters that raise, hang or return garbage (docs/protocol.md §16, docs/architecture.md §2)."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import Raw
from faulty import FaultyAdapter
from pop3sf.adapters import MaildropInUse, MessageGone, PermanentFailure, TemporaryFailure

from pop3sf.testing import running_server


def login(port: int, user: bytes = b"u") -> tuple[Raw, bytes]:
    c = Raw.connect(port)
    c.line()
    c.cmd(b"USER " + user)
    return c, c.cmd(b"PASS pw")


LOGIN_FAULTS = [
    (TemporaryFailure("db down"), b"-ERR [SYS/TEMP]"),
    (PermanentFailure("broken"), b"-ERR [SYS/PERM]"),
    (RuntimeError("bug"), b"-ERR [SYS/TEMP]"),
    ("garbage", b"-ERR [SYS/TEMP]"),
]


@pytest.mark.parametrize("hook, fault, expected", [
    (hook, fault, expected) for hook in ("authenticate", "login_succeeded", "list_messages")
    for fault, expected in LOGIN_FAULTS
    if not (hook == "login_succeeded" and fault == "garbage")  # it returns nothing
])
def test_login_hooks_fail(hook: str, fault: object, expected: bytes,
                          caplog: pytest.LogCaptureFixture) -> None:
    adapter = FaultyAdapter({hook: fault})
    with running_server(adapter=adapter) as srv:
        _c, reply = login(srv.port)
        assert reply.startswith(expected), reply
        # The server is still up and the account lock was released.
        adapter.faults.clear()
        _c2, reply2 = login(srv.port)
        assert reply2.startswith(b"+OK")
    if isinstance(fault, RuntimeError):
        assert "RuntimeError" in caplog.text and "bug" in caplog.text
        # Authentication errors are logged as type and scrubbed message (docs/protocol.md §18), the
        # others with their traceback.
        assert ("Traceback" in caplog.text) == (hook != "authenticate")


def test_in_use_from_adapter_lock() -> None:
    adapter = FaultyAdapter({"login_succeeded": MaildropInUse("other host")})
    with running_server(adapter=adapter) as srv:
        c, reply = login(srv.port)
        assert reply.startswith(b"-ERR [IN-USE]")
        assert c.closed()
        assert srv.call(lambda: dict(srv.server.accounts.locks)) == {}


@pytest.mark.parametrize("fault, expected", [
    (MessageGone("1"), b"-ERR Message no longer exists"),
    (TemporaryFailure("x"), b"-ERR [SYS/TEMP]"),
    (PermanentFailure("x"), b"-ERR [SYS/PERM]"),
    (OSError("disk"), b"-ERR [SYS/TEMP]"),
    ("garbage", b"-ERR [SYS/TEMP]"),
])
def test_open_message_fails(fault: object, expected: bytes) -> None:
    with running_server(adapter=FaultyAdapter({"open_message": fault})) as srv:
        c, reply = login(srv.port)
        assert reply.startswith(b"+OK")
        assert c.cmd(b"RETR 1").startswith(expected)
        assert c.cmd(b"TOP 1 0").startswith(expected)
        assert c.cmd(b"STAT").startswith(b"+OK 2 ")  # the session goes on


@pytest.mark.parametrize("fault", [TemporaryFailure("db"), RuntimeError("bug"), "garbage"])
def test_delete_failure_answers_err(fault: object) -> None:
    adapter = FaultyAdapter({"delete_messages": fault})
    with running_server(adapter=adapter) as srv:
        c, _ = login(srv.port)
        c.cmd(b"DELE 1")
        assert c.cmd(b"QUIT").startswith(b"-ERR")
        assert c.closed()


def test_connection_closed_always_called_and_failure_harmless() -> None:
    adapter = FaultyAdapter({"connection_closed": RuntimeError("close bug")})
    with running_server(adapter=adapter) as srv:
        for _ in range(3):
            c, _ = login(srv.port)
            c.close()
        c, _ = login(srv.port)
        assert c.cmd(b"QUIT").startswith(b"+OK")
        assert c.closed()
        deadline = time.monotonic() + 5
        while adapter.closed < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert adapter.closed == 4
        _c, reply = login(srv.port)
        assert reply.startswith(b"+OK")


def test_hanging_call_times_out_and_stuck_calls_refuse_logins() -> None:
    adapter = FaultyAdapter({"open_message": "hang:3"})
    with running_server(adapter=adapter, workers={"call_timeout": 0.5, "max_stuck_calls": 2}
                        ) as srv:
        clients = []
        for _ in range(2):
            c, reply = login(srv.port, b"u%d" % len(clients))
            assert reply.startswith(b"+OK")
            c.send(b"RETR 1\r\n")
            clients.append(c)
        for c in clients:
            assert c.line().startswith(b"-ERR [SYS/TEMP]")
            assert c.closed()
        assert srv.call(lambda: srv.server.pools["mail"].stuck) == 2
        _c, reply = login(srv.port, b"new")
        assert reply.startswith(b"-ERR [SYS/TEMP]")
        time.sleep(3)  # the stuck calls return; logins work again
        assert srv.call(lambda: srv.server.pools["mail"].stuck) == 0
        _c, reply = login(srv.port, b"new")
        assert reply.startswith(b"+OK")


def test_slow_adapter_call_does_not_delay_other_sessions() -> None:
    adapter = FaultyAdapter({"open_message": "hang:2"})
    with running_server(adapter=adapter) as srv:
        slow, _ = login(srv.port, b"slow")
        fast, _ = login(srv.port, b"fast")
        slow.send(b"RETR 1\r\n")
        time.sleep(0.1)
        start = time.monotonic()
        for _ in range(20):
            assert fast.cmd(b"NOOP") == b"+OK"
        assert time.monotonic() - start < 0.5
        assert slow.line().startswith(b"+OK")


def test_retrieval_continues_while_other_sessions_work() -> None:
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20000
    from pop3sf.adapters.memory import ListAdapter

    adapter = ListAdapter.from_messages({"a": ("{PLAIN}pw", [big]), "b": ("{PLAIN}pw", [big])})
    with running_server(adapter=adapter) as srv:
        reader, _ = login(srv.port, b"a")
        reader.send(b"RETR 1\r\n")  # 20 MB, never read: output backpressure holds it
        other, _ = login(srv.port, b"b")
        for _ in range(10):
            assert other.cmd(b"STAT").startswith(b"+OK 1 ")
        backlog = srv.call(lambda: max(c.backlog() for c in srv.server.connections))
        assert backlog < 2 * 1024 * 1024  # bounded, not the whole message
        got = threading.Event()

        def drain() -> None:
            assert reader.line().startswith(b"+OK")
            assert len(reader.multiline()) == 20002
            got.set()

        t = threading.Thread(target=drain)
        t.start()
        t.join(30)
        assert got.is_set()
