"""The command table: what each POP3 command needs before its handler runs (docs/protocol.md §4).

Dispatch checks a command's entry once, in this order: known at all, valid in this state, allowed
on this connection (``plaintext``), allowed in this session (``writes``), argument count. What
can't be said declaratively (LANG's arguments, XPRO counting as a bad command) stays in handlers.
CAPA, the unknown-command answer, the pipelining look-ahead and the fuzz model all read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .sasl import MECHANISMS

AUTHORIZATION, TRANSACTION, UPDATE = 0, 1, 2
BOTH = frozenset((AUTHORIZATION, TRANSACTION))
BEFORE_LOGIN = frozenset((AUTHORIZATION,))
AFTER_LOGIN = frozenset((TRANSACTION,))

#: What a blocked session waits for before it reads the next command (None: nothing).
VERIFICATION, CALL, TLS, LISTING, RETRIEVAL, COMMIT, CLOSING = (
    "verification", "call", "tls", "listing", "retrieval", "commit", "closing")


class Command(NamedTuple):
    verb: bytes
    states: frozenset[int]
    min_args: int = 0
    #: None: any number (the handler decides).
    max_args: int | None = 0
    #: Only over TLS or from a network where plaintext logins are allowed.
    plaintext: bool = False
    #: Changes the maildrop: refused in a read-only session.
    writes: bool = False
    #: Its CAPA line, when the session offers the command.
    capability: bytes = b""
    #: Reads a message: pipelined runs of these are read in one worker call.
    retrieves: bool = False
    #: PASS: the rest of the line is one argument, spaces included.
    verbatim: bool = False


TABLE = (
    Command(b"CAPA", BOTH),
    Command(b"QUIT", BOTH, max_args=None),
    Command(b"LANG", BOTH, max_args=None, capability=b"LANG"),
    Command(b"USER", BEFORE_LOGIN, 1, 1, plaintext=True, capability=b"USER"),
    Command(b"PASS", BEFORE_LOGIN, 0, 1, plaintext=True, verbatim=True),
    # AUTH without arguments lists mechanisms even where plaintext is refused: its handler checks.
    Command(b"AUTH", BEFORE_LOGIN, 0, 2, capability=b"SASL"),
    Command(b"STLS", BEFORE_LOGIN, capability=b"STLS"),
    Command(b"UTF8", BEFORE_LOGIN, capability=b"UTF8 USER"),
    Command(b"XPRO", BEFORE_LOGIN, max_args=None, capability=b"X-POP3SF-READ-ONLY"),
    Command(b"STAT", AFTER_LOGIN),
    Command(b"LIST", AFTER_LOGIN, 0, 1),
    Command(b"UIDL", AFTER_LOGIN, 0, 1, capability=b"UIDL"),
    Command(b"RETR", AFTER_LOGIN, 1, 1, retrieves=True),
    Command(b"TOP", AFTER_LOGIN, 2, 2, retrieves=True, capability=b"TOP"),
    Command(b"DELE", AFTER_LOGIN, 1, 1, writes=True),
    Command(b"RSET", AFTER_LOGIN, writes=True),
    Command(b"NOOP", AFTER_LOGIN),
)
COMMANDS = {command.verb: command for command in TABLE}
#: Capabilities that belong to no single command.
GENERAL_CAPABILITIES = (b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE")


def capabilities(offered: Callable[[Command], bool], version: str) -> bytes:
    """The CAPA answer: the capabilities of the commands this session offers, and the rest."""
    lines = [b"+OK Capability list follows", *GENERAL_CAPABILITIES]
    for command in TABLE:
        if command.capability and offered(command):
            lines.append(command.capability if command.verb != b"AUTH" else
                         b"SASL " + " ".join(MECHANISMS).encode())
    lines += [b" ".join(filter(None, (b"IMPLEMENTATION pop3sf", version.encode()))), b"."]
    return b"\r\n".join(lines) + b"\r\n"


def parse(line: bytes) -> tuple[Command | None, list[bytes]]:
    """The command a line names (None if none does) and its arguments."""
    verb, _, rest = line.partition(b" ")
    command = COMMANDS.get(verb.upper())
    if command is not None and command.verbatim:
        return command, [rest] if rest else []
    return command, rest.split()


def arguments_fit(command: Command, args: list[bytes]) -> bool:
    count = len(args)
    return command.min_args <= count and (command.max_args is None or count <= command.max_args)
