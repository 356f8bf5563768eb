"""Tools that feed the bundled data sources: a library (:mod:`.sources`) and ``pop3sf-admin``."""

from __future__ import annotations

from .sources import (
    GROUP,
    BadMessage,
    BadName,
    MessageLike,
    MessageSummary,
    NotSupported,
    Source,
    SourceError,
    UnknownUser,
    UserExists,
    open_source,
)

__all__ = [
    "GROUP",
    "BadMessage",
    "BadName",
    "MessageLike",
    "MessageSummary",
    "NotSupported",
    "Source",
    "SourceError",
    "UnknownUser",
    "UserExists",
    "open_source",
]
