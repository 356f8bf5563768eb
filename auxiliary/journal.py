"""``pop3sf-admin`` for ``type = journal``: the accounts' messages, listed as the server would.

The journal is written by the system, never by pop3sf: there is nothing to add, and accounts
are ``[[name]]`` subsections of ``[adapter]`` in /etc/pop3sf.conf, so the user commands say so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pop3sf.adapters.base import AuthenticationFailed
from pop3sf.adapters.journal import JournalAdapter

from .sources import (
    MessageLike,
    MessageSummary,
    NotSupported,
    Source,
    UnknownUser,
    build_adapter,
    summarize,
)

_ACCOUNTS = ("journal accounts are [[name]] subsections of [adapter] in /etc/pop3sf.conf "
             "(password_hash from `pop3sf-admin hash`)")


class JournalSource(Source):
    """Read-only: lists what each account would be served."""

    has_users = False

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        super().__init__(config, service_user)
        self.adapter = build_adapter(JournalAdapter, config)

    def add_message(self, user: str | None, message: MessageLike) -> str:
        raise NotSupported("the journal is read-only to pop3sf; log with logger(1) or "
                           "systemd-cat(1) instead")

    def list_messages(self, user: str | None) -> Sequence[MessageSummary]:
        try:
            session = self.adapter.preview_session(user or "")
        except AuthenticationFailed as exc:
            raise UnknownUser(str(exc)) from None
        try:
            return [summarize(info.uid, info.size, session.open_message(info.uid))
                    for info in session.list_messages()]
        finally:
            session.connection_closed()

    def list_users(self) -> Sequence[str]:
        return sorted(self.adapter.mailboxes)

    def add_user(self, name: str, password: str) -> None:
        raise NotSupported(_ACCOUNTS)

    def set_password(self, name: str, password: str) -> None:
        raise NotSupported(_ACCOUNTS)

    def delete_user(self, name: str) -> None:
        raise NotSupported(_ACCOUNTS)
