"""The interfaces between the layers: what a session and its connection need of the server
that runs them (:class:`Host`), and what a connection needs of its session (:class:`Handler`).

The server is the only implementation; naming the interface here lets the connection and the
session depend on it without importing the server, so the imports run one way: server ->
session -> connection (docs/architecture.md §3).
"""

from __future__ import annotations

import collections
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from pop3sf.adapters import Adapter

from .accounts import Accounts
from .config import Settings
from .loop import EventLoop
from .readcache import ReadCache
from .throttle import Penalties, VerificationGate


class Host(Protocol):
    settings: Settings  # replaced by a reload: read it when needed, never keep it
    loop: EventLoop
    adapter: Adapter
    tls_context: ssl.SSLContext | None
    verifications: VerificationGate
    penalties: Penalties
    accounts: Accounts
    stats: collections.Counter[str]
    commands: collections.Counter[bytes]
    debug: bool  # log every command (decided once: the check costs even when filtered out)
    read_cache: ReadCache  # TOP answers and RETRs read ahead (adapters with immutable messages)

    def call_adapter(self, pool: str, func: Callable[..., Any], args: tuple[Any, ...],
                     done: Callable[[Any, BaseException | None], None],
                     inline: bool = False) -> None: ...
    def plaintext_allowed(self, address: str) -> bool: ...
    def penalty_group(self, address: str) -> str: ...
    def commit_started(self) -> None: ...
    def commit_finished(self) -> None: ...
    def session_released(self, session: object) -> None: ...
    def connection_closed(self, conn: Any) -> None: ...
    def proxied(self, conn: Any, header: Any) -> str | None: ...


class Handler(Protocol):
    """The session on top of a connection: told about input, drained output and the end."""

    close_reason: str

    @property
    def authenticated(self) -> bool: ...
    def start(self) -> None: ...
    def tls_established(self) -> None: ...
    def busy(self) -> bool: ...
    def on_input(self) -> None: ...
    def on_drain(self) -> None: ...
    def on_close(self, reason: str) -> None: ...
