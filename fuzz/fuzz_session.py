#!/usr/bin/env python3
"""Coverage-guided fuzzing of the POP3 session: the real Server, Connection and Session objects,
fed through a socketpair by the server's own event loop, in this process.

The first input byte picks a preamble (none, USER/PASS, AUTH PLAIN, XPRO login, UTF8 login) so
that TRANSACTION is reached often; the second picks one write for everything or writes of 1 to
1017 bytes (lines then arrive in pieces across reads); the rest is the client's byte stream,
followed by EOF.

Invariants: no exception reaches the loop or is logged as an error; the greeting comes first and
every reply ends with CRLF; every status line is at most 512 octets; every complete line gets
exactly one answer (``+OK``, ``-ERR`` or a ``+ `` continuation) unless QUIT or the bad-command
cap ended the session; the connection always ends (a hang is reported by
libFuzzer's ``-timeout``); afterwards no lock, per-user slot, auth slot or commit is left over;
and the maildrop is unchanged unless the input contained a QUIT.
"""

from __future__ import annotations

import base64
import logging
import selectors
import socket
import sys

import atheris

with atheris.instrument_imports(include=["pop3sf"]):
    from pop3sf.adapters.memory import ListAdapter, Mailbox

    from pop3sf.config import settings_from_dict
    from pop3sf.listeners import ListeningSocket
    from pop3sf.server import Server
    from pop3sf.testing import server_config

from common import main

MESSAGES = [
    b"Subject: one\r\n\r\nhello\r\n",
    b"Subject: two\n\n.leading dot\nbare LF\rbare CR\n..two dots\nno final newline",
    "Subject: Grüße\r\nFrom: Jörg <j@example.org>\r\n\r\nKörper\r\n".encode(),
    b"",
]
PREAMBLES = [
    b"",
    b"USER alice\r\nPASS secret\r\n",
    b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n",
    b"XPRO\r\nUSER alice\r\nPASS secret\r\n",
    b"UTF8\r\nAUTH LOGIN YWxpY2U=\r\nc2VjcmV0\r\n",
]


class Errors(logging.Handler):
    """Counts error records: the loop logs exceptions from callbacks instead of dying."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ERRORS = Errors()
logging.getLogger("pop3sf").addHandler(ERRORS)
logging.getLogger("pop3sf").propagate = False
logging.getLogger("pop3sf").setLevel(logging.DEBUG)  # run the debug paths too, output dropped

SETTINGS = settings_from_dict(server_config(
    "list", {}, logging={"level": "error"},
    protocol={"max_line_length": 300, "max_auth_line_length": 600, "output_backlog": 4096},
    auth={"penalty_initial": 0}, limits={"max_bad_commands": 40}), "<fuzz>")
ADAPTER = ListAdapter.from_messages({"alice": ("{PLAIN}secret", MESSAGES)})
SERVER = Server(SETTINGS, ADAPTER)
SERVER.start([])
LISTENER = ListeningSocket("fuzz", socket.socket(), False)


def converse(stream: bytes, piece: int = 65536) -> bytes:
    """Send ``stream`` in writes of ``piece`` bytes, one per loop turn, then EOF, to a fresh
    connection; return everything the server sent."""
    server_end, client = socket.socketpair()
    client.setblocking(False)
    out = bytearray()
    pending = memoryview(stream)

    def on_client(mask: int) -> None:
        nonlocal pending
        if mask & selectors.EVENT_READ:
            try:
                out.extend(client.recv(1 << 20))
            except BlockingIOError:
                pass
        if mask & selectors.EVENT_WRITE:
            try:
                pending = pending[client.send(pending[:piece]):]
            except BlockingIOError:
                return
            except OSError:  # the server closed first (QUIT, too many bad commands)
                pending = pending[len(pending):]
            if not pending:
                try:
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                SERVER.loop.selector.modify(client, selectors.EVENT_READ, on_client)

    SERVER.loop.selector.register(client, selectors.EVENT_READ | selectors.EVENT_WRITE, on_client)
    SERVER._admit(LISTENER, server_end, ("127.0.0.1", 40000))
    SERVER.loop.run(until=lambda: not SERVER.connections)
    SERVER.loop.selector.unregister(client)
    client.setblocking(True)
    client.settimeout(5)
    while chunk := client.recv(1 << 20):
        out.extend(chunk)
    client.close()
    return bytes(out)


def check_replies(stream: bytes, out: bytes) -> None:
    assert out.startswith(b"+OK pop3sf ready\r\n"), out[:100]
    assert not out or out.endswith(b"\r\n"), f"reply cut short: {out[-100:]!r}"
    statuses = 0
    for line in out.split(b"\r\n")[1:]:
        if line.startswith((b"+OK", b"-ERR", b"+ ")):
            assert len(line) + 2 <= 512, f"status line too long: {line[:100]!r}"
            statuses += 1
    # One answer per complete line, an over-long one included (answered once, its tail never
    # run); an over-long unterminated tail at EOF may get one more. Unless the session ended
    # early, by QUIT or the bad-command cap.
    if b"signing off" not in out and b"Too many bad commands" not in out:
        lines = stream.count(b"\n")
        assert lines <= statuses <= lines + 1, f"{lines} lines, {statuses} answers"


def test_one_input(data: bytes) -> None:
    preamble = PREAMBLES[data[0] % len(PREAMBLES)] if data else b""
    piece = 65536 if len(data) < 2 or data[1] < 128 else 1 + (data[1] - 128) * 8
    stream = preamble + data[2:]
    box = Mailbox("{PLAIN}secret", MESSAGES)
    ADAPTER.mailboxes["alice"] = box
    before = dict(box.messages)
    ERRORS.records.clear()
    out = converse(stream, piece)
    assert not ERRORS.records, ERRORS.records[0].getMessage()
    check_replies(stream, out)
    server = SERVER
    accounts = server.accounts
    assert not accounts.locks and not accounts.user_sessions and server.sessions_alive == 0
    assert not server.leaks()
    assert server.commits_in_flight == 0 and not server.admission.by_group
    if b"QUIT" not in stream.upper():
        assert box.messages == before, "a message was deleted without QUIT"


if __name__ == "__main__":
    main(test_one_input, "session")
    sys.exit(0)
