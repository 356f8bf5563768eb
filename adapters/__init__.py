"""Adapters: the bridges between data sources and POP3 maildrops (see :mod:`.base`)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .base import (
    Adapter,
    AdapterError,
    AuthenticationFailed,
    AuthResult,
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
]

#: The bundled adapters, found even when the package metadata is not installed.
BUNDLED = {
    "list": "pop3sf.adapters.memory:ListAdapter",
    "directory": "pop3sf.adapters.directory:DirectoryAdapter",
    "directory_multi": "pop3sf.adapters.directory:MultiUserDirectoryAdapter",
    "maildir": "pop3sf.adapters.maildir:MaildirAdapter",
    "mysql": "pop3sf.adapters.mysql:MySQLAdapter",
    "mysql_multi": "pop3sf.adapters.mysql:MultiUserMySQLAdapter",
}


def load_adapter_class(name: str) -> type[Adapter]:
    """Resolve an entry-point name (group ``pop3sf.adapters``) or a ``module:Class`` path."""
    target = BUNDLED.get(name)
    if target is None:
        for ep in entry_points(group="pop3sf.adapters"):
            if ep.name == name:
                target = ep.value
                break
    if target is None:
        if ":" not in name and "." not in name:
            known = ", ".join(sorted(set(BUNDLED) | {e.name for e in
                                                     entry_points(group="pop3sf.adapters")}))
            raise ConfigurationError(f"unknown adapter {name!r} (known: {known}; or module:Class)")
        target = name
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot load adapter {name!r} ({target}): {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Adapter)):
        raise ConfigurationError(f"adapter {name!r} ({target}) is not an Adapter subclass")
    return obj
