"""``pop3sf-admin``: users and messages of the configured data source, from the shell.

The source is the ``[adapter]`` section of ``/etc/pop3sf.conf`` (or ``--config``), so the tool
always writes where the server reads. Passwords are asked twice on a terminal, or read as one
line from standard input in scripts (``echo "$pw" | pop3sf-admin user add alice``). Errors go to
stderr with an exit status from ``sysexits.h``, so scripts can tell them apart.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from pop3sf.adapters.plaintext import decode_text

from pop3sf import control, passwords

from .exits import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    PROG,
    Failure,
)
from .sources import (
    BadMessage,
    BadName,
    NotSupported,
    Source,
    SourceError,
    UnknownUser,
    UserExists,
    open_source,
    password_bytes,
)

if TYPE_CHECKING:
    from pop3sf.config import Settings

DEFAULT_CONFIG = "/etc/pop3sf.conf"

EPILOG = """\
exit status: 0 success, 64 usage, 65 bad name/message/password, or a user to delete
still has messages (nothing deleted; --force deletes them too), 66 unreadable input,
67 unknown user, 69 not supported by this source, 73 user exists, 74 I/O error,
77 permission denied, 78 bad configuration, 1 other source errors.
who/kick: 69 server not running (or its control socket disabled), 67 kick matched nothing,
75 server busy or not answering, 70 request refused by the server."""


class SourceSettings(NamedTuple):
    adapter_type: str
    adapter_config: Mapping[str, Any]
    service_user: str | None


def load_settings(path: str) -> SourceSettings:
    """The configured source, read through the server's own config loader."""
    settings = load_server_settings(path)
    return SourceSettings(settings.adapter_type, settings.adapter_config, settings.service_user)


def load_server_settings(path: str) -> Settings:
    """The whole configuration, with errors as :class:`Failure`."""
    from pop3sf.config import ConfigError, load_config

    if not os.path.exists(path):
        raise Failure(f"config file {path} does not exist", EX_CONFIG)
    if not os.access(path, os.R_OK):
        raise Failure(f"cannot read {path}: permission denied", EX_NOPERM)
    try:
        settings = load_config(path)
    except ConfigError as exc:
        raise Failure(f"bad configuration: {exc}", EX_CONFIG) from exc
    except PermissionError as exc:
        raise Failure(f"cannot read {path}: {exc.strerror}", EX_NOPERM) from exc
    except OSError as exc:
        raise Failure(f"cannot read {path}: {exc}", EX_CONFIG) from exc
    return settings


# --- input --------------------------------------------------------------------------------


def read_password(confirm: bool = True) -> str:
    """Twice via getpass on a terminal; otherwise one line of standard input."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Retype password: ") != first:
            raise Failure("passwords differ; nothing changed", EX_DATAERR)
        password = first
    else:
        line = sys.stdin.buffer.readline()
        try:
            password = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise Failure("the password read from stdin is not UTF-8", EX_DATAERR) from None
    if not password:
        raise Failure("empty password refused", EX_DATAERR)
    return password


def _read_input(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except PermissionError as exc:
        raise Failure(f"cannot read {path}: permission denied", EX_NOINPUT) from exc
    except OSError as exc:
        raise Failure(f"cannot read {path}: {exc.strerror or exc}", EX_NOINPUT) from exc


def _looks_like_message(data: bytes) -> bool:
    first = data.lstrip(b"\r\n").split(b"\n", 1)[0]
    name, colon, _ = first.partition(b":")
    return bool(colon) and bool(name) and all(33 <= c <= 126 for c in name)


# --- commands -----------------------------------------------------------------------------


def cmd_user_add(source: Source, args: argparse.Namespace) -> int:
    if source.has_users:  # complain before asking for a password
        source.check_user_name(args.name)
        if args.name in source.list_users():
            raise UserExists(f"user {args.name!r} already exists")
    source.add_user(args.name, read_password())
    print(f"{PROG}: added user {args.name}", file=sys.stderr)
    return EX_OK


def cmd_user_passwd(source: Source, args: argparse.Namespace) -> int:
    if source.has_users:  # fails early for bad names and unknown users, before asking
        source.check_user_name(args.name)
        source.list_messages(args.name)
    source.set_password(args.name, read_password())
    print(f"{PROG}: password of {args.name} changed", file=sys.stderr)
    return EX_OK


def cmd_user_del(source: Source, args: argparse.Namespace) -> int:
    count = source.count_messages(args.name) if source.has_users else 0
    if count and not args.force:
        raise Failure(f"user {args.name} still has {count} message(s); nothing deleted. "
                      "To delete the user and the messages, add --force", EX_DATAERR)
    source.delete_user(args.name)
    print(f"{PROG}: deleted user {args.name} and {count} message(s)", file=sys.stderr)
    return EX_OK


def cmd_user_list(source: Source, args: argparse.Namespace) -> int:
    for name in source.list_users():
        print(name)
    return EX_OK


def cmd_message_add(source: Source, args: argparse.Namespace) -> int:
    if args.eml is not None:
        data = _read_input(args.eml)
        if not data.strip():
            raise Failure("empty message refused", EX_DATAERR)
        if not _looks_like_message(data):
            raise Failure(f"{args.eml} does not start with a header field; to add plain text, "
                          "leave out --eml", EX_DATAERR)
        message_id = source.add_message(args.name, data)
    else:
        if args.text == "-" and sys.stdin.isatty():
            print(f"{PROG}: reading the message text from the terminal; end with Ctrl-D",
                  file=sys.stderr)
        data = _read_input(args.text)
        if not data.strip():
            raise Failure("empty message refused", EX_DATAERR)
        message_id = source.add_message(args.name, decode_text(data))
    print(message_id)
    return EX_OK


def cmd_message_list(source: Source, args: argparse.Namespace) -> int:
    for m in source.list_messages(args.name):
        print(f"{m.id}\t{m.size}\t{m.date.strftime('%Y-%m-%d %H:%M:%S')}\t{m.subject}")
    return EX_OK


def cmd_hash(args: argparse.Namespace) -> int:
    """A bcrypt hash for the single-user sources' ``password_hash`` key."""
    print(passwords.hash_bcrypt(password_bytes(read_password()), rounds=args.rounds))
    return EX_OK


def cmd_preview(settings: SourceSettings, args: argparse.Namespace) -> int:
    from .preview import preview  # the one command that needs no Source

    return preview(settings.adapter_type, settings.adapter_config, args.account, args.message)


# --- live sessions: who and kick, asked of the running server ----------------------------


def ask_server(settings: Settings, request: dict[str, Any]) -> dict[str, Any]:
    """The running server's reply over its control socket, or a Failure saying why not.

    With ``[server] processes = N`` every serving process has its own socket (``PATH``,
    ``PATH.1`` ... ``PATH.N-1``): all are asked and their sessions put together; one that
    does not answer (a process being restarted) is left out.
    """
    reply = _ask_one(settings, settings.server.control_socket, request)
    for index in range(1, settings.server.processes):
        try:
            more = _ask_one(settings, f"{settings.server.control_socket}.{index}", request)
        except Failure:
            continue
        reply["sessions"] = [*reply.get("sessions", []), *more.get("sessions", [])]
    return reply


def _ask_one(settings: Settings, path: str, request: dict[str, Any]) -> dict[str, Any]:
    if not path:
        raise Failure(f"the control socket is disabled ([server] control_socket is empty in "
                      f"{settings.source}); set it and restart pop3sf", EX_UNAVAILABLE)
    try:
        reply = control.ask(path, request)
    except (FileNotFoundError, ConnectionRefusedError):
        raise Failure(f"pop3sf is not running (nothing answers on {path})",
                      EX_UNAVAILABLE) from None
    except PermissionError:
        group = settings.server.group or settings.server.user
        raise Failure(f"permission denied on {path}; run as root or as a member of group "
                      f"{group}", EX_NOPERM) from None
    except TimeoutError:
        raise Failure(f"pop3sf did not answer on {path}", EX_TEMPFAIL) from None
    except (OSError, ValueError) as exc:
        raise Failure(f"talking to pop3sf on {path} failed: {exc}", EX_IOERR) from None
    if not reply["ok"]:
        error = str(reply.get("error"))
        raise Failure(f"pop3sf refused: {error}",
                      EX_TEMPFAIL if error.startswith(("busy", "timed out")) else EX_SOFTWARE)
    return reply


def _client(s: Mapping[str, Any]) -> str:
    host = s["address"]
    return f"[{host}]:{s['port']}" if ":" in host else f"{host}:{s['port']}"


def cmd_who(settings: Settings, args: argparse.Namespace) -> int:
    sessions = sorted(ask_server(settings, {"command": "who"})["sessions"],
                      key=lambda s: (s["account"], s["since"]))
    if args.json:
        print(json.dumps(sessions, indent=1))
        return EX_OK
    rows = [("ACCOUNT", "ADDRESS", "LISTENER", "TLS", "SINCE", "SENT", "MODE")]
    rows += [(s["account"], _client(s), s["listener"], "yes" if s["tls"] else "no",
              time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["since"])),
              str(s["bytes_out"]), "read-only" if s["read_only"] else "read-write")
             for s in sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return EX_OK


def cmd_kick(settings: Settings, args: argparse.Namespace) -> int:
    ended = ask_server(settings, {"command": "kick", "target": args.target})["sessions"]
    if not ended:
        raise Failure(f"no session of account or from address {args.target}", EX_NOUSER)
    for s in ended:
        who = s["account"] or "(not logged in)"
        print(f"{PROG}: ended {who} from {_client(s)} on {s['listener']}", file=sys.stderr)
    return EX_OK


# --- command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with EX_USAGE, as the exit status list says (argparse's own is 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Manage users and messages of the data source pop3sf serves.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help=f"configuration file (default {DEFAULT_CONFIG})")
    sub = parser.add_subparsers(dest="area", required=True)

    user = sub.add_parser("user", help="add, change, delete and list users")
    user_sub = user.add_subparsers(dest="action", required=True)
    p = user_sub.add_parser("add", help="add a user (password asked, or one line of stdin)")
    p.add_argument("name")
    p.set_defaults(func=cmd_user_add)
    p = user_sub.add_parser("passwd", help="change a user's password")
    p.add_argument("name")
    p.set_defaults(func=cmd_user_passwd)
    p = user_sub.add_parser("del", help="delete a user (and, with --force, their messages)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="also when the user has messages")
    p.set_defaults(func=cmd_user_del)
    p = user_sub.add_parser("list", help="list users")
    p.set_defaults(func=cmd_user_list)

    message = sub.add_parser("message", help="add and list messages")
    message_sub = message.add_subparsers(dest="action", required=True)
    p = message_sub.add_parser("add", help="add plain text from stdin, or an .eml with --eml")
    p.add_argument("name")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--eml", metavar="FILE", help="an RFC 5322 message file ('-': stdin)")
    group.add_argument("--text", metavar="FILE", default="-",
                       help="a plain text file to wrap (default: stdin)")
    p.set_defaults(func=cmd_message_add)
    p = message_sub.add_parser(
        "list", help="list a user's messages (id, size as the server sends it, date, subject)")
    p.add_argument("name")
    p.set_defaults(func=cmd_message_list)

    p = sub.add_parser("hash", help="print a bcrypt hash of a password (for password_hash)")
    p.add_argument("--rounds", type=int, default=12, choices=range(4, 32), metavar="4..31")
    p.set_defaults(func=None)

    p = sub.add_parser("preview", help="what an account would be served (number, UIDL, "
                       "size, date, subject), without its password")
    p.add_argument("account")
    p.add_argument("--message", type=int, metavar="N", help="print message N instead")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("who", help="list the running server's logged-in sessions")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(func=cmd_who)
    p = sub.add_parser("kick", help="end the sessions of an account or a client address "
                       "(their deletions are not committed)")
    p.add_argument("target", metavar="ACCOUNT|ADDRESS")
    p.set_defaults(func=cmd_kick)
    return parser


def _status_of(exc: BaseException) -> int:
    table: Sequence[tuple[type[BaseException], int]] = (
        (UnknownUser, EX_NOUSER), (BadName, EX_DATAERR), (BadMessage, EX_DATAERR),
        (UserExists, EX_CANTCREAT), (NotSupported, EX_UNAVAILABLE), (SourceError, 1),
        (PermissionError, EX_NOPERM), (OSError, EX_IOERR),
    )
    for cls, status in table:
        if isinstance(exc, cls):
            return status
    return EX_SOFTWARE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.area == "hash":
            return cmd_hash(args)
        if args.area in ("who", "kick"):
            return int(args.func(load_server_settings(args.config), args))
        if args.area == "preview":
            return cmd_preview(load_settings(args.config), args)
        settings = load_settings(args.config)
        source = open_source(settings.adapter_type, settings.adapter_config,
                             settings.service_user)
        func: Callable[[Source, argparse.Namespace], int] = args.func
        with source:
            return func(source, args)
    except Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.status
    except (SourceError, OSError) as exc:
        if isinstance(exc, PermissionError):
            where = f" ({exc.filename})" if exc.filename else ""
            message = f"permission denied{where}; run as root or as the service user"
        elif isinstance(exc, OSError):
            message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        else:
            message = str(exc)
        print(f"{PROG}: {message}", file=sys.stderr)
        return _status_of(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
