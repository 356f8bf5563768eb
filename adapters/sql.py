"""``type = sql``: the rows of any table, selected by the admin's own queries, as messages.

A table some script already fills is served by editing ``/etc/pop3sf.conf`` alone: the admin
writes a listing query (an id and what renders the message: ``date``, ``subject``, ``body`` and
optionally ``sender`` — or ``message``, a complete RFC 5322 message), a query fetching one
row's body by ``:id``, and says what deletion means (``deletion = read_only``, ``hide``: pop3sf
remembers, or ``query``: the admin's ``delete_query``, e.g. ``UPDATE ... SET seen = 1``).
One user from the config (``username``, ``password_hash``) or many (``password_query``
returning a user's hash for ``:user``; the account is then passed to the other queries as
``:user``). Queries use named parameters only (:mod:`.sql_query`); sizes are computed by the
database without sending bodies; the three drivers are in :mod:`.sql_driver`; a client's session
is :mod:`.sql_session`. README.md has a complete configuration per driver.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from pop3sf import passwords

from .base import (
    Adapter,
    AdapterError,
    AuthenticationFailed,
    AuthResult,
    ConfigError,
    Peer,
    TemporaryFailure,
    normalize_secret,
)
from .hidden import HiddenStore
from .mysql_driver import read_password_file
from .sql_driver import AnyDriver, MySQLDriver, Pool, PostgreSQLDriver, SQLiteDriver, statement
from .sql_driver import execute_many as _execute_many
from .sql_query import ALLOWED_PARAMS, Query, Shape, check_single, describe_sql, shape_of, translate
from .sql_session import SQLSession

log = logging.getLogger("pop3sf.adapters.sql")

QUERY_KEYS = tuple(ALLOWED_PARAMS)
#: PostgreSQL's type OID of bytea.
BYTEA = 17
#: Date/time column types the database converts to Unix seconds: PostgreSQL's date,
#: timestamp, timestamptz OIDs; MySQL's TIMESTAMP, DATE, DATETIME, NEWDATE field types.
DATE_TYPES = {"postgresql": (1082, 1114, 1184), "mysql": (7, 10, 12, 14)}


class SQLAdapter(Adapter):
    """Messages from the admin's SQL queries on SQLite, PostgreSQL or MySQL/MariaDB.

    Keys (``[adapter]``, ``type = sql``); put queries in quotes (``\"\"\"...\"\"\"`` may span
    lines), since an unquoted comma splits a configuration value:

    ``driver``
        ``sqlite`` (default), ``postgresql`` (python3-psycopg2) or ``mysql``.
    ``database``
        sqlite: the database file's absolute path; otherwise the database name.
    ``host``, ``port``, ``unix_socket``, ``user``, ``password``, ``password_file``
        Where and as whom to connect (postgresql, mysql); ``password_file``: the password's
        first line, readable by nobody else. ``unix_socket`` is PostgreSQL's socket directory.
    ``sslmode``, ``ssl_ca``
        TLS to the database: ``disable``, ``prefer`` (default), ``require``, ``verify-ca``,
        ``verify-full`` (PostgreSQL's names; mysql: TLS from ``require`` on).
    ``mysql_driver``
        ``auto``, ``mysql-connector`` or ``pymysql``.
    ``connect_timeout``, ``read_timeout``, ``pool_size``, ``pool_timeout``
        Seconds to connect (5) and per statement (30); pooled connections (4) and how long a
        call waits for one (10 s).
    ``list_query``
        Columns ``id``, ``date``, ``subject``, ``body`` [, ``sender``], or ``id``, ``message``
        [, ``date``]; ``:user`` is the account. Listed oldest first: by ``date``, then ``id``.
    ``body_query``
        One column, ``body`` (``message``), of the row ``:id`` (and ``:user``).
    ``deletion``
        ``read_only`` (default: QUIT reports the deletions failed), ``hide`` (the account's
        deleted ids are kept under ``hidden_dir`` and not listed again) or ``query``.
    ``delete_query``
        With ``deletion = query``: run once per deleted ``:id`` (and ``:user``), all in one
        transaction.
    ``hidden_dir``
        Where ``deletion = hide`` keeps its sets (default ``/var/lib/pop3sf/hidden``).
    ``username``, ``password_hash``
        The one account (any scheme the passwd-file source accepts: ``pop3sf-admin hash``).
    ``password_query``
        Instead, many accounts: column ``password``, the hash of ``:user``, and optionally
        ``username``, the name as stored (the account's canonical name: with a
        case-insensitive match, "Alice" and "alice" are then one account).
    ``from_address``, ``to_address``
        From (when there is no ``sender``) and To of rendered rows; ``%u`` is the account.
    """

    configspec = """
driver = option("sqlite", "postgresql", "mysql", default="sqlite")
database = string
host = string(default="")
port = integer(0, 65535, default=0)
unix_socket = string(default="")
user = string(default="pop3sf")
password = string(default="")
password_file = string(default="")
sslmode = option("disable", "prefer", "require", "verify-ca", "verify-full", default="prefer")
ssl_ca = string(default="")
mysql_driver = option("auto", "mysql-connector", "pymysql", default="auto")
connect_timeout = float(0.1, 300, default=5)
read_timeout = float(1, 3600, default=30)
pool_size = integer(1, 1000, default=4)
pool_timeout = float(0, 300, default=10)
list_query = string
body_query = string
deletion = option("read_only", "hide", "query", default="read_only")
delete_query = string(default="")
hidden_dir = string(default="/var/lib/pop3sf/hidden")
username = string(default="")
password_hash = string(default="")
password_query = string(default="")
from_address = string(default="pop3sf <pop3sf@localhost>")
to_address = string(default="%u <%u@localhost>")
"""
    blocking = True
    allows_read_only = True
    fds_per_session = 0  # connections are pooled, not held by sessions
    list_with_login = True  # login_succeeded takes no lock: list in the login's worker call

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self._setup(self.options)
        self._recent_hashes: collections.deque[str] = collections.deque(maxlen=64)

    def _setup(self, o: Mapping[str, Any]) -> None:
        self.driver: AnyDriver = _driver(o)
        self.dialect = self.driver.dialect
        self.queries: dict[str, Query] = o["queries"]
        self.pool = Pool(self.driver.connect, o["pool_size"], o["pool_timeout"], self.driver.lost)
        self.hidden: HiddenStore | None = None
        if o["deletion"] == "hide":
            where = f"{self.dialect}\0{o['host']}\0{o['port']}\0{o['unix_socket']}\0{o['database']}"
            tag = hashlib.sha256(where.encode("utf-8", "surrogateescape")).hexdigest()[:16]
            self.hidden = HiddenStore(o["hidden_dir"], f"sql-{tag}")
        self._shape: Shape | None = None
        self._shape_lock = threading.Lock()
        #: password_query also returns ``username``, the account's canonical name (found with
        #: the other columns, by :meth:`describe`).
        self.password_name = False

    # --- settings ----------------------------------------------------------------------------

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        for key in (*QUERY_KEYS, "from_address", "to_address"):
            if isinstance(config.get(key), list | tuple):
                raise ConfigError(f"{key}: an unquoted comma split the value; put it in quotes "
                                  f'({key} = """SELECT ..."""; triple quotes may span lines)')
        o = super().validate(config)
        if o["driver"] == "sqlite" and not os.path.isabs(o["database"]):
            raise ConfigError(f"database = {o['database']!r}: with driver = sqlite, the "
                              "database file's absolute path")
        if o["password_file"]:
            o["password"] = read_password_file(o["password_file"])
        dialect = o["driver"]
        if o["deletion"] == "query" and not o["delete_query"]:
            raise ConfigError("deletion = query needs delete_query")
        if o["delete_query"] and o["deletion"] != "query":
            raise ConfigError(f"delete_query is set but deletion = {o['deletion']}: "
                              "set deletion = query to run it")
        if o["deletion"] == "hide" and not os.path.isabs(o["hidden_dir"]):
            raise ConfigError(f"hidden_dir = {o['hidden_dir']!r}: must be an absolute path")
        if bool(o["password_query"]) == bool(o["username"] or o["password_hash"]):
            raise ConfigError("give either username and password_hash (one account) or "
                              "password_query (many accounts)")
        if bool(o["username"]) != bool(o["password_hash"]):
            raise ConfigError("username and password_hash go together")
        if o["password_hash"]:
            try:
                passwords.scheme_of(o["password_hash"])
            except passwords.UnknownScheme as exc:
                raise ConfigError(f"password_hash: unknown scheme {exc}") from None
        o["queries"] = {key: translate(o[key], key, dialect)
                        for key in QUERY_KEYS if o[key]}
        return o

    @property
    def multi_user(self) -> bool:
        return "password_query" in self.queries

    # --- life cycle --------------------------------------------------------------------------

    def check(self) -> None:
        o = self.options
        if o["driver"] == "sqlite" and not os.path.isfile(o["database"]):
            raise ConfigError(f"database = {o['database']!r}: no such file")
        if o["ssl_ca"] and not os.access(o["ssl_ca"], os.R_OK):
            raise ConfigError(f"ssl_ca = {o['ssl_ca']!r}: not a readable file")

    def probe(self) -> None:
        """Connect, and run every query on no rows: the listing's and body's columns are
        checked by name, the delete query runs with NULL parameters and is rolled back."""
        try:
            conn = self.driver.connect()
        except Exception as exc:
            raise ConfigError(f"cannot connect to {self.driver.where()}: "
                              f"{str(exc).strip() or type(exc).__name__}") from None
        try:
            self._shape = self.describe(conn)
            if self.dialect == "postgresql":
                self._check_encoding(conn)
            if "delete_query" in self.queries:
                query = self.queries["delete_query"]
                self._run_query(query, lambda: self._dry_delete(conn, query))
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        if self.hidden is not None:
            problem = self.hidden.check_writable()
            if problem:
                raise ConfigError(f"hidden_dir = {self.options['hidden_dir']!r}: {problem}")

    def _dry_delete(self, conn: Any, query: Query) -> None:
        statement(self.driver, conn, "BEGIN")
        try:
            _execute_many(self.driver, conn, query.text, [query.args({})])
        finally:
            statement(self.driver, conn, "ROLLBACK")

    def _check_encoding(self, conn: Any) -> None:
        from .sql_driver import fetch_all
        enc = fetch_all(self.driver, conn, "SHOW server_encoding", {})[0][0]
        if str(enc).upper() not in ("UTF8", "SQL_ASCII") and not self.shape().binary:
            raise ConfigError(f"database {self.options['database']!r} is {enc}: text bodies "
                              "must be UTF8 for exact sizes (or select them as bytea)")

    def describe(self, conn: Any) -> Shape:
        """Run each SELECT on no rows and check its columns (ConfigError names the query)."""
        shape: Shape | None = None
        for key, query in self.queries.items():
            if key in ("delete_query", "body_query"):
                continue
            cols = self._run_query(query, lambda q=query: self.driver.describe(
                conn, describe_sql(q), q.args({})))
            names = [str(c[0]) for c in cols]
            if key == "list_query":
                body = "message" if "message" in {n.lower() for n in names} else "body"
                types = {n.lower(): t for n, t in cols}
                binary = self.dialect == "postgresql" and types.get(body) == BYTEA
                date_type = types.get("date") in DATE_TYPES.get(self.dialect, ())
                shape = shape_of(key, names, binary, date_type)
            elif key == "password_query":
                if sorted(n.lower() for n in names) == ["password", "username"]:
                    self.password_name = True
                else:
                    check_single(key, names, ["password"])
                    self.password_name = False
        assert shape is not None
        body_cols = [str(c[0]) for c in self._run_query(
            self.queries["body_query"], lambda: self.driver.describe(
                conn, describe_sql(self.queries["body_query"]),
                self.queries["body_query"].args({})))]
        check_single("body_query", body_cols, [shape.body])
        return shape

    def _run_query(self, query: Query, fn: Any) -> Any:
        try:
            return fn()
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{query.key} failed on {self.driver.where()}: "
                              f"{_message(exc)}") from None

    def shape(self) -> Shape:
        """What the listing returns, found once (after a start or reload) from its columns."""
        if self._shape is None:
            with self._shape_lock:
                if self._shape is None:
                    try:
                        self._shape = self.pool.run(self.describe)
                    except ConfigError as exc:
                        log.error("sql: %s", exc)
                        raise TemporaryFailure("the sql source's queries need fixing") from exc
                    except AdapterError:
                        raise
                    except Exception as exc:
                        log.error("sql: connecting to %s failed: %s", self.driver.where(),
                                  _message(exc))
                        raise TemporaryFailure("database unavailable") from exc
        return self._shape

    def start(self) -> None:
        super().start()
        self._check_shape()

    def _check_shape(self) -> None:
        """Check the queries' columns now if the database answers: wrong columns are a
        ConfigError (the start or reload fails); an unreachable database is only a warning
        (logins fail with [SYS/TEMP] until it is back)."""
        try:
            self.shape()
        except TemporaryFailure as exc:
            cause = exc.__cause__
            if isinstance(cause, ConfigError):
                raise cause from None
            log.warning("sql: queries not checked (%s); will retry at first login", exc)

    def apply(self, options: dict[str, Any]) -> None:
        """Swap to the new queries and connection, after checking their columns as
        :meth:`start` does; a ConfigError keeps everything as it was. Sessions in progress
        keep the queries they listed with."""
        if options["driver"] == "sqlite" and not os.path.isfile(options["database"]):
            raise ConfigError(f"database = {options['database']!r}: no such file")
        keys = ("driver", "dialect", "queries", "pool", "hidden", "_shape")
        old = {key: getattr(self, key) for key in keys}
        self._setup(options)
        try:
            self._check_shape()
        except ConfigError:
            self.pool.close()
            for key, value in old.items():
                setattr(self, key, value)
            raise
        old["pool"].close()

    def close(self) -> None:
        self.pool.close()

    # --- sessions ----------------------------------------------------------------------------

    def new_session(self, peer: Peer) -> SQLSession:
        return SQLSession(self)

    def preview_session(self, account: str) -> SQLSession:
        """A read-only session on ``account`` without its password (``pop3sf-admin preview``,
        docs/adapters.md#admin); with ``password_query``, an account it finds no hash for is
        :class:`AuthenticationFailed`."""
        if self.multi_user:
            rows = self.password_rows(account)
            if len(rows) != 1:
                raise AuthenticationFailed(f"no account {account!r} (password_query finds "
                                           f"{len(rows)} rows)")
            if self.password_name and rows[0][1] is not None:
                account = normalize_secret(str(rows[0][1]))
        elif account != normalize_secret(self.options["username"]):
            raise AuthenticationFailed(f"no account {account!r} (the one account is "
                                       f"{self.options['username']!r})")
        session = SQLSession(self)
        session.login_succeeded(AuthResult(account, None), True)
        return session

    session_for = preview_session  # the name the MySQL adapters' admin sources use

    @contextlib.contextmanager
    def guard(self, query_key: str) -> Iterator[None]:
        """A failing query is logged with its name and the database's message; the client
        gets ``[SYS/TEMP]``."""
        try:
            yield
        except AdapterError:
            raise
        except Exception as exc:
            log.error("sql: %s failed on %s: %s", query_key, self.driver.where(), _message(exc))
            raise TemporaryFailure(f"database error in {query_key}") from exc

    def fetch(self, sql: str, args: Mapping[str, Any], query_key: str) -> list[Any]:
        from .sql_driver import fetch_all
        with self.guard(query_key):
            return list(self.pool.run(lambda conn: fetch_all(self.driver, conn, sql, args)))

    def execute_many(self, sql: str, rows: list[Mapping[str, Any]], query_key: str) -> None:
        """The statements in one transaction: all or nothing."""
        def run(conn: Any) -> None:
            statement(self.driver, conn, "BEGIN")
            try:
                _execute_many(self.driver, conn, sql, rows)
            except BaseException:
                with contextlib.suppress(Exception):
                    statement(self.driver, conn, "ROLLBACK")
                raise
            statement(self.driver, conn, "COMMIT")
        with self.guard(query_key):
            self.pool.run(run, retry=False)  # a COMMIT may have happened: never run twice

    def password_rows(self, name: str) -> list[Any]:
        """(hash, canonical name or None) rows password_query finds for ``name``."""
        self.shape()  # the columns are known once the queries were described
        query = self.queries["password_query"]
        name_col = "username" if self.password_name else "NULL"
        return self.fetch(f"SELECT password, {name_col} FROM ({query.text}) AS pop3sf_q",
                          query.args({"user": name}), query.key)

    def reference_hash(self) -> str | None:
        """What unknown users' dummy checks imitate: the commonest kind among recent hashes."""
        if self.options["password_hash"]:
            return str(self.options["password_hash"])
        return passwords.reference(list(self._recent_hashes))

    def saw_hash(self, stored: str) -> None:
        self._recent_hashes.append(stored)


def _driver(o: Mapping[str, Any]) -> AnyDriver:
    if o["driver"] == "sqlite":
        return SQLiteDriver(o["database"], o["deletion"] == "query", o["read_timeout"])
    if o["driver"] == "postgresql":
        return PostgreSQLDriver(o, o["password"])
    return MySQLDriver(o, o["password"])


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
