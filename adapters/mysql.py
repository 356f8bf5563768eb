"""MySQL/MariaDB sources: messages in a table, one account or many (docs/mysql.md).

The tables are the original pop3sf's, so existing databases keep working unchanged::

    messages: id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY   -- the unique id (UIDL)
              [user_id INT UNSIGNED]                       -- multi-user only
              message MEDIUMTEXT, is_plaintext BOOL, added_timestamp DATETIME
    users:    id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY, username VARCHAR(64) UNIQUE,
              password_bcrypt CHAR(60)                     -- multi-user only

Other programs insert rows; only pop3sf deletes them. Message bodies are read as bytes
(``CAST(message AS BINARY)``, so the column's character set never re-encodes them) in chunks
with ``SUBSTRING``; a 50 MB ``LONGTEXT`` row is never held whole. Exact sizes come from one query
at login that counts octets and bare line ends in SQL and extracts the header section only of
messages whose header has 8-bit octets (for the RFC 6858 downgraded size). Rows with
``is_plaintext`` are wrapped like the directory adapter's ``.txt`` files (Subject "Plaintext
database entry <id>", Date from ``added_timestamp``); their size is measured in Python by reading
the row once and kept in an LRU keyed by (id, length, CRC32), so it is computed once per row.

Deletions run at QUIT in one transaction, restricted to the logged-in user's rows. Across several
pop3sf instances on one database, a read-write session holds ``GET_LOCK`` on a connection of its
own (never pooled: MySQL locks belong to connections and are re-entrant, so a pooled connection
would hand one account's lock to a second session) and re-checks it holds it before deleting.

This module holds the adapters (settings, pool, schema, authentication); a client's session is
:mod:`.mysql_session`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from pop3sf import passwords

from .base import (
    Adapter,
    AdapterError,
    AuthenticationFailed,
    AuthResult,
    ConfigError,
    Credentials,
    Peer,
    PermanentFailure,
    TemporaryFailure,
    encodable,
    normalize_secret,
)
from .mysql_driver import (
    CircuitBreaker,
    ConnectParams,
    Driver,
    Pool,
    close_quietly,
    read_password_file,
)
from .mysql_session import MySQLSession
from .mysql_sql import (
    check_identifier,
    schema_sql,
    to_text,
)

log = logging.getLogger("pop3sf.adapters.mysql")

#: Server errors that retrying won't fix: missing table or column, missing privilege.
PERMANENT_ERRNOS = frozenset({1054, 1142, 1143, 1146, 1049})

_COLUMN_TYPES = '"MEDIUMTEXT", "LONGTEXT", "MEDIUMBLOB", "LONGBLOB"'
_COMMON_SPEC = f"""
driver = option("auto", "mysql-connector", "pymysql", default="auto")
host = string(default="localhost")
port = integer(1, 65535, default=3306)
unix_socket = string(default="")
user = string(default="pop3sf")
password = string(default="")
password_file = string(default="")
database = string(default="pop3sf")
ssl = boolean(default=False)
ssl_ca = string(default="")
ssl_cert = string(default="")
ssl_key = string(default="")
ssl_verify_identity = boolean(default=True)
connect_timeout = float(0.1, 300, default=5)
read_timeout = float(1, 3600, default=30)
write_timeout = float(1, 3600, default=30)
pool_size = integer(1, 1000, default=10)
pool_timeout = float(0, 300, default=10)
breaker_threshold = integer(1, 1000, default=5)
breaker_cooldown = float(0, 3600, default=10)
chunk_size = integer(4096, 268435456, default=1048576)
max_chunk_size = integer(4096, 268435456, default=8388608)
create_tables = boolean(default=True)
message_column_type = option({_COLUMN_TYPES}, default="MEDIUMTEXT")
sql_dialect = option("auto", "mariadb", "mysql", default="auto")
cross_instance_lock = boolean(default=True)
lock_idle_timeout = integer(1, 31536000, default=3600)
from_address = string(default="nobody <nobody@localhost>")
to_address = string(default="%u <%u@localhost>")
plaintext_size_cache = integer(0, 100000000, default=100000)
"""

_CONNECT_KEYS = ("driver", "host", "port", "unix_socket", "user", "password", "password_file",
                 "database", "ssl", "ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_identity",
                 "connect_timeout", "read_timeout", "write_timeout", "pool_size", "pool_timeout",
                 "breaker_threshold", "breaker_cooldown")

_CONFIG_DOC = """
    Connection keys (both adapters):

    ``driver``
        ``auto`` (default: mysql-connector-python when installed, else PyMySQL),
        ``mysql-connector`` or ``pymysql``.
    ``host``, ``port``
        The server over TCP (default ``localhost``, 3306); ignored when ``unix_socket`` is set.
    ``unix_socket``
        Path of the server's unix socket (e.g. ``/run/mysqld/mysqld.sock``).
    ``user``, ``password``
        The database account (default user ``pop3sf``); see docs/mysql.md for its grants.
    ``password_file``
        Read the password from this file's first line instead; it must not be readable by
        others (``chown root:pop3sf``, ``chmod 0640``), or the adapter refuses to start.
    ``database``
        The database (schema) holding the tables (default ``pop3sf``).
    ``ssl``, ``ssl_ca``, ``ssl_cert``, ``ssl_key``, ``ssl_verify_identity``
        TLS to the database: on with ``ssl = yes``; the server certificate is checked against
        ``ssl_ca`` (default: the system's trust store) and, unless ``ssl_verify_identity = no``,
        its host name; ``ssl_cert``/``ssl_key`` give a client certificate.
    ``connect_timeout``, ``read_timeout``, ``write_timeout``
        Seconds (defaults 5, 30, 30), so a hung database can't pin worker threads.
    ``pool_size``, ``pool_timeout``
        At most this many pooled connections (default 10); a call waits this long for a free
        one (default 10 s) before failing with ``[SYS/TEMP]``. Each read-write session also
        holds one lock connection while logged in (``cross_instance_lock``).
    ``breaker_threshold``, ``breaker_cooldown``
        After this many consecutive failed connects (default 5), calls fail at once with
        ``[SYS/TEMP]`` for this many seconds (default 10) before one new attempt.

    Other keys (both adapters):

    ``chunk_size``, ``max_chunk_size``
        Octets fetched per ``SUBSTRING`` query when sending a message: a sixteenth of the
        message, but at least ``chunk_size`` (default 1 MiB) and at most ``max_chunk_size``
        (default 8 MiB). Every query makes the database read the whole row, so fewer, larger
        chunks cost it less; pop3sf holds about one chunk per message being sent.
    ``create_tables``
        Create missing tables at start (default yes). New tables get ``INDEX(user_id)``.
    ``message_column_type``
        The ``message`` column of tables this adapter creates: ``MEDIUMTEXT`` (default, the
        original's, up to 16 MiB), ``LONGTEXT`` (up to 4 GiB), or ``MEDIUMBLOB``/``LONGBLOB``
        to store messages whose 8-bit parts are not UTF-8 (a utf8mb4 text column rejects them).
    ``sql_dialect``
        ``auto`` (default: from ``VERSION()``), ``mariadb`` or ``mysql``: how sizes are
        counted in SQL (MariaDB: a linear ``REGEXP_REPLACE``; MySQL: ``REPLACE``).
    ``cross_instance_lock``
        Hold ``GET_LOCK`` per account during read-write sessions (default yes), so several
        pop3sf instances on one database serve an account once. Galera does not support it:
        set ``no`` there and route each account to one instance.
    ``lock_idle_timeout``
        The lock connection's ``wait_timeout`` in seconds (default 3600): how long the
        database keeps the account lock of an instance that vanished without closing its
        connection (host crash, network cut). Keep it above the server's ``idle_timeout``:
        a session idle longer loses its lock, and its QUIT then deletes nothing.
    ``from_address``, ``to_address``
        From and To of wrapped ``is_plaintext`` rows; ``%u`` is the account name.
    ``plaintext_size_cache``
        How many wrapped sizes of ``is_plaintext`` rows to remember (default 100000).
"""


class _LRU:
    """A small thread-safe LRU (plain-text rows' wrapped sizes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


class MySQLAdapterBase(Adapter):
    """What both MySQL adapters share: settings, pool, schema, the session class."""

    blocking = True
    allows_read_only = True
    fds_per_session = 1  # the dedicated GET_LOCK connection of a read-write session
    list_with_login = True
    multi_user: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.driver = Driver.choose(self.options["driver"])
        self.params = self._params(self.options)
        self.pool = self._make_pool(self.options)
        self.plaintext_sizes = _LRU(self.options["plaintext_size_cache"])
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._dialect: str | None = None

    # --- settings --------------------------------------------------------------------------

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        options = super().validate(config)
        options["messages_sql"] = check_identifier(options["messages_table"], "messages_table")
        if self.multi_user:
            options["users_sql"] = check_identifier(options["users_table"], "users_table")
        if options["password_file"]:
            options["password"] = read_password_file(options["password_file"])
        if options["chunk_size"] > options["max_chunk_size"]:
            raise ConfigError("chunk_size must not exceed max_chunk_size")
        for key in ("ssl_ca", "ssl_cert", "ssl_key"):
            if options[key] and not options["ssl"]:
                raise ConfigError(f"{key} is set but ssl = no; set ssl = yes to use TLS")
        return options

    @staticmethod
    def _params(o: Mapping[str, Any]) -> ConnectParams:
        return ConnectParams(
            host=o["host"], port=o["port"], unix_socket=o["unix_socket"], user=o["user"],
            password=o["password"], database=o["database"], connect_timeout=o["connect_timeout"],
            read_timeout=o["read_timeout"], write_timeout=o["write_timeout"], ssl=o["ssl"],
            ssl_ca=o["ssl_ca"], ssl_cert=o["ssl_cert"], ssl_key=o["ssl_key"],
            ssl_verify_identity=o["ssl_verify_identity"])

    def _make_pool(self, o: Mapping[str, Any]) -> Pool:
        breaker = CircuitBreaker(o["breaker_threshold"], o["breaker_cooldown"])
        return Pool(self.driver, self._params(o), size=o["pool_size"],
                    timeout=o["pool_timeout"], breaker=breaker)

    # --- life cycle ------------------------------------------------------------------------

    def check(self) -> None:
        """The TLS files exist and are readable (the database itself may be down: that is not
        a configuration error, and start-up tolerates it)."""
        for key in ("ssl_ca", "ssl_cert", "ssl_key"):
            path = self.options[key]
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ConfigError(f"{key} = {path!r}: not a readable file")

    def probe(self) -> None:
        """Log in with the configured account and run one query."""
        try:
            conn = self.driver.connect(self.params, autocommit=True)
        except Exception as exc:
            raise ConfigError(f"cannot connect to {self.params.where()}: "
                                     f"{str(exc).strip() or type(exc).__name__}") from exc
        try:
            self.fetch_all(conn, "SELECT 1")
        except Exception as exc:
            raise ConfigError(f"query on {self.params.where()} failed: {exc}") from exc
        finally:
            close_quietly(conn)

    def start(self) -> None:
        super().start()
        try:
            self.ensure_schema()
        except TemporaryFailure as exc:  # the server runs; logins work once the database is up
            log.warning("mysql: tables not checked at start (%s); will retry at first login", exc)

    def apply(self, options: dict[str, Any]) -> None:
        driver = Driver.choose(options["driver"])
        old_pool = None
        if any(options[k] != self.options[k] for k in _CONNECT_KEYS) or \
                driver.name != self.driver.name:
            old_pool = self.pool
            self.driver = driver
            self.pool = self._make_pool(options)
        if self.options["plaintext_size_cache"] != options["plaintext_size_cache"]:
            self.plaintext_sizes = _LRU(options["plaintext_size_cache"])
        tables = ("messages_table", "users_table", "database", "create_tables")
        if any(options.get(k) != self.options.get(k) for k in tables):
            self._schema_ready = False
        if old_pool is not None or options["sql_dialect"] != self.options["sql_dialect"]:
            self._dialect = None
        self.params = self._params(options)
        if old_pool is not None:
            old_pool.close()  # connections in use are closed when given back

    def close(self) -> None:
        self.pool.close()

    def new_session(self, peer: Peer) -> MySQLSession:
        return MySQLSession(self, peer)

    def session_for(self, account: str, user_id: int | None) -> MySQLSession:
        """A read-only session on an account without a password (for the admin tools)."""
        session = MySQLSession(self, Peer("local", 0, "admin"))
        session.login_succeeded(AuthResult(account, user_id), True)
        return session

    def report_too_large(self, row_id: int, length: int | None, outcome: str) -> None:
        """Log a row the database won't hand out because it exceeds its max_allowed_packet
        (it answers NULL, or drops the connection), naming the setting that fixes it."""
        try:
            limit = f"{int(self.query('SELECT @@max_allowed_packet')[0][0])} octets"
        except Exception:
            limit = "unknown"
        size = f"{length} octets" if length is not None else "size unknown"
        log.error("mysql: message %d (%s) is larger than the database server's "
                  "max_allowed_packet (%s), so the database refuses to return it; %s. Raise "
                  "max_allowed_packet on the database server ([mysqld] max_allowed_packet)",
                  row_id, size, limit, outcome)

    # --- SQL helpers -----------------------------------------------------------------------

    def query(self, sql: str, args: Sequence[Any] = (), retry: bool = True) -> list[Any]:
        """Rows of one read-only statement on a pooled connection."""
        def run(conn: Any) -> list[Any]:
            return self.fetch_all(conn, sql, args)
        return list(self.pool.run(run, retry=retry))

    def fetch_all(self, conn: Any, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        cur = conn.cursor(buffered=True) if self.driver.name == "mysql-connector" \
            else conn.cursor()
        try:
            cur.execute(sql, tuple(args))
            return list(cur.fetchall()) if cur.description else []
        finally:
            cur.close()

    def execute(self, conn: Any, sql: str, args: Sequence[Any] = ()) -> int:
        cur = conn.cursor()
        try:
            cur.execute(sql, tuple(args))
            return int(cur.rowcount)
        finally:
            cur.close()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Driver errors -> :class:`TemporaryFailure` (or :class:`PermanentFailure`), logged."""
        try:
            yield
        except AdapterError:
            raise
        except Exception as exc:
            num = self.driver.errno(exc)
            if isinstance(exc, self.driver.Error) and num in PERMANENT_ERRNOS:
                log.error("mysql: %s failed: %s (check the tables and grants; docs/mysql.md)",
                          what, exc)
                raise PermanentFailure(f"database error during {what}") from exc
            log.error("mysql: %s failed: %s: %s", what, type(exc).__name__,
                      str(exc).strip() or "(no message)")
            raise TemporaryFailure(f"database error during {what}") from exc

    # --- schema ----------------------------------------------------------------------------

    def schema_sql(self) -> list[str]:
        o = self.options
        return schema_sql(o["messages_sql"], o["users_sql"] if self.multi_user else None,
                          o["message_column_type"])

    def dialect(self) -> str:
        """``mariadb`` or ``mysql``: configured, or detected once from ``VERSION()``."""
        if self._dialect is None:
            wanted = self.options["sql_dialect"]
            if wanted == "auto":
                with self.guard("detecting the server type"):
                    version = to_text(self.query("SELECT VERSION()")[0][0])
                wanted = "mariadb" if "mariadb" in version.lower() else "mysql"
            self._dialect = wanted
        return self._dialect

    def ensure_schema(self) -> None:
        if self._schema_ready or not self.options["create_tables"]:
            return
        with self._schema_lock:
            if self._schema_ready:
                return

            def create(conn: Any) -> None:
                for stmt in self.schema_sql():
                    self.execute(conn, stmt)
            with self.guard("creating tables"):
                self.pool.run(create)
            self._schema_ready = True

    # --- accounts --------------------------------------------------------------------------

    def authenticate(self, credentials: Credentials) -> AuthResult[int]:
        """The login (canonical account id; ``found``: user_id, None for the single-user table)
        or :class:`AuthenticationFailed`."""
        raise NotImplementedError

    def chunk_for(self, length: int) -> int:
        """Octets per query for a message of ``length``: about 16 queries, within bounds."""
        o = self.options
        return max(o["chunk_size"], min(o["max_chunk_size"], -(-length // 16)))

    def address(self, template: str, account: str) -> str:
        return template.replace("%u", account)


class MySQLAdapter(MySQLAdapterBase):
    """One account whose messages are the rows of one table (the original's single-user table).

    Config keys (``[adapter]``, ``type = mysql``):

    ``username``
        The one user name accepted (compared exactly, after NFC normalisation).
    ``password_hash``
        Its password hash: bcrypt (``$2b$...``) or a scheme of :mod:`pop3sf.passwords`.
    ``messages_table``
        Table name (default ``pop3sf_singleuser_messages``).

    Plus the connection and other keys listed below.
    """

    configspec = """
username = string
password_hash = string
messages_table = string(default="pop3sf_singleuser_messages")
""" + _COMMON_SPEC

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        options = super().validate(config)
        try:
            passwords.scheme_of(options["password_hash"])
        except passwords.UnknownScheme as exc:
            raise ConfigError(f"password_hash: unknown scheme {exc}") from exc
        return options

    def authenticate(self, credentials: Credentials) -> AuthResult[int]:
        stored: str = self.options["password_hash"]
        username = normalize_secret(self.options["username"])
        if not hmac.compare_digest(credentials.username.encode("utf-8", "surrogateescape"),
                                   username.encode("utf-8", "surrogateescape")):
            passwords.dummy_verify(credentials.password_bytes(), like=stored)
            raise AuthenticationFailed("unknown user")
        passwords.verify_or_deny(stored, credentials.password_bytes())
        return AuthResult(username)


class MultiUserMySQLAdapter(MySQLAdapterBase):
    """Many accounts: a users table and one messages table with ``user_id`` (the original's).

    User names are matched by the users table's collation (case-insensitive by default); the
    name as stored is the canonical account id. Hashes are bcrypt as ``pop3sf-admin`` writes
    them, or any scheme of :mod:`pop3sf.passwords` that fits the column.

    Config keys (``[adapter]``, ``type = mysql_multi``):

    ``messages_table``
        Table name (default ``pop3sf_multiuser_messages``).
    ``users_table``
        Table name (default ``pop3sf_multiuser_users``).
    ``bcrypt_rounds``
        Cost of the hashes ``pop3sf-admin`` writes (default 12; the server reads any cost).

    Plus the connection and other keys listed below.
    """

    multi_user = True
    _dummy: str | None = None
    configspec = """
messages_table = string(default="pop3sf_multiuser_messages")
users_table = string(default="pop3sf_multiuser_users")
bcrypt_rounds = integer(4, 31, default=12)
""" + _COMMON_SPEC

    def start(self) -> None:
        self._dummy_hash()  # computed now, not during the first unknown user's login
        super().start()

    def _dummy_hash(self) -> str:
        """A hash of the cost ``pop3sf-admin`` writes: unknown users cost what real ones do."""
        rounds = self.options["bcrypt_rounds"]
        if self._dummy is None or not self._dummy.startswith(f"$2b${rounds:02d}$"):
            self._dummy = passwords.hash_bcrypt(b"pop3sf-dummy", rounds=rounds)
        return self._dummy

    def authenticate(self, credentials: Credentials) -> AuthResult[int]:
        password = credentials.password_bytes()
        name = credentials.username
        rows: list[Any] = []
        if 0 < len(name) <= 64 and encodable(name):
            self.ensure_schema()
            with self.guard("looking up a user"):
                rows = self.query(f"SELECT id, username, password_bcrypt FROM "
                                  f"{self.options['users_sql']} WHERE username = %s", (name,))
        if len(rows) > 1:  # several names equal under the collation: only an exact one counts
            rows = [r for r in rows if r[1] == name]
        if len(rows) != 1:
            passwords.dummy_verify(password, like=self._dummy_hash())
            raise AuthenticationFailed("unknown user")
        user_id, stored_name, stored = rows[0]
        passwords.verify_or_deny(to_text(stored).strip(), password, like=self._dummy_hash(),
                                 account=to_text(stored_name))
        return AuthResult(to_text(stored_name), int(user_id))


MySQLAdapter.__doc__ = (MySQLAdapter.__doc__ or "") + _CONFIG_DOC
MultiUserMySQLAdapter.__doc__ = (MultiUserMySQLAdapter.__doc__ or "") + _CONFIG_DOC
