"""A private PostgreSQL server for the tests: its own cluster, socket directory and loopback port.

Never touches the machine's own PostgreSQL (:5432). Debian's ``postgresql`` provides ``initdb``
and ``postgres`` under /usr/lib/postgresql/VERSION/bin. PostgreSQL refuses to run as root, so
when the tests run as root the cluster belongs to the ``postgres`` (or ``nobody``) user: the
temporary directory is handed to it and the programs drop to it before they start. Use the
session-scoped ``postgres`` fixture::

    from postgres import postgres  # noqa: F401  (registers the fixture)

    def test_x(postgres):
        postgres.execute("CREATE TABLE t (...)", database=postgres.new_database())
        cfg = postgres.adapter_config(database)   # keys for type = sql (the test user)
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mariadb import PrivateServer, free_port, serving

START_TIMEOUT = 30.0
TEST_USER = "pop3sf_test"
TEST_PASSWORD = "test-Passw0rd"


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _owner() -> pwd.struct_passwd | None:
    """The user to run as: None when not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and no postgres or nobody user to run PostgreSQL as")


def _drop_to(owner: pwd.struct_passwd | None) -> Callable[[], None]:
    def run() -> None:
        if owner is not None:
            os.setgroups([])
            os.setgid(owner.pw_gid)
            os.setuid(owner.pw_uid)
        try:  # after setuid, which clears it: SIGTERM when the test process dies
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    return run


class PostgresServer(PrivateServer):
    """One private ``postgres``; ``start``/``stop`` may be called repeatedly."""

    stop_signal = signal.SIGINT  # "fast" shutdown

    def __init__(self, base: str, bindir: str) -> None:
        super().__init__(base, os.path.join(base, "postgres.log"))
        self.bindir = bindir
        self.datadir = os.path.join(base, "data")
        self.socket_dir = base
        self.host = "127.0.0.1"
        self.port = free_port()
        self.owner = _owner()

    def install(self) -> None:
        if self.owner is not None:
            os.chown(self.base, self.owner.pw_uid, self.owner.pw_gid)
        cmd = [os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", "postgres",
               "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
               "--locale=C.UTF-8", "--no-sync"]
        res = subprocess.run(cmd, capture_output=True, timeout=120, check=False,
                             preexec_fn=_drop_to(self.owner), cwd=self.base)
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed ({res.returncode}):\n"
                               f"{res.stdout.decode(errors='replace')}\n"
                               f"{res.stderr.decode(errors='replace')}")

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [os.path.join(self.bindir, "postgres"), "-D", self.datadir, "-p", str(self.port),
               "-k", self.socket_dir, "-h", self.host, "-c", "fsync=off",
               "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
               "-c", "shared_buffers=32MB", "-c", "max_connections=100",
               "-c", f"log_directory={self.base}", "-c", "logging_collector=off"]
        log = open(self.logfile, "ab")  # noqa: SIM115  (the child keeps it)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True, preexec_fn=_drop_to(self.owner),
                                     cwd=self.base)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}):\n{self.log()}")
            try:
                self.connect().close()
                return
            except Exception:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres not ready after {START_TIMEOUT:.0f} s:\n{self.log()}")

    # --- clients ---------------------------------------------------------------------------

    def connect(self, database: str = "postgres", **kw: Any) -> Any:
        """A psycopg2 connection as the superuser over the unix socket (autocommit)."""
        import psycopg2

        conn = psycopg2.connect(host=self.socket_dir, port=self.port, user="postgres",
                                dbname=database, connect_timeout=5, **kw)
        conn.autocommit = True
        return conn

    def execute(self, sql: str, args: Any = None, database: str = "postgres") -> Any:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def setup_test_account(self) -> None:
        self.execute(f"CREATE ROLE {TEST_USER} LOGIN PASSWORD %s", (TEST_PASSWORD,))

    def new_database(self) -> str:
        """A fresh database owned by the test user."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.execute(f"CREATE DATABASE {name} OWNER {TEST_USER}")
        return name

    def adapter_config(self, database: str, tcp: bool = True, **overrides: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {"driver": "postgresql", "user": TEST_USER,
                               "password": TEST_PASSWORD, "database": database}
        if tcp:
            cfg.update(host=self.host, port=self.port, sslmode="disable")
        else:
            cfg.update(unix_socket=self.socket_dir, port=self.port)
        cfg.update(overrides)
        return cfg


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="apt-get install python3-psycopg2")
    base = tempfile.mkdtemp(prefix="pop3sf-pg-")
    os.chmod(base, 0o755)
    with serving(PostgresServer(base, bindir)) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the whole test session (per xdist worker)."""
    with running_postgres() as server:
        yield server
