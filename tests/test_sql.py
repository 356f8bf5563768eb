"""``type = sql`` against real databases: SQLite files, a private MariaDB (tests/mariadb.py) and
a private PostgreSQL (tests/postgres.py), through the conformance kit, poplib and the CLI."""

from __future__ import annotations

import datetime
import io
import logging
import os
import poplib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fetchmail import Fetchmail
from mariadb import MariaDBServer, mariadb  # noqa: F401  (fixture)
from pop3sf.adapters.base import ConfigError, Credentials, Peer, TemporaryFailure
from pop3sf.adapters.hidden import HiddenStore
from pop3sf.adapters.sql import SQLAdapter
from pop3sf.adapters.sql_query import translate
from pop3sf.adapters.sql_session import Row, encode_address, render_header, to_datetime, uid_of
from pop3sf.auxiliary.sources import NotSupported, open_source
from postgres import PostgresServer, postgres  # noqa: F401  (fixture)

from pop3sf import passwords
from pop3sf.testing import AdapterConformance, running_server
from pop3sf.wire import measure, wire_bytes

T0 = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
PLAIN = "{PLAIN}pw"
ODD = [
    b"Subject: crlf\r\n\r\nbody\r\n", b"Subject: bare lf\n\nline\nlast line without end",
    b"Subject: bare cr\r\rbody\rend\r", b"Subject: mixed\r\n\nx\r\r\n\n\r", b"", b"\r\n",
    b"\nstarts with a blank line\n", b"no blank line at all \xc3\xa9",
    "Subject: \u00e9t\u00e9 \u2603\nFrom: J\u00fcrgen <j@example.org>\n\nbody \u00ff\n".encode(),
    b"Subject: latin1 \xe9\n\nbody \xff\xfe\n", b"Subject: dots\n\n.leading dot\n..two\n.\n",
    b"Subject: nul \0 inside\n\nx\0y\n", ("X-Long: " + "a" * 5000 + "\n\n" + "b\n" * 1000).encode(),
]

# --- the three databases behind one face ----------------------------------------------------


class Backend:
    """One fresh database with the test tables ``ev`` (rows) and ``users``."""

    name = ""
    mark = "%s"

    def sql(self, stmt: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def config(self, **kw: Any) -> dict[str, Any]:
        raise NotImplementedError

    def at(self, i: int) -> Any:
        return T0 + datetime.timedelta(seconds=i)

    def add(self, body: str | None = None, raw: bytes | None = None, title: str = "t",
            who: str | None = None, owner: str = "alice", i: int = 0) -> int:
        m = self.mark
        self.sql(f"INSERT INTO ev (at, title, body, raw, who, owner) "
                 f"VALUES ({m}, {m}, {m}, {m}, {m}, {m})",
                 (self.at(i), title, body, raw, who, owner))
        return int(self.sql("SELECT MAX(id) FROM ev")[0][0])

    def add_user(self, name: str, password: str = "pw") -> None:
        self.sql(f"INSERT INTO users (name, hash) VALUES ({self.mark}, {self.mark})",
                 (name, passwords.hash_bcrypt(password.encode(), rounds=4)))


class SQLiteBackend(Backend):
    name = "sqlite"
    mark = "?"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sql("CREATE TABLE ev (id INTEGER PRIMARY KEY, at REAL NOT NULL, title TEXT, "
                 "body TEXT, raw BLOB, who TEXT, owner TEXT, seen INTEGER NOT NULL DEFAULT 0)")
        self.sql("CREATE TABLE users (name TEXT PRIMARY KEY, hash TEXT NOT NULL)")

    def at(self, i: int) -> Any:
        return T0.timestamp() + i

    def sql(self, stmt: str, args: Sequence[Any] = ()) -> list[Any]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return conn.execute(stmt, tuple(args)).fetchall()
        finally:
            conn.close()

    def config(self, **kw: Any) -> dict[str, Any]:
        return {"driver": "sqlite", "database": str(self.path), **kw}


class PostgresBackend(Backend):
    name = "postgresql"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.database = server.new_database()
        self.sql("CREATE TABLE ev (id SERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL, title TEXT, "
                 "body TEXT, raw BYTEA, who TEXT, owner TEXT, seen INT NOT NULL DEFAULT 0)")
        self.sql("CREATE TABLE users (name TEXT PRIMARY KEY, hash TEXT NOT NULL)")
        self.sql("ALTER TABLE ev OWNER TO pop3sf_test")
        self.sql("ALTER TABLE users OWNER TO pop3sf_test")

    def sql(self, stmt: str, args: Sequence[Any] = ()) -> list[Any]:
        return self.server.execute(stmt, tuple(args) or None, database=self.database) or []

    def config(self, **kw: Any) -> dict[str, Any]:
        return self.server.adapter_config(self.database, **kw)


class MariaDBBackend(Backend):
    name = "mysql"

    def __init__(self, server: MariaDBServer) -> None:
        self.server = server
        self.database = server.new_database()
        self.sql("CREATE TABLE ev (id INT AUTO_INCREMENT PRIMARY KEY, at DATETIME NOT NULL, "
                 "title TEXT, body MEDIUMTEXT, raw LONGBLOB, who TEXT, owner VARCHAR(64), "
                 "seen INT NOT NULL DEFAULT 0) CHARSET=utf8mb4")
        self.sql("CREATE TABLE users (name VARCHAR(64) PRIMARY KEY, hash TEXT NOT NULL) "
                 "CHARSET=utf8mb4")

    def at(self, i: int) -> Any:
        return (T0 + datetime.timedelta(seconds=i)).replace(tzinfo=None)

    def sql(self, stmt: str, args: Sequence[Any] = ()) -> list[Any]:
        return list(self.server.execute(stmt, tuple(args) or None, database=self.database))

    def config(self, **kw: Any) -> dict[str, Any]:
        return {**self.server.adapter_config(self.database), "driver": "mysql",
                "mysql_driver": "pymysql", **kw}


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if kind == "sqlite":
        return SQLiteBackend(tmp_path / "rows.sqlite3")
    if kind == "postgresql":
        return PostgresBackend(request.getfixturevalue("postgres"))
    return MariaDBBackend(request.getfixturevalue("mariadb"))


KINDS = ["sqlite", "postgresql", "mysql"]


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request.param, request, tmp_path)


#: The admin's queries: rendered rows for one configured user, marked seen on deletion.
RENDERED = {
    "list_query": """SELECT id, at AS date, title AS subject, body, who AS sender
                     FROM ev WHERE seen = 0 ORDER BY id -- oldest first""",
    "body_query": "SELECT body FROM ev WHERE id = :id",
}
SINGLE = {"username": "alice", "password_hash": PLAIN}
#: Complete messages of many users, deleted for real.
RAW_MULTI = {
    "list_query": "SELECT id, raw AS message FROM ev WHERE owner = :user",
    "body_query": "SELECT raw AS message FROM ev WHERE id = :id AND owner = :user",
    "password_query": "SELECT hash AS password FROM users WHERE name = :user",
    "deletion": "query",
    "delete_query": "DELETE FROM ev WHERE id = :id AND owner = :user",
}


def adapter_for(backend: Backend, **kw: Any) -> SQLAdapter:
    adapter = SQLAdapter(backend.config(**kw))
    adapter.start()
    return adapter


def login(adapter: SQLAdapter, user: str = "alice", password: str = "pw") -> Any:
    session = adapter.new_session(Peer("127.0.0.1", 1))
    session.login_succeeded(session.authenticate(Credentials(user, password)), False)
    return session


# --- conformance: each database, both shapes --------------------------------------------------


class RawConformance(AdapterConformance):
    """Complete messages, many users (password_query), DELETE at QUIT."""

    adapter_type = "sql"
    kind = ""

    @pytest.fixture(autouse=True)
    def _request(self, request: pytest.FixtureRequest) -> None:
        self.request = request

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        backend = make_backend(self.kind, self.request, Path(tmp_path))
        backend.add_user(user, password)
        backend.add_user("bob", "bob-pw")
        backend.add(raw=b"Subject: bob's\n\nnot alice's\n", owner="bob")
        for i, raw in enumerate(messages):
            backend.add(raw=raw, owner=user, i=i)
        return backend.config(**RAW_MULTI)


class RenderedConformance(RawConformance):
    """Rows rendered into messages, one configured user, ``UPDATE ... SET seen = 1``."""

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        backend = make_backend(self.kind, self.request, Path(tmp_path))
        self.rendered: dict[bytes, bytes] = {}
        sender = encode_address(None, "pop3sf <pop3sf@localhost>")
        recipient = encode_address(f"{user} <{user}@localhost>", "")
        for i, raw in enumerate(messages):
            title = f"row {i} \u00e9t\u00e9"
            body = raw.split(b"\n\n", 1)[-1].split(b"\r\n\r\n", 1)[-1]  # the sample's body
            row_id = backend.add(body=body.decode(), title=title, i=i)
            row = Row(row_id, T0 + datetime.timedelta(seconds=i), title, None)
            self.rendered[raw] = render_header(row, str(row_id), sender, recipient, user) + body
        return backend.config(**RENDERED, username=user,
                              password_hash=passwords.hash_bcrypt(password.encode(), rounds=4),
                              deletion="query",
                              delete_query="UPDATE ev SET seen = 1 WHERE id = :id")

    def expected_message(self, raw: bytes) -> bytes:
        return self.rendered[raw]


class TestRawSQLite(RawConformance):
    kind = "sqlite"


class TestRawPostgres(RawConformance):
    kind = "postgresql"


class TestRawMariaDB(RawConformance):
    kind = "mysql"


class TestRenderedSQLite(RenderedConformance):
    kind = "sqlite"


class TestRenderedPostgres(RenderedConformance):
    kind = "postgresql"


class TestRenderedMariaDB(RenderedConformance):
    kind = "mysql"


# --- sizes ----------------------------------------------------------------------------------


def test_raw_sizes_computed_in_sql_match_measure(backend: Backend) -> None:
    """Every line-end rule and 8-bit header case: the database's count equals pop3sf's own
    measure of the octets, and the octets served are the stored ones."""
    backend.add_user("alice")
    ids = [backend.add(raw=m, i=i) for i, m in enumerate(ODD)]
    adapter = adapter_for(backend, **RAW_MULTI)
    session = login(adapter)
    infos = session.list_messages()
    assert [i.uid for i in infos] == [str(i) for i in ids]
    for info, message in zip(infos, ODD, strict=True):
        assert tuple(info[1:]) == tuple(measure(io.BytesIO(message))), message
        assert session.open_message(info.uid).read() == message
    session.connection_closed()
    adapter.close()


def test_rendered_bodies_with_every_line_end(backend: Backend) -> None:
    texts = ["a\r\nb", "bare\rcr\r", "lf\n\nend\n", "", "\u00e9t\u00e9\n\u2603", ".dot\n."]
    for i, text in enumerate(texts):
        backend.add(body=text, title=f"Ünïcode {i}\nsecond line", who="Jörg <j@example.org>", i=i)
    backend.add(body=None, title=None, i=99)  # NULL body and subject: empty ones
    adapter = adapter_for(backend, **RENDERED, **SINGLE)
    session = login(adapter)
    infos = session.list_messages()
    assert len(infos) == len(texts) + 1
    for info in infos:
        data = session.open_message(info.uid).read()
        assert len(wire_bytes(data)) == info.size
        assert data.isascii() or data.index(b"\r\n\r\n") < data.index(b"\xc3")  # ASCII header
    first = session.open_message(infos[0].uid).read()
    assert b"Subject: =?utf-8?" in first and b"From: =?utf-8?b?SsO2cmc=?= <j@example.org>" in first
    assert b"Date: Mon, 06 May 2024 07:08:09 +0000\r\n" in first
    adapter.close()


# --- deletion modes -------------------------------------------------------------------------


def test_hide_remembers_and_leaves_the_table_alone(backend: Backend, tmp_path: Path) -> None:
    for i in range(3):
        backend.add(body=f"row {i}", i=i)
    hidden = tmp_path / "hidden"
    cfg = backend.config(**RENDERED, **SINGLE, deletion="hide", hidden_dir=str(hidden))
    with running_server("sql", cfg) as srv:
        pop = srv.pop3()
        pop.user("alice")
        pop.pass_("pw")
        first = pop.uidl()[1]
        pop.dele(2)
        pop.quit()
        pop = srv.pop3()
        pop.user("alice")
        pop.pass_("pw")
        assert [line.split()[1] for line in pop.uidl()[1]] == \
            [first[0].split()[1], first[2].split()[1]]
        pop.quit()
    assert len(backend.sql("SELECT id FROM ev")) == 3
    files = list(hidden.rglob("*.hidden"))
    assert len(files) == 1 and oct(files[0].stat().st_mode)[-3:] == "640"


def test_read_only_refuses_deletion_at_quit(backend: Backend) -> None:
    backend.add(body="keep me")
    with running_server("sql", backend.config(**RENDERED, **SINGLE)) as srv:
        pop = srv.pop3()
        pop.user("alice")
        pop.pass_("pw")
        pop.dele(1)
        with pytest.raises(poplib.error_proto, match="not removed"):
            pop.quit()
    assert len(backend.sql("SELECT id FROM ev")) == 1


def test_hidden_store_api(tmp_path: Path) -> None:
    store = HiddenStore(str(tmp_path / "state"), "ns")
    assert store.hidden("a") == frozenset()
    store.hide("a", ["1", "2"])
    store.hide("a", ["3"], keep=["2", "3", "4"])  # 1 is no longer in the source: forgotten
    assert store.hidden("a") == {"2", "3"}
    assert store.hidden("b") == frozenset()
    assert store.check_writable() is None
    store.forget("a")
    assert store.hidden("a") == frozenset()
    assert not [p for p in (tmp_path / "state" / "ns").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError):
        HiddenStore("relative", "ns")


# --- configuration errors ---------------------------------------------------------------------


def test_parameters_are_named_and_translated_safely() -> None:
    q = translate("SELECT ':not', \"a:b\", x::text, '%' FROM t -- :user\n"
                  "WHERE id = :id AND name LIKE 'a%' AND u = :user", "body_query", "postgresql")
    assert q.params == {"id", "user"}
    assert "':not'" in q.text and "x::text" in q.text and "-- :user" in q.text
    assert "%(id)s" in q.text and "%(user)s" in q.text and "'a%%'" in q.text
    assert translate("SELECT 1 FROM t WHERE id = :id", "body_query", "sqlite").text.strip() \
        == "SELECT 1 FROM t WHERE id = :id"
    with pytest.raises(ConfigError, match="positional"):
        translate("SELECT * FROM t WHERE id = ?", "body_query", "sqlite")
    with pytest.raises(ConfigError, match="unknown parameter :owner"):
        translate("SELECT * FROM t WHERE o = :owner", "list_query", "mysql")
    with pytest.raises(ConfigError, match="one statement"):
        translate("SELECT 1; DROP TABLE t", "list_query", "sqlite")
    with pytest.raises(ConfigError, match="unterminated"):
        translate("SELECT 'x FROM t", "list_query", "sqlite")
    assert translate("SELECT ';' AS x", "list_query", "mysql").text.strip() == "SELECT ';' AS x"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    db = SQLiteBackend(tmp_path / "rows.sqlite3")
    with pytest.raises(ConfigError, match="unquoted comma"):
        SQLAdapter(db.config(**{**RENDERED, "list_query": ["SELECT id", "date"]}, **SINGLE))
    with pytest.raises(ConfigError, match="needs delete_query"):
        SQLAdapter(db.config(**RENDERED, **SINGLE, deletion="query"))
    with pytest.raises(ConfigError, match="delete_query is set"):
        SQLAdapter(db.config(**RENDERED, **SINGLE, delete_query="DELETE FROM ev WHERE id = :id"))
    with pytest.raises(ConfigError, match="either username"):
        SQLAdapter(db.config(**RENDERED))
    with pytest.raises(ConfigError, match="absolute path"):
        SQLAdapter({**db.config(**RENDERED, **SINGLE), "database": "rows.sqlite3"})
    with pytest.raises(ConfigError, match="no such file"):
        SQLAdapter({**db.config(**RENDERED, **SINGLE), "database": "/nonexistent.db"}).check()


def test_wrong_columns_are_found_by_probe(backend: Backend) -> None:
    """--check-config runs each query on no rows: wrong columns, a bad delete query and a
    missing table are configuration errors naming the query."""
    cases = [
        ({**RENDERED, "list_query": "SELECT id, title AS subject, body FROM ev"},
         "list_query returns id, subject, body (missing date)"),
        ({**RENDERED, "list_query": "SELECT id, at AS date, title AS subject, body, who FROM ev"},
         "unknown column 'who'"),
        ({**RENDERED, "body_query": "SELECT body, title FROM ev WHERE id = :id"},
         "body_query returns body, title: it must return exactly body"),
        ({**RENDERED, "list_query": "SELECT id, at AS date, title AS subject, body FROM nope"},
         "list_query failed on"),
        ({**RENDERED, "deletion": "query", "delete_query": "DELETE FROM nope WHERE id = :id"},
         "delete_query failed on"),
    ]
    for queries, message in cases:
        adapter = SQLAdapter(backend.config(**queries, **SINGLE))
        with pytest.raises(ConfigError) as info:
            adapter.probe()
        assert message in str(info.value), (queries, str(info.value))
        adapter.close()
    good = SQLAdapter(backend.config(**RENDERED, **SINGLE, deletion="query",
                                     delete_query="UPDATE ev SET seen = 1 WHERE id = :id"))
    good.probe()
    good.close()


def test_check_config_command(tmp_path: Path) -> None:
    db = SQLiteBackend(tmp_path / "rows.sqlite3")
    os.chmod(tmp_path, 0o755)
    os.chmod(db.path, 0o644)
    path = tmp_path / "pop3sf.conf"

    def run(list_query: str) -> subprocess.CompletedProcess[str]:
        path.write_text(f'[server]\nuser = ""\n[logging]\ntarget = stderr\n[listeners]\n'
                        f'    [[pop3]]\n    addresses = 127.0.0.1:0\n[adapter]\ntype = sql\n'
                        f'database = {db.path}\nusername = alice\npassword_hash = {PLAIN}\n'
                        f'list_query = """{list_query}"""\n'
                        f'body_query = "SELECT body FROM ev WHERE id = :id"\n')
        return subprocess.run([sys.executable, "-m", "pop3sf", "--check-config", "--config",
                               str(path)], capture_output=True, text=True, timeout=60, cwd="/")

    ok = run("SELECT id, at AS date,\n  title AS subject, body FROM ev")
    assert ok.returncode == 0, ok.stderr
    bad = run("SELECT id, title AS subject, body FROM ev")
    assert bad.returncode == 78, bad.stderr
    assert "[adapter] (sql): list_query returns id, subject, body (missing date)" in bad.stderr


def test_a_failing_query_is_logged_by_name_and_the_client_gets_sys_temp(
        backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    backend.add(body="x")
    with running_server("sql", backend.config(**RENDERED, **SINGLE)) as srv:
        backend.sql("DROP TABLE ev")
        pop = srv.pop3()
        pop.user("alice")
        with caplog.at_level(logging.ERROR, "pop3sf.adapters.sql"), \
                pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            pop.pass_("pw")
        pop.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "pop3sf.adapters.sql"]
    assert any(m.startswith("sql: list_query failed on") and "ev" in m for m in logged), logged


# --- users ----------------------------------------------------------------------------------


def test_multi_user_logins(backend: Backend) -> None:
    backend.add_user("alice", "a-pw")
    backend.sql(f"INSERT INTO users (name, hash) VALUES ({backend.mark}, {backend.mark})",
                ("carol", passwords.hash_salted("SSHA512", b"c-pw", b"salt")))
    backend.add(raw=b"Subject: a\n\na\n", owner="alice")
    backend.add(raw=b"Subject: c\n\nc\n", owner="carol")
    adapter = adapter_for(backend, **RAW_MULTI)
    for user, pw, subject in (("alice", "a-pw", b"a"), ("carol", "c-pw", b"c")):
        session = login(adapter, user, pw)
        (info,) = session.list_messages()
        assert session.open_message(info.uid).read().startswith(b"Subject: " + subject)
    for user, pw in (("alice", "wrong"), ("nobody", "a-pw"), ("", "x")):
        session = adapter.new_session(Peer("127.0.0.1", 1))
        with pytest.raises(Exception, match=r"unknown user|wrong password"):
            session.authenticate(Credentials(user, pw))
    adapter.close()


# --- admin tools ----------------------------------------------------------------------------


def test_admin_source_lists_what_the_server_lists(tmp_path: Path) -> None:
    db = SQLiteBackend(tmp_path / "rows.sqlite3")
    for i in range(3):
        db.add(body=f"row {i}\n", title=f"title {i}", i=i)
    with open_source("sql", db.config(**RENDERED, **SINGLE)) as source:
        listed = source.list_messages("alice")
        assert [m.subject for m in listed] == ["title 0", "title 1", "title 2"]
        assert listed[0].date == T0
        session = source.session("alice")  # type: ignore[attr-defined]
        data = session.open_message(listed[0].id).read()
        assert len(wire_bytes(data)) == listed[0].size
        session.connection_closed()
        with pytest.raises(NotSupported):
            source.add_message("alice", "text")


# --- rendering helpers ----------------------------------------------------------------------


def test_dates_and_uids() -> None:
    assert to_datetime("2024-05-06T07:08:09Z") == T0
    assert to_datetime(T0.timestamp()) == T0
    assert to_datetime("1714979289") == T0
    assert to_datetime(T0.replace(tzinfo=None)) == T0
    with pytest.raises(ValueError):
        to_datetime("yesterday")
    assert uid_of(42) == "42" and uid_of("a b").startswith("h") and len(uid_of("x" * 80)) == 41


def test_rows_with_bad_dates_are_left_out_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = SQLiteBackend(tmp_path / "rows.sqlite3")
    db.add(body="good")
    db.sql("INSERT INTO ev (at, title, body) VALUES ('not a date', 'bad', 'x')")
    adapter = adapter_for(db, **RENDERED, **SINGLE)
    with caplog.at_level(logging.ERROR, "pop3sf.adapters.sql"):
        assert len(login(adapter).list_messages()) == 1
    assert "1 rows left out: a NULL id, or a date that is not a date" in caplog.text
    adapter.close()


# --- 100,000 rows ---------------------------------------------------------------------------


def fill(backend: Backend, count: int) -> None:
    rows = [(backend.at(i), f"event {i}", f"line one of {i}\nline two\n", "alice")
            for i in range(count)]
    if isinstance(backend, SQLiteBackend):
        conn = sqlite3.connect(backend.path)
        with conn:
            conn.executemany("INSERT INTO ev (at, title, body, owner) VALUES (?, ?, ?, ?)", rows)
        conn.close()
        return
    conn = backend.server.connect(backend.database)  # type: ignore[attr-defined]
    try:
        cur = conn.cursor()
        for start in range(0, count, 5000):
            cur.executemany("INSERT INTO ev (at, title, body, owner) VALUES (%s, %s, %s, %s)",
                            rows[start:start + 5000])
        cur.close()
    finally:
        conn.close()


@pytest.fixture
def big(backend: Backend) -> Iterator[Backend]:
    fill(backend, 100_000)
    yield backend


def test_100k_rows_list_and_retrieve_exactly(big: Backend) -> None:
    """Login + LIST of a 100,000-row table through poplib, sizes exact for a sample. How fast
    is benchmarks/sql_source.py's to measure (a timed test on a shared machine measures the
    neighbours as much as pop3sf)."""
    with running_server("sql", big.config(**RENDERED, **SINGLE)) as srv:
        pop = srv.pop3()
        pop.user("alice")
        pop.pass_("pw")
        _, listing, _ = pop.list()
        assert len(listing) == 100_000
        for n in (1, 50_000, 100_000):
            _, lines, _ = pop.retr(n)
            assert sum(len(line) + 2 for line in lines) == int(listing[n - 1].split()[1])
        pop.quit()


def test_unreachable_database_is_a_temporary_failure(tmp_path: Path) -> None:
    from mariadb import free_port

    adapter = SQLAdapter({"driver": "postgresql", "host": "127.0.0.1", "port": free_port(),
                          "database": "x", "sslmode": "disable", **RENDERED, **SINGLE})
    adapter.start()  # tolerated: the database may come up later
    session = login(adapter)
    with pytest.raises(TemporaryFailure):
        session.list_messages()
    with pytest.raises(ConfigError, match="cannot connect"):
        adapter.probe()
    adapter.close()


def test_preview_session_hook(backend: Backend, tmp_path: Path) -> None:
    """The hook of ``pop3sf-admin preview`` (docs/adapters.md#admin): a read-only session of an
    account without its password; an unknown account is AuthenticationFailed; nothing changes."""
    from pop3sf.adapters.base import AuthenticationFailed

    backend.add_user("alice")
    backend.add(raw=b"Subject: a\n\nbody\n", owner="alice")
    hidden = tmp_path / "hidden"
    cfg = {**RAW_MULTI, "deletion": "hide", "hidden_dir": str(hidden)}
    del cfg["delete_query"]
    adapter = adapter_for(backend, **cfg)
    session = adapter.preview_session("alice")
    (info,) = session.list_messages()
    assert session.read_only
    assert session.open_message(info.uid).read() == b"Subject: a\n\nbody\n"
    assert session.delete_messages([info.uid]).failed  # read-only: nothing hidden
    session.connection_closed()
    assert not hidden.exists()
    with pytest.raises(AuthenticationFailed, match="no account 'mallory'"):
        adapter.preview_session("mallory")
    adapter.close()
    single = adapter_for(backend, **RENDERED, **SINGLE)
    with pytest.raises(AuthenticationFailed, match="no account"):
        single.preview_session("bob")
    single.close()


def test_hidden_store_keeps_by_predicate(tmp_path: Path) -> None:
    store = HiddenStore(str(tmp_path), "ns")
    store.hide("a", ["old-1", "new-2"], keep=lambda uid: uid.startswith("new"))
    assert store.hidden("a") == {"new-2"}


def readme_sql_configs() -> list[dict[str, Any]]:
    """The ``[adapter]`` sections of README.md's ``type = sql`` examples, read as the server
    reads its file (configobj, list values on)."""
    import textwrap

    from configobj import ConfigObj

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Any table, by query", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in section.split("\n\n") if b.startswith("    [adapter]")]
    return [dict(ConfigObj(textwrap.dedent(b).splitlines(), interpolation=False)["adapter"])
            for b in blocks]


def test_readme_configurations_work(tmp_path: Path, postgres: PostgresServer) -> None:  # noqa: F811
    sqlite_cfg, pg_cfg = readme_sql_configs()
    assert sqlite_cfg.pop("type") == pg_cfg.pop("type") == "sql"
    path = tmp_path / "runs.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, finished_at TEXT, host TEXT, "
                   "status TEXT, log TEXT, seen INTEGER DEFAULT 0)")
        db.execute("INSERT INTO runs (finished_at, host, status, log) VALUES "
                   "('2024-05-06 07:08:09', 'db1', 'ok', 'all fine\n')")
    db.close()
    sqlite_cfg.update(database=str(path), password_hash=PLAIN)
    with running_server("sql", sqlite_cfg) as srv:
        pop = srv.pop3()
        pop.user("ops")
        pop.pass_("pw")
        _, lines, _ = pop.retr(1)
        assert b"Subject: db1: ok" in lines and lines[-1] == b"all fine"
        pop.dele(1)
        pop.quit()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT seen FROM runs").fetchall() == [(1,)]
    db.close()
    database = postgres.new_database()
    pg = PostgresBackend.__new__(PostgresBackend)
    pg.server, pg.database = postgres, database
    pg.sql("CREATE TABLE operators (login TEXT, pw_hash TEXT)")
    pg.sql("CREATE TABLE alerts (id SERIAL, created TIMESTAMPTZ, title TEXT, details TEXT, "
           "source TEXT, recipient TEXT)")
    pg.sql("GRANT SELECT ON operators, alerts TO pop3sf_test")
    pg.sql("INSERT INTO operators VALUES ('oncall', '{PLAIN}pw')")
    pg.sql("INSERT INTO alerts (created, title, details, source, recipient) VALUES "
           "(now(), 'disk full', 'on /srv', 'Monitor <mon@example.org>', 'oncall')")
    secret = tmp_path / "dbpass"
    secret.write_text("test-Passw0rd\n")
    secret.chmod(0o600)
    pg_cfg.update(postgres.adapter_config(database), password_file=str(secret),
                  hidden_dir=str(tmp_path / "hidden"))
    del pg_cfg["password"]
    adapter = SQLAdapter(pg_cfg)
    adapter.probe()
    adapter.start()
    session = login(adapter, "oncall")
    (info,) = session.list_messages()
    assert b"From: Monitor <mon@example.org>" in session.open_message(info.uid).read()
    session.delete_messages([info.uid])
    assert login(adapter, "oncall").list_messages() == []  # hidden
    adapter.close()


@pytest.mark.parametrize("subject", ["plain", " lead", "trail ", "two  spaces", "tab\there",
                                     "x" * 500, "é", None, b"bytes", 42, "line\nbreak", ""])
def test_subject_length_is_the_encoded_length(subject: Any) -> None:
    from pop3sf.adapters.sql_session import encode_subject, subject_length

    assert subject_length(subject) == len(encode_subject(subject))


def test_literal_percent_and_casts_reach_the_database(backend: Backend) -> None:
    """``%`` is doubled for the pyformat drivers and comes back single; ``::`` and quoted
    ``:words`` are not parameters."""
    backend.add(body="b", title="100% done")
    backend.add(body="b", title="other")
    cast = "::text" if backend.name == "postgresql" else ""
    adapter = adapter_for(backend, **SINGLE, body_query=RENDERED["body_query"], list_query=(
        f"SELECT id, at AS date, title{cast} AS subject, body FROM ev "
        f"WHERE title LIKE '%\\%%' ESCAPE '\\' AND title <> ':user'"
        if backend.name != "mysql" else
        "SELECT id, at AS date, title AS subject, body FROM ev "
        "WHERE title LIKE '%\\\\%%' AND title <> ':user'"))
    adapter.probe()
    session = login(adapter)
    (info,) = session.list_messages()
    assert b"Subject: 100% done\r\n" in session.open_message(info.uid).read()
    adapter.close()


def test_reload_checks_the_new_queries_and_keeps_the_old_on_error(tmp_path: Path) -> None:
    db = SQLiteBackend(tmp_path / "rows.sqlite3")
    db.add(body="one", title="first")
    db.add(body="two", title="second", i=1)
    adapter = adapter_for(db, **RENDERED, **SINGLE)
    bad = db.config(**SINGLE, **{**RENDERED, "list_query": "SELECT id, body FROM ev"})
    with pytest.raises(ConfigError, match="missing date, subject"):
        adapter.reload(bad)
    assert len(login(adapter).list_messages()) == 2  # the old queries still serve
    session = login(adapter)
    session.list_messages()
    adapter.reload(db.config(**SINGLE, **{**RENDERED, "list_query": (
        "SELECT id, at AS date, title AS subject, body FROM ev WHERE title = 'second'")}))
    assert len(login(adapter).list_messages()) == 1
    assert session.open_message("1").read().endswith(b"one")  # listed before: still served
    adapter.close()


@pytest.mark.skipif(__import__("shutil").which("fetchmail") is None,
                    reason="fetchmail not installed")
def test_fetchmail_reads_and_marks_rows_seen(backend: Backend, tmp_path: Path) -> None:
    """A real mail client: fetchmail fetches every row (sizes checked against LIST, as it
    does) and deletes; the delete query marks them seen, so a second run finds nothing."""
    backend.add(body="disk full on /srv\nretrying\n", title="backup: failed", who="cron <c@h>")
    backend.add(body="Grüße\r\n", title="naïve café", i=1)
    cfg = backend.config(**RENDERED, **SINGLE, deletion="query",
                         delete_query="UPDATE ev SET seen = 1 WHERE id = :id")
    with running_server("sql", cfg) as srv:
        fetchmail = Fetchmail(tmp_path, srv.port, "alice", "pw")
        proc = fetchmail.run()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        again = fetchmail.run()
        assert again.returncode == 1, again.stdout + again.stderr  # 1: no mail
    delivered = fetchmail.delivered()
    assert b"Subject: backup: failed" in delivered and b"disk full on /srv" in delivered
    assert "Grüße".encode() in delivered and b"From: cron <c@h>" in delivered
    assert sorted(r[0] for r in backend.sql("SELECT seen FROM ev")) == [1, 1]


def test_pop3sf_admin_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The generic ``pop3sf-admin preview`` reaches a sql source through preview_session."""
    from pop3sf.auxiliary.admin import main

    db = SQLiteBackend(tmp_path / "rows.sqlite3")
    db.add(body="first body\n", title="first")
    db.add(body="second body\n", title="second", i=1)
    path = tmp_path / "pop3sf.conf"
    path.write_text(f'[server]\nuser = ""\n[listeners]\n    [[pop3]]\n'
                    f'    addresses = 127.0.0.1:0\n[adapter]\ntype = sql\n'
                    f'database = {db.path}\nusername = alice\npassword_hash = {PLAIN}\n'
                    f'list_query = """{RENDERED["list_query"]}"""\n'
                    f'body_query = "{RENDERED["body_query"]}"\n')
    assert main(["--config", str(path), "preview", "alice"]) == 0
    out = capsys.readouterr().out
    assert "first" in out and "second" in out
    assert main(["--config", str(path), "preview", "alice", "--message", "2"]) == 0
    assert "second body" in capsys.readouterr().out
    assert main(["--config", str(path), "preview", "bob"]) == 67


def test_password_query_may_name_the_canonical_account(backend: Backend) -> None:
    """With a ``username`` column, a case-insensitive lookup still gives one account name:
    the lock, the log and ``:user`` in the other queries use the stored spelling."""
    backend.add_user("Alice", "pw")
    backend.add(raw=b"Subject: for Alice\n\nx\n", owner="Alice")
    adapter = adapter_for(backend, **{**RAW_MULTI, "password_query": (
        "SELECT hash AS password, name AS username FROM users WHERE lower(name) = lower(:user)")})
    session = adapter.new_session(Peer("127.0.0.1", 1))
    found = session.authenticate(Credentials("alice", "pw"))
    assert found.account_id == "Alice"
    session.login_succeeded(found, False)
    assert len(session.list_messages()) == 1
    assert adapter.preview_session("ALICE").account == "Alice"
    with pytest.raises(ConfigError, match="exactly password"):
        SQLAdapter(backend.config(**{**RAW_MULTI, "password_query": (
            "SELECT hash AS password, name FROM users WHERE name = :user")})).probe()
    adapter.close()


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_a_restarted_database_costs_no_failed_login(kind: str, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    """Pooled connections die with the database; the next read notices and reconnects once."""
    from mariadb import running_mariadb
    from postgres import running_postgres

    with (running_postgres() if kind == "postgresql" else running_mariadb()) as server:
        backend = (PostgresBackend(server) if kind == "postgresql"  # type: ignore[arg-type]
                   else MariaDBBackend(server))  # type: ignore[arg-type]
        backend.add(body="x")
        adapter = adapter_for(backend, **RENDERED, **SINGLE)
        assert len(login(adapter).list_messages()) == 1
        server.stop()
        server.start()
        assert len(login(adapter).list_messages()) == 1
        adapter.close()
