"""``pop3sf-admin`` on a ``type = sql`` source: read-only (the admin's own program fills the
table), so it lists what the server would list, through the adapter's own session.

``message list NAME`` (and any generic preview built on :meth:`SQLSource.session`) shows the
rows with the sizes the server sends; adding messages and managing users is refused with an
explanation, since pop3sf never writes to a table it does not own (a ``delete_query`` at QUIT is
the one exception the admin configures).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from pop3sf.adapters.base import AdapterError, AuthenticationFailed, normalize_secret
from pop3sf.adapters.sql import SQLAdapter
from pop3sf.adapters.sql_session import Row, SQLSession, encode_subject, to_datetime

from .sources import (
    BadName,
    MessageLike,
    MessageSummary,
    NotSupported,
    Source,
    SourceError,
    UnknownUser,
    build_adapter,
)

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class SQLSource(Source):
    """The rows the configured queries select; users only through ``password_query``."""

    def __init__(self, config: Mapping[str, Any], service_user: str | None = None) -> None:
        self.adapter = build_adapter(SQLAdapter, config)
        super().__init__(self.adapter.options, service_user)
        self.has_users = self.adapter.multi_user  # type: ignore[misc]

    def _account(self, user: str | None) -> str:
        if not self.adapter.multi_user:
            name = normalize_secret(self.config["username"])
            if user is not None and normalize_secret(user) != name:
                raise UnknownUser(f"unknown user {user!r} (this source's user is {name!r})")
            return name
        if not user:
            raise BadName("this source has several users: name one")
        return normalize_secret(user)

    def _preview(self, user: str | None) -> SQLSession:
        try:
            return self.adapter.preview_session(self._account(user))
        except AuthenticationFailed as exc:
            raise UnknownUser(str(exc)) from exc
        except AdapterError as exc:
            raise SourceError(f"database {self.adapter.driver.where()}: {exc} "
                              f"({exc.__cause__ or exc})") from exc

    def session(self, user: str | None) -> SQLSession:
        """A read-only session on the account, listed already (for previews); close it with
        ``connection_closed()``."""
        session = self._preview(user)
        try:
            session.list_messages()
        except AdapterError as exc:
            session.connection_closed()
            raise SourceError(f"database {self.adapter.driver.where()}: {exc} "
                              f"({exc.__cause__ or exc})") from exc
        return session

    def list_messages(self, user: str | None) -> Sequence[MessageSummary]:
        session = self.session(user)
        session.connection_closed()
        out = []
        for info in session.infos:
            row = Row(*session.rows[info.uid][:4])
            subject = "" if row.subject is None else " ".join(str(row.subject).split())
            if not subject and self.adapter.shape().raw:
                subject = f"(message {info.uid})"
            date = _EPOCH if row.date is None else to_datetime(row.date)
            out.append(MessageSummary(info.uid, info.size, date,
                                      subject or encode_subject("")))
        return out

    def add_message(self, user: str | None, message: MessageLike) -> str:
        raise NotSupported("a sql source is read by pop3sf, never written: insert rows with "
                           "your own program")

    def list_users(self) -> Sequence[str]:
        raise NotSupported("a sql source's users are whatever password_query finds; "
                           "list them with your database's tools")

    def close(self) -> None:
        self.adapter.close()
