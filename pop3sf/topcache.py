"""Recent TOP answers, kept so that asking again costs no read (docs/protocol.md §9).

Mail clients that leave mail on the server ask for the same headers at every poll (``TOP n 0``),
and Dovecot answers those from its index. For an adapter whose messages never change under their
unique id (``Adapter.immutable_messages``), the server keeps the encoded answers of recent TOPs
here and answers a repeat on the loop, without a worker round trip. The key holds everything the
answer depends on: the account, the unique id, the listed size, the line count and whether the
header is downgraded for the client.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

#: What the answers may hold in all, in octets (one answer of ``TOP n 0`` is typically 1-3 KB).
LIMIT = 8 * 1024 * 1024
#: Counted per entry besides its octets: the key and the dictionary's share.
ENTRY_COST = 256


class TopCache:
    """Least recently used answers first out, within :data:`LIMIT` octets. Loop thread only."""

    __slots__ = ("limit", "size", "entries")

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.size = 0
        self.entries: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, key: Hashable) -> bytes | None:
        answer = self.entries.get(key)
        if answer is not None:
            self.entries.move_to_end(key)
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
