"""What one journal account sees: its filters applied to a ``systemd.journal.Reader``.

Listing touches as little as it can. Entry mode walks back from the journal's tail reading only
each entry's timestamp and cursor (C calls, no field conversion) until the window or the
account's cap ends; the full fields are read only for entries whose size isn't cached yet.
Digest mode walks the window forward once, reading the few fields a digest shows. A Reader is
opened per call and closed after: a system journal is dozens of files, and an idle POP3
session should not hold their descriptors.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .base import TemporaryFailure
from .journal_render import MAX_TEXT, PRIORITIES, Line, digest, digest_uid, entry_uid

GROUPS = ("entry", "unit-hour", "unit-day")
#: Seconds after its end a period counts as closed: entries journald is still writing (a
#: burst, a slow disk) land before its digest is listed.
CLOSE_GRACE = 60
_MATCH = re.compile(r"[A-Z0-9_]{1,64}=.*", re.DOTALL)
_DURATION = re.compile(r"(\d+)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_UNIT_KEYS = ("_SYSTEMD_UNIT", "_SYSTEMD_USER_UNIT", "SYSLOG_IDENTIFIER", "_COMM")


def parse_matches(items: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """``FIELD=value`` items, ``+`` between alternatives (as journalctl takes them); raises
    ValueError naming the first bad item."""
    terms: list[list[str]] = [[]]
    for item in items:
        item = item.strip()
        if item == "+":
            terms.append([])
        elif _MATCH.fullmatch(item):
            terms[-1].append(item)
        else:
            raise ValueError(f"{item!r} is not FIELD=value (FIELD in capitals, digits and _) "
                             "or +")
    if any(not term for term in terms) and len(terms) > 1:
        raise ValueError("+ must stand between two groups of FIELD=value")
    return tuple(tuple(term) for term in terms if term)


def parse_priority(value: str) -> int:
    value = value.strip().lower()
    if value in PRIORITIES:
        return PRIORITIES.index(value)
    if value.isdigit() and int(value) < len(PRIORITIES):
        return int(value)
    raise ValueError(f"{value!r}: one of {', '.join(PRIORITIES)} or 0-7")


def parse_duration(value: str) -> int:
    """``7d``, ``12h``, ``90m``, ``2w``, ``3600`` (seconds) -> seconds, at most 400 days."""
    m = _DURATION.fullmatch(value.strip().lower())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"{value!r}: a positive number with s, m, h, d or w, e.g. 7d")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > 400 * 86400:
        raise ValueError(f"{value!r}: at most 400d")
    return seconds


@dataclass(frozen=True)
class Mailbox:
    """One account: its password and which entries it shows, in which shape."""

    name: str
    password_hash: str = field(repr=False)
    terms: tuple[tuple[str, ...], ...] = ()
    priority: int = 7
    since: int = 7 * 86400
    max_messages: int = 1000
    group: str = "entry"

    @property
    def fingerprint(self) -> str:
        """What a digest's content depends on beyond unit and period: its UIDL changes with
        the filters, so a changed filter can never change a message under a listed UIDL."""
        return digest(repr((self.terms, self.priority, self.group)), size=8)


def open_reader(directory: str) -> Any:
    """A Reader of *directory*'s journal files, or of the local system (and users') journal.
    Raises TemporaryFailure: a session call's failure is temporary."""
    from systemd import journal

    try:
        reader = journal.Reader(path=directory) if directory else \
            journal.Reader(flags=journal.LOCAL_ONLY)
    except OSError as exc:
        raise TemporaryFailure(f"cannot open the journal {directory or '(system)'}: "
                               f"{exc.strerror or exc}") from exc
    reader.data_threshold = MAX_TEXT + 1
    return reader


@contextmanager
def filtered(directory: str, mailbox: Mailbox) -> Iterator[Any]:
    """An open Reader with the mailbox's matches (ORed terms, each with the priority cap)."""
    reader = open_reader(directory)
    try:
        for i, term in enumerate(mailbox.terms or ((),)):
            if i:
                reader.add_disjunction()
            for match in term:
                reader.add_match(match)
            if mailbox.priority < 7:
                for p in range(mailbox.priority + 1):
                    reader.add_match(f"PRIORITY={p}")
        yield reader
    except OSError as exc:
        raise TemporaryFailure(f"reading the journal: {exc.strerror or exc}") from exc
    finally:
        reader.close()


def get(reader: Any, key: str) -> bytes:
    try:
        value: bytes = reader._get(key)
    except KeyError:
        return b""
    return value


def unit_at(reader: Any) -> bytes:
    """:func:`.journal_render.unit_of` of the current entry, reading only what it needs."""
    for key in _UNIT_KEYS:
        value = get(reader, key)
        if value:
            return value
    return b"journal"


# --- entry mode ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    uid: str
    size: int
    where: Any  # a cursor (entry) or a Period (digest)


def list_entries(reader: Any, mailbox: Mailbox, now: float, hidden: set[str],
                 size_of: Callable[[str, Callable[[], bytes]], int],
                 render: Callable[[dict[str, Any], int, str], bytes]) -> list[Listed]:
    """The newest ``max_messages`` visible entries inside the window, oldest first.

    ``size_of(uid, make)`` returns a cached size or measures ``make()``; ``make`` reads the
    entry's fields only then, while the reader still stands on it."""
    cutoff = int((now - mailbox.since) * 1e6)
    listed: list[Listed] = []
    reader.seek_tail()
    while len(listed) < mailbox.max_messages and reader._previous():
        realtime = reader._get_realtime()
        if realtime < cutoff:
            break
        cursor = reader._get_cursor()
        uid = entry_uid(realtime, cursor)
        if uid in hidden:
            continue

        def make(realtime: int = realtime, cursor: str = cursor) -> bytes:
            return render(reader._get_all(), realtime, cursor)

        size = size_of(uid, make)
        listed.append(Listed(uid, size, cursor))
    listed.reverse()
    return listed


def entry_at(reader: Any, cursor: str) -> tuple[dict[str, Any], int] | None:
    """(fields, realtime µs) of the entry at *cursor*, None if it has gone (vacuumed)."""
    try:
        reader.seek_cursor(cursor)
    except (OSError, ValueError):
        return None
    if not reader._next() or not reader.test_cursor(cursor):
        return None
    return reader._get_all(), reader._get_realtime()


# --- digest mode --------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    kind: str  # unit-hour | unit-day
    start: int  # Unix seconds
    end: int
    unit: bytes
    #: The timestamps of the entries it was listed with: RETR serves exactly those.
    stamps: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def bounds(self) -> tuple[datetime.datetime, datetime.datetime]:
        return (datetime.datetime.fromtimestamp(self.start).astimezone(),
                datetime.datetime.fromtimestamp(self.end).astimezone())


def period_of(ts: float, group: str) -> tuple[int, int]:
    """(start, end) in Unix seconds of the local-time hour or day holding *ts*."""
    moment = datetime.datetime.fromtimestamp(ts).astimezone()
    if group == "unit-hour":
        start = moment.replace(minute=0, second=0, microsecond=0)
        return int(start.timestamp()), int(start.timestamp()) + 3600
    start = datetime.datetime.combine(moment.date(), datetime.time()).astimezone()
    after = datetime.datetime.fromtimestamp(start.timestamp() + 26 * 3600).astimezone()
    end = datetime.datetime.combine(after.date(), datetime.time()).astimezone()
    return int(start.timestamp()), int(end.timestamp())


def line_at(reader: Any, realtime: int) -> Line:
    priority = get(reader, "PRIORITY")
    return Line(realtime, int(priority) if priority.isdigit() and int(priority) < 8 else None,
                get(reader, "MESSAGE"), get(reader, "_HOSTNAME"))


def digest_window(mailbox: Mailbox, now: float) -> tuple[int, int]:
    """(first, closed): the start of the period holding the window's start, and of the period
    still open. Digests cover exactly the periods in between; a listing of them stays valid
    until this pair changes (once an hour or day), which is what the adapter caches by."""
    return (period_of(now - mailbox.since, mailbox.group)[0],
            period_of(now - CLOSE_GRACE, mailbox.group)[0])


def collect_digests(reader: Any, mailbox: Mailbox,
                    window: tuple[int, int]) -> list[tuple[str, Period, list[Line]]]:
    """Every closed period of the window, per unit: (uid, period, lines), oldest first. The
    period still open is left for later: a digest is offered once, complete."""
    first, closed = window
    groups: dict[tuple[int, bytes], list[Line]] = {}
    bounds: dict[int, int] = {}
    start = end = 0  # the period of the entry before: the next one is most likely in it too
    reader.seek_realtime(first * 1_000_000)
    while reader._next():
        realtime = reader._get_realtime()
        if realtime >= closed * 1_000_000:
            break
        if realtime < first * 1_000_000:
            continue
        if not start * 1_000_000 <= realtime < end * 1_000_000:
            start, end = period_of(realtime / 1e6, mailbox.group)
            bounds[start] = end
        groups.setdefault((start, unit_at(reader)), []).append(line_at(reader, realtime))
    kind = mailbox.group.split("-")[1]
    return [(digest_uid(kind, start, unit, mailbox.fingerprint),
             Period(mailbox.group, start, bounds[start], unit,
                    tuple(line.realtime_us for line in lines)), lines)
            for (start, unit), lines in sorted(groups.items())]


def lines_of(reader: Any, period: Period) -> list[Line] | None:
    """A digest's lines read again (RETR): the entries it was listed with, in order, so an
    entry that arrived late (a clock step, an imported journal) can't change it; None when
    some have gone (the journal was vacuumed), as the message then no longer exists."""
    lines = []
    stamps = set(period.stamps)
    reader.seek_realtime(period.start * 1_000_000)
    while reader._next():
        realtime = reader._get_realtime()
        if realtime >= period.end * 1_000_000:
            break
        if realtime in stamps and unit_at(reader) == period.unit:
            lines.append(line_at(reader, realtime))
    return lines if len(lines) == len(period.stamps) else None
