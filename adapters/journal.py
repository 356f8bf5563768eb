"""``type = journal``: the systemd journal as mailboxes, read with ``systemd.journal.Reader``.

An admin reads the machine's logs in a mail client: one account per ``[[name]]`` subsection of
``[adapter]``, each with its own password and filters (journal matches, a priority cap, a time
window, a cap on messages) and shape: one message per entry, or one digest per unit and closed
hour or day. Rendering is in :mod:`.journal_render`, reading in :mod:`.journal_view`, the
per-account hidden sets (DELE) in :mod:`.journal_state`. The journal is only ever read.

Reading the system journal needs membership in group ``systemd-journal`` (or ``adm``); the
package does not grant it (least privilege): see ``README.Debian``. ``probe`` (run by ``pop3sf
--check-config`` as the service user) says so when the journal files can't be read.
"""

from __future__ import annotations

import io
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, BinaryIO

from pop3sf import passwords

from .base import (
    Adapter,
    AuthenticationFailed,
    AuthResult,
    ConfigError,
    Credentials,
    DeleteResult,
    MailboxSession,
    MessageGone,
    MessageInfo,
    Peer,
    TemporaryFailure,
    normalize_secret,
    probe_directory,
    require_directory,
)
from .journal_render import render_digest, render_entry
from .journal_state import HiddenStore
from .journal_view import (
    GROUPS,
    Listed,
    Mailbox,
    Period,
    collect_digests,
    digest_window,
    entry_at,
    filtered,
    lines_of,
    list_entries,
    open_reader,
    parse_duration,
    parse_matches,
    parse_priority,
)

_ACCOUNT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
#: Cached sizes beyond this are dropped all at once (about 100 octets each).
SIZE_CACHE_LIMIT = 500_000
SYSTEM_JOURNALS = ("/var/log/journal", "/run/log/journal")


class JournalAdapter(Adapter):
    """The journal as mailboxes. Config keys (``[adapter]``, ``type = journal``):

    ``directory``
        A directory of journal files to read (``journalctl -D``); empty (default): the local
        system journal and the users' journals this process may read.
    ``state_directory``
        Where each account's hidden (DELE'd) UIDLs are kept; made by the first deletion, as
        the service user (so ``pop3sf-admin`` run as root never creates it root's). Default
        ``/var/lib/pop3sf/journal`` (inside the service's StateDirectory).
    ``hostname``
        Names the host in From, To and Message-ID when an entry has no ``_HOSTNAME``;
        default: this machine's name.
    ``read_only``
        Offer read-only (XPRO) sessions (default yes).

    One subsection per account, ``[[alerts]]``, its name the login name:

    ``password_hash``
        A hash as ``pop3sf-admin hash`` prints it (or any ``{SCHEME}`` of pop3sf.passwords).
    ``matches``
        Journal matches, a comma-separated list of ``FIELD=value`` (``_SYSTEMD_UNIT=x.service``,
        ``SYSLOG_IDENTIFIER=cron``): one field's values are alternatives, different fields must
        all match; ``+`` separates alternative groups, as in journalctl. Default: all entries.
    ``priority``
        The least severe priority shown: ``emerg`` ... ``debug`` or 0-7 (default ``debug``).
    ``since``
        How far back: ``7d`` (default), ``12h``, ``2w``...; older entries leave the mailbox.
    ``max_messages``
        At most this many messages, the newest (default 1000).
    ``group``
        ``entry`` (default): a message per entry; ``unit-hour`` / ``unit-day``: a digest per
        unit and local hour/day, offered once that period has closed.
    """

    configspec = """
directory = string(default="")
state_directory = string(default="/var/lib/pop3sf/journal")
hostname = string(default="")
read_only = boolean(default=True)
[__many__]
password_hash = string
matches = force_list(default=list())
priority = string(default="debug")
since = string(default="7d")
max_messages = integer(1, 100000, default=1000)
group = string(default="entry")
"""
    blocking = True  # journal files are read from disk on the worker pool
    closes_inline = True  # a session holds nothing open between calls: nothing to release

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        #: The time now (Unix seconds): what decides the window and which periods are closed.
        self.clock: Callable[[], float] = time.time
        self.sizes: dict[tuple[str, str], int] = {}
        #: (account, filters, directory) -> (digest window, its digests): see _digests.
        self.digests: dict[tuple[str, str, str], tuple[tuple[int, int], list[Listed]]] = {}
        self._sizes_lock = threading.Lock()
        self._use(self.options)

    def _use(self, options: dict[str, Any]) -> None:
        self.mailboxes: dict[str, Mailbox] = options["mailboxes"]
        self.like = passwords.reference(m.password_hash for m in self.mailboxes.values())
        self.hidden = HiddenStore(options["state_directory"])
        self.host = options["hostname"] or socket.gethostname() or "localhost"
        self.allows_read_only = bool(options["read_only"])
        with self._sizes_lock:
            self.sizes.clear()  # renderings may differ under new options
            self.digests.clear()

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        options = super().validate(config)
        for key in ("directory", "state_directory"):
            if options[key] and not os.path.isabs(options[key]):
                raise ConfigError(f"{key} = {options[key]!r}: must be an absolute path")
        if not options["state_directory"]:
            raise ConfigError("state_directory is empty: deletions need a place to be kept")
        if options["hostname"] and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", options["hostname"]):
            raise ConfigError(f"hostname = {options['hostname']!r}: letters, digits, . and -")
        mailboxes = {}
        for name, section in options.items():
            if isinstance(section, Mapping):
                mailboxes[normalize_secret(name)] = _mailbox(name, section)
        if not mailboxes:
            raise ConfigError("no account: add a [[name]] subsection with password_hash")
        options = {k: v for k, v in options.items() if not isinstance(v, Mapping)}
        options["mailboxes"] = mailboxes
        return options

    def check(self) -> None:
        if self.options["directory"]:
            require_directory(self.options["directory"], "directory")
        state = self.options["state_directory"]
        if not os.path.isdir(state) and not os.path.isdir(os.path.dirname(state)):
            raise ConfigError(f"state_directory = {state!r}: neither it nor its parent exists")

    def probe(self) -> None:
        directory = self.options["directory"]
        if directory:
            probe_directory(directory, "directory")
        files, unreadable = journal_files([directory] if directory else SYSTEM_JOURNALS)
        if unreadable:
            raise ConfigError(
                f"{f'directory = {directory!r}' if directory else 'the system journal'}: "
                f"cannot read {unreadable[0]} ({len(unreadable)} unreadable of "
                f"{len(files)} journal files and their directories); the service user needs "
                "group systemd-journal: SupplementaryGroups=systemd-journal in a drop-in, see "
                "README.Debian")
        if directory and not files:
            raise ConfigError(f"directory = {directory!r}: holds no journal files")
        try:
            open_reader(directory).close()
        except TemporaryFailure as exc:
            raise ConfigError(f"directory = {directory!r}: {exc}") from None
        state = self.options["state_directory"]
        where = state if os.path.isdir(state) else os.path.dirname(state)
        if not os.access(where, os.W_OK | os.X_OK):
            raise ConfigError(f"state_directory = {state!r}: {where} is not writable")

    def apply(self, options: dict[str, Any]) -> None:
        if options["directory"]:
            require_directory(options["directory"], "directory")
        self._use(options)

    def new_session(self, peer: Peer) -> JournalSession:
        return JournalSession(self)

    def preview_session(self, account: str) -> JournalSession:
        """A read-only session of *account* without its password (``pop3sf-admin preview``)."""
        mailbox = self.mailboxes.get(normalize_secret(account))
        if mailbox is None:
            raise AuthenticationFailed(f"no account {account!r} (accounts: "
                                       f"{', '.join(sorted(self.mailboxes))})")
        session = JournalSession(self)
        session.login_succeeded(AuthResult(mailbox.name, mailbox), True)
        return session

    def size_of(self, account: str, uid: str, make: Callable[[], bytes]) -> int:
        """The cached size of a rendering, or measure it (renderings are pure, so a size once
        measured stays right for as long as the options don't change)."""
        key = (account, uid)
        size = self.sizes.get(key)
        if size is None:
            size = len(make())
            with self._sizes_lock:
                if len(self.sizes) >= SIZE_CACHE_LIMIT:
                    self.sizes.clear()
                self.sizes[key] = size
        return size


def journal_files(roots: Sequence[str]) -> tuple[list[str], list[str]]:
    """(journal files, what of them or of their directories this process can't read) under
    *roots*, one machine-id level deep, as journald lays them out."""
    files: list[str] = []
    unreadable: list[str] = []
    for root in roots:
        for path in [root, *(os.path.join(root, n) for n in _names(root, unreadable))]:
            if path.endswith(".journal"):
                files.append(path)
            elif path != root and os.path.isdir(path):
                files += [os.path.join(path, n) for n in _names(path, unreadable)
                          if n.endswith(".journal")]
    return files, unreadable + [f for f in files if not os.access(f, os.R_OK)]


def _names(directory: str, unreadable: list[str]) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError:
        unreadable.append(directory)
        return []


def _mailbox(name: str, section: Mapping[str, Any]) -> Mailbox:
    where = f"[[{name}]]"
    if not _ACCOUNT.fullmatch(name):
        raise ConfigError(f"{where}: an account name is 1-64 letters, digits and ._@+- "
                          "(not starting with a punctuation mark)")
    try:
        passwords.scheme_of(section["password_hash"])
    except passwords.UnknownScheme as exc:
        raise ConfigError(f"{where} password_hash: unknown scheme {exc}") from None
    if section["group"] not in GROUPS:
        raise ConfigError(f"{where} group = {section['group']!r}: one of {', '.join(GROUPS)}")
    try:
        terms = parse_matches(section["matches"])
        priority = parse_priority(section["priority"])
        since = parse_duration(section["since"])
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Mailbox(normalize_secret(name), section["password_hash"], terms, priority, since,
                   section["max_messages"], section["group"])


class JournalSession(MailboxSession[Mailbox]):
    """One client's view of one account: the messages listed at login, and where each is."""

    def __init__(self, adapter: JournalAdapter) -> None:
        self.adapter = adapter
        self.directory: str = adapter.options["directory"]
        self.mailbox: Mailbox | None = None
        self.read_only = False
        self.recipient = ""
        self.listed: dict[str, Listed] = {}

    def authenticate(self, credentials: Credentials) -> AuthResult[Mailbox]:
        mailbox = self.adapter.mailboxes.get(normalize_secret(credentials.username))
        password = credentials.password_bytes()
        if mailbox is None:
            passwords.dummy_verify(password, like=self.adapter.like)
            raise AuthenticationFailed("unknown user")
        passwords.verify_or_deny(mailbox.password_hash, password, like=self.adapter.like,
                                 account=mailbox.name)
        return AuthResult(mailbox.name, mailbox)

    def login_succeeded(self, account: AuthResult[Mailbox], read_only: bool) -> None:
        assert account.found is not None, "a journal login always carries its mailbox"
        self.mailbox, self.read_only = account.found, read_only
        self.recipient = f"{account.account_id}@{self.adapter.host}"

    def _mailbox(self) -> Mailbox:
        if self.mailbox is None:
            raise TemporaryFailure("not logged in")
        return self.mailbox

    def _render_entry(self, fields: dict[str, Any], realtime: int, cursor: str) -> bytes:
        return render_entry(fields, realtime, cursor, host=self.adapter.host,
                            recipient=self.recipient)

    def _render_digest(self, uid: str, period: Period, lines: Sequence[Any]) -> bytes:
        start, end = period.bounds()
        return render_digest(uid, period.unit, start, end, lines, host=self.adapter.host,
                             recipient=self.recipient)

    def list_messages(self) -> Sequence[MessageInfo]:
        mailbox = self._mailbox()
        hidden = self.adapter.hidden.load(mailbox.name)
        now = self.adapter.clock()

        def size_of(uid: str, make: Callable[[], bytes]) -> int:
            return self.adapter.size_of(mailbox.name, uid, make)

        if mailbox.group == "entry":
            with filtered(self.directory, mailbox) as reader:
                listed = list_entries(reader, mailbox, now, hidden, size_of,
                                      self._render_entry)
        else:
            listed = [item for item in self._digests(mailbox, now) if item.uid not in hidden]
            listed = listed[-mailbox.max_messages:]
        self.listed = {item.uid: item for item in listed}
        return [MessageInfo(item.uid, item.size) for item in listed]

    def _digests(self, mailbox: Mailbox, now: float) -> list[Listed]:
        """The window's digests, read from the journal once per window (closed periods don't
        change, so until the next hour or day closes every login gets the same list)."""
        window = digest_window(mailbox, now)
        key = (mailbox.name, mailbox.fingerprint, self.directory)
        cached = self.adapter.digests.get(key)
        if cached is not None and cached[0] == window:
            return cached[1]
        with filtered(self.directory, mailbox) as reader:
            found = collect_digests(reader, mailbox, window)
        listed = [Listed(uid, self.adapter.size_of(mailbox.name, uid, partial(
            self._render_digest, uid, period, lines)), period) for uid, period, lines in found]
        self.adapter.digests[key] = (window, listed)
        return listed

    def open_message(self, uid: str) -> BinaryIO:
        item = self.listed.get(uid)
        if item is None:
            raise MessageGone(uid)
        with filtered(self.directory, self._mailbox()) as reader:
            if isinstance(item.where, Period):
                lines = lines_of(reader, item.where)
                if lines is None:
                    raise MessageGone(uid)
                return io.BytesIO(self._render_digest(uid, item.where, lines))
            found = entry_at(reader, item.where)
        if found is None:
            raise MessageGone(uid)
        return io.BytesIO(self._render_entry(found[0], found[1], item.where))

    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        mailbox = self._mailbox()
        if self.read_only:
            return DeleteResult({uid: "read-only session" for uid in uids})
        if uids:
            cutoff = self.adapter.clock() - mailbox.since - 2 * 86400  # a digest's whole day
            self.adapter.hidden.hide(mailbox.name, uids, cutoff)
        return DeleteResult()
