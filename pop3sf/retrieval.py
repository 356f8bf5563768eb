"""RETR and TOP: a message read on workers, written as the client takes it (docs/protocol.md §9).

A big message streams: one chunk per worker call, the next only once the output backlog is below
its threshold, so memory per session is bounded by a constant whatever the message size. A
pipelined run of RETR/TOP of small messages is read in one worker call instead, because a worker
round trip costs more than reading a small message; each message's output in such a batch is
capped, and the one that passes the cap streams like a big one. Commands behind the batch stay in
the input buffer until their answers are written. A lone RETR of a small message also reads the
small messages after it into the server's :class:`~pop3sf.readcache.ReadCache`, where repeated
TOPs are kept too: those are answered at once, without a worker round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

from pop3sf.adapters import MailboxSession, PermanentFailure
from pop3sf.wire import CHUNK, HeaderTooLarge, WireEncoder

from . import calls
from .commands import COMMANDS, RETRIEVAL, TRANSACTION, arguments_fit, parse
from .connection import Connection
from .maildrop import Maildrop
from .replies import END, ERR_NEEDS_UTF8, MESSAGE_FOLLOWS, OK, error_reply

#: Pipelined RETR/TOP of messages up to this size are read in batches; also the cap on each
#: message's output in a batch.
BATCH_SMALL = 128 * 1024
_BATCH_TOP = 1000  # TOP with at most this many lines counts as small
_TOP_READ = 16 * 1024
_BATCH_MAX = 64  # messages read in one batch
_BATCH_ITEMS = 1024  # commands answered in one batch
_BATCH_BYTES = 2 * 1024 * 1024
#: What a lone RETR reads ahead, at most (messages and octets), for adapters whose messages
#: never change: a client fetching messages in turn waits for a worker once per few of them.
_AHEAD_MAX = 8
_AHEAD_BYTES = 128 * 1024


class ReadingSession(calls.CallOwner, Protocol):
    """What a retrieval needs of its session."""

    conn: Connection
    account: str | None
    blocked: str | None
    retrieval: Retrieval | None
    retrieved: int
    close_reason: str

    @property
    def drop(self) -> Maildrop: ...
    def reply(self, data: bytes) -> None: ...
    def adapter_session(self) -> MailboxSession: ...


class Retrieval:
    """A RETR/TOP in progress: its stream and encoder live on whichever thread reads next."""

    __slots__ = ("uid", "encoder", "stream", "started", "eof", "read_size", "cache_key")

    def __init__(self, uid: str, encoder: WireEncoder, read_size: int = CHUNK,
                 cache_key: Hashable | None = None) -> None:
        self.uid = uid
        self.encoder = encoder
        self.read_size = read_size
        self.cache_key = cache_key  # where a TOP answer read in one piece is kept
        self.stream: Any = None
        self.started = False
        self.eof = False


Job = tuple[int, int | None]  # message index, TOP's line count (None: RETR)


def retrieve(session: ReadingSession, n: int, top_lines: int | None) -> None:
    if n in session.drop.refuse:
        session.reply(ERR_NEEDS_UTF8)
        return
    cached = _cached(session, n, top_lines)
    if cached is not None:
        session.retrieved += top_lines is None
        session.reply(cached)
        return
    session.blocked = RETRIEVAL
    if _batchable(session.drop, n, top_lines) and session.host.adapter.blocking:
        items, ends = _pipelined(session, (n, top_lines))
        ahead = _ahead(session, n) if len(items) == 1 and top_lines is None else []
        if len(items) > 1 or ahead:
            _read_batch(session, items, ends, ahead)
            return
    _stream(session, n, top_lines)


def _stream(session: ReadingSession, n: int, top_lines: int | None) -> None:
    drop = session.drop
    encoder = WireEncoder(top_lines=top_lines, downgrade=n in drop.downgrade)
    session.retrieval = Retrieval(drop.infos[n].uid, encoder,
                                  CHUNK if top_lines is None else _TOP_READ,
                                  None if top_lines is None else _cache_key(session, n, top_lines))
    if top_lines is None:
        session.retrieved += 1
    next_chunk(session)


def _cache_key(session: ReadingSession, n: int, top_lines: int | None) -> Hashable | None:
    """Where a read's answer is kept; None for an adapter whose messages may change under
    their unique id."""
    if not session.host.adapter.immutable_messages:
        return None
    drop = session.drop
    return session.account, drop.infos[n].uid, drop.sizes[n], top_lines, n in drop.downgrade


def _cached(session: ReadingSession, n: int, top_lines: int | None) -> bytes | None:
    """A kept answer: a TOP's stays for the next poll, a message read ahead is used once."""
    key = _cache_key(session, n, top_lines)
    if key is None:
        return None
    cache = session.host.read_cache
    return cache.pop(key) if top_lines is None else cache.get(key)


def _ahead(session: ReadingSession, n: int) -> list[Job]:
    """The small live messages after message ``n`` to read with it (and keep for a RETR)."""
    drop, cache = session.drop, session.host.read_cache
    jobs: list[Job] = []
    total = 0
    for m in range(n + 1, min(len(drop), n + 1 + _AHEAD_MAX)):
        if m in drop.deleted or m in drop.refuse:
            continue
        key = _cache_key(session, m, None)
        if key is None or drop.sizes[m] > BATCH_SMALL or total + drop.sizes[m] > _AHEAD_BYTES:
            break
        if key not in cache:
            jobs.append((m, None))
            total += drop.sizes[m]
    return jobs


def _batchable(drop: Maildrop, n: int, top_lines: int | None) -> bool:
    """Small enough to read whole in a batch: a small message, or a short TOP."""
    return drop.sizes[n] <= BATCH_SMALL if top_lines is None else top_lines <= _BATCH_TOP


def _pipelined(session: ReadingSession, first: Job) -> tuple[list[Job | bytes], list[int]]:
    """The commands queued right behind the first that one batch can answer, and where each
    one's line ends in the input buffer: RETR/TOP of small messages (read in the batch) and,
    between them, commands answered from the snapshot (their answers, computed now: nothing
    in a batch can change the snapshot)."""
    drop = session.drop
    items: list[Job | bytes] = [first]
    ends: list[int] = []
    reads, total = 1, min(drop.sizes[first[0]], BATCH_SMALL)
    for line, end in session.conn.lines_ahead():
        command, args = parse(line)
        if command is None or TRANSACTION not in command.states or \
                not arguments_fit(command, args):
            break
        if command.retrieves:
            n = drop.index(args)
            if isinstance(n, bytes) or n in drop.refuse:
                break
            top = None if command is COMMANDS[b"RETR"] else int(args[1])
            cached = None if top is None else _cached(session, n, top)  # a RETR's is used once
            if cached is not None:
                items.append(cached)
                ends.append(end)
                continue
            if not _batchable(drop, n, top) or total > _BATCH_BYTES or reads >= _BATCH_MAX:
                break
            total += min(drop.sizes[n], BATCH_SMALL)
            reads += 1
            items.append((n, top))
        else:
            answer = _snapshot_answer(drop, command.verb, args)
            if answer is None:
                break
            items.append(answer)
        ends.append(end)
        if len(items) >= _BATCH_ITEMS:
            break
    while isinstance(items[-1], bytes):  # answers after the last read need no batch
        items.pop()
        ends.pop()
    return items, ends


def _snapshot_answer(drop: Maildrop, verb: bytes, args: list[bytes]) -> bytes | None:
    """The answer of a command that only reads the snapshot, or None for any other."""
    if verb == b"NOOP":
        return OK
    if verb == b"STAT":
        return f"+OK {drop.live_count} {drop.live_size}\r\n".encode()
    if verb in (b"LIST", b"UIDL") and args:
        n = drop.index(args)
        if isinstance(n, bytes):
            return n
        value = drop.sizes[n] if verb == b"LIST" else drop.uids[n]
        return f"+OK {n + 1} {value}\r\n".encode()
    return None


def _read_batch(session: ReadingSession, items: list[Job | bytes], ends: list[int],
                ahead: list[Job]) -> None:
    drop = session.drop
    jobs = [item for item in items if not isinstance(item, bytes)] + ahead
    work = [(drop.infos[n].uid, WireEncoder(top_lines=top, downgrade=n in drop.downgrade),
             BATCH_SMALL if top is None else _TOP_READ) for n, top in jobs]
    calls.run(session, "mail", _read_whole, (session.adapter_session, work),
                      lambda r, e: _batch_read(session, items, ends, ahead, r, e))


def _batch_read(session: ReadingSession, items: list[Job | bytes], ends: list[int],
                ahead: list[Job], results: Any, error: BaseException | None) -> None:
    conn = session.conn
    if conn.closed:
        return
    session.blocked = None
    if error is not None:
        calls.log_failure(session, "retrieving", error)
        session.reply(error_reply(error))
        return  # the commands behind it are still in the input buffer
    out: list[bytes] = []
    found = iter(results)
    capped: Job | None = None
    answered = 0  # items answered (or started) after the first
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            out.append(item)
        else:
            result = next(found, None)
            if result is None:  # over the cap (or never read): stream this one
                capped = item
            elif isinstance(result, bytes):
                out += (MESSAGE_FOLLOWS, result, END)
                if item[1] is None:
                    session.retrieved += 1
                else:
                    _keep(session, item, result)
            else:
                failure = _as_failure(result)
                calls.log_failure(session, "retrieving", failure)
                out.append(error_reply(failure))
        answered = i
        if capped is not None:
            break
    if answered:
        conn.consume(ends[answered - 1])
    conn.write(b"".join(out))
    if capped is not None:
        session.blocked = RETRIEVAL
        _stream(session, *capped)
        return
    for job in ahead:  # one that failed is just not kept: its RETR reads it again
        result = next(found, None)
        if isinstance(result, bytes):
            _keep(session, job, result)


def _keep(session: ReadingSession, job: Job, result: bytes) -> None:
    key = _cache_key(session, *job)
    if key is not None:
        session.host.read_cache.put(key, MESSAGE_FOLLOWS + result + END)


def next_chunk(session: ReadingSession) -> None:
    reading = session.retrieval
    assert reading is not None
    calls.run(session, "mail", _read_chunk, (session.adapter_session, reading),
                      lambda out, error: _chunk_read(session, out, error), bytes)


def _chunk_read(session: ReadingSession, out: Any, error: BaseException | None) -> None:
    reading, conn = session.retrieval, session.conn
    if reading is None or conn.closed:
        return
    if error is not None:
        session.retrieval = None
        session.blocked = None
        error = _as_failure(error)
        calls.log_failure(session, f"retrieving {reading.uid}", error)
        if reading.started:  # the +OK and part of the message are out: only closing is honest
            session.close_reason = "retrieval failed mid-message"
            conn.close(session.close_reason)
        else:
            session.reply(error_reply(error))
        return
    if not reading.started:
        reading.started = True
        if reading.eof and reading.cache_key is not None:  # a TOP answered in one piece
            session.host.read_cache.put(reading.cache_key, MESSAGE_FOLLOWS + out + END)
        conn.write(MESSAGE_FOLLOWS)
    conn.write(out)
    if reading.eof:
        conn.write(END)
        session.retrieval = None
        session.blocked = None
    elif conn.backlog() < session.host.settings.protocol.output_backlog:
        next_chunk(session)


def _as_failure(error: BaseException) -> BaseException:
    """A message the encoder can't send, or a stream returning the wrong type, is permanent."""
    if isinstance(error, HeaderTooLarge | TypeError):
        return PermanentFailure(str(error))
    return error


# -- on a worker thread ------------------------------------------------------------------------

def _read_whole(adapter: Callable[[], MailboxSession], work: list[tuple[str, WireEncoder, int]]
                ) -> list[bytes | BaseException | None]:
    """Each message's complete output or exception, in order; None for one whose output
    passed the cap (it and those after it are left for the ordinary way)."""
    results: list[bytes | BaseException | None] = []
    session = adapter()
    for uid, encoder, size in work:
        try:
            stream = session.open_message(uid)
            try:
                parts = []
                out = 0
                while not encoder.done and out <= BATCH_SMALL:
                    data = stream.read(size)
                    if not data:
                        break
                    parts.append(encoder.feed(data))
                    out += len(parts[-1])
                if out > BATCH_SMALL:
                    results.append(None)
                    return results
                parts.append(encoder.finish())
            finally:
                stream.close()
            results.append(b"".join(parts))
        except Exception as exc:  # answered per message, like separate commands
            results.append(exc)
    return results


def _read_chunk(adapter: Callable[[], MailboxSession], reading: Retrieval) -> bytes:
    if reading.stream is None:
        reading.stream = adapter().open_message(reading.uid)
    data = reading.stream.read(reading.read_size)
    at_end = not data
    if data and len(data) < reading.read_size:
        # Probably the end: confirm it here rather than in another worker round trip.
        more = reading.stream.read(reading.read_size)
        if more:
            data += more
        else:
            at_end = True
    encoder = reading.encoder
    out = encoder.feed(data) if data else b""
    if at_end or encoder.done:
        out += encoder.finish()
        reading.eof = True
        stream, reading.stream = reading.stream, None
        stream.close()
    return out
