"""Directory sources: message files in a folder, one folder per user (docs/adapters.md#bundled).

The on-disk formats are the original pop3sf's, so existing data directories keep working with the
same unique ids: ``*.eml`` files are served as they are, ``*.txt`` files are wrapped into a
generated message (:mod:`.plaintext`), everything else (and every dot-file, such as a writer's
temporary file) is ignored. Messages are ordered by mtime, then name, so new files come last.

Safety: each session holds a descriptor of its directory and opens names from its own listing
relative to it with ``O_NOFOLLOW``, so neither a symlink nor a renamed directory can lead outside
the root; every opened file is checked to be the version listed (device, inode, size, mtime).
Files locked by a writer (``flock`` shared fails) and empty files are left out until complete.
Deletion renames the file aside, checks it is the listed one, then unlinks it; a file that was
replaced is left alone.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, BinaryIO, NamedTuple, NoReturn

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
    TemporaryFailure,
    normalize_secret,
    probe_directory,
    require_directory,
)
from .plaintext import PlaintextMessage
from .sizecache import FileChanged

log = logging.getLogger(__name__)

#: User (directory) names of the multi-user source; nothing else can name a path component.
USERNAME_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
PASSWORD_FILE = ".pop3sf_password_bcrypt"
#: flock()ed by read-write sessions, so other pop3sf processes serve the directory once
#: (adapters/accountlock.py); a dot-file, so never listed as a message.
LOCK_FILE = ".pop3sf.lock"
#: File name suffix -> kind of message file.
KINDS = {".eml": "eml", ".txt": "txt"}
#: Bumped whenever the .txt wrapping changes, so cached sizes of the old form are not reused.
WRAP_VERSION = "1"

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_COMMON_SPEC = """
uid_root = string(default="")
from_address = string(default="pop3sf <pop3sf@localhost>")
to_address = string(default="%u@localhost")
cross_instance_lock = boolean(default=True)
""" + sizecache.CONFIGSPEC


def is_valid_username(name: str) -> bool:
    return USERNAME_RE.fullmatch(name) is not None


def kind_of(name: str) -> str | None:
    """``"eml"``, ``"txt"`` or None for a file name in a message directory."""
    if name.startswith("."):
        return None
    return KINDS.get(os.path.splitext(name)[1])


def original_uid(path: str, st_mtime: float) -> str:
    """The original pop3sf's unique id: SHA-256 hex of the absolute path + ``str(st_mtime)``."""
    return hashlib.sha256((path + str(st_mtime)).encode("utf-8", "surrogateescape")).hexdigest()


def _utc(st_mtime: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(st_mtime, tz=datetime.UTC)


class _Entry(NamedTuple):
    name: str
    kind: str
    uid: str
    device: int
    inode: int
    raw_size: int
    mtime_ns: int
    mtime: float

    def matches(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == \
            (self.device, self.inode, self.raw_size, self.mtime_ns)


class Located(NamedTuple):
    """What a directory login found (:attr:`AuthResult.found`): where unique ids are computed
    from. The open directory itself goes to the session at once, so it is closed however the
    login ends."""

    uid_base: str


class DirectoryAdapterBase(Adapter):
    """What both directory adapters share: options, the size cache, the session class."""

    blocking = True
    list_with_login = True
    closes_inline = True
    allows_read_only = True
    fds_per_session = 2  # the user's directory, held open against swaps, and its lock file

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.size_cache = sizecache.from_options(self.options)

    def apply(self, options: dict[str, Any]) -> None:
        self._check_paths(options)
        self.size_cache = sizecache.reconfigured(self.size_cache, self.options, options)

    def check(self) -> None:
        self._check_paths(self.options)

    def probe(self) -> None:
        key = "directory" if "directory" in self.options else "root"
        probe_directory(self.options[key], key)

    def close(self) -> None:
        self.size_cache.close()

    def _check_paths(self, options: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def new_session(self, peer: Peer) -> DirectorySession:
        return DirectorySession(self, peer)

    def session_for(self, account: str, dir_fd: int) -> DirectorySession:
        """A read-only session on an account's open directory (the fd is taken over), without a
        password: the admin tools list messages with the sizes the server serves."""
        session = DirectorySession(self, Peer("local", 0, "admin"))
        session._dir_fd = dir_fd
        session.login_succeeded(AuthResult(account, Located(self.uid_base(account))), True)
        return session

    # Implemented by the two adapters: where an account's messages are.
    def locate(self, credentials: Credentials) -> tuple[AuthResult[Located], int]:
        """Verify credentials; return the login and its open directory fd."""
        raise NotImplementedError

    def uid_base(self, account: str) -> str:
        """The path unique ids of the account's files are computed from."""
        raise NotImplementedError

    def _located(self, account: str, dir_fd: int) -> tuple[AuthResult[Located], int]:
        return AuthResult(account, Located(self.uid_base(account))), dir_fd


class DirectoryAdapter(DirectoryAdapterBase):
    """One account whose messages are the files of one directory.

    Config keys (``[adapter]``, ``type = directory``):

    ``directory``
        Absolute path of the message directory.
    ``username``
        The one user name accepted (compared exactly, after NFC normalisation).
    ``password_hash``
        Its password hash: bcrypt (``$2b$...``, as ``pop3sf-admin`` writes) or any scheme of
        :mod:`pop3sf.passwords` in Dovecot notation (``{SSHA512}...``).
    ``uid_root``
        The directory's *former* absolute path, when the data was moved: unique ids are computed
        as if the files were still there, so clients don't download everything again. Default:
        the directory's own absolute path.
    ``from_address``, ``to_address``
        From and To of wrapped ``.txt`` files; ``%u`` in them is the account name.
        Defaults ``pop3sf <pop3sf@localhost>`` and ``%u@localhost``.
    ``size_cache_dir``
        Where exact sizes persist across restarts (e.g. ``/var/cache/pop3sf``); empty (the
        default) keeps them in memory only.
    ``size_cache_entries``
        How many file versions the size cache remembers (default 100000).
    ``cross_instance_lock``
        Read-write sessions ``flock`` the directory's ``.pop3sf.lock`` (default yes), so other
        pop3sf processes and instances sharing the directory answer ``[IN-USE]``
        (:mod:`.accountlock`); the service user must be able to create that file.
    """

    configspec = """
directory = string
username = string
password_hash = string
""" + _COMMON_SPEC

    def _check_paths(self, options: Mapping[str, Any]) -> None:
        require_directory(options["directory"], "directory")
        try:
            passwords.scheme_of(options["password_hash"])
        except passwords.UnknownScheme as exc:
            raise ConfigError(f"password_hash: unknown scheme {exc}") from exc

    def locate(self, credentials: Credentials) -> tuple[AuthResult[Located], int]:
        options = self.options
        stored: str = options["password_hash"]
        username = normalize_secret(options["username"])
        if credentials.username != username:
            passwords.dummy_verify(credentials.password_bytes(), like=stored)
            raise AuthenticationFailed("unknown user")
        passwords.verify_or_deny(stored, credentials.password_bytes())
        return self._located(username, _open_dir(os.path.abspath(options["directory"])))

    def uid_base(self, account: str) -> str:
        uid_root = self.options["uid_root"]
        directory = os.path.abspath(self.options["directory"])
        return os.path.normpath(uid_root) if uid_root else directory


class MultiUserDirectoryAdapter(DirectoryAdapterBase):
    """Many accounts: a root holding one directory per user (the original pop3sf's layout).

    A user directory's name is the user name (``^[0-9A-Za-z_-]{1,64}$``, case-sensitive); it
    holds ``.pop3sf_password_bcrypt`` (one bcrypt hash, or a hash in Dovecot notation) and the
    user's ``.eml``/``.txt`` files. A symlinked user directory is not served.

    Config keys (``[adapter]``, ``type = directory_multi``):

    ``root``
        Absolute path of the directory holding the user directories.
    ``uid_root``
        The root's *former* absolute path when the data was moved (see :class:`DirectoryAdapter`).
    ``from_address``, ``to_address``, ``size_cache_dir``, ``size_cache_entries``,
    ``cross_instance_lock``
        As for :class:`DirectoryAdapter` (the lock file is each user directory's).
    ``bcrypt_rounds``
        Cost of the hashes ``pop3sf-admin`` writes (default 12; the server reads any cost).
        Every login spends one check of this cost: unknown names, broken accounts (no or an
        unreadable password file) and cheaper hashes are padded to it.
    """

    configspec = """
root = string
bcrypt_rounds = integer(4, 31, default=12)
""" + _COMMON_SPEC

    _dummy: tuple[int, str] | None = None

    def _check_paths(self, options: Mapping[str, Any]) -> None:
        require_directory(options["root"], "root")

    def reference(self) -> str:
        """A hash of the cost new users get: every login spends one check of this cost."""
        rounds = self.options["bcrypt_rounds"]
        dummy = self._dummy
        if dummy is None or dummy[0] != rounds:
            dummy = self._dummy = (rounds, passwords.hash_bcrypt(b"pop3sf-dummy", rounds))
        return dummy[1]

    def deny(self, password: bytes, cause: str, account: str = "") -> NoReturn:
        """Fail a login as a wrong password would, in the same time. An existing account that
        can't log in (unreadable, no or a garbled password file) answers and costs what an
        unknown name does, so probing can't find it; the log tells the admin why."""
        if account:
            log.warning("account %r can't log in: %s", account, cause)
        passwords.dummy_verify(password, like=self.reference())
        raise AuthenticationFailed(cause)

    def locate(self, credentials: Credentials) -> tuple[AuthResult[Located], int]:
        username = credentials.username
        password = credentials.password_bytes()
        if not is_valid_username(username):
            self.deny(password, "invalid user name")
        root = os.path.abspath(self.options["root"])
        root_fd = _open_dir(root)
        try:
            try:
                user_fd = os.open(username, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
            except FileNotFoundError:
                self.deny(password, "unknown user")
            except OSError as exc:
                _fail_if_out_of_resources(exc)
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    self.deny(password, f"cannot open user directory: {exc.strerror}", username)
                if _is_symlink(username, root_fd):  # ENOTDIR, or ELOOP, for a link
                    self.deny(password, "user directory is a symlink, not served", username)
                self.deny(password, "unknown user")  # a file, not a directory
        finally:
            os.close(root_fd)
        try:
            try:
                stored = password_file(user_fd)
            except (NoPasswordFile, UnreadablePasswordFile) as exc:
                self.deny(password, str(exc), username)
            # A hash of the reference's cost needs no padding, and no reference: hashing one
            # (a third of a second at cost 12) waits for the first login that needs it.
            same = passwords.cost_class(stored) == \
                passwords.bcrypt_class(self.options["bcrypt_rounds"])
            like = None if same else self.reference()
            passwords.verify_or_deny(stored, password, like=like, account=username)
        except BaseException:
            os.close(user_fd)
            raise
        return self._located(username, user_fd)

    def uid_base(self, account: str) -> str:
        uid_root = self.options["uid_root"]
        base = os.path.normpath(uid_root) if uid_root else os.path.abspath(self.options["root"])
        return os.path.join(base, account)


def _open_dir(path: str) -> int:
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise TemporaryFailure(f"cannot open message directory {path}: {exc}") from exc


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _fail_if_out_of_resources(exc: OSError) -> None:
    """Out of descriptors or memory says nothing about the account: a temporary failure."""
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        raise TemporaryFailure(f"cannot open a file: {exc.strerror}") from exc


class NoPasswordFile(Exception):
    """The user directory has no usable password file: none, empty, a symlink, not a file."""


class UnreadablePasswordFile(TemporaryFailure):
    """The password file is there but can't be read (permissions, I/O error)."""


def password_file(dir_fd: int) -> str:
    """The stored hash of a user directory. Raises :class:`NoPasswordFile`,
    :class:`UnreadablePasswordFile`, or :class:`TemporaryFailure` while a writer holds it."""
    try:
        fd = os.open(PASSWORD_FILE, _OPEN_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        raise NoPasswordFile(f"no {PASSWORD_FILE}") from None
    except OSError as exc:
        _fail_if_out_of_resources(exc)
        if exc.errno == errno.ELOOP:
            raise NoPasswordFile(f"{PASSWORD_FILE} is a symlink") from None
        raise UnreadablePasswordFile(f"cannot read {PASSWORD_FILE}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NoPasswordFile(f"{PASSWORD_FILE} is not a regular file")
        # The original tools write it in place under LOCK_EX; wait briefly for such a writer.
        for _ in range(50):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.02)
        else:
            raise TemporaryFailure("password file locked by a writer")
        try:
            data = os.read(fd, 4096)
        except OSError as exc:
            raise UnreadablePasswordFile(f"cannot read {PASSWORD_FILE}: {exc.strerror}") \
                from exc
    finally:
        os.close(fd)
    text = data.decode("ascii", "replace").strip()
    if not text:
        raise NoPasswordFile(f"{PASSWORD_FILE} is empty")
    return text


def read_password_file(dir_fd: int) -> str | None:
    """The stored hash of a user directory, or None if there is none (missing, empty, a link);
    :class:`TemporaryFailure` if it can't be read."""
    try:
        return password_file(dir_fd)
    except NoPasswordFile:
        return None


class DirectorySession(MailboxSession[Located]):
    """One connection's view of one message directory (via an open directory descriptor)."""

    def __init__(self, adapter: DirectoryAdapterBase, peer: Peer) -> None:
        self.adapter = adapter
        self.peer = peer
        self.options = adapter.options
        self.cache = adapter.size_cache
        self.account: str | None = None
        self.read_only = False
        self._dir_fd: int | None = None
        self._uid_base = ""
        self._entries: dict[str, _Entry] = {}
        self._lock_fd: int | None = None

    # --- authentication -------------------------------------------------------------------

    def authenticate(self, credentials: Credentials) -> AuthResult[Located]:
        result, fd = self.adapter.locate(credentials)
        self._close_dir()
        self._dir_fd = fd  # a resource: owned by the session from now on, whatever follows
        return result

    def login_succeeded(self, account: AuthResult[Located], read_only: bool) -> None:
        assert account.found is not None, "a directory login always says where"
        self.account, self._uid_base = account.account_id, account.found.uid_base
        self.read_only = read_only
        if not read_only and self.options["cross_instance_lock"] and self._lock_fd is None:
            self._lock_fd = lock_maildrop(self._fd(), LOCK_FILE, self._uid_base)

    # --- listing --------------------------------------------------------------------------

    def _fd(self) -> int:
        if self._dir_fd is None:
            raise TemporaryFailure("not logged in")
        return self._dir_fd

    def list_messages(self) -> Sequence[MessageInfo]:
        dir_fd = self._fd()
        try:
            names = os.listdir(dir_fd)
        except OSError as exc:
            raise TemporaryFailure(f"cannot list message directory: {exc}") from exc
        found: list[tuple[_Entry, MessageInfo]] = []
        for name in names:
            kind = kind_of(name)
            if kind is None:
                if name.startswith(_ASIDE_PREFIX):
                    self._remove_leftover(dir_fd, name)
                continue
            listed = self._list_one(dir_fd, name, kind)
            if listed is not None:
                found.append(listed)
        found.sort(key=lambda item: (item[0].mtime_ns, item[0].name))
        self._entries = {entry.uid: entry for entry, _ in found}
        return [info for _, info in found]

    def name_of(self, uid: str) -> str | None:
        """The file name of a listed message."""
        entry = self._entries.get(uid)
        return entry.name if entry is not None else None

    def _list_one(self, dir_fd: int, name: str, kind: str) -> tuple[_Entry, MessageInfo] | None:
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
        except OSError as exc:  # vanished, a symlink (ELOOP), unreadable
            if exc.errno not in (errno.ENOENT, errno.ELOOP):
                log.warning("skipping %r in %s: %s", name, self._uid_base, exc)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # a writer holds it: not complete yet
            entry = _Entry(name, kind, original_uid(os.path.join(self._uid_base, name),
                                                    st.st_mtime),
                           st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mtime)
            try:
                m = self.cache.get_or_measure(st, lambda: self._stream(entry, os.dup(fd)),
                                              self._variant(entry))
            except FileChanged:
                return None
        except OSError as exc:
            log.warning("skipping %r in %s: %s", name, self._uid_base, exc)
            return None
        finally:
            os.close(fd)
        return entry, MessageInfo(entry.uid, m.size, m.utf8_header, m.downgraded_size)

    def _addresses(self) -> tuple[str, str]:
        account = self.account or ""
        return (self.options["from_address"].replace("%u", account),
                self.options["to_address"].replace("%u", account))

    def _variant(self, entry: _Entry) -> str:
        if entry.kind == "eml":
            return ""
        sender, recipient = self._addresses()
        return "\0".join(("txt", WRAP_VERSION, entry.uid, entry.name, sender, recipient))

    def _stream(self, entry: _Entry, fd: int) -> BinaryIO:
        """A stream of the message from an open descriptor of its file (taken over)."""
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.fdopen(fd, "rb")
        if entry.kind == "eml":
            return raw
        sender, recipient = self._addresses()
        wrapped = PlaintextMessage(raw, uid=entry.uid, name=entry.name, date=_utc(entry.mtime),
                                   from_addr=sender, to_addr=recipient)
        return wrapped  # type: ignore[return-value]

    # --- retrieval ------------------------------------------------------------------------

    def open_message(self, uid: str) -> BinaryIO:
        entry = self._entries.get(uid)
        if entry is None:
            raise MessageGone(uid)
        try:
            fd = os.open(entry.name, _OPEN_FLAGS, dir_fd=self._fd())
        except FileNotFoundError:
            raise MessageGone(uid) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a symlink
                raise MessageGone(uid) from None
            raise
        try:
            if not entry.matches(os.fstat(fd)):
                raise MessageGone(uid)  # replaced or rewritten: the listed size would be wrong
            os.set_blocking(fd, True)
            # Hold a shared lock while sending, so a flock-respecting writer waits for us.
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TemporaryFailure("message file locked by a writer") from None
            return self._stream(entry, fd)
        except BaseException:
            os.close(fd)
            raise

    # --- deletion -------------------------------------------------------------------------

    def delete_messages(self, uids: Collection[str]) -> DeleteResult:
        if self.read_only:
            return DeleteResult({uid: "read-only session" for uid in uids})
        dir_fd = self._fd()
        failed: dict[str, str] = {}
        changed = False
        for uid in uids:
            entry = self._entries.get(uid)
            if entry is None:
                failed[uid] = "not in this session's listing"
                continue
            try:
                if self._delete_one(dir_fd, entry):
                    changed = True
                    del self._entries[uid]
            except (OSError, _Replaced) as exc:
                failed[uid] = str(exc) or type(exc).__name__
        if changed:
            try:
                os.fsync(dir_fd)
            except OSError as exc:
                log.warning("fsync of %s after deletions: %s", self._uid_base, exc)
        return DeleteResult(failed)

    @staticmethod
    def _remove_leftover(dir_fd: int, name: str) -> None:
        """A file set aside by a deletion that a crash interrupted after its QUIT: finish it.

        Only once it has been aside for a minute, so a commit still running elsewhere is safe.
        """
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and time.time() - st.st_ctime > ASIDE_GRACE:
                os.unlink(name, dir_fd=dir_fd)
                log.info("removed %s, left over from an interrupted deletion", name)
        except OSError:
            pass

    def _delete_one(self, dir_fd: int, entry: _Entry) -> bool:
        """Unlink the listed file; False if it was already gone."""
        aside = f"{_ASIDE_PREFIX}{os.urandom(16).hex()}"
        try:
            os.rename(entry.name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        st = os.stat(aside, dir_fd=dir_fd, follow_symlinks=False)
        if not entry.matches(st):
            # Another file under that name, or this one rewritten since the listing (the client
            # never saw that content): put it back, never delete it.
            os.rename(aside, entry.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            raise _Replaced("file was replaced since the listing; kept")
        os.unlink(aside, dir_fd=dir_fd)
        return True

    def connection_closed(self) -> None:
        self._close_dir()
        self._entries = {}
        unlock_maildrop(self._lock_fd)
        self._lock_fd = None

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


class _Replaced(Exception):
    pass


_ASIDE_PREFIX = ".pop3sf-deleting-"
#: Seconds a set-aside file must have been aside before a listing finishes its deletion.
ASIDE_GRACE = 60.0
