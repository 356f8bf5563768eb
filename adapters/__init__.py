"""Adapters: the bridges between data sources and POP3 maildrops (see :mod:`.base`)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
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

#: The entry point group adapters register under; the bundled ones too (setup.py), so the
#: installed package metadata is the one list of adapter names.
GROUP = "pop3sf.adapters"


def registered(group: str = GROUP) -> dict[str, str]:
    """Registered name -> ``module:Class`` of every installed adapter (or of another group)."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def load_object(name: str, group: str, what: str = "adapter") -> Any:
    """What a registered *name* of *group*, or a ``module:Class`` (or dotted) path, names.

    Raises :class:`ConfigError` for an unknown name or an import failure.
    """
    known = registered(group)
    target = known.get(name)
    if target is None:
        if ":" not in name and "." not in name:
            listed = ", ".join(sorted(known))
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
