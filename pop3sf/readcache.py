"""Answers of message reads kept for later: repeated TOPs, and RETRs read ahead
(docs/protocol.md §9).

Mail clients that leave mail on the server ask for the same headers at every poll (``TOP n 0``),
and Dovecot answers those from its index; a client fetching every message asks for them one
after the other. For an adapter whose messages never change under their unique id
(``Adapter.immutable_messages``), the server keeps the encoded answers of recent TOPs and of the
small messages it read ahead of a RETR here, and answers them on the loop, without a worker
round trip. The key holds everything an answer depends on: the account, the unique id, the
listed size, the line count (None: RETR) and whether the header is downgraded for the client.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

#: What the answers may hold in all, in octets, whatever the number of sessions.
LIMIT = 16 * 1024 * 1024
#: Counted per entry besides its octets: the key and the dictionary's share.
ENTRY_COST = 256


class ReadCache:
    """Least recently used answers first out, within :data:`LIMIT` octets. Loop thread only."""

    __slots__ = ("limit", "size", "entries")

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.size = 0
        self.entries: OrderedDict[Hashable, bytes] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def get(self, key: Hashable) -> bytes | None:
        answer = self.entries.get(key)
        if answer is not None:
            self.entries.move_to_end(key)
        return answer

    def pop(self, key: Hashable) -> bytes | None:
        """An answer used once (a message read ahead), taken out."""
        answer = self.entries.pop(key, None)
        if answer is not None:
            self.size -= len(answer) + ENTRY_COST
        return answer

    def put(self, key: Hashable, answer: bytes) -> None:
        cost = len(answer) + ENTRY_COST
        if cost > self.limit // 64 or key in self.entries:  # a few big answers can't flush it
            return
        self.entries[key] = answer
        self.size += cost
        while self.size > self.limit:
            _, old = self.entries.popitem(last=False)
            self.size -= len(old) + ENTRY_COST
