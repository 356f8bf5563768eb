"""The input buffer and its one line scanner (docs/protocol.md §3).

A command line counts its CRLF against the limit, as RFC 2449 §4 does. A longer line is reported
once, as :data:`TOO_LONG`, and skipped to its end, however much later that end arrives.
"""

from __future__ import annotations

from collections.abc import Iterator

#: Returned by :meth:`LineBuffer.next_line` once per over-long line.
TOO_LONG = b"\0too-long"


class LineBuffer(bytearray):
    """Bytes received and not yet taken as lines."""

    __slots__ = ("limit", "discarding")

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.discarding = False  # inside an over-long line, until its end

    def reset(self) -> None:
        self.clear()
        self.discarding = False

    def next_line(self) -> bytes | None:
        """The next complete line without its line end, TOO_LONG, or None."""
        limit = self.limit
        while True:
            idx = self.find(b"\n", 0, None if self.discarding else limit)
            if self.discarding:
                if idx < 0:
                    self.clear()
                    return None
                del self[: idx + 1]
                self.discarding = False
                continue
            if idx < 0:
                if len(self) < limit:
                    return None
                end = self.find(b"\n", limit)
                if end < 0:
                    self.clear()
                    self.discarding = True
                else:
                    del self[: end + 1]
                return TOO_LONG
            line = bytes(self[:idx])
            del self[: idx + 1]
            return line[:-1] if line[-1:] == b"\r" else line

    def lines_ahead(self) -> Iterator[tuple[bytes, int]]:
        """The complete lines waiting, each with where it ends, without taking them: the
        pipelining fast paths answer several at once, then delete them together."""
        if self.discarding:
            return
        limit, pos = self.limit, 0
        while True:
            end = self.find(b"\n", pos, pos + limit)
            if end < 0:
                return
            line = bytes(self[pos:end])
            pos = end + 1
            yield (line[:-1] if line[-1:] == b"\r" else line), pos
