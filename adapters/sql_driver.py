"""Connections for ``type = sql``: one small class per database, and a bounded pool.

* ``sqlite`` — the standard library's :mod:`sqlite3`; the file is opened read-only unless
  ``deletion = query`` needs to write (``mode=ro``/``mode=rw``: a missing file is never
  created).
* ``postgresql`` — psycopg2 (Debian's ``python3-psycopg2``, a Suggests of the package: imported
  only when configured, with an error saying what to install when it is missing).
* ``mysql`` — the MySQL adapters' drivers (:mod:`.mysql_driver`: mysql-connector-python or
  PyMySQL) and their connection keys.

Every connection runs in autocommit mode; a deletion brackets its statements with ``BEGIN`` and
``COMMIT`` itself. :class:`Pool` keeps up to ``size`` connections; one that raised anything is
closed rather than reused, so a restarted database costs one failed call, not a broken pool.
"""

from __future__ import annotations

import contextlib
import importlib
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .base import ConfigError, TemporaryFailure
from .mysql_driver import ConnectParams, Driver
from .sql_query import HEADER_PREFIX


def _head8(prefix: bytes | None) -> bytes | None:
    """SQLite has no byte-level test for 8-bit octets: the header prefix if it has one."""
    if prefix is None:
        return None
    data = bytes(prefix)
    return data if data and max(data) >= 0x80 else None


class SQLiteDriver:
    dialect = "sqlite"

    def __init__(self, path: str, writable: bool, timeout: float) -> None:
        self.path = path
        self.writable = writable
        self.timeout = timeout
        self.Error: type[Exception] = sqlite3.Error

    def where(self) -> str:
        return self.path

    def connect(self) -> Any:
        uri = Path(self.path).as_uri() + ("?mode=rw" if self.writable else "?mode=ro")
        conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, check_same_thread=False,
                               isolation_level=None)
        conn.create_function("pop3sf_head8", 1, _head8, deterministic=True)
        return conn

    def lost(self, conn: Any, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection is gone (never, for a file)."""
        return False

    def describe(self, conn: Any, sql: str, args: Mapping[str, Any]) -> list[tuple[str, Any]]:
        cur = conn.execute(sql, dict(args))
        try:
            return [(d[0], None) for d in cur.description or ()]
        finally:
            cur.close()


class PostgreSQLDriver:
    dialect = "postgresql"

    def __init__(self, options: Mapping[str, Any], password: str) -> None:
        try:
            self.module: Any = importlib.import_module("psycopg2")
        except ImportError as exc:
            raise ConfigError(f"driver = postgresql needs psycopg2 ({exc}): "
                              "apt-get install python3-psycopg2") from None
        self.Error = self.module.Error
        o = options
        self.kw: dict[str, Any] = {
            "host": o["unix_socket"] or o["host"], "port": o["port"] or 5432,
            "dbname": o["database"], "user": o["user"], "password": password,
            "connect_timeout": max(1, round(o["connect_timeout"])),
            "sslmode": o["sslmode"], "application_name": "pop3sf",
            "client_encoding": "UTF8",
            "options": f"-c statement_timeout={int(o['read_timeout'] * 1000)}",
        }
        if o["ssl_ca"]:
            self.kw["sslrootcert"] = o["ssl_ca"]

    def where(self) -> str:
        return f"{self.kw['user']}@{self.kw['host']}:{self.kw['port']}/{self.kw['dbname']}"

    def connect(self) -> Any:
        conn = self.module.connect(**self.kw)
        conn.autocommit = True
        return conn

    def lost(self, conn: Any, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection is gone (the server restarted, or closed an
        idle connection): psycopg2 marks such a connection closed."""
        return bool(getattr(conn, "closed", 0)) or isinstance(exc, self.module.InterfaceError)

    def describe(self, conn: Any, sql: str, args: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """Column names and type OIDs (17 is ``bytea``)."""
        with conn.cursor() as cur:
            cur.execute(sql, dict(args) if args else _NO_ARGS)
            return [(d[0], d[1]) for d in cur.description or ()]


class MySQLDriver:
    dialect = "mysql"

    def __init__(self, options: Mapping[str, Any], password: str) -> None:
        o = options
        self.driver = Driver.choose(o["mysql_driver"])
        self.Error = self.driver.Error
        self.params = ConnectParams(
            host=o["host"] or "localhost", port=o["port"] or 3306, unix_socket=o["unix_socket"],
            user=o["user"], password=password, database=o["database"],
            connect_timeout=o["connect_timeout"], read_timeout=o["read_timeout"],
            write_timeout=o["read_timeout"],
            ssl=o["sslmode"] in ("require", "verify-ca", "verify-full"),
            ssl_ca=o["ssl_ca"], ssl_verify_identity=o["sslmode"] == "verify-full")
        self.mariadb: bool | None = None

    def where(self) -> str:
        return self.params.where()

    def connect(self) -> Any:
        conn = self.driver.connect(self.params, autocommit=True)
        if self.mariadb is None:
            cur = self._cursor(conn)
            try:
                cur.execute("SELECT VERSION()")
                version = cur.fetchone()[0]
            finally:
                cur.close()
            if isinstance(version, bytes | bytearray):
                version = bytes(version).decode("ascii", "replace")
            self.mariadb = "mariadb" in str(version).lower()
        return conn

    def lost(self, conn: Any, exc: BaseException) -> bool:
        return self.driver.is_connection_error(exc)

    def _cursor(self, conn: Any) -> Any:
        return conn.cursor(buffered=True) if self.driver.name == "mysql-connector" \
            else conn.cursor()

    def describe(self, conn: Any, sql: str, args: Mapping[str, Any]) -> list[tuple[str, Any]]:
        cur = self._cursor(conn)
        try:
            cur.execute(sql, dict(args) if args else _NO_ARGS)
            names = [(d[0], d[1]) for d in cur.description or ()]
            cur.fetchall()
            return names
        finally:
            cur.close()


AnyDriver = SQLiteDriver | PostgreSQLDriver | MySQLDriver


def fetch_all(driver: AnyDriver, conn: Any, sql: str, args: Mapping[str, Any]) -> list[Any]:
    """All rows of one statement (an empty mapping is passed as no parameters, so a lone
    ``%%`` means the same with or without parameters: translation always doubles ``%``)."""
    if isinstance(driver, SQLiteDriver):
        return conn.execute(sql, dict(args)).fetchall()
    cur = driver._cursor(conn) if isinstance(driver, MySQLDriver) else conn.cursor()
    try:
        cur.execute(sql, dict(args) if args else _NO_ARGS)
        return list(cur.fetchall()) if cur.description else []
    finally:
        cur.close()


#: Passed instead of no parameters so drivers always apply ``%`` formatting (``%%`` -> ``%``).
_NO_ARGS: Mapping[str, Any] = {"pop3sf": None}


def execute_many(driver: AnyDriver, conn: Any, sql: str, rows: list[Mapping[str, Any]]) -> None:
    """One statement per parameter mapping, in a transaction the caller opened."""
    if isinstance(driver, SQLiteDriver):
        conn.executemany(sql, [dict(r) for r in rows])
        return
    cur = driver._cursor(conn) if isinstance(driver, MySQLDriver) else conn.cursor()
    try:
        for r in rows:
            cur.execute(sql, dict(r) if r else _NO_ARGS)
    finally:
        cur.close()


def statement(driver: AnyDriver, conn: Any, sql: str) -> None:
    """A statement without parameters or results (BEGIN, COMMIT, ROLLBACK)."""
    if isinstance(driver, SQLiteDriver):
        conn.execute(sql)
        return
    cur = conn.cursor()
    try:
        cur.execute(sql)
    finally:
        cur.close()


class Pool:
    """At most ``size`` open connections, handed out one call at a time."""

    def __init__(self, connect: Callable[[], Any], size: int, timeout: float,
                 lost: Callable[[Any, BaseException], bool] | None = None) -> None:
        self._connect = connect
        self._lost = lost or (lambda conn, exc: False)
        self.size = size
        self.timeout = timeout
        self._cond = threading.Condition()
        self._idle: list[Any] = []
        self._open = 0
        self._closed = False

    def run(self, fn: Callable[[Any], Any], retry: bool = True) -> Any:
        """``fn(connection)``; a connection that raised is closed, never pooled again. When a
        pooled connection turns out to be gone (the database restarted since it was last
        used), ``fn`` runs once more on a new one if ``retry`` (reads: safe to repeat)."""
        for attempt in (1, 2):
            conn, reused = self._acquire()
            try:
                result = fn(conn)
            except Exception as exc:
                self._discard(conn)
                if retry and reused and attempt == 1 and self._lost(conn, exc):
                    continue
                raise
            except BaseException:
                self._discard(conn)
                raise
            self._release(conn)
            return result
        raise AssertionError("unreachable")

    def _acquire(self) -> tuple[Any, bool]:
        """(connection, whether it was pooled)."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._closed:
                    raise TemporaryFailure("the database pool is closed")
                if self._idle:
                    return self._idle.pop(), True
                if self._open < self.size:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TemporaryFailure(f"all {self.size} database connections busy")
                self._cond.wait(left)
        try:
            return self._connect(), False
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _release(self, conn: Any) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(conn)
                self._cond.notify()
                return
            self._open -= 1
        _close(conn)

    def _discard(self, conn: Any) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()
        _close(conn)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            _close(conn)


def _close(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


__all__ = ["HEADER_PREFIX", "MySQLDriver", "Pool", "PostgreSQLDriver", "SQLiteDriver"]
