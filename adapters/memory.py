"""ListAdapter: a maildrop held in memory, from the config file or a Python list.

For demos, tests and embedding: ``ListAdapter.from_messages({"alice": ("{PLAIN}pw", [b"..."])})``.
Its calls never block, so the server runs them inline on the loop (``blocking = False``).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any, BinaryIO

from pop3sf import passwords
from pop3sf.wire import measure

from .base import (
    Adapter,
    AuthenticationFailed,
    AuthResult,
    Credentials,
    DeleteResult,
    MailboxSession,
    MessageGone,
    MessageInfo,
    Peer,
)


class Mailbox:
    """One user's secret and messages; shared by every session of that user."""

    def __init__(self, secret: str, messages: Sequence[bytes]) -> None:
        self.secret = secret
        self.lock = threading.Lock()
        self.messages: dict[str, bytes] = {}
        self.infos: dict[str, MessageInfo] = {}
        for message in messages:
            self.add(message)

    def add(self, message: bytes) -> str:
        uid = hashlib.sha256(message).hexdigest()[:32]
        n = 1
        while uid in self.messages:  # identical bodies still get distinct uids
            uid = f"{hashlib.sha256(message).hexdigest()[:32]}-{n}"
            n += 1
        m = measure(io.BytesIO(message))
        with self.lock:
            self.messages[uid] = message
            self.infos[uid] = MessageInfo(uid, m.size, m.utf8_header, m.downgraded_size)
        return uid


class ListAdapter(Adapter):
    """Messages from the config file or from Python.

    Config keys: ``users`` — a list of ``name:{SCHEME}secret`` entries (``{PLAIN}`` or bcrypt);
    ``messages`` — for a single configured user, a list of file paths whose contents are served.
    ``read_only`` — offer XPRO (default yes).
    """

    list_with_login = True
    closes_inline = True

    configspec = """
users = force_list(default=list())
messages = force_list(default=list())
read_only = boolean(default=True)
"""
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.mailboxes: dict[str, Mailbox] = {}
        files = list(self.options["messages"])
        for entry in self.options["users"]:
            name, _, secret = entry.partition(":")
            self.mailboxes[name] = Mailbox(secret, [])
        for path in files:
            with open(path, "rb") as fh:
                for box in self.mailboxes.values():
                    box.add(fh.read())
                    fh.seek(0)
        self.allows_read_only = bool(self.options["read_only"])
        self._set_blocking()

    def _set_blocking(self) -> None:
        """Inline on the loop unless some secret needs a slow hash (bcrypt)."""
        self.blocking = not all(b.secret.upper().startswith("{PLAIN}")
                                for b in self.mailboxes.values())

    @classmethod
    def from_messages(cls, users: Mapping[str, tuple[str, Sequence[bytes]]]) -> ListAdapter:
        """An adapter for ``{name: (secret, [message bytes, ...])}``."""
        adapter = cls({})
        for name, (secret, messages) in users.items():
            adapter.mailboxes[name] = Mailbox(secret, messages)
        adapter._set_blocking()
        return adapter

    def new_session(self, peer: Peer) -> MailboxSession:
        return ListSession(self)


class ListSession(MailboxSession):
    def __init__(self, adapter: ListAdapter) -> None:
        self.adapter = adapter
        self.box: Mailbox | None = None

    def authenticate(self, credentials: Credentials) -> AuthResult:
        box = self.adapter.mailboxes.get(credentials.username)
        like = passwords.reference(b.secret for b in list(self.adapter.mailboxes.values()))
        if box is None:
            passwords.dummy_verify(credentials.password_bytes(), like)
            raise AuthenticationFailed("unknown user")
        passwords.verify_or_deny(box.secret, credentials.password_bytes(), like,
                                 account=credentials.username)
        self.box = box
        return AuthResult(credentials.username)

    def list_messages(self) -> Sequence[MessageInfo]:
        assert self.box is not None
        with self.box.lock:
            return list(self.box.infos.values())

    def open_message(self, uid: str) -> BinaryIO:
        assert self.box is not None
        with self.box.lock:
            data = self.box.messages.get(uid)
        if data is None:
            raise MessageGone(uid)
        return io.BytesIO(data)

    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        assert self.box is not None
        with self.box.lock:
            for uid in uids:
                self.box.messages.pop(uid, None)
                self.box.infos.pop(uid, None)
        return DeleteResult()
