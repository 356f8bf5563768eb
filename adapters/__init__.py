"""Adapters: the bridges between data sources and POP3 maildrops (see :mod:`.base`)."""

from __future__ import annotations

import importlib
from typing import Any

from .base import (
    Adapter,
    AdapterError,
    AuthenticationFailed,
    AuthResult,
    ConfigError,
    ConfigurationError,
    Credentials,
    DeleteResult,
    MailboxSession,
    MaildropInUse,
    MessageGone,
    MessageInfo,
    Peer,
    PermanentFailure,
    TemporaryFailure,
)

__all__ = [
    "Adapter",
    "AdapterError",
    "AuthResult",
    "AuthenticationFailed",
    "ConfigError",
    "ConfigurationError",
    "Credentials",
    "DeleteResult",
    "MailboxSession",
    "MaildropInUse",
    "MessageGone",
    "MessageInfo",
    "Peer",
    "PermanentFailure",
    "TemporaryFailure",
    "load_adapter_class",
    "registered",
]

#: The entry point group adapters register under; the bundled ones too (setup.py).
GROUP = "pop3sf.adapters"

#: The bundled adapters as setup.py registers them (a test keeps the two equal). Looking them up
#: here instead of in the package metadata spares start-up importlib.metadata (~20 ms of CPU).
BUNDLED = {
    "list": "pop3sf.adapters.memory:ListAdapter",
    "directory": "pop3sf.adapters.directory:DirectoryAdapter",
    "directory_multi": "pop3sf.adapters.directory:MultiUserDirectoryAdapter",
    "maildir": "pop3sf.adapters.maildir:MaildirAdapter",
    "mysql": "pop3sf.adapters.mysql:MySQLAdapter",
    "mysql_multi": "pop3sf.adapters.mysql:MultiUserMySQLAdapter",
    "sql": "pop3sf.adapters.sql:SQLAdapter",
    "journal": "pop3sf.adapters.journal:JournalAdapter",
}


def registered(group: str = GROUP) -> dict[str, str]:
    """Registered name -> ``module:Class`` of every installed adapter (or of another group)."""
    from importlib.metadata import entry_points  # reads every installed package's metadata

    return {ep.name: ep.value for ep in entry_points(group=group)}


def load_object(name: str, group: str, what: str = "adapter") -> Any:
    """What a registered *name* of *group*, or a ``module:Class`` (or dotted) path, names.

    Raises :class:`ConfigError` for an unknown name or an import failure.
    """
    target = BUNDLED.get(name) if group == GROUP else None
    if target is None:
        target = registered(group).get(name)
    if target is None:
        if ":" not in name and "." not in name:
            listed = ", ".join(sorted(registered(group)))
            raise ConfigError(f"unknown {what} {name!r} (known: {listed}; or module:Class)")
        target = name
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {what} {name!r} ({target}): {exc}") from exc


def load_adapter_class(name: str) -> type[Adapter]:
    """Resolve an entry-point name (group ``pop3sf.adapters``) or a ``module:Class`` path."""
    obj = load_object(name, GROUP)
    if not (isinstance(obj, type) and issubclass(obj, Adapter)):
        raise ConfigError(f"adapter {name!r} is not an Adapter subclass")
    return obj
