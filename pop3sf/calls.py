"""A session's adapter calls: the one way work reaches an adapter and its outcome comes back.

A session has at most one call in flight. Every outcome, early, late or failed, comes back on the
loop thread through :meth:`Calls.run`'s ``done``, after the result's type was checked; failures
are logged here, once, and :func:`pop3sf.replies.error_reply` turns them into the client's
answer. A call that outlives the worker timeout is reported to the owner at once
(``call_timed_out``); its real outcome still arrives later, so nothing it holds is forgotten
(docs/architecture.md §4).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from pop3sf.adapters import (
    AuthenticationFailed,
    MaildropInUse,
    MessageGone,
    PermanentFailure,
    TemporaryFailure,
)

from .workers import CallTimeout

log = logging.getLogger("pop3sf.session")

Done = Callable[[Any, BaseException | None], None]
Submit = Callable[[str, Callable[..., Any], tuple[Any, ...], Done, bool], None]


class CallOwner(Protocol):
    """The session a call belongs to."""

    def call_settled(self) -> None:
        """A call's outcome was handled: continue (or finish closing)."""

    def call_timed_out(self) -> None:
        """A call passed its timeout; its outcome will still come."""

    def describe(self) -> str:
        """Who the calls are for, in log lines: address and account."""
        raise NotImplementedError


class Calls:
    __slots__ = ("submit", "owner", "in_flight", "count")

    def __init__(self, submit: Submit, owner: CallOwner) -> None:
        self.submit = submit
        self.owner = owner
        self.in_flight = False
        self.count = 0  # calls that went to a worker: reported at logout

    def run(self, pool: str, func: Callable[..., Any], args: tuple[Any, ...], done: Done,
            expect: type | None = None, inline: bool = False) -> None:
        """Run ``func(*args)`` on a worker of ``pool`` (``inline``: on the loop, for a call
        that can't block); ``done(result, error)`` on the loop.

        With ``expect``, a result of another type becomes a TemporaryFailure naming ``func``.
        """
        self.in_flight = True
        self.count += 1

        def returned(result: Any, error: BaseException | None) -> None:
            if isinstance(error, CallTimeout):
                self.owner.call_timed_out()
                return
            self.in_flight = False
            if error is None and expect is not None and not isinstance(result, expect):
                error = TemporaryFailure(f"{getattr(func, '__name__', func)} returned "
                                         f"{type(result).__name__}, not {expect.__name__}")
            done(result, error)
            self.owner.call_settled()

        self.submit(pool, func, args, returned, inline)

    def log_failure(self, what: str, error: BaseException) -> None:
        """Log an adapter's failure once: expected ones in a line, bugs with their traceback."""
        if isinstance(error, MessageGone | AuthenticationFailed):
            return
        who = self.owner.describe()
        if isinstance(error, TemporaryFailure | PermanentFailure | MaildropInUse):
            log.warning("%s: %s: %s: %s", who, what, type(error).__name__, error)
        else:
            log.error("%s: %s failed:\n%s", who, what,
                      "".join(traceback.format_exception(error)).rstrip())
