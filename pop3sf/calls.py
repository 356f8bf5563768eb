"""A session's adapter calls: the one way work reaches an adapter and its outcome comes back.

A session has at most one call in flight. Every outcome, early, late or failed, comes back on the
loop thread through :func:`run`'s ``done``, after the result's type was checked; failures are
logged here, once (:func:`log_failure`), and :func:`pop3sf.replies.error_reply` turns them into
the client's answer. A call that outlives the worker timeout is reported to the owner at once
(``call_timed_out``); its real outcome still arrives later, so nothing it holds is forgotten
(docs/architecture.md §4). The bookkeeping is two fields of the session, not an object of its
own: 10,000 idle sessions are the norm.
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

from .host import Host
from .workers import CallTimeout

log = logging.getLogger("pop3sf.session")

Done = Callable[[Any, BaseException | None], None]


class CallOwner(Protocol):
    """The session a call belongs to."""

    host: Host
    in_flight: bool  # a call has not returned yet (a timed-out one included)
    call_count: int  # calls made: reported at logout

    def call_settled(self) -> None:
        """A call's outcome was handled: continue (or finish closing)."""

    def call_timed_out(self) -> None:
        """A call passed its timeout; its outcome will still come."""

    def describe(self) -> str:
        """Who the calls are for, in log lines: address and account."""
        raise NotImplementedError


def run(owner: CallOwner, pool: str, func: Callable[..., Any], args: tuple[Any, ...],
        done: Done, expect: type | None = None, inline: bool = False) -> None:
    """Run ``func(*args)`` on a worker of ``pool`` (``inline``: on the loop, for a call that
    can't block); ``done(result, error)`` on the loop.

    With ``expect``, a result of another type becomes a TemporaryFailure naming ``func``.
    """
    owner.in_flight = True
    owner.call_count += 1

    def returned(result: Any, error: BaseException | None) -> None:
        if isinstance(error, CallTimeout):
            owner.call_timed_out()
            return
        owner.in_flight = False
        if error is None and expect is not None and not isinstance(result, expect):
            error = TemporaryFailure(f"{getattr(func, '__name__', func)} returned "
                                     f"{type(result).__name__}, not {expect.__name__}")
        done(result, error)
        owner.call_settled()

    owner.host.call_adapter(pool, func, args, returned, inline)


def log_failure(owner: CallOwner, what: str, error: BaseException) -> None:
    """Log an adapter's failure once: expected ones in a line, bugs with their traceback."""
    if isinstance(error, MessageGone | AuthenticationFailed):
        return
    if isinstance(error, TemporaryFailure | PermanentFailure | MaildropInUse):
        log.warning("%s: %s: %s: %s", owner.describe(), what, type(error).__name__, error)
    else:
        log.error("%s: %s failed:\n%s", owner.describe(), what,
                  "".join(traceback.format_exception(error)).rstrip())
