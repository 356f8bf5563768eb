"""``pop3sf-admin preview ACCOUNT``: what an account would be served, through any adapter's
``preview_session(account)`` hook (docs/adapters.md#admin), without its password.

It lists with the adapter's own code, so what it shows is what a mail client would get: the
journal's matches and windows, a database's queries. Nothing changes: the session is read-only
and is never asked to delete.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from pop3sf.adapters import AdapterError, AuthenticationFailed, ConfigError, load_adapter_class

from .exits import EX_CONFIG, EX_DATAERR, EX_NOUSER, EX_OK, EX_UNAVAILABLE, PROG, Failure
from .sources import summarize


def preview(adapter_type: str, adapter_config: Mapping[str, Any], account: str,
            message: int | None = None) -> int:
    """What ACCOUNT would be served, through the adapter's ``preview_session`` (any adapter
    that has one: docs/adapters.md#admin), without its password and without hiding anything."""
    try:
        adapter = load_adapter_class(adapter_type)(adapter_config)
        adapter.start()
    except ConfigError as exc:
        raise Failure(f"bad configuration: [adapter] ({adapter_type}): {exc}",
                      EX_CONFIG) from exc
    try:
        try:
            session = adapter.preview_session(account)
        except NotImplementedError:
            raise Failure(f"adapter type {adapter_type!r} can't preview (it has no "
                          "preview_session)", EX_UNAVAILABLE) from None
        except AuthenticationFailed as exc:
            raise Failure(str(exc), EX_NOUSER) from None
        try:
            infos = session.list_messages()
            if message is not None:
                if not 1 <= message <= len(infos):
                    raise Failure(f"no message {message} ({len(infos)} listed)", EX_DATAERR)
                with session.open_message(infos[message - 1].uid) as stream:
                    sys.stdout.buffer.write(stream.read())
                return EX_OK
            for n, info in enumerate(infos, 1):
                m = summarize(info.uid, info.size, session.open_message(info.uid))
                print(f"{n}\t{m.id}\t{m.size}\t{m.date.strftime('%Y-%m-%d %H:%M:%S')}\t"
                      f"{m.subject}")
            print(f"{PROG}: {account}: {len(infos)} message(s), "
                  f"{sum(i.size for i in infos)} octets", file=sys.stderr)
        finally:
            session.connection_closed()
    except AdapterError as exc:
        raise Failure(f"{account}: {exc}", 1) from exc
    finally:
        adapter.close()
    return EX_OK
