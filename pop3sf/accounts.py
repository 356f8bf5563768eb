"""Who holds which account: the per-account lock and the per-user session count.

A read-write session locks its account for its whole life, so two sessions never mark the same
messages for deletion; read-only sessions share it. Both count against ``max_sessions_per_user``
(docs/protocol.md §8). Holders are sessions; a holder releases once, on whichever path ends it.
"""

from __future__ import annotations

import collections
import logging

from .replies import ERR_IN_USE, ERR_TEMP

log = logging.getLogger("pop3sf.server")


class Accounts:
    __slots__ = ("locks", "user_sessions", "holders")

    def __init__(self) -> None:
        self.locks: dict[str, object] = {}
        self.user_sessions: collections.Counter[str] = collections.Counter()
        self.holders: dict[object, str] = {}

    def claim(self, holder: object, account: str, read_only: bool, per_user: int) -> bytes | None:
        """Take the account for ``holder``, or say why not (the -ERR answer)."""
        if self.user_sessions[account] >= per_user:
            return ERR_TEMP
        if not read_only:
            if account in self.locks:
                return ERR_IN_USE
            self.locks[account] = holder
        self.user_sessions[account] += 1
        self.holders[holder] = account
        return None

    def release(self, holder: object) -> None:
        """Give back what ``holder`` took; harmless when it holds nothing (any more)."""
        account = self.holders.pop(holder, None)
        if account is None:
            return
        if self.locks.get(account) is holder:
            del self.locks[account]
        self.user_sessions[account] -= 1
        if self.user_sessions[account] <= 0:
            del self.user_sessions[account]
