"""POP3 over real loopback sockets: every command in every state (RFC 1939, docs/protocol.md)."""

from __future__ import annotations

import base64
import poplib
import time
from collections.abc import Iterator

import pytest
from conftest import Raw
from pop3sf.adapters.memory import ListAdapter

from pop3sf.testing import RunningServer, running_server
from pop3sf.wire import wire_bytes

MESSAGES = [
    b"From: a@example.org\r\nSubject: one\r\n\r\nhello\r\n",
    b"Subject: two\n\n.leading dot\nbare LF\rbare CR\n..two dots\nno final newline",
    b"Subject: three\r\n\r\nl1\r\nl2\r\nl3\r\n",
]


def make_adapter(messages: list[bytes] | None = None, **users: str) -> ListAdapter:
    boxes = {"alice": ("{PLAIN}secret", list(MESSAGES if messages is None else messages))}
    for name, secret in users.items():
        boxes[name] = (secret, [])
    return ListAdapter.from_messages(boxes)


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    with running_server(adapter=make_adapter()) as s:
        yield s


def login(srv: RunningServer, user: bytes = b"alice", password: bytes = b"secret") -> Raw:
    c = Raw.connect(srv.port)
    assert c.line().startswith(b"+OK")
    assert c.cmd(b"USER " + user).startswith(b"+OK")
    reply = c.cmd(b"PASS " + password)
    assert reply.startswith(b"+OK"), reply
    return c


def test_greeting_has_no_apop_timestamp(srv: RunningServer) -> None:
    c = Raw.connect(srv.port)
    greeting = c.line()
    assert greeting.startswith(b"+OK") and b"<" not in greeting


def test_capa_same_before_and_after_login(srv: RunningServer) -> None:
    c = Raw.connect(srv.port)
    c.line()
    assert c.cmd(b"CAPA").startswith(b"+OK")
    before = c.multiline()
    for tag in (b"TOP", b"UIDL", b"USER", b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE",
                b"SASL PLAIN LOGIN", b"UTF8 USER", b"LANG", b"IMPLEMENTATION pop3sf",
                b"X-POP3SF-READ-ONLY"):
        assert tag in before
    assert b"STLS" not in before  # no certificate configured
    assert not any(t.startswith((b"EXPIRE", b"LOGIN-DELAY", b"APOP")) for t in before)
    c.cmd(b"USER alice")
    c.cmd(b"PASS secret")
    assert c.cmd(b"CAPA").startswith(b"+OK")
    assert c.multiline() == before


def test_full_transaction_and_exact_sizes(srv: RunningServer) -> None:
    c = login(srv)
    total = sum(len(wire_bytes(m)) for m in MESSAGES)
    assert c.cmd(b"STAT") == b"+OK 3 %d" % total
    assert c.cmd(b"LIST").startswith(b"+OK")
    assert c.multiline() == [b"%d %d" % (i, len(wire_bytes(m))) for i, m in enumerate(MESSAGES, 1)]
    assert c.cmd(b"LIST 2") == b"+OK 2 %d" % len(wire_bytes(MESSAGES[1]))
    assert c.cmd(b"RETR 2").startswith(b"+OK")
    assert c.multiline() == [b"Subject: two", b"", b"..leading dot", b"bare LF", b"bare CR",
                             b"...two dots", b"no final newline"]
    assert c.cmd(b"UIDL").startswith(b"+OK")
    uids = c.multiline()
    assert len(uids) == 3
    assert c.cmd(b"UIDL 3") == b"+OK " + uids[2]
    assert c.cmd(b"NOOP") == b"+OK"


def test_top(srv: RunningServer) -> None:
    c = login(srv)
    assert c.cmd(b"TOP 3 0").startswith(b"+OK")
    assert c.multiline() == [b"Subject: three", b""]
    assert c.cmd(b"TOP 3 2").startswith(b"+OK")
    assert c.multiline() == [b"Subject: three", b"", b"l1", b"l2"]
    assert c.cmd(b"TOP 3 99").startswith(b"+OK")
    assert c.multiline() == [b"Subject: three", b"", b"l1", b"l2", b"l3"]
    assert c.cmd(b"TOP 3").startswith(b"-ERR")
    assert c.cmd(b"TOP 3 -1").startswith(b"-ERR")


def test_top_message_without_blank_line_is_all_header() -> None:
    with running_server(adapter=make_adapter([b"Subject: x\r\nX-A: 1"])) as srv:
        c = login(srv)
        assert c.cmd(b"TOP 1 0").startswith(b"+OK")
        assert c.multiline() == [b"Subject: x", b"X-A: 1"]


def test_dele_rset_and_marked_messages(srv: RunningServer) -> None:
    c = login(srv)
    size1 = len(wire_bytes(MESSAGES[0]))
    total = sum(len(wire_bytes(m)) for m in MESSAGES)
    assert c.cmd(b"DELE 1").startswith(b"+OK")
    assert c.cmd(b"DELE 1").startswith(b"-ERR")
    assert c.cmd(b"STAT") == b"+OK 2 %d" % (total - size1)
    assert c.cmd(b"LIST 1").startswith(b"-ERR")
    assert c.cmd(b"RETR 1").startswith(b"-ERR")
    assert c.cmd(b"TOP 1 0").startswith(b"-ERR")
    assert c.cmd(b"UIDL 1").startswith(b"-ERR")
    assert c.cmd(b"LIST").startswith(b"+OK")
    assert [line.split()[0] for line in c.multiline()] == [b"2", b"3"]
    assert c.cmd(b"RSET").startswith(b"+OK")
    assert c.cmd(b"STAT") == b"+OK 3 %d" % total


def test_quit_commits_and_drop_does_not(srv: RunningServer) -> None:
    c = login(srv)
    c.cmd(b"DELE 2")
    c.close()  # dropped: nothing deleted
    c = login(srv)
    assert c.cmd(b"STAT").startswith(b"+OK 3 ")
    c.cmd(b"DELE 2")
    assert c.cmd(b"QUIT").startswith(b"+OK")
    assert c.closed()
    c = login(srv)
    assert c.cmd(b"STAT").startswith(b"+OK 2 ")


@pytest.mark.parametrize("command", [
    b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL",
])
def test_transaction_commands_refused_before_login(srv: RunningServer, command: bytes) -> None:
    c = Raw.connect(srv.port)
    c.line()
    assert c.cmd(command) == b"-ERR Command not valid in this state"


@pytest.mark.parametrize("command", [
    b"USER alice", b"PASS x", b"AUTH PLAIN", b"STLS", b"UTF8", b"XPRO", b"APOP alice abc",
])
def test_authorization_commands_refused_after_login(srv: RunningServer, command: bytes) -> None:
    c = login(srv)
    assert c.cmd(command).startswith(b"-ERR")
    assert c.cmd(b"NOOP") == b"+OK"


@pytest.mark.parametrize("command", [
    b"RETR", b"RETR zqxj", b"RETR 0", b"RETR 4", b"RETR 1 2", b"LIST 99", b"DELE", b"STAT 1",
    b"NOOP zqxj", b"TOP 1 zqxj", b"UIDL 0", b"LIST 99999999999", b"RSET 1", b"ZQXJ 1",
])
def test_bad_arguments(srv: RunningServer, command: bytes) -> None:
    c = login(srv)
    reply = c.cmd(command)
    assert reply.startswith(b"-ERR") and not reply.startswith(b"-ERR [")
    assert b"zqxj" not in reply.lower() and len(reply) <= 510  # never echoes client input
    assert c.cmd(b"NOOP") == b"+OK"


def test_keywords_case_insensitive_and_trailing_whitespace(srv: RunningServer) -> None:
    c = Raw.connect(srv.port)
    c.line()
    assert c.cmd(b"user alice  ").startswith(b"+OK")
    assert c.cmd(b"pAsS secret").startswith(b"+OK")
    assert c.cmd(b"stat \t").startswith(b"+OK")
    assert c.cmd(b"list 1 ").startswith(b"+OK 1 ")


def test_password_with_spaces_is_verbatim() -> None:
    with running_server(adapter=make_adapter(bob="{PLAIN} pass word ")) as srv:
        c = Raw.connect(srv.port)
        c.line()
        c.cmd(b"USER bob")
        assert c.cmd(b"PASS  pass word ").startswith(b"+OK")


def test_unknown_command_and_bad_command_cap() -> None:
    with running_server(adapter=make_adapter(), limits={"max_bad_commands": 3}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        assert c.cmd(b"FOO") == b"-ERR Unknown command"
        assert c.cmd(b"\x00\xff") == b"-ERR Unknown command"
        assert c.cmd(b"BAR").startswith(b"-ERR")
        assert c.line().startswith(b"-ERR Too many bad commands")
        assert c.closed()


def test_long_lines() -> None:
    with running_server(adapter=make_adapter(), protocol={"max_line_length": 300}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        # 255 octets is the floor: a 255-octet line (CRLF included) is accepted.
        assert c.cmd(b"USER " + b"a" * 248).startswith(b"+OK")
        # An over-long line is answered once and its tail never runs as a command.
        c.send(b"NOOP " + b"x" * 400 + b" QUIT\r\n")
        assert c.line() == b"-ERR Line too long"
        assert c.cmd(b"CAPA").startswith(b"+OK")
        c.multiline()
        c.send(b"X" * 200)
        c.send(b"Y" * 200 + b"\r\nUSER alice\r\n")
        assert c.line() == b"-ERR Line too long"
        assert c.line().startswith(b"+OK")


def test_pipelining_100_commands_in_one_write(srv: RunningServer) -> None:
    c = Raw.connect(srv.port)
    c.line()
    batch = b"USER alice\r\nPASS secret\r\n" + b"NOOP\r\nSTAT\r\nLIST 1\r\nRETR 3\r\n" * 24
    batch += b"UIDL\r\nQUIT\r\n"
    assert batch.count(b"\r\n") == 100
    c.send(batch)
    assert c.line().startswith(b"+OK")
    assert c.line().startswith(b"+OK Logged in")
    for _ in range(24):
        assert c.line() == b"+OK"
        assert c.line().startswith(b"+OK 3 ")
        assert c.line().startswith(b"+OK 1 ")
        assert c.line().startswith(b"+OK")
        assert c.multiline() == [b"Subject: three", b"", b"l1", b"l2", b"l3"]
    assert c.line().startswith(b"+OK")
    assert len(c.multiline()) == 3
    assert c.line().startswith(b"+OK")
    assert c.closed()


def test_utf8_and_lang(srv: RunningServer) -> None:
    c = Raw.connect(srv.port)
    c.line()
    assert c.cmd(b"LANG").startswith(b"+OK")
    assert c.multiline() == [b"en English"]
    assert c.cmd(b"LANG en").startswith(b"+OK")
    assert c.cmd(b"LANG fr").startswith(b"-ERR")
    assert c.cmd(b"UTF8").startswith(b"+OK")
    assert c.cmd(b"USER \xff\xfe").startswith(b"-ERR")  # not UTF-8 once UTF8 is on
    c.cmd(b"USER alice")
    assert c.cmd(b"PASS secret").startswith(b"+OK")
    assert c.cmd(b"UTF8").startswith(b"-ERR")
    assert c.cmd(b"LANG").startswith(b"+OK")  # valid in TRANSACTION too
    c.multiline()


INTL = "Subject: Grüße\r\nFrom: Jörg <j@example.org>\r\n\r\nKörper\r\n".encode()


def test_utf8_header_downgraded_refused_or_sent() -> None:
    for policy in ("downgrade", "refuse", "send"):
        with running_server(adapter=make_adapter([INTL]),
                            protocol={"non_utf8_clients": policy}) as srv:
            c = login(srv)
            listed = int(c.cmd(b"LIST 1").split()[2])
            reply = c.cmd(b"RETR 1")
            if policy == "refuse":
                assert reply.startswith(b"-ERR [UTF8]")
                assert listed == len(wire_bytes(INTL))
                continue
            lines = c.multiline()
            body = b"".join(line + b"\r\n" for line in lines)
            assert len(body) == listed
            assert lines[-1] == "Körper".encode()  # bodies are never touched
            if policy == "downgrade":
                assert all(max(line, default=0) < 0x80 for line in lines[:2])
                assert lines[0].startswith(b"Subject: =?utf-8?")
            else:
                assert body == wire_bytes(INTL)
            # A UTF8 session gets the message unchanged.
            u = Raw.connect(srv.port)
            u.line()
            u.cmd(b"UTF8")
            u.cmd(b"XPRO")
            u.cmd(b"USER alice")
            assert u.cmd(b"PASS secret").startswith(b"+OK")
            assert u.cmd(b"RETR 1").startswith(b"+OK")
            assert b"".join(line + b"\r\n" for line in u.multiline()) == wire_bytes(INTL)


def test_xpro_read_only_session(srv: RunningServer) -> None:
    rw = login(srv)
    ro = Raw.connect(srv.port)
    ro.line()
    assert ro.cmd(b"XPRO") == b"+OK Read-only mode"
    ro.cmd(b"USER alice")
    assert ro.cmd(b"PASS secret").startswith(b"+OK")  # beside the read-write session
    assert ro.cmd(b"DELE 1").startswith(b"-ERR [X-POP3SF-READ-ONLY]")
    assert ro.cmd(b"RSET").startswith(b"-ERR [X-POP3SF-READ-ONLY]")
    assert ro.cmd(b"QUIT").startswith(b"+OK")
    assert rw.cmd(b"XPRO").startswith(b"-ERR")
    c = Raw.connect(srv.port)
    c.line()
    assert c.cmd(b"XPRO now").startswith(b"-ERR")


def test_xpro_refused_when_adapter_disallows() -> None:
    adapter = make_adapter()
    adapter.allows_read_only = False
    with running_server(adapter=adapter) as srv:
        c = Raw.connect(srv.port)
        c.line()
        assert c.cmd(b"CAPA").startswith(b"+OK")
        assert b"X-POP3SF-READ-ONLY" not in c.multiline()
        assert c.cmd(b"XPRO").startswith(b"-ERR [X-POP3SF-READ-ONLY]")


def test_in_use_only_after_credentials(srv: RunningServer) -> None:
    first = login(srv)
    second = Raw.connect(srv.port)
    second.line()
    second.cmd(b"USER alice")
    assert second.cmd(b"PASS wrong").startswith(b"-ERR [AUTH]")
    second = Raw.connect(srv.port)
    second.line()
    second.cmd(b"USER alice")
    assert second.cmd(b"PASS secret").startswith(b"-ERR [IN-USE]")
    first.cmd(b"QUIT")
    assert first.closed()
    third = login(srv)
    assert third.cmd(b"STAT").startswith(b"+OK")


def test_auth_plain_and_login_every_form(srv: RunningServer) -> None:
    plain = base64.b64encode(b"\0alice\0secret")
    forms = [
        [(b"AUTH PLAIN " + plain, b"+OK")],
        [(b"AUTH PLAIN", b"+ "), (plain, b"+OK")],
        [(b"AUTH PLAIN " + base64.b64encode(b"alice\0alice\0secret"), b"+OK")],
        [(b"AUTH LOGIN", b"+ VXNlcm5hbWU6"), (base64.b64encode(b"alice"), b"+ UGFzc3dvcmQ6"),
         (base64.b64encode(b"secret"), b"+OK")],
        [(b"AUTH LOGIN " + base64.b64encode(b"alice"), b"+ UGFzc3dvcmQ6"),
         (base64.b64encode(b"secret"), b"+OK")],
        [(b"auth plain", b"+ "), (b"*", b"-ERR")],
        [(b"AUTH PLAIN", b"+ "), (b"%%%notbase64", b"-ERR")],
        [(b"AUTH PLAIN", b"+ "), (b"=", b"-ERR")],
        [(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0secret"), b"-ERR")],
        [(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong"), b"-ERR [AUTH]")],
        [(b"AUTH CRAM-MD5", b"-ERR")],
    ]
    for steps in forms:
        c = Raw.connect(srv.port)
        c.line()
        for send, expect in steps:
            reply = c.cmd(send)
            assert reply.startswith(expect), (steps, reply)
            if expect == b"+ ":
                assert reply == b"+ "
        if steps[-1][1] == b"+OK":
            assert c.cmd(b"QUIT").startswith(b"+OK")
    c = Raw.connect(srv.port)
    c.line()
    assert c.cmd(b"AUTH").startswith(b"+OK")
    assert c.multiline() == [b"PLAIN", b"LOGIN"]


def test_auth_continuation_line_limit() -> None:
    with running_server(adapter=make_adapter(),
                        protocol={"max_line_length": 300, "max_auth_line_length": 2000}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        assert c.cmd(b"AUTH PLAIN") == b"+ "
        long_b64 = base64.b64encode(b"\0alice\0" + b"p" * 1000)
        assert c.cmd(long_b64).startswith(b"-ERR [AUTH]")  # accepted as a line, wrong password


def test_plaintext_refused_outside_networks_and_not_advertised() -> None:
    with running_server(adapter=make_adapter(),
                        auth={"plaintext_auth_networks": ["10.0.0.0/8"]}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        assert c.cmd(b"CAPA").startswith(b"+OK")
        caps = c.multiline()
        assert b"USER" not in caps and not any(t.startswith(b"SASL") for t in caps)
        assert c.cmd(b"USER alice").startswith(b"-ERR [AUTH]")
        assert c.cmd(b"PASS secret").startswith(b"-ERR [AUTH]")
        assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret")).startswith(
            b"-ERR [AUTH]")


def test_wrong_password_and_unknown_user_same_answer(srv: RunningServer) -> None:
    answers = set()
    for user in (b"alice", b"nobody"):
        c = Raw.connect(srv.port)
        c.line()
        c.cmd(b"USER " + user)
        answers.add(c.cmd(b"PASS wrong"))
    assert answers == {b"-ERR [AUTH] Authentication failed"}


def test_poplib_client(srv: RunningServer) -> None:
    pop = srv.pop3()
    pop.user("alice")
    pop.pass_("secret")
    assert pop.stat()[0] == 3
    assert pop.retr(1)[1] == [b"From: a@example.org", b"Subject: one", b"", b"hello"]
    with pytest.raises(poplib.error_proto):
        pop.retr(9)
    pop.quit()


def test_pipelined_answers_follow_dele_and_rset(srv: RunningServer) -> None:
    """Answers remembered for pipelined runs must never outlive a state change."""
    c = login(srv)
    size1 = len(wire_bytes(MESSAGES[0]))
    total = sum(len(wire_bytes(m)) for m in MESSAGES)
    run = b"STAT\r\nLIST 1\r\nUIDL 1\r\nNOOP\r\n"
    c.send(run * 3 + b"DELE 1\r\n" + run + b"RSET\r\n" + run * 2)
    for _ in range(3):
        assert c.line() == b"+OK 3 %d" % total
        assert c.line() == b"+OK 1 %d" % size1
        assert c.line().startswith(b"+OK 1 ")
        assert c.line() == b"+OK"
    assert c.line().startswith(b"+OK")
    assert c.line() == b"+OK 2 %d" % (total - size1)
    assert c.line() == b"-ERR Message already deleted"
    assert c.line() == b"-ERR Message already deleted"
    assert c.line() == b"+OK"
    assert c.line().startswith(b"+OK")
    for _ in range(2):
        assert c.line() == b"+OK 3 %d" % total
        assert c.line() == b"+OK 1 %d" % size1
        assert c.line().startswith(b"+OK 1 ")
        assert c.line() == b"+OK"


def test_pipelined_retrievals_answer_exactly_as_one_at_a_time() -> None:
    """Runs of RETR/TOP, with snapshot answers between them, are read in batches on a worker;
    the bytes must not change."""
    big = b"Subject: big\r\n\r\n" + (b"b" * 998 + b"\r\n") * 300
    script = [b"RETR 1", b"TOP 2 1", b"RETR 3", b"TOP 4 0", b"RETR 4", b"RETR 9", b"TOP 1",
              b"DELE 2", b"RETR 2", b"TOP 3 99", b"retr 1", b"NOOP", b"RETR 3", b"TOP 1 0",
              # a rotation: snapshot answers between batched TOPs
              b"LIST 1", b"UIDL 3", b"TOP 1 0", b"LIST 2", b"UIDL 4", b"TOP 3 0", b"STAT",
              b"LIST 9", b"TOP 4 0", b"NOOP", b"UIDL 1", b"LIST 1 2", b"TOP 1 0"]
    adapter = make_adapter([*MESSAGES, big])
    adapter.blocking = True  # through the worker pool, where batching happens
    with running_server(adapter=adapter) as srv:
        one = login(srv)
        sequential = b""
        for command in script:
            one.send(command + b"\r\n")
            status = one.line()
            sequential += status + b"\r\n"
            if status.startswith(b"+OK") and command.upper().startswith((b"RETR", b"TOP")):
                sequential += b"".join(line + b"\r\n" for line in one.multiline()) + b".\r\n"
        one.close()  # dropped: its DELE is not committed, so both sessions see the same maildrop
        deadline = time.monotonic() + 5
        while srv.call(lambda: len(srv.server.connections)) and time.monotonic() < deadline:
            time.sleep(0.01)
        two = login(srv)
        calls = srv.call(lambda: srv.server.stats["adapter_calls"])
        two.send(b"".join(command + b"\r\n" for command in script) + b"QUIT\r\n")
        assert two.read_to_end().startswith(sequential)
        reads = sum(1 for command in script if command.upper().startswith((b"RETR", b"TOP")))
        batched = srv.call(lambda: srv.server.stats["adapter_calls"]) - calls
        assert 0 < batched < reads / 2, (batched, reads)
