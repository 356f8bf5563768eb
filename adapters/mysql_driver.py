"""Connections to MySQL/MariaDB for the MySQL adapters: driver shim, bounded pool, circuit breaker.

Two DB-API drivers are supported: ``mysql-connector-python`` (used when importable) and PyMySQL
(Debian's ``python3-pymysql``, the one the .deb can depend on). :class:`Driver` hides their few
differences (connect keywords, which exceptions mean "the connection is gone") so the adapter's
SQL code is written once.

:class:`Pool` hands out connections, opening at most ``size`` at a time; a connection that failed
is discarded, never returned, so a database that restarted is reconnected on the next call.
:class:`CircuitBreaker` makes a dead database cheap: after ``threshold`` consecutive failed
connects, calls fail at once with :class:`TemporaryFailure` for ``cooldown`` seconds instead of
pinning worker threads on connect timeouts.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import ConfigurationError, TemporaryFailure

log = logging.getLogger("pop3sf.adapters.mysql")

#: Client error numbers that mean the connection is unusable (CR_* codes) or the server is
#: going away (ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED, ...).
CONNECTION_ERRNOS = frozenset({
    2002, 2003, 2005, 2006, 2011, 2013, 2014, 2026, 2027, 2048, 2055,
    1040, 1053, 1077, 1152, 1153, 1156, 1158, 1159, 1160, 1161, 1184, 1927, 4031,
})


@dataclass(frozen=True)
class ConnectParams:
    """Where and how to connect; built once from the adapter's config section."""

    host: str = "localhost"
    port: int = 3306
    unix_socket: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    database: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    ssl: bool = False
    ssl_ca: str = ""
    ssl_cert: str = ""
    ssl_key: str = ""
    ssl_verify_identity: bool = True

    def where(self) -> str:
        place = self.unix_socket or f"{self.host}:{self.port}"
        return f"{self.user}@{place}/{self.database}"


def read_password_file(path: str) -> str:
    """The first line of a password file that only its owner (and group) may read."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigurationError(f"password_file {path!r}: {exc.strerror or exc}") from exc
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigurationError(
            f"password_file {path!r} is readable or writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod o-rwx {path}")
    return text.splitlines()[0] if text else ""


class Driver:
    """One DB-API driver behind a common face."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "mysql-connector":
            self.module: Any = importlib.import_module("mysql.connector")
            # It logs its authentication plugin at INFO on every connect: keep the log to
            # pop3sf's own lines (a level someone set for that logger explicitly stays).
            connector_log = logging.getLogger("mysql.connector")
            if connector_log.level == logging.NOTSET:
                connector_log.setLevel(logging.WARNING)
        elif name == "pymysql":
            self.module = importlib.import_module("pymysql")
        else:
            raise ConfigurationError(f"unknown MySQL driver {name!r}")
        self.Error: type[Exception] = self.module.Error
        # Errors after which the connection must not be used again, whatever their number.
        errors = getattr(self.module, "errors", None)
        timeouts = [getattr(errors, n) for n in
                    ("ConnectionTimeoutError", "ReadTimeoutError", "WriteTimeoutError")
                    if hasattr(errors, n)]
        self._lost: tuple[type[BaseException], ...] = (OSError, EOFError, *timeouts)

    @classmethod
    def choose(cls, wanted: str = "auto") -> Driver:
        """``auto``: mysql-connector-python when importable, else PyMySQL."""
        order = ["mysql-connector", "pymysql"] if wanted == "auto" else [wanted]
        problems = []
        for name in order:
            try:
                return cls(name)
            except ImportError as exc:
                problems.append(f"{name}: {exc}")
        hint = "apt-get install python3-pymysql (or pip install mysql-connector-python)"
        raise ConfigurationError(f"no usable MySQL driver ({'; '.join(problems)}); {hint}")

    def connect(self, p: ConnectParams, autocommit: bool = True) -> Any:
        kw: dict[str, Any] = {"user": p.user, "password": p.password, "database": p.database,
                              "autocommit": autocommit, "charset": "utf8mb4",
                              "read_timeout": p.read_timeout, "write_timeout": p.write_timeout}
        if p.unix_socket:
            kw["unix_socket"] = p.unix_socket
        else:
            kw.update(host=p.host, port=p.port)
        if self.name == "pymysql":
            # The server's max_allowed_packet is the real limit; don't add a lower one here.
            kw.update(connect_timeout=p.connect_timeout, binary_prefix=True,
                      max_allowed_packet=1 << 30)
            if p.ssl:
                # Without ssl_ca, PyMySQL verifies against the system's trust store.
                kw.update(ssl_ca=p.ssl_ca or None, ssl_cert=p.ssl_cert or None,
                          ssl_key=p.ssl_key or None, ssl_verify_cert=True,
                          ssl_verify_identity=p.ssl_verify_identity)
        else:  # mysql-connector wants whole seconds
            kw.update(connection_timeout=_seconds(p.connect_timeout),
                      read_timeout=_seconds(p.read_timeout),
                      write_timeout=_seconds(p.write_timeout),
                      collation="utf8mb4_general_ci")
            if p.ssl:
                kw.update(ssl_verify_cert=True, ssl_verify_identity=p.ssl_verify_identity)
                for key in ("ssl_ca", "ssl_cert", "ssl_key"):
                    if getattr(p, key):
                        kw[key] = getattr(p, key)
            else:
                kw["ssl_disabled"] = True
        return self.module.connect(**kw)

    def errno(self, exc: BaseException) -> int | None:
        num = getattr(exc, "errno", None)
        if isinstance(num, int):
            return num
        args = getattr(exc, "args", ())
        return args[0] if args and isinstance(args[0], int) else None

    def is_connection_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` leaves the connection unusable (or in a state nobody can vouch for).

        Only an error the *server* reported (numbers below 2000, or 3000 and up) on a live
        connection leaves it usable; client errors (2000-2999), errors without a number
        (PyMySQL's ``InterfaceError(0)``, connector's ``-1`` "Connection not available"),
        timeouts and anything that is not a driver error do not.
        """
        if isinstance(exc, self._lost) or not isinstance(exc, self.Error):
            return True
        num = self.errno(exc)
        if num is None or num <= 0 or num in CONNECTION_ERRNOS:
            return True
        return 2000 <= num < 3000


class CircuitBreaker:
    """Fail fast while the database is known to be down."""

    def __init__(self, threshold: int = 5, cooldown: float = 10.0) -> None:
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0
        self._trial = False

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold and time.monotonic() < self._open_until

    def before_connect(self) -> None:
        """Raise :class:`TemporaryFailure` while open; let one trial through after cooldown."""
        with self._lock:
            if self._failures < self.threshold:
                return
            now = time.monotonic()
            if now < self._open_until or self._trial:
                wait = max(0.0, self._open_until - now)
                raise TemporaryFailure(
                    f"database unavailable (circuit open after {self._failures} failed "
                    f"connects; next try in {wait:.0f} s)")
            self._trial = True

    def succeeded(self) -> None:
        with self._lock:
            if self._failures >= self.threshold:
                log.warning("mysql: database reachable again; circuit closed")
            self._failures = 0
            self._trial = False

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial = False
            if self._failures >= self.threshold:
                self._open_until = time.monotonic() + self.cooldown
                if self._failures == self.threshold:
                    log.error("mysql: %d consecutive connection failures; failing fast for "
                              "%.0f s", self._failures, self.cooldown)


class Pool:
    """At most ``size`` open connections shared by the sessions of one adapter."""

    def __init__(self, driver: Driver, params: ConnectParams, size: int = 10,
                 timeout: float = 10.0, breaker: CircuitBreaker | None = None,
                 ping_after: float = 30.0) -> None:
        self.driver = driver
        self.params = params
        self.size = max(1, size)
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker()
        self.ping_after = ping_after
        self._cond = threading.Condition()
        self._idle: list[tuple[Any, float]] = []
        self._open = 0
        self._closed = False

    def open_connection(self, autocommit: bool = True) -> Any:
        """A new connection outside the pool (also used for the lock connection)."""
        self.breaker.before_connect()
        try:
            conn = self.driver.connect(self.params, autocommit=autocommit)
        except Exception as exc:
            self.breaker.failed()
            log.error("mysql: cannot connect to %s: %s", self.params.where(),
                      str(exc).strip() or type(exc).__name__)
            raise TemporaryFailure("cannot connect to the database") from exc
        self.breaker.succeeded()
        return conn

    def _take(self) -> tuple[Any, bool]:
        """An idle connection (reused=True) or a slot to open a new one (None, False)."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._closed:
                    raise TemporaryFailure("the database pool is closed")
                if self._idle:
                    conn, since = self._idle.pop()
                    return (conn, since), True
                if self._open < self.size:
                    self._open += 1
                    return None, False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TemporaryFailure(f"all {self.size} database connections busy")
                self._cond.wait(left)

    def _release_slot(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def acquire(self) -> tuple[Any, bool]:
        """``(connection, reused)``; give it back with :meth:`release`."""
        item, reused = self._take()
        if reused:
            conn, since = item
            if time.monotonic() - since < self.ping_after:
                return conn, True
            try:  # long idle: the server may have closed it (wait_timeout)
                conn.ping(reconnect=False) if self.driver.name == "pymysql" else conn.ping()
                return conn, True
            except Exception:
                _close_quietly(conn)
        try:
            return self.open_connection(), False
        except BaseException:
            self._release_slot()
            raise

    def release(self, conn: Any, broken: bool = False) -> None:
        with self._cond:
            if broken or self._closed:
                self._open -= 1
                self._cond.notify()
            else:
                self._idle.append((conn, time.monotonic()))
                self._cond.notify()
                return
        _close_quietly(conn)

    def run(self, fn: Any, retry: bool = True) -> Any:
        """``fn(conn)`` on a pooled connection.

        A connection that fails is discarded, never pooled again. When a *reused* connection
        fails fast (the server restarted, or closed it after ``wait_timeout``), ``fn`` runs once
        more on a new connection if ``retry`` (pass it only for calls that are safe to repeat);
        a slow failure (a timeout: the database hangs) is not retried, to not wait twice.
        """
        for attempt in (1, 2):
            conn, reused = self.acquire()
            started = time.monotonic()
            try:
                result = fn(conn)
            except BaseException as exc:
                lost = self.driver.is_connection_error(exc)
                if lost:
                    self.release(conn, broken=True)
                else:
                    with contextlib.suppress(Exception):
                        conn.rollback()
                    self.release(conn)
                fast = time.monotonic() - started < min(1.0, self.params.read_timeout / 2)
                if lost and reused and retry and attempt == 1 and fast \
                        and isinstance(exc, Exception):
                    log.info("mysql: pooled connection lost (%s); reconnecting", exc)
                    continue
                raise
            self.release(conn)
            return result
        raise AssertionError("unreachable")

    def stats(self) -> Mapping[str, int]:
        with self._cond:
            return {"open": self._open, "idle": len(self._idle), "size": self.size}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn, _ in idle:
            _close_quietly(conn)


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def close_quietly(conn: Any) -> None:
    """Close a connection that may already be broken; its errors don't matter any more."""
    with contextlib.suppress(Exception):
        conn.close()
