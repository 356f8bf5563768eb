"""Journal entries as RFC 5322 messages: pure functions of the entry, so sizes never drift.

Every message is rendered from the entry's raw fields (the octets journald stored) and the
configured names only, with no clock and no locale: rendering the same entry again gives the
same octets, so the size listed at login is the size RETR sends, and a message never changes
under its UIDL. Field values that aren't valid UTF-8 are shown with ``\\xNN`` escapes, control
characters likewise: the body is always valid UTF-8 text. The body travels ``8bit``, or
``quoted-printable`` when a line would exceed RFC 5322's 998 octets.

UIDLs carry the time they belong to, so the hidden set can be pruned without the journal:
``e.<realtime µs>.<16 hex of the cursor's hash>`` for an entry, ``h.``/``d.<period start>.<16
hex of unit and filters>`` for an hourly/daily digest; all well under 70 octets.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import quopri
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .plaintext import subject_for

#: syslog priorities by number (the journal's PRIORITY field).
PRIORITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
MAX_LINE = 998
#: A MESSAGE longer than this is cut (journald accepts up to hundreds of MiB); the reader's
#: data threshold is one more, so what is read, and therefore rendered, never varies.
MAX_TEXT = 1 << 20
#: Metadata values longer than this are summarised (a core dump, a binary blob).
MAX_FIELD = 512
#: Entries shown in one digest; the rest are counted.
MAX_DIGEST_ENTRIES = 5000

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LONG_LINE = re.compile(rb"[^\n]{%d}" % (MAX_LINE + 1))
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")

Fields = Mapping[str, bytes]


def text_of(value: bytes) -> str:
    """Field octets as printable text: UTF-8, other octets and controls (but tab and newline)
    as ``\\xNN``; CRLF and lone CR count as newlines."""
    text = value.decode("utf-8", "backslashreplace")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CONTROLS.search(text) is None:  # the common case: nothing to escape
        return text
    return _CONTROLS.sub(_escape, text)


def _escape(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def subject(text: str) -> str:
    """A Subject field body: short printable ASCII as it is, anything else through
    :func:`.plaintext.subject_for` (cleaned, folded, RFC 2047 encoded)."""
    if text.isascii() and text.isprintable() and "=?" not in text and len(text) <= 68:
        return text
    return subject_for(text)


def priority_of(fields: Fields) -> int | None:
    raw = fields.get("PRIORITY", b"")
    return int(raw) if raw.isdigit() and int(raw) < 8 else None


def priority_name(priority: int | None) -> str:
    return PRIORITIES[priority] if priority is not None else "-"


def unit_of(fields: Fields) -> bytes:
    """What the entry is grouped and labelled by: its systemd unit, else its syslog identifier,
    else its command name (journald sets ``_SYSTEMD_UNIT`` only for processes in a unit)."""
    for key in ("_SYSTEMD_UNIT", "_SYSTEMD_USER_UNIT", "SYSLOG_IDENTIFIER", "_COMM"):
        value = fields.get(key)
        if value:
            return value
    return b"journal"


def one_line(value: bytes, limit: int = 120) -> str:
    text = " ".join(text_of(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def host_of(fields: Fields, default: str) -> str:
    """The entry's host name when it is one (a journal may hold other machines' entries)."""
    name = fields.get("_HOSTNAME", b"").decode("ascii", "replace")
    return name if _HOSTNAME.fullmatch(name) else default


def digest(*parts: bytes | str, size: int = 16) -> str:
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        h.update(part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def entry_uid(realtime_us: int, cursor: str) -> str:
    # Once per listed entry at every login: hashlib directly (a cursor is ASCII).
    return f"e.{realtime_us}.{hashlib.blake2b(cursor.encode(), digest_size=8).hexdigest()}"


def digest_uid(kind: str, period_start: int, unit: bytes, fingerprint: str) -> str:
    return f"{kind[0]}.{period_start}.{digest(unit, fingerprint, size=8)}"


def uid_time(uid: str) -> float | None:
    """The time (Unix seconds) a UIDL belongs to, or None for a foreign one."""
    kind, _, rest = uid.partition(".")
    stamp = rest.partition(".")[0]
    if not stamp.isdigit():
        return None
    return int(stamp) / 1e6 if kind == "e" else float(stamp) if kind in "hd" else None


def local_time(realtime_us: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(realtime_us / 1e6).astimezone()


def _message(*, sender_host: str, recipient: str, date: datetime.datetime, message_id: str,
             subject: str, extra: Sequence[tuple[str, str]], body: str) -> bytes:
    """Header fields (ASCII) and a UTF-8 body with CRLF line ends and a final CRLF."""
    data = body.encode("utf-8")
    if not data.endswith(b"\n"):
        data += b"\n"
    qp = _LONG_LINE.search(data) is not None
    if qp:
        data = quopri.encodestring(data)
    head = [f"From: journal on {sender_host} <journal@{sender_host}>",
            f"To: {recipient}",
            f"Date: {email.utils.format_datetime(date)}",
            f"Message-ID: {message_id}",
            f"Subject: {subject}",
            *(f"{name}: {value}" for name, value in extra),
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Transfer-Encoding: {'quoted-printable' if qp else '8bit'}", "", ""]
    return "\r\n".join(head).encode("ascii") + data.replace(b"\n", b"\r\n")


def single(fields: Mapping[str, bytes | list[bytes]]) -> dict[str, bytes]:
    """Fields with one value each: a field sent twice (the Reader gives a list) keeps its
    first, as journalctl's short output does."""
    return {k: v[0] if isinstance(v, list) else v for k, v in fields.items()}


def _metadata(fields: Mapping[str, bytes | list[bytes]]) -> list[str]:
    out = []
    for key in sorted(fields):
        if key == "MESSAGE":
            continue
        value = fields[key]
        for one in value if isinstance(value, list) else [value]:
            if len(one) > MAX_FIELD:
                out.append(f"{key}=(more than {MAX_FIELD} octets, not shown)")
            elif one.isascii() and one.isalnum():  # ids, numbers, names: nothing to escape
                out.append(f"{key}={one.decode('ascii')}")
            else:
                out.append(f"{key}={text_of(one)}".replace("\n", "\\n"))
    return out


def render_entry(all_fields: Mapping[str, bytes | list[bytes]], realtime_us: int, cursor: str,
                 *, host: str, recipient: str) -> bytes:
    """One entry as a message: the MESSAGE text, then every other field after a ``-- ``
    signature line (mail clients dim it), as ``journalctl -o verbose`` would list them."""
    fields = single(all_fields)
    sender = host_of(fields, host)
    raw = fields.get("MESSAGE", b"")
    text = text_of(raw[:MAX_TEXT]) + ("\n[cut at 1 MiB]" if len(raw) > MAX_TEXT else "")
    priority = priority_of(fields)
    title = f"[{one_line(unit_of(fields), 60)}] {priority_name(priority)}: {one_line(raw)}"
    body = "\n".join([text, "", "-- ", f"__CURSOR={cursor}",
                      f"__REALTIME_TIMESTAMP={realtime_us}", *_metadata(all_fields)])
    return _message(sender_host=sender, recipient=recipient, date=local_time(realtime_us),
                    message_id=f"<{digest(cursor)}.entry@{sender}>",
                    subject=subject(title),
                    extra=[("X-Journal-Priority", priority_name(priority))], body=body)


@dataclass(frozen=True)
class Line:
    """What a digest shows of one entry."""

    realtime_us: int
    priority: int | None
    text: bytes
    host: bytes = b""


def render_digest(uid: str, unit: bytes, start: datetime.datetime, end: datetime.datetime,
                  lines: Sequence[Line], *, host: str, recipient: str) -> bytes:
    """A closed period's entries of one unit as one message, a line each (continuation lines
    indented), the worst priority in the Subject."""
    shown = lines[:MAX_DIGEST_ENTRIES]
    worst = min((line.priority for line in lines if line.priority is not None), default=None)
    first = next((line for line in lines if line.priority == worst), lines[0])
    sender = host_of({"_HOSTNAME": first.host}, host)
    span = f"{start:%Y-%m-%d %H:%M}-{end:%H:%M %Z}" if end - start <= datetime.timedelta(
        hours=1) else f"{start:%Y-%m-%d} ({start:%Z})"
    name = one_line(unit, 60)
    body = [f"{name}, {span}: {len(lines)} entr{'y' if len(lines) == 1 else 'ies'}", ""]
    for line in shown:
        stamp = local_time(line.realtime_us).strftime("%H:%M:%S")
        text = text_of(line.text[:MAX_TEXT]).split("\n")
        body.append(f"{stamp} {priority_name(line.priority):<7} {text[0]}")
        body.extend(f"    {more}" for more in text[1:])
    if len(lines) > len(shown):
        body += ["", f"[{len(lines) - len(shown)} more entries not shown]"]
    count = f"{len(lines)} entr{'y' if len(lines) == 1 else 'ies'}"
    title = f"[{name}] {priority_name(worst)}: {count}, {span}: {one_line(first.text)}"
    return _message(sender_host=sender, recipient=recipient, date=start,
                    message_id=f"<{digest(uid)}.digest@{sender}>", subject=subject(title),
                    extra=[("X-Journal-Priority", priority_name(worst))], body="\n".join(body))
