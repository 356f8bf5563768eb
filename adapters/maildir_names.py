"""Maildir names, location templates and Dovecot's ``dovecot-uidlist``: parsing only, no I/O.

What :mod:`.maildir` (the adapter) and the admin tools need to understand an existing Dovecot
installation: base names, flags and ``,W=`` sizes in Maildir file names, Dovecot's
``mail_location`` and ``%`` variables, its uidlist file and its ``pop3_uidl_format``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from .base import ConfigError, PermanentFailure
from .passwdfile import PasswdEntry

UIDLIST = "dovecot-uidlist"
SUBDIRS = ("new", "cur")
#: Dovecot's default ``pop3_uidl_format``: the IMAP uid and the uidvalidity, 8 hex digits each.
DOVECOT_UIDL_FORMAT = "%08Xu%08Xv"

_W_SIZE = re.compile(r",W=(\d+)(?=[,:]|$)")
_DELIVERY = re.compile(r"(\d+)(?:\.[^.:]*?M(\d+))?")
_UIDL_CHARS = re.compile(r"[\x21-\x7e]{1,70}")
_NAME_FORBIDDEN = re.compile(r"[\x00-\x20\x7f/\\:%]")


def is_valid_uidl(text: str) -> bool:
    """1-70 octets of 0x21-0x7E (RFC 1939 §7)."""
    return _UIDL_CHARS.fullmatch(text) is not None


def basename_uidl(base: str) -> str:
    """The ``basename`` UIDL: the base name when it is a valid UIDL, else its SHA-1 hex."""
    if is_valid_uidl(base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def split_name(name: str) -> tuple[str, str]:
    """(base name, flags) of a Maildir file name; flags are the letters after ``:2,``."""
    base, _, info = name.partition(":")
    return base, info[2:] if info.startswith("2,") else ""


def w_size(base: str) -> int | None:
    """The ``,W=<n>`` size (the message with CRLF line ends) in a base name, if any."""
    m = _W_SIZE.search(base)
    return int(m.group(1)) if m else None


def delivery_key(base: str) -> tuple[int, int] | None:
    """(seconds, microseconds) of delivery from a base name ``<time>.M<usec>...``, if it has one."""
    m = _DELIVERY.match(base)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def is_valid_username(name: str) -> bool:
    """Whether a login name can safely fill a path template (``%u``, ``%n``, ``%d``)."""
    if not 0 < len(name) <= 255 or _NAME_FORBIDDEN.search(name) or name.count("@") > 1:
        return False
    local, _, domain = name.partition("@")
    if not local or local.startswith("."):
        return False
    return "@" not in name or (bool(domain) and not domain.startswith(".") and ".." not in domain)


# --- templates ------------------------------------------------------------------------------

_VAR = re.compile(r"%(?:(?P<mod>[LU]?)(?P<short>[undh%])|\{(?P<long>[a-z]+)\}|(?P<bad>.?))")
_LONG = {"user": "u", "username": "n", "domain": "d", "home": "h"}


def expand(template: str, user: str, entry: PasswdEntry | None) -> str:
    """Dovecot-style ``%u`` (user), ``%n`` (local part), ``%d`` (domain), ``%h`` (home), ``%%``,
    the ``%L``/``%U`` case modifiers and the long forms ``%{user}`` etc.; ``~`` leading = home."""
    local, _, domain = user.partition("@")
    values = {"u": user, "n": local, "d": domain, "h": entry.home if entry else "", "%": "%"}
    if template.startswith("~") and (len(template) == 1 or template[1] == "/"):
        template = "%h" + template[1:]

    def sub(m: re.Match[str]) -> str:
        key = m.group("short") or _LONG.get(m.group("long") or "", "")
        if not key:
            raise ConfigError(f"unsupported variable {m.group(0)!r} in {template!r} "
                                     "(use %u %n %d %h %%)")
        if key == "h" and not values["h"]:
            raise PermanentFailure(f"no home directory for {user!r} in the passwd-file")
        value = values[key]
        mod = m.group("mod")
        return value.lower() if mod == "L" else value.upper() if mod == "U" else value

    return _VAR.sub(sub, template)


class Location(NamedTuple):
    """A parsed ``mail_location``: the Maildir template and Dovecot's CONTROL= directory."""

    path: str
    control: str | None


def parse_location(text: str) -> Location:
    """``[maildir:]PATH[:KEY=VALUE...]`` as in Dovecot's ``mail_location``."""
    text = text.strip()
    if text.startswith("maildir:"):
        text = text[len("maildir:"):]
    elif re.match(r"[a-z0-9]+:", text):
        raise ConfigError(f"mail_location {text!r}: only maildir is supported")
    path, *options = text.split(":")
    control = None
    for option in options:
        key, _, value = option.partition("=")
        if key.upper() == "CONTROL" and value:
            control = value
    if not path:
        raise ConfigError("mail_location: no path")
    # Check the variables now, with a made-up user, so a typo fails at start.
    probe = PasswdEntry("probe@example.org", "", home="/home/probe")
    for template in filter(None, (path, control)):
        expand(template, probe.user, probe)
    return Location(path, control)


# --- dovecot-uidlist --------------------------------------------------------------------------

@dataclass(frozen=True)
class UidRecord:
    uid: int
    ext: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Uidlist:
    """What pop3sf needs of a ``dovecot-uidlist``: uidvalidity and base name -> record."""

    uidvalidity: int
    next_uid: int
    guid: str
    records: Mapping[str, UidRecord]


def parse_uidlist(data: bytes) -> Uidlist | None:
    """Dovecot's uidlist, versions 1 and 3; None when the header is unusable.

    v3: header ``3 V<uidvalidity> N<nextuid> G<guid> ...``, records
    ``<uid> [<key><value> ...] :<filename>`` (keys: ``P`` POP3 UIDL, ``O`` POP3 order,
    ``W``/``S`` sizes, ``G`` GUID). v1: header ``1 <uidvalidity> <nextuid>``, records
    ``<uid> <filename>``. Records are matched by base name, as Dovecot does.
    """
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    header = lines[0].split()
    if not header or header[0] not in ("1", "3"):
        return None
    version = int(header[0])
    uidvalidity = next_uid = 0
    guid = ""
    try:
        if version == 1:
            uidvalidity, next_uid = int(header[1]), int(header[2])
        else:
            for item in header[1:]:
                if item[:1] == "V":
                    uidvalidity = int(item[1:])
                elif item[:1] == "N":
                    next_uid = int(item[1:])
                elif item[:1] == "G":
                    guid = item[1:]
    except (ValueError, IndexError):
        return None
    records: dict[str, UidRecord] = {}
    prev = 0
    for line in lines[1:]:
        parsed = _uidlist_record(line, version)
        if parsed is None:
            continue
        uid, ext, filename = parsed
        if uid <= prev:  # Dovecot treats unordered uids as corruption; keep what came first
            continue
        prev = uid
        base = filename.partition(":")[0]
        records[base] = UidRecord(uid, ext)
    return Uidlist(uidvalidity, next_uid, guid, records)


def _uidlist_record(line: str, version: int) -> tuple[int, dict[str, str], str] | None:
    uid_text, sep, rest = line.rstrip("\r").partition(" ")
    if not sep or not uid_text.isdigit() or int(uid_text) == 0:
        return None
    rest = rest.lstrip(" ")
    ext: dict[str, str] = {}
    if version == 3:
        while rest and not rest.startswith(":"):
            token, _, rest = rest.partition(" ")
            rest = rest.lstrip(" ")
            if token:
                ext.setdefault(token[0], token[1:])
        if not rest.startswith(":"):
            return None
        rest = rest[1:]
    if not rest or "/" in rest:
        return None
    return int(uid_text), ext, rest


_UIDL_VAR = re.compile(r"%(0?)(\d*)([LUX]*)(?:([uvgf%])|\{([a-z]+)\}|.?)")


def format_uidl(fmt: str, uid: int, uidvalidity: int, base: str, guid: str) -> str:
    """Dovecot's ``pop3_uidl_format`` for one message: ``%u`` uid, ``%v`` uidvalidity, ``%f``
    base name, ``%g`` GUID (the base name unless the uidlist stores one), with ``0``-padding,
    width and the ``X`` (lowercase hex, as Dovecot prints it), ``L``, ``U`` modifiers."""
    values = {"u": str(uid), "v": str(uidvalidity), "f": base, "g": guid or base, "%": "%"}
    longs = {"uid": "u", "uidvalidity": "v", "filename": "f", "guid": "g"}

    def sub(m: re.Match[str]) -> str:
        key = m.group(4) or longs.get(m.group(5) or "", "")
        if not key:
            raise ConfigError(f"pop3_uidl_format: unsupported variable {m.group(0)!r} "
                                     "(supported: %u %v %f %g, %{uid} %{uidvalidity} ...)")
        value = values[key]
        for mod in m.group(3):
            if mod == "X":
                value = format(int(value) if value.isdigit() else 0, "x")
            elif mod == "L":
                value = value.lower()
            elif mod == "U":
                value = value.upper()
        width = int(m.group(2) or 0)
        if width and m.group(1):
            value = value.rjust(width, "0")
        elif width:
            value = value[:width]
        return value

    return _UIDL_VAR.sub(sub, fmt)
