"""The maildrop as the client sees it: the login snapshot, numbered, with deletion marks.

Everything here is answered on the loop thread without asking the adapter (docs/protocol.md §10):
message numbers stay fixed for the session, UIDs are made valid and unique once, and sizes are
what RETR will really send (a downgraded message's size is its downgraded size).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any

from pop3sf.adapters import MessageInfo

from .logs import counted
from .replies import ERR_DELETED, ERR_NO_MSG, ERR_SYNTAX

log = logging.getLogger("pop3sf.session")

_UID_OK = re.compile(rb"[\x21-\x7e]{1,70}\Z")
_LIST_BATCH = 512
#: Shared while empty: most sessions never delete, refuse or downgrade anything.
_NONE: frozenset[int] = frozenset()
#: Bounds of the answer cache, whatever the client sends.
_ANSWERS_MAX, _ANSWER_LINE_MAX = 4096, 32


class Maildrop:
    __slots__ = ("infos", "uids", "sizes", "refuse", "downgrade", "deleted", "live_count",
                 "live_size", "answers")

    def __init__(self, listing: Iterable[Any], limit: int, policy: str, utf8: bool,
                 account: str) -> None:
        """Raises TypeError or ValueError for a listing that isn't a list of MessageInfo."""
        infos = [m if isinstance(m, MessageInfo) else MessageInfo(*m) for m in listing]
        if limit and len(infos) > limit:
            infos = infos[-limit:]  # the newest N
        seen: set[str] = set()
        uids: list[str] = []
        sizes: list[int] = []
        refuse: set[int] = set()
        downgrade: set[int] = set()
        for i, info in enumerate(infos):
            if not isinstance(info.uid, str) or not isinstance(info.size, int) or info.size < 0:
                raise ValueError(f"message {i + 1}: uid must be str and size an int >= 0")
            uid = _unique(_valid_uid(info.uid), seen, account)
            seen.add(uid)
            uids.append(uid)
            size = info.size
            if info.utf8_header and not utf8 and policy != "send":
                if policy == "downgrade" and info.downgraded_size is not None:
                    downgrade.add(i)
                    size = info.downgraded_size
                else:
                    refuse.add(i)
            sizes.append(size)
        self.infos, self.uids, self.sizes = infos, uids, sizes
        self.refuse: AbstractSet[int] = refuse or _NONE
        self.downgrade: AbstractSet[int] = downgrade or _NONE
        self.deleted: AbstractSet[int] = _NONE
        self.live_count, self.live_size = len(sizes), sum(sizes)
        #: Exact command line -> its answer, for commands answered from the snapshot alone
        #: (STAT, NOOP, LIST n, UIDL n): pipelined runs of them cost a lookup per line.
        self.answers: dict[bytes, bytes] | None = None

    def __len__(self) -> int:
        return len(self.infos)

    def summary(self) -> str:
        return f"{counted(self.live_count, 'message')} ({self.live_size} octets)"

    def index(self, args: list[bytes]) -> int | bytes:
        """The 0-based index the first argument names, or the -ERR answer; every argument must
        be a number (TOP's line count too)."""
        if not all(a.isdigit() and len(a) <= 10 for a in args):
            return ERR_SYNTAX
        n = int(args[0]) - 1
        if not 0 <= n < len(self.infos):
            return ERR_NO_MSG
        if n in self.deleted:
            return ERR_DELETED
        return n

    def remember(self, line: bytes, answer: bytes) -> None:
        if len(line) > _ANSWER_LINE_MAX:
            return
        if self.answers is None:
            self.answers = {}
        if len(self.answers) < _ANSWERS_MAX:
            self.answers[line] = answer

    def delete(self, n: int) -> None:
        if not self.deleted:
            self.deleted = set()
        assert isinstance(self.deleted, set)
        self.deleted.add(n)
        self.live_count -= 1
        self.live_size -= self.sizes[n]
        self.answers = None

    def reset(self) -> None:
        self.deleted = _NONE
        self.live_count, self.live_size = len(self.sizes), sum(self.sizes)
        self.answers = None

    def marked_uids(self) -> list[str]:
        """The adapter's UIDs of the messages marked for deletion, in message order."""
        return [self.infos[i].uid for i in sorted(self.deleted)]

    def listing(self, values: list[Any], header: bytes) -> Iterator[bytes]:
        """A LIST or UIDL answer in pieces, so a huge maildrop never sits in one buffer."""
        yield header
        deleted = self.deleted
        batch: list[str] = []
        for i, value in enumerate(values):
            if i not in deleted:
                batch.append(f"{i + 1} {value}\r\n")
                if len(batch) >= _LIST_BATCH:
                    yield "".join(batch).encode()
                    batch = []
        batch.append(".\r\n")
        yield "".join(batch).encode()


def _valid_uid(uid: str) -> str:
    """An adapter's UID as a UIDL may show it: printable ASCII of 1-70 octets, else its hash."""
    if 0 < len(uid) <= 70 and uid.isascii() and uid.isprintable() and " " not in uid:
        return uid  # the usual case, with C-speed string methods
    raw = uid.encode("utf-8", "surrogateescape")
    return uid if _UID_OK.match(raw) else hashlib.sha1(raw).hexdigest()


def _unique(uid: str, seen: set[str], account: str) -> str:
    if uid not in seen:
        return uid
    n = 1
    while f"{uid[:60]}.{n}" in seen:
        n += 1
    log.warning("%s: duplicate uid %r from the adapter made unique", account, uid)
    return f"{uid[:60]}.{n}"
