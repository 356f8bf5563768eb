"""Exact message sizes, measured once per file version (docs/adapters.md#sessions, #bundled).

A listing must give the exact RETR size (and, for internationalized headers, the downgraded size)
without reading bodies, yet plain files carry no size but their raw length. So each file is
measured by one read the first time it is seen and the result kept under (device, inode, size,
mtime_ns): any change to the file gives a new key. A ``variant`` string distinguishes different
renderings of the same file (a ``.txt`` file wrapped with other headers).

Entries live in a bounded LRU in memory and, with a cache directory, in an append-only journal
that survives restarts (rewritten compactly when it grows to twice the live entries). The cache is
an optimisation only: a lost or corrupt journal just costs re-measuring.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, NamedTuple

from pop3sf.wire import Measure, measure

log = logging.getLogger(__name__)

#: The journal's name carries the version of the wire form it measured: a release that changes
#: the downgrade's output changes the name, so sizes measured by the old code are never served.
JOURNAL = "sizes-v2.log"
STALE_JOURNALS = ("sizes-v1.log",)
DEFAULT_MAX_ENTRIES = 100_000


class FileChanged(Exception):
    """The file changed while it was being measured (a writer without a lock); try later."""


class SizeKey(NamedTuple):
    device: int
    inode: int
    size: int
    mtime_ns: int
    variant: str = ""


def key_for(st: os.stat_result, variant: str = "") -> SizeKey:
    """The cache key of one version of a file; ``variant`` is hashed to a short token."""
    token = hashlib.sha256(variant.encode("utf-8", "surrogateescape")).hexdigest()[:16] \
        if variant else ""
    return SizeKey(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, token)


def _same_version(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == \
        (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


class SizeCache:
    """Thread-safe bounded cache of :class:`~pop3sf.wire.Measure` per file version."""

    def __init__(self, directory: str | os.PathLike[str] | None = None,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max(1, max_entries)
        self.directory = os.fspath(directory) if directory else None
        self._entries: OrderedDict[SizeKey, Measure] = OrderedDict()
        self._lock = threading.Lock()
        self._journal: int | None = None
        self._journal_lines = 0
        self._loaded = self.directory is None
        self.hits = 0
        self.misses = 0

    # --- public API -----------------------------------------------------------------------

    def get(self, key: SizeKey) -> Measure | None:
        with self._lock:
            self._load()
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: SizeKey, value: Measure) -> None:
        with self._lock:
            self._load()
            if self._entries.get(key) == value:
                self._entries.move_to_end(key)
                return
            self._store(key, value)
            self._append(key, value)

    def get_or_measure(self, st: os.stat_result, opener: Callable[[], BinaryIO],
                       variant: str = "") -> Measure:
        """The cached measure of this file version, or measure ``opener()``'s stream now.

        ``st`` is the ``fstat`` of the file as listed. The stream is closed afterwards. If it has
        a file descriptor, the file is checked to be the same version after reading, and
        :class:`FileChanged` is raised (nothing cached) when it isn't.
        """
        key = key_for(st, variant)
        found = self.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        with opener() as stream:
            result = measure(stream)
            try:
                after = os.fstat(stream.fileno())
            except (OSError, AttributeError, ValueError):
                after = st
        if not _same_version(st, after):
            raise FileChanged(f"file changed while measured (inode {st.st_ino})")
        self.put(key, result)
        return result

    def discard(self, key: SizeKey) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None

    # --- internals (called with the lock held) ---------------------------------------------

    def _store(self, key: SizeKey, value: Measure) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    @staticmethod
    def _line(key: SizeKey, value: Measure) -> bytes:
        down = "-" if value.downgraded_size is None else str(value.downgraded_size)
        return (f"{key.device} {key.inode} {key.size} {key.mtime_ns} {key.variant or '-'} "
                f"{value.size} {int(value.utf8_header)} {down}\n").encode("ascii")

    @staticmethod
    def _parse(line: bytes) -> tuple[SizeKey, Measure] | None:
        parts = line.split()
        if len(parts) != 8:
            return None
        try:
            dev, ino, size, mtime, msize, utf8 = (int(p) for p in parts[:4] + parts[5:7])
            down = None if parts[7] == b"-" else int(parts[7])
            variant = "" if parts[4] == b"-" else parts[4].decode("ascii")
        except (ValueError, UnicodeDecodeError):
            return None
        return SizeKey(dev, ino, size, mtime, variant), Measure(msize, bool(utf8), down)

    def _path(self) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, JOURNAL)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            os.makedirs(self.directory or ".", mode=0o750, exist_ok=True)
            for stale in STALE_JOURNALS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory or ".", stale))
            try:
                with open(self._path(), "rb") as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                lines = []
            for line in lines:
                parsed = self._parse(line)
                if parsed is not None:
                    self._store(*parsed)
            self._journal_lines = len(lines)
            if self._journal_lines > 2 * len(self._entries) + 1000:
                self._compact()
            self._journal = os.open(self._path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                    | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            log.warning("size cache %s unusable, keeping sizes in memory only: %s",
                        self.directory, exc)
            self._journal = None

    def _compact(self) -> None:
        tmp = os.path.join(self.directory or ".", f".{JOURNAL}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(self._line(k, v) for k, v in self._entries.items()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path())
        self._journal_lines = len(self._entries)

    def _append(self, key: SizeKey, value: Measure) -> None:
        if self._journal is None:
            return
        try:
            os.write(self._journal, self._line(key, value))
            self._journal_lines += 1
            if self._journal_lines > 2 * self.max_entries + 1000:
                os.close(self._journal)
                self._journal = None
                self._compact()
                self._journal = os.open(self._path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                        | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            log.warning("size cache journal %s: %s; continuing in memory", self._path(), exc)
            if self._journal is not None:
                os.close(self._journal)
            self._journal = None


#: configspec lines of the two keys of adapters with a size cache.
CONFIGSPEC = """
size_cache_dir = string(default="")
size_cache_entries = integer(100, 10000000, default=100000)
"""
_KEYS = ("size_cache_dir", "size_cache_entries")


def from_options(options: Mapping[str, Any]) -> SizeCache:
    """The cache configured by an adapter's ``size_cache_dir`` and ``size_cache_entries``."""
    return SizeCache(options["size_cache_dir"] or None, options["size_cache_entries"])


def reconfigured(cache: SizeCache, old: Mapping[str, Any], new: Mapping[str, Any]) -> SizeCache:
    """The cache for the *new* options of a reload: *cache* itself while its keys are
    unchanged (the sizes it learnt stay), else a new one, and *cache* is closed."""
    if all(old[key] == new[key] for key in _KEYS):
        return cache
    cache.close()
    return from_options(new)

