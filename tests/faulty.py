"""A test adapter whose every hook can be told to raise, hang or return garbage."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any, BinaryIO

from pop3sf.adapters import (
    Adapter,
    AuthenticationFailed,
    AuthResult,
    Credentials,
    DeleteResult,
    MailboxSession,
    MessageInfo,
    Peer,
)

from pop3sf.wire import wire_bytes

MESSAGES = [b"Subject: a\r\n\r\nfirst\r\n", b"Subject: b\r\n\r\nsecond\r\n"]


class FaultyAdapter(Adapter):
    """``faults`` maps a hook name to an exception instance, ``"hang:SECONDS"`` or ``"garbage"``."""

    def __init__(self, faults: dict[str, Any] | None = None) -> None:
        super().__init__({})
        self.faults = faults or {}
        self.deleted: list[str] = []
        self.closed = 0
        self.lock = threading.Lock()

    def new_session(self, peer: Peer) -> MailboxSession:
        return FaultySession(self)


class FaultySession(MailboxSession):
    def __init__(self, adapter: FaultyAdapter) -> None:
        self.adapter = adapter

    def _fault(self, hook: str, good: Any) -> Any:
        fault = self.adapter.faults.get(hook)
        if fault is None:
            return good
        if isinstance(fault, BaseException):
            raise fault
        if isinstance(fault, str) and fault.startswith("hang:"):
            time.sleep(float(fault[5:]))
            return good
        return object()  # garbage

    def authenticate(self, credentials: Credentials) -> AuthResult:
        if credentials.password != "pw":
            raise AuthenticationFailed("nope")
        result: AuthResult = self._fault("authenticate", AuthResult(credentials.username))
        return result

    def login_succeeded(self, account: AuthResult, read_only: bool) -> None:
        self._fault("login_succeeded", None)

    def list_messages(self) -> Sequence[MessageInfo]:
        good = [MessageInfo(str(i), len(wire_bytes(m))) for i, m in enumerate(MESSAGES)]
        result: Sequence[MessageInfo] = self._fault("list_messages", good)
        return result

    def open_message(self, uid: str) -> BinaryIO:
        stream: BinaryIO = self._fault("open_message", io.BytesIO(MESSAGES[int(uid)]))
        return stream

    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        result: DeleteResult = self._fault("delete_messages", DeleteResult())
        with self.adapter.lock:
            self.adapter.deleted.extend(uids)
        return result

    def connection_closed(self) -> None:
        with self.adapter.lock:
            self.adapter.closed += 1
        self._fault("connection_closed", None)
