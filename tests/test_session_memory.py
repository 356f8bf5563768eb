"""The session driven in memory, without sockets: the command table's checks, pipelining and
the state machine, each line's answer read straight back (the real-socket suites cover I/O)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import pytest
from pop3sf.adapters import MailboxSession, Peer
from pop3sf.adapters.memory import ListAdapter

from pop3sf.commands import AUTHORIZATION, TABLE, TRANSACTION
from pop3sf.readcache import ENTRY_COST, ReadCache
from pop3sf.testing import MemoryConnection, session_in_memory

MESSAGES = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\nsecond\r\n.dot\r\n"]


@pytest.fixture
def adapter() -> ListAdapter:
    return ListAdapter.from_messages({"u": ("{PLAIN}pw", list(MESSAGES))})


@pytest.fixture
def conn(adapter: ListAdapter) -> Iterator[MemoryConnection]:
    with session_in_memory(adapter, auth={"plaintext_auth_networks": ["0.0.0.0/0"]}) as c:
        assert bytes(c.sent) == b"+OK pop3sf ready\r\n"
        yield c


def log_in(conn: MemoryConnection) -> None:
    assert conn.feed(b"USER u\r\n").startswith(b"+OK")
    assert conn.feed(b"PASS pw\r\n").startswith(b"+OK Logged in, 2 messages")


@pytest.mark.parametrize("state", [AUTHORIZATION, TRANSACTION])
def test_every_command_outside_its_states_is_refused_without_running(
        conn: MemoryConnection, state: int) -> None:
    if state == TRANSACTION:
        log_in(conn)
    for command in TABLE:
        if state not in command.states:
            assert conn.feed(command.verb + b"\r\n") == b"-ERR Command not valid in this state\r\n"
    assert conn.feed(b"XYZZY\r\n") == b"-ERR Unknown command\r\n"
    assert not conn.closed


def test_argument_counts_come_from_the_table(conn: MemoryConnection) -> None:
    log_in(conn)
    for command in TABLE:
        if TRANSACTION in command.states and command.max_args is not None:
            line = command.verb + b" 1" * (command.max_args + 1) + b"\r\n"
            assert conn.feed(line) == b"-ERR Syntax error in arguments\r\n", line
    assert conn.feed(b"TOP 1 x\r\n") == b"-ERR Syntax error in arguments\r\n"
    assert conn.feed(b"RETR 3\r\n") == b"-ERR No such message\r\n"


def test_read_only_refuses_what_writes_before_looking_at_arguments(
        conn: MemoryConnection) -> None:
    assert conn.feed(b"XPRO\r\n") == b"+OK Read-only mode\r\n"
    log_in_reply = conn.feed(b"USER u\r\nPASS pw\r\n")
    assert log_in_reply.endswith(b"+OK Logged in (read-only), 2 messages (53 octets)\r\n")
    for command in TABLE:
        if command.writes:
            assert conn.feed(command.verb + b" junk junk\r\n").startswith(
                b"-ERR [X-POP3SF-READ-ONLY]")


def test_plaintext_refused_where_the_table_says(adapter: ListAdapter) -> None:
    with session_in_memory(adapter, auth={"plaintext_auth_networks": []}) as conn:
        for command in TABLE:
            if command.plaintext:
                assert conn.feed(command.verb + b" x\r\n").startswith(b"-ERR [AUTH] Plaintext")
        capa = conn.feed(b"CAPA\r\n")
        assert b"\r\nUSER\r\n" not in capa and b"SASL" not in capa
        assert conn.feed(b"AUTH\r\n") == b"+OK Supported mechanisms follow\r\n.\r\n"


def test_pipelined_answers_stay_in_order_and_deletion_clears_remembered_ones(
        conn: MemoryConnection) -> None:
    log_in(conn)
    burst = b"LIST 1\r\nUIDL 2\r\nSTAT\r\n" * 3
    first = conn.feed(burst)
    total = sum(map(len, MESSAGES))
    lines = first.split(b"\r\n")
    assert len(lines) == 10 and lines[-1] == b""
    for i in range(3):
        assert lines[3 * i] == f"+OK 1 {len(MESSAGES[0])}".encode()
        assert lines[3 * i + 1].startswith(b"+OK 2 ") and lines[3 * i + 1] == lines[1]
        assert lines[3 * i + 2] == f"+OK 2 {total}".encode()
    assert conn.feed(burst) == first  # the second burst is answered from memory, identically
    assert conn.feed(b"DELE 1\r\n") == b"+OK Message 1 deleted\r\n"
    after = conn.feed(b"LIST 1\r\nUIDL 2\r\nSTAT\r\n")
    assert after == (b"-ERR Message already deleted\r\n" + lines[1] + b"\r\n"
                     + f"+OK 1 {len(MESSAGES[1])}\r\n".encode())


def test_retrieval_and_quit_commit(conn: MemoryConnection, adapter: ListAdapter) -> None:
    log_in(conn)
    out = conn.feed(b"RETR 2\r\nTOP 1 0\r\nDELE 1\r\nQUIT\r\n")
    assert out == (b"+OK Message follows\r\n" + MESSAGES[1].replace(b"\r\n.", b"\r\n..")
                   + b".\r\n+OK Message follows\r\nSubject: one\r\n\r\n.\r\n"
                   + b"+OK Message 1 deleted\r\n+OK pop3sf signing off (1 message left)\r\n")
    assert conn.closed
    assert len(adapter.mailboxes["u"].messages) == 1


def test_a_dropped_session_deletes_nothing(conn: MemoryConnection,
                                           adapter: ListAdapter) -> None:
    log_in(conn)
    conn.feed(b"DELE 1\r\nDELE 2\r\n")
    conn.feed(b"")  # EOF without QUIT
    assert conn.closed
    assert len(adapter.mailboxes["u"].messages) == 2


def test_bad_commands_and_long_lines_count_to_the_limit(adapter: ListAdapter) -> None:
    with session_in_memory(adapter, limits={"max_bad_commands": 3},
                           protocol={"max_line_length": 255}) as conn:
        assert conn.feed(b"X" * 300 + b"\r\n") == b"-ERR Line too long\r\n"
        assert conn.feed(b"BOGUS\r\n") == b"-ERR Unknown command\r\n"
        assert conn.feed(b"STAT\r\n") == (b"-ERR Command not valid in this state\r\n"
                                          b"-ERR Too many bad commands, closing connection\r\n")
        assert conn.closed


# -- the TOP cache -------------------------------------------------------------------------------

@pytest.fixture
def opened(adapter: ListAdapter, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The uids the adapter's sessions opened, in order."""
    seen: list[str] = []
    make = adapter.new_session

    def new_session(peer: Peer) -> MailboxSession:
        session = make(peer)
        read = session.open_message

        def open_message(uid: str) -> BinaryIO:
            seen.append(uid)
            return read(uid)

        monkeypatch.setattr(session, "open_message", open_message)
        return session

    monkeypatch.setattr(adapter, "new_session", new_session)
    return seen


def test_a_repeated_top_is_answered_without_reading_when_messages_are_immutable(
        adapter: ListAdapter, conn: MemoryConnection, opened: list[str]) -> None:
    adapter.immutable_messages = True
    log_in(conn)
    first = conn.feed(b"TOP 2 0\r\n")
    assert first == b"+OK Message follows\r\nSubject: two\r\n\r\n.\r\n"
    assert conn.feed(b"TOP 2 0\r\nLIST 2\r\nTOP 2 0\r\n") == \
        first + b"+OK 2 30\r\n" + first
    assert len(opened) == 1
    conn.feed(b"TOP 2 1\r\nRETR 2\r\nRETR 2\r\n")  # another line count; RETR always reads
    assert len(opened) == 4


def test_top_reads_every_time_when_messages_may_change(
        conn: MemoryConnection, opened: list[str]) -> None:
    log_in(conn)
    assert conn.feed(b"TOP 1 0\r\n") == conn.feed(b"TOP 1 0\r\n")
    assert len(opened) == 2


def test_the_read_cache_stays_within_its_limit_dropping_the_least_recent() -> None:
    cache = ReadCache(limit=64 * (100 + ENTRY_COST))
    for i in range(1000):
        cache.put(i, bytes(100))
        cache.get(0)  # kept: always the most recently used
        assert cache.size <= cache.limit
    assert cache.get(0) is not None and cache.get(1) is None and cache.get(999) is not None
    cache.put("big", bytes(cache.limit))  # bigger than a 64th of the limit: not kept
    assert cache.get("big") is None
