"""Maildir sources: an existing Dovecot/Postfix virtual-mail installation served as it is.

Users come from a Dovecot passwd-file (:mod:`.passwdfile`), each user's Maildir from a location
template, and messages from its ``new/`` and ``cur/`` (``tmp/`` holds deliveries in progress and
is never read). UIDLs can be exactly the ones Dovecot's POP3 server gave, read from Dovecot's
``dovecot-uidlist``, so clients that "leave mail on the server" don't fetch everything again
after a migration; or they are derived from the Maildir base names, stable across flag changes.

A Maildir message's file name changes while it lives (``new/`` to ``cur/``, flags after ``:2,``)
but its base name (the part before ``:``) never does, so the session remembers base names and
finds the current file again whenever a name it listed has gone. Sizes come from ``,W=<n>`` in
the name when a delivery agent put it there (Dovecot, and pop3sf's own tools, do), else from one
measured read cached per file version (:mod:`.sizecache`).

Safety: user names can't name path components (no ``/``, no leading dot); with ``root`` set the
resolved Maildir must lie inside it; each session keeps a descriptor of its Maildir and opens
``new``/``cur`` and the message files relative to it with ``O_NOFOLLOW``, so a symlink can't lead
out of it, and only regular files are served.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, TypeVar, cast

from pop3sf import passwords

from . import sizecache
from .accountlock import lock_maildrop, unlock_maildrop
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
    PermanentFailure,
    TemporaryFailure,
    probe_directory,
)
from .maildir_names import (
    SUBDIRS,
    UIDLIST,
    Uidlist,
    UidRecord,
    basename_uidl,
    delivery_key,
    expand,
    format_uidl,
    is_valid_uidl,
    is_valid_username,
    parse_location,
    parse_uidlist,
    split_name,
    w_size,
)
from .passwdfile import PasswdEntry, PasswdFile
from .sizecache import FileChanged

log = logging.getLogger("pop3sf.adapters.maildir")

#: flock()ed by read-write sessions in the Maildir's top directory, so other pop3sf processes
#: serve it once (adapters/accountlock.py); no leading dot, which Maildir++ uses for folders.
LOCK_FILE = "pop3sf.lock"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SUBDIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# --- the adapter ------------------------------------------------------------------------------

class Place(NamedTuple):
    """Where a user's mail is (what a login found, :attr:`AuthResult.found`)."""

    path: str
    control: str | None


class MaildirAdapter(Adapter):
    """Dovecot-style virtual mail: a passwd-file of users and one Maildir each.

    Config keys (``[adapter]``, ``type = maildir``):

    ``passwd_file``
        Absolute path of a Dovecot passwd-file, ``user:password:uid:gid:gecos:home:shell:extra``
        (``user`` may be ``user@domain``). Password schemes: ``{PLAIN}``, ``{CRYPT}`` and
        un-prefixed crypt(3) hashes, ``{MD5-CRYPT}``, ``{SHA256-CRYPT}``, ``{SHA512-CRYPT}``,
        ``{BLF-CRYPT}``, ``{SSHA256}``, ``{SSHA512}``. A user with another scheme can't log in
        (one warning per scheme in the log). Reread whenever the file changes.
    ``mail_location``
        Where a user's Maildir is, as Dovecot's ``mail_location``: ``%u`` the user name,
        ``%n`` its local part, ``%d`` its domain, ``%h`` (or a leading ``~``) the passwd-file
        home field, ``%Lu`` etc. lowercased; a ``maildir:`` prefix and ``:KEY=VALUE`` options
        are accepted (``:CONTROL=`` says where ``dovecot-uidlist`` is). A passwd-file extra
        field ``userdb_mail=`` overrides it per user. Default ``%h/Maildir``; typical for
        virtual mail: ``/var/vmail/%d/%n/Maildir``.
    ``root``
        If set, every Maildir must resolve (symlinks followed) to a path inside this directory;
        users whose Maildir doesn't are refused. Default: empty (no restriction).
    ``uidl_format``
        ``dovecot`` (default): the UIDLs Dovecot's POP3 server gives, from ``dovecot-uidlist``
        (a stored POP3 UIDL if there is one, else ``pop3_uidl_format``); messages Dovecot hasn't
        seen yet get ``basename`` UIDLs. ``basename``: the base name of the file (the part
        before ``:``) when it is a valid UIDL, else its SHA-1 in hex.
    ``pop3_uidl_format``
        Dovecot's setting of the same name, for ``uidl_format = dovecot``: ``%u`` uid, ``%v``
        uidvalidity, ``%f`` base name, ``%g`` GUID. Default ``%08Xu%08Xv``, Dovecot's default.
    ``deleted``
        ``unlink`` (default): DELE+QUIT removes the file. ``flag``: it gets the Maildir ``T``
        (trashed) flag instead, and messages with ``T`` are no longer listed.
    ``measure_all``
        Measure every message once (cached) even when its name carries ``,W=``, so 8-bit
        header sections are detected for the UTF-8 downgrade (SPEC §P4). Default no: ``,W=``
        is trusted as Dovecot trusts it, and such headers are then sent unchanged.
    ``size_cache_dir``
        Where measured sizes persist across restarts; empty (default) keeps them in memory.
    ``size_cache_entries``
        How many file versions the size cache remembers (default 100000).
    ``read_only``
        Offer read-only (XPRO) sessions (default yes).
    ``bcrypt_rounds``
        Cost of the ``{BLF-CRYPT}`` hashes ``pop3sf-admin`` writes (default 12).
    ``from_address``
        From of the messages ``pop3sf-admin message add`` makes of plain text
        (default ``pop3sf <pop3sf@localhost>``).
    ``cross_instance_lock``
        Read-write sessions ``flock`` ``pop3sf.lock`` in the Maildir (default yes), so other
        pop3sf processes and instances sharing it answer ``[IN-USE]`` (:mod:`.accountlock`).
    """

    configspec = """
passwd_file = string
mail_location = string(default="%h/Maildir")
root = string(default="")
uidl_format = option("dovecot", "basename", default="dovecot")
pop3_uidl_format = string(default="%08Xu%08Xv")
deleted = option("unlink", "flag", default="unlink")
measure_all = boolean(default=False)
read_only = boolean(default=True)
bcrypt_rounds = integer(4, 31, default=12)
from_address = string(default="pop3sf <pop3sf@localhost>")
cross_instance_lock = boolean(default=True)
""" + sizecache.CONFIGSPEC

    blocking = True
    list_with_login = True
    closes_inline = True
    immutable_messages = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.location = parse_location(self.options["mail_location"])
        self.passwd = PasswdFile(self.options["passwd_file"])
        self.size_cache = sizecache.from_options(self.options)
        self.allows_read_only = bool(self.options["read_only"])
        #: The lock file of a read-write session, unless the cross-process lock is off.
        self.fds_per_session = int(self.options["cross_instance_lock"])
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()
        self._like_source: object = None
        self._like: str | None = None

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        options = super().validate(config)
        if not os.path.isabs(options["passwd_file"]):
            raise ConfigError(f"passwd_file = {options['passwd_file']!r}: "
                              "must be an absolute path")
        if options["root"] and not os.path.isabs(options["root"]):
            raise ConfigError(f"root = {options['root']!r}: must be an absolute path")
        if not is_valid_uidl(format_uidl(options["pop3_uidl_format"], 1, 1, "x", "")):
            raise ConfigError("pop3_uidl_format gives no valid UIDL")
        return options

    def check(self) -> None:
        try:
            self.passwd.entries()
        except OSError as exc:
            raise ConfigError(f"passwd_file {self.passwd.path}: {exc.strerror}") from exc
        root = self.options["root"]
        if root and not os.path.isdir(root):
            raise ConfigError(f"root = {root!r}: not an existing directory")

    def probe(self) -> None:
        if self.options["root"]:
            probe_directory(self.options["root"], "root")

    def apply(self, options: dict[str, Any]) -> None:
        self.location = parse_location(options["mail_location"])
        if options["passwd_file"] != self.options["passwd_file"]:
            self.passwd = PasswdFile(options["passwd_file"])
        self.size_cache = sizecache.reconfigured(self.size_cache, self.options, options)
        self.allows_read_only = bool(options["read_only"])
        self.fds_per_session = int(options["cross_instance_lock"])

    def close(self) -> None:
        self.size_cache.close()

    def new_session(self, peer: Peer) -> MaildirSession:
        return MaildirSession(self, peer)

    # --- authentication helpers ------------------------------------------------------------

    def warn_scheme(self, scheme: str, user: str) -> None:
        with self._warn_lock:
            if scheme in self._warned:
                return
            self._warned.add(scheme)
        log.warning("passwd-file %s: user %r has a password of unknown scheme %s; such logins "
                    "are denied (logged once per scheme)", self.passwd.path, user, scheme)

    def dummy_like(self) -> str | None:
        """The reference secret of the passwd-file (see :func:`pop3sf.passwords.reference`):
        unknown names are dummy-checked against it and cheaper hashes padded to it, so every
        login costs the same whether the name exists and whatever scheme it uses."""
        try:
            entries = self.passwd.snapshot()
        except OSError:
            return None
        if entries is not self._like_source:
            self._like = passwords.reference(entry.password for entry in entries.values())
            self._like_source = entries
        return self._like

    def authenticate(self, credentials: Credentials) -> AuthResult[Place]:
        """A verified login carrying where its Maildir is, or :class:`AuthenticationFailed`."""
        name = credentials.username
        password = credentials.password_bytes()
        if not is_valid_username(name):
            passwords.dummy_verify(password, like=self.dummy_like())
            raise AuthenticationFailed("invalid user name")
        try:
            entry = self.passwd.lookup(name)
        except OSError as exc:
            raise TemporaryFailure(f"cannot read passwd_file: {exc.strerror}") from exc
        if entry is None or not password:
            passwords.dummy_verify(password, like=self.dummy_like())
            raise AuthenticationFailed("unknown user")
        if not entry.password or not is_valid_username(entry.user):
            cause = "an empty password" if not entry.password else "an invalid user name"
            log.warning("passwd-file %s line %d: account %r has %s; login denied",
                        self.passwd.path, entry.lineno, entry.user, cause)
            passwords.dummy_verify(password, like=self.dummy_like())
            raise AuthenticationFailed(cause)
        try:
            ok = passwords.verify_padded(entry.password, password, like=self.dummy_like())
        except passwords.UnknownScheme as exc:
            self.warn_scheme(str(exc), entry.user)
            raise AuthenticationFailed("unknown password scheme") from None
        if not ok:
            raise AuthenticationFailed("wrong password")
        return AuthResult(entry.user, self.maildir_of(entry))

    def session_for(self, entry: PasswdEntry) -> MaildirSession:
        """A read-only session on a user's Maildir without a password (for the admin tools)."""
        session = MaildirSession(self, Peer("local", 0, "admin"))
        session.login_succeeded(AuthResult(entry.user, self.maildir_of(entry)), True)
        return session

    def maildir_of(self, entry: PasswdEntry) -> Place:
        """(Maildir path, control directory or None) of a user, checked against ``root``."""
        override = entry.extra.get("userdb_mail") or entry.extra.get("mail")
        location = parse_location(override) if override else self.location
        path = os.path.normpath(expand(location.path, entry.user, entry))
        control = os.path.normpath(expand(location.control, entry.user, entry)) \
            if location.control else None
        if not os.path.isabs(path):
            raise PermanentFailure(f"Maildir of {entry.user!r} is not an absolute path")
        root = self.options["root"]
        if root and not _inside(os.path.realpath(path), os.path.realpath(root)):
            log.warning("Maildir %s of %r is outside root %s; refused", path, entry.user, root)
            raise PermanentFailure("Maildir outside the configured root")
        return Place(path, control)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(slots=True)
class _Msg:
    """A listed message: where it was last seen. The base name identifies it for good."""

    base: str
    sub: str
    name: str


class _Listed(NamedTuple):
    order: tuple[int, int, int, int, str]
    base: str
    uid: str
    msg: _Msg
    info: MessageInfo


_F = TypeVar("_F", bound=Callable[..., Any])


def _closing_maildir(method: _F) -> _F:
    """After the login's listing the Maildir's descriptor is closed: 10,000 idle sessions
    would otherwise hold 10,000 directory fds beside their sockets. Retrieving reopens it."""

    @functools.wraps(method)
    def wrapper(self: MaildirSession, *args: Any) -> Any:
        try:
            return method(self, *args)
        finally:
            self._close_maildir()

    return cast(_F, wrapper)


class MaildirSession(MailboxSession["Place"]):
    """One connection's view of one Maildir (held by an open directory descriptor)."""

    __slots__ = ("adapter", "peer", "options", "account", "read_only", "path", "_control", "_fd",
                 "_missing", "_msgs", "_lock_fd")

    def __init__(self, adapter: MaildirAdapter, peer: Peer) -> None:
        self.adapter = adapter
        self.peer = peer
        self.options = adapter.options
        self.account: str | None = None
        self.read_only = False
        self.path = ""
        self._control: str | None = None
        self._fd: int | None = None
        self._missing = False
        self._msgs: dict[str, _Msg] = {}
        self._lock_fd: int | None = None

    # --- authentication ---------------------------------------------------------------------

    def authenticate(self, credentials: Credentials) -> AuthResult[Place]:
        return self.adapter.authenticate(credentials)

    def login_succeeded(self, account: AuthResult[Place], read_only: bool) -> None:
        assert account.found is not None, "a maildir login always says where"
        self.path, self._control = account.found
        self.account, self.read_only = account.account_id, read_only
        if not read_only and self.options["cross_instance_lock"] and self._lock_fd is None:
            # The Maildir stays open for the listing that follows in the same worker call
            # (list_with_login), which closes it; connection_closed does, if none follows.
            fd = self._open_maildir()  # None: no Maildir yet, nothing to serve twice
            if fd is not None:
                self._lock_fd = lock_maildrop(fd, LOCK_FILE, self.path)

    def _open_maildir(self) -> int | None:
        """The Maildir's descriptor; None when it doesn't exist yet (no mail delivered)."""
        if self._fd is not None or self._missing:
            return self._fd
        if not self.path:
            raise TemporaryFailure("not logged in")
        try:  # symlinks followed, as an admin's symlinked Maildir needs
            fd = os.open(self.path, _DIR_FLAGS)
        except FileNotFoundError:
            self._missing = True
            return None
        except OSError as exc:
            raise TemporaryFailure(f"cannot open Maildir {self.path}: {exc.strerror}") from exc
        root = self.options["root"]
        if root:
            try:  # what was opened, whatever was swapped in between
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                opened = os.path.realpath(self.path)
            if not _inside(opened, os.path.realpath(root)):
                os.close(fd)
                raise PermanentFailure("Maildir outside the configured root")
        self._fd = fd
        return fd

    @contextmanager
    def _subdir(self, sub: str) -> Iterator[int | None]:
        """``new``/``cur`` of the Maildir (never through a symlink); None if absent."""
        fd = self._open_maildir()
        if fd is None:
            yield None
            return
        try:
            dfd = os.open(sub, _SUBDIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                raise TemporaryFailure(f"cannot open {self.path}/{sub}: {exc.strerror}") from exc
            if exc.errno != errno.ENOENT:
                log.warning("%s/%s is not a directory (symlink?); ignored", self.path, sub)
            yield None
            return
        try:
            yield dfd
        finally:
            os.close(dfd)

    # --- listing ----------------------------------------------------------------------------

    def _uidlist(self) -> Uidlist | None:
        """Dovecot's uidlist: UIDLs in ``dovecot`` mode, the message order in both modes."""
        try:
            if self._control:
                fd = os.open(os.path.join(self._control, UIDLIST), _FILE_FLAGS)
            else:
                mfd = self._open_maildir()
                if mfd is None:
                    return None
                fd = os.open(UIDLIST, _FILE_FLAGS, dir_fd=mfd)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("%s of %s unreadable (%s); UIDLs from base names", UIDLIST,
                            self.account, exc.strerror)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(fd, "rb") as f:
                fd = -1
                data = f.read()
        finally:
            if fd >= 0:
                os.close(fd)
        uidlist = parse_uidlist(data)
        if uidlist is None:
            log.warning("%s of %s has an unknown format; UIDLs from base names", UIDLIST,
                        self.account)
        return uidlist

    def _hidden(self, flags: str) -> bool:
        return self.options["deleted"] == "flag" and "T" in flags

    @_closing_maildir
    def list_messages(self) -> Sequence[MessageInfo]:
        self._msgs = {}
        if self._open_maildir() is None:
            return []
        uidlist = self._uidlist()
        found: dict[str, _Listed] = {}
        for sub in SUBDIRS:  # cur/ last: a message moved meanwhile is taken from there
            with self._subdir(sub) as dfd:
                if dfd is None:
                    continue
                try:
                    entries = list(os.scandir(dfd))
                except OSError as exc:
                    raise TemporaryFailure(f"cannot list {self.path}/{sub}: {exc}") from exc
                for de in entries:
                    listed = self._list_one(sub, dfd, de, uidlist)
                    if listed is not None:
                        found[listed.base] = listed
        ordered = sorted(found.values(), key=lambda item: item.order)
        infos: list[MessageInfo] = []
        seen: set[str] = set()
        for item in ordered:
            uid = _unique(item.uid, seen)
            self._msgs[uid] = item.msg
            infos.append(item.info._replace(uid=uid))
        return infos

    def _list_one(self, sub: str, dfd: int, de: os.DirEntry[str],
                  uidlist: Uidlist | None) -> _Listed | None:
        name = de.name
        if name.startswith("."):
            return None
        try:
            if not de.is_file(follow_symlinks=False):
                return None
        except OSError:
            return None
        base, flags = split_name(name)
        if not base or self._hidden(flags):
            return None
        record = uidlist.records.get(base) if uidlist is not None else None
        # The uidlist's W is not used: Dovecot doesn't count the CRLF that completes a message
        # without a final newline, which pop3sf sends (SPEC §P3); one measured read is exact.
        size = w_size(base)
        info: MessageInfo | None = None
        mtime = 0
        if size is None or self.options["measure_all"]:
            measured = self._measure(sub, dfd, name)
            if measured is None:
                return None
            info, mtime = measured
        else:
            info = MessageInfo("", size)
        # Order: what Dovecot's POP3 lists first (O, then uid), then new mail by delivery time.
        if record is not None and uidlist is not None:
            uid = self._dovecot_uidl(record, uidlist, base) \
                if self.options["uidl_format"] == "dovecot" else basename_uidl(base)
            order_ext = record.ext.get("O", "")
            order = (0, int(order_ext) if order_ext.isdigit() else 1 << 32, record.uid, 0, base)
        else:
            uid = basename_uidl(base)
            when = delivery_key(base)
            if when is None:
                if not mtime:
                    try:
                        mtime = int(de.stat(follow_symlinks=False).st_mtime)
                    except OSError:
                        return None
                when = (mtime, 0)
            order = (1, 0, when[0], when[1], base)
        return _Listed(order, base, uid, _Msg(base, sub, name), info._replace(uid=uid))

    def _dovecot_uidl(self, record: UidRecord, uidlist: Uidlist, base: str) -> str:
        stored = record.ext.get("P")
        if stored and is_valid_uidl(stored):
            return stored
        uidl = format_uidl(self.options["pop3_uidl_format"], record.uid, uidlist.uidvalidity,
                           base, record.ext.get("G", ""))
        return uidl if is_valid_uidl(uidl) else basename_uidl(base)

    def _measure(self, sub: str, dfd: int, name: str) -> tuple[MessageInfo, int] | None:
        """Exact size by one cached read (the name had no ``,W=``); None if it went away."""
        for _ in range(2):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    return None
                m = self.adapter.size_cache.get_or_measure(
                    st, lambda: os.fdopen(_open_regular(dfd, name), "rb"))
            except FileChanged:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ELOOP):
                    log.warning("skipping %s/%s/%s: %s", self.path, sub, name, exc)
                return None
            return MessageInfo("", m.size, m.utf8_header, m.downgraded_size), int(st.st_mtime)
        return None

    def location(self, uid: str) -> tuple[str, str] | None:
        """(``new``/``cur``, file name) where a listed message was last seen."""
        msg = self._msgs.get(uid)
        return (msg.sub, msg.name) if msg is not None else None

    # --- finding a message again -------------------------------------------------------------

    def _relocate(self, msg: _Msg) -> bool:
        """Find the message's current file by its base name (flags or new->cur changed it).

        One rescan updates every listed message, so a client that marked all mail read
        elsewhere costs one directory listing, not one per message.
        """
        current: dict[str, tuple[str, str]] = {}
        for sub in SUBDIRS:  # cur/ last, so it wins during a new->cur rename
            with self._subdir(sub) as dfd:
                if dfd is None:
                    continue
                try:
                    names = os.listdir(dfd)
                except OSError as exc:
                    raise TemporaryFailure(f"cannot list {self.path}/{sub}: {exc}") from exc
                for name in names:
                    if not name.startswith("."):
                        current[name.partition(":")[0]] = (sub, name)
        for listed in self._msgs.values():
            found = current.get(listed.base)
            if found is not None:
                listed.sub, listed.name = found
        found = current.get(msg.base)
        if found is None:
            return False
        msg.sub, msg.name = found
        return True

    def open_message(self, uid: str) -> BinaryIO:
        msg = self._msgs.get(uid)
        if msg is None:
            raise MessageGone(uid)
        for attempt in range(3):
            if attempt and not self._relocate(msg):
                break
            if self._hidden(split_name(msg.name)[1]):
                break
            with self._subdir(msg.sub) as dfd:
                if dfd is None:
                    continue
                try:
                    fd = _open_regular(dfd, msg.name)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR):
                        continue
                    raise TemporaryFailure(f"cannot open message: {exc.strerror}") from exc
                os.set_blocking(fd, True)
                return os.fdopen(fd, "rb")
        raise MessageGone(uid)

    # --- deletion ----------------------------------------------------------------------------

    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        if self.read_only:
            return DeleteResult({uid: "read-only session" for uid in uids})
        failed: dict[str, str] = {}
        touched: set[str] = set()
        for uid in uids:
            msg = self._msgs.get(uid)
            if msg is None:
                failed[uid] = "not in this session's listing"
                continue
            try:
                touched.update(self._delete_one(msg))
            except OSError as exc:
                failed[uid] = exc.strerror or str(exc)
            except TemporaryFailure as exc:
                failed[uid] = str(exc)
            else:
                del self._msgs[uid]
        for sub in touched:
            with self._subdir(sub) as dfd:
                if dfd is not None:
                    try:
                        os.fsync(dfd)
                    except OSError as exc:
                        log.warning("fsync of %s/%s after deletions: %s", self.path, sub, exc)
        return DeleteResult(failed)

    def _delete_one(self, msg: _Msg) -> set[str]:
        """Unlink or T-flag the message; the directories changed (none if already gone)."""
        for attempt in range(3):
            if attempt and not self._relocate(msg):
                return set()  # removed by someone else: what was wanted
            try:
                if self.options["deleted"] == "flag":
                    return self._flag_trashed(msg)
                with self._subdir(msg.sub) as dfd:
                    if dfd is None:
                        continue
                    os.unlink(msg.name, dir_fd=dfd)
                    return {msg.sub}
            except FileNotFoundError:
                continue
        return set()

    def _flag_trashed(self, msg: _Msg) -> set[str]:
        base, flags = split_name(msg.name)
        if "T" in flags:
            return set()
        new_name = f"{base}:2,{''.join(sorted(flags + 'T'))}"
        with self._subdir(msg.sub) as src, self._subdir("cur") as dst:
            if src is None or dst is None:
                raise FileNotFoundError(errno.ENOENT, "Maildir directory missing")
            os.rename(msg.name, new_name, src_dir_fd=src, dst_dir_fd=dst)
        changed = {msg.sub, "cur"}
        msg.sub, msg.name = "cur", new_name
        return changed

    def _close_maildir(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def connection_closed(self) -> None:
        self._close_maildir()
        self._msgs = {}
        unlock_maildrop(self._lock_fd)
        self._lock_fd = None


def _open_regular(dfd: int, name: str) -> int:
    """Open a message file without following symlinks or blocking on a FIFO."""
    fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, "not a regular file", name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unique(uid: str, seen: set[str]) -> str:
    """A uid not used yet in this listing (a duplicate stored UIDL gets a stable suffix)."""
    candidate, n = uid, 1
    while candidate in seen:
        n += 1
        suffix = f"-{n}"
        candidate = uid[: 70 - len(suffix)] + suffix
    if candidate != uid:
        log.warning("duplicate UIDL %r in a Maildir; listed as %r", uid, candidate)
    seen.add(candidate)
    return candidate
