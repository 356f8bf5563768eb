"""A private MariaDB server for the tests: its own data directory, unix socket and loopback port.

Never touches the machine's own MariaDB (:3306). Debian's ``mariadb-server`` provides
``mariadbd`` and ``mariadb-install-db``; a fresh data directory takes well under a second to
create and the server a second or two to start. Use the session-scoped ``mariadb`` fixture::

    from mariadb import mariadb  # noqa: F401  (registers the fixture)

    def test_x(mariadb):
        conn = mariadb.connect()          # root, over the unix socket (PyMySQL)
        cfg = mariadb.adapter_config()    # keys for the MySQL adapters (the test user)

The server can be stopped and started again (same data, same port) to test outages.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import pytest

MARIADBD = shutil.which("mariadbd", path="/usr/sbin:/usr/bin:/sbin") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
START_TIMEOUT = 30.0

#: The account the adapters use in tests: a password, rights on the test database only.
TEST_USER = "pop3sf_test"
TEST_PASSWORD = "test-Passw0rd"
TEST_DATABASE = "pop3sf_test"


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no mariadbd outlives a killed
    test run (Linux ``PR_SET_PDEATHSIG``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer(abc.ABC):
    """What the private database servers of the tests share: the process, its log, the stop,
    and (:func:`serving`) the life cycle around a test session. Subclasses install, start and
    set up the test account."""

    #: What stops the server cleanly.
    stop_signal = signal.SIGTERM

    def __init__(self, base: str, logfile: str) -> None:
        self.base = base
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def install(self) -> None: ...

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def setup_test_account(self) -> None: ...

    def log(self) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()[-20000:]
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self) -> None:
        """A clean shutdown, as an admin's ``systemctl stop`` would do."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


Server = TypeVar("Server", bound=PrivateServer)


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    """The server installed, started and given the test account; stopped and its directory
    removed afterwards."""
    try:
        server.install()
        server.start()
        server.setup_test_account()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)


class MariaDBServer(PrivateServer):
    """One private ``mariadbd``; ``start``/``stop`` may be called repeatedly."""

    def __init__(self, base: str, max_allowed_packet: str = "128M",
                 extra_args: Sequence[str] = ()) -> None:
        super().__init__(base, os.path.join(base, "error.log"))
        self.datadir = os.path.join(base, "data")
        self.socket = os.path.join(base, "mysqld.sock")
        self.pidfile = os.path.join(base, "mysqld.pid")
        # Its own temporary directory: temporary tables in the shared /tmp were seen deleted
        # under a running mariadb-install-db ("Error on delete of '/tmp/#sql-temptable-...'").
        self.tmpdir = os.path.join(base, "tmp")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.max_allowed_packet = max_allowed_packet
        self.extra_args = list(extra_args)

    # --- life cycle ------------------------------------------------------------------------

    def install(self) -> None:
        os.makedirs(self.tmpdir, exist_ok=True)
        cmd = [INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
               "--auth-root-authentication-method=normal", "--skip-test-db",
               "--skip-name-resolve", f"--tmpdir={self.tmpdir}"]
        res = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed ({res.returncode}):\n"
                               f"{res.stdout.decode(errors='replace')}\n"
                               f"{res.stderr.decode(errors='replace')}")

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
               f"--port={self.port}", "--bind-address=127.0.0.1", f"--pid-file={self.pidfile}",
               f"--log-error={self.logfile}", f"--tmpdir={self.tmpdir}", "--user=root",
               "--skip-name-resolve",
               "--skip-log-bin", "--innodb-buffer-pool-size=128M",
               "--innodb-flush-log-at-trx-commit=2", "--character-set-server=utf8mb4",
               "--collation-server=utf8mb4_general_ci",
               f"--max-allowed-packet={self.max_allowed_packet}",
               "--max-connections=300", "--skip-host-cache", "--performance-schema=OFF",
               *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"mariadbd exited with status {self.proc.returncode}")
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        self._fail(f"mariadbd not ready after {START_TIMEOUT:.0f} s")

    def _ready(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                pass
            conn = self.connect()
        except Exception:
            return False
        conn.close()
        return True

    def _fail(self, what: str) -> None:
        raise RuntimeError(f"{what}; its log ({self.logfile}):\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: the database vanishes without closing its connections."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the database hangs (connections open, nothing answers)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    # --- clients ---------------------------------------------------------------------------

    def connect(self, database: str | None = None, **kwargs: Any) -> Any:
        """A PyMySQL connection as root over the unix socket (autocommit)."""
        import pymysql

        params: dict[str, Any] = {"unix_socket": self.socket, "user": "root", "password": "",
                                  "autocommit": True, "charset": "utf8mb4",
                                  "connect_timeout": 5, "binary_prefix": True,
                                  "max_allowed_packet": 256 * 1024 * 1024}
        if database:
            params["database"] = database
        params.update(kwargs)
        return pymysql.connect(**params)

    def execute(self, sql: str, args: Any = None, database: str | None = TEST_DATABASE) -> Any:
        """Run one statement as root; returns all rows."""
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()

    def setup_test_account(self) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{TEST_DATABASE}`")
                cur.execute("CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s",
                            (TEST_USER, TEST_PASSWORD))
                cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX, ALTER "
                            f"ON `{TEST_DATABASE}`.* TO %s@'%%'", (TEST_USER,))
        finally:
            conn.close()

    def new_database(self) -> str:
        """A fresh empty database the test user may use (isolates one test's tables)."""
        name = "t_" + uuid.uuid4().hex[:12]
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}`")
                cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX, ALTER "
                            f"ON `{name}`.* TO %s@'%%'", (TEST_USER,))
        finally:
            conn.close()
        return name

    def adapter_config(self, database: str = TEST_DATABASE, tcp: bool = False,
                       **overrides: Any) -> dict[str, Any]:
        """Config keys for the MySQL adapters, connecting as the test user."""
        cfg: dict[str, Any] = {"user": TEST_USER, "password": TEST_PASSWORD,
                               "database": database}
        if tcp:
            cfg.update(host=self.host, port=self.port)
        else:
            cfg["unix_socket"] = self.socket
        cfg.update(overrides)
        return cfg


@contextlib.contextmanager
def running_mariadb(max_allowed_packet: str = "128M",
                    extra_args: Sequence[str] = ()) -> Iterator[MariaDBServer]:
    """A started server with the test account; removed afterwards. ``extra_args`` go to
    ``mariadbd`` (e.g. ``--ssl-cert=...``)."""
    if not os.path.exists(MARIADBD):
        pytest.skip("mariadbd not installed (apt-get install mariadb-server)")
    base = tempfile.mkdtemp(prefix="pop3sf-mdb-")
    with serving(MariaDBServer(base, max_allowed_packet, extra_args)) as server:
        yield server


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """One private MariaDB for the whole test session (per xdist worker)."""
    with running_mariadb() as server:
        yield server
