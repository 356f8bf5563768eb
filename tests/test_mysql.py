"""The MySQL/MariaDB adapters against a real, private MariaDB server (tests/mariadb.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import poplib
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from mariadb import MariaDBServer, mariadb, running_mariadb  # noqa: F401  (fixture)
from pop3sf.adapters.base import (
    AuthenticationFailed,
    AuthResult,
    ConfigurationError,
    Credentials,
    MaildropInUse,
    MessageGone,
    Peer,
    PermanentFailure,
    TemporaryFailure,
)
from pop3sf.adapters.mysql import MultiUserMySQLAdapter, MySQLAdapter, MySQLSession
from pop3sf.adapters.mysql_sql import check_identifier, lock_name, to_text
from pop3sf.adapters.plaintext import PlaintextMessage

from pop3sf import passwords
from pop3sf.testing import AdapterConformance, RunningServer, login_when_free, running_server
from pop3sf.wire import measure, wire_bytes

DRIVERS = ["pymysql", pytest.param("mysql-connector", marks=pytest.mark.skipif(
    importlib.util.find_spec("mysql.connector") is None,
    reason="mysql-connector-python not installed"))]
PEER = Peer("127.0.0.1", 40000)
HASH_CACHE: dict[str, str] = {}

#: The original pop3sf's DDL, verbatim (its tools create the tables exactly so).
ORIGINAL_MULTI = ["""CREATE TABLE IF NOT EXISTS pop3sf_multiuser_messages (
            id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL,
            user_id INT UNSIGNED NOT NULL,
            message MEDIUMTEXT NOT NULL,
            is_plaintext BOOL NOT NULL,
            added_timestamp DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL
        )""", """CREATE TABLE IF NOT EXISTS pop3sf_multiuser_users (
            id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL,
            username VARCHAR(64) UNIQUE NOT NULL,
            password_bcrypt CHAR(60) NOT NULL
        )"""]
ORIGINAL_SINGLE = """CREATE TABLE IF NOT EXISTS pop3sf_singleuser_messages (
            id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL,
            message MEDIUMTEXT NOT NULL,
            is_plaintext BOOL NOT NULL,
            added_timestamp DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL
        )"""

#: Messages whose sizes exercise every rule of docs/protocol.md §9/§10.
ODD_MESSAGES = [
    b"Subject: crlf\r\n\r\nbody\r\n",
    b"Subject: bare lf\n\nline\nlast line without end",
    b"Subject: bare cr\r\rbody\rend\r",
    b"Subject: mixed\r\n\nx\r\r\n\n\r",
    b"",
    b"\nstarts with a blank line\n",
    b"\r\n",
    b"no blank line at all \xc3\xa9",
    "Subject: \u00e9t\u00e9 \u2603\nFrom: J\u00fcrgen <j@example.org>\n\nbody \u00ff\n".encode(),
    "Subject: plain\n\nbody with 8-bit only in body \u00e9\n".encode(),
    b"Subject: dots\n\n.leading dot\n..two\n.\n",
    ("X-Long: " + "a" * 5000 + "\n\n" + "b\n" * 1000).encode(),
]
#: Header sections beyond what is downgraded (1 MiB): 8-bit, but no downgraded size.
HUGE_HEADERS = [
    "X-Big: \u00e9\n".encode() + b"X-Pad: 0123456789\r\n" * 90_000,
    "X-Big: \u00e9\n".encode() + b"X-Pad: 0123456789\n" * 70_000 + b"\nbody\n",
]


def bcrypt4(password: str) -> str:
    if password not in HASH_CACHE:
        HASH_CACHE[password] = passwords.hash_bcrypt(password.encode(), rounds=4)
    return HASH_CACHE[password]


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(mariadb: MariaDBServer) -> str:  # noqa: F811
    return mariadb.new_database()


class Env:
    """One test's database with helpers to fill it and build adapters on it."""

    def __init__(self, server: MariaDBServer, database: str, driver: str) -> None:
        self.server = server
        self.database = database
        self.driver = driver
        self.adapters: list[Any] = []

    def config(self, **kw: Any) -> dict[str, Any]:
        return self.server.adapter_config(self.database, driver=self.driver, **kw)

    def multi(self, **kw: Any) -> MultiUserMySQLAdapter:
        adapter = MultiUserMySQLAdapter(self.config(**kw))
        adapter.start()
        self.adapters.append(adapter)
        return adapter

    def single(self, **kw: Any) -> MySQLAdapter:
        kw.setdefault("username", "solo")
        kw.setdefault("password_hash", bcrypt4("solo-pw"))
        adapter = MySQLAdapter(self.config(**kw))
        adapter.start()
        self.adapters.append(adapter)
        return adapter

    def sql(self, sql: str, args: Any = None) -> Any:
        return self.server.execute(sql, args, database=self.database)

    def add_user(self, name: str, password: str = "pw",
                 table: str = "pop3sf_multiuser_users") -> int:
        self.sql(f"INSERT INTO {table} (username, password_bcrypt) VALUES (%s, %s)",
                 (name, bcrypt4(password)))
        return int(self.sql(f"SELECT id FROM {table} WHERE username = %s", (name,))[0][0])

    def add_message(self, message: bytes | str, user_id: int | None = None,
                    plaintext: bool = False, table: str | None = None) -> int:
        conn = self.server.connect(self.database)
        try:
            with conn.cursor() as cur:
                if user_id is None:
                    cur.execute(f"INSERT INTO {table or 'pop3sf_singleuser_messages'} "
                                "(message, is_plaintext) VALUES (%s, %s)", (message, plaintext))
                else:
                    cur.execute(f"INSERT INTO {table or 'pop3sf_multiuser_messages'} "
                                "(user_id, message, is_plaintext) VALUES (%s, %s, %s)",
                                (user_id, message, plaintext))
                return int(cur.lastrowid)
        finally:
            conn.close()

    def ids(self, table: str = "pop3sf_multiuser_messages") -> list[int]:
        return [r[0] for r in self.sql(f"SELECT id FROM {table} ORDER BY id")]

    def close(self) -> None:
        for adapter in self.adapters:
            adapter.close()


@pytest.fixture
def env(mariadb: MariaDBServer, db: str, driver: str) -> Iterator[Env]:  # noqa: F811
    e = Env(mariadb, db, driver)
    yield e
    e.close()


def login(adapter: Any, user: str, password: str = "pw", read_only: bool = False) -> MySQLSession:
    session = adapter.new_session(PEER)
    result = session.authenticate(Credentials(user, password))
    session.login_succeeded(result, read_only)
    return session


def read_all(session: MySQLSession, uid: str) -> bytes:
    stream = session.open_message(uid)
    try:
        return stream.read()
    finally:
        stream.close()


# --- sizes, bodies, wrapping ---------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["auto", "mysql"])
def test_sizes_and_bodies_match_the_wire(env: Env, dialect: str) -> None:
    # "mysql" counts with REPLACE and a plain header prefix, as on MySQL servers.
    adapter = env.multi(message_column_type="MEDIUMBLOB", sql_dialect=dialect)
    uid_ = env.add_user("alice")
    messages = [*ODD_MESSAGES, b"Subject: latin1 \xe9\n\nbody \xff\xfe\n", b"\xff\xfe\xfd"]
    if dialect == "auto":  # MariaDB's REPLACE (the "mysql" counting) is quadratic: skip these
        messages += HUGE_HEADERS
    rng = random.Random(4)
    for _ in range(20):  # random line-end soup, 8-bit bytes in headers and bodies
        parts = [rng.choice([b"a", b"\r", b"\n", b"\r\n", b".", b"\xc3\xa9", b"\xff", b": "])
                 for _ in range(rng.randint(0, 80))]
        messages.append(b"".join(parts))
    ids = [env.add_message(m, uid_) for m in messages]
    session = login(adapter, "alice")
    infos = session.list_messages()
    assert adapter.dialect() == ("mariadb" if dialect == "auto" else "mysql")
    assert [i.uid for i in infos] == [str(i) for i in ids]
    for info, message in zip(infos, messages, strict=True):
        expected = measure(io.BytesIO(message))
        assert (info.size, info.utf8_header, info.downgraded_size) == tuple(expected), message
        assert read_all(session, info.uid) == message
        assert len(wire_bytes(message)) == info.size
    session.connection_closed()


def test_plaintext_rows_are_wrapped_with_exact_sizes(env: Env) -> None:
    adapter = env.multi(chunk_size=4096)
    alice = env.add_user("alice")
    texts = ["short note", "line one\nline two\r\n\u00e9t\u00e9 \u2603",
             "x" * 3000 + "\n" + "long line " * 500, "tab\tand NUL\0inside\n", "y\n" * 5000]
    ids = [env.add_message(t, alice, plaintext=True) for t in texts]
    env.sql("UPDATE pop3sf_multiuser_messages SET added_timestamp = '2021-03-04 05:06:07'")
    session = login(adapter, "alice")
    infos = session.list_messages()
    for info, text, row_id in zip(infos, texts, ids, strict=True):
        body = read_all(session, info.uid)
        assert info.size == len(body)
        assert body.startswith(b"Date: Thu, 04 Mar 2021 05:06:07 +0000\r\n")
        assert f"Subject: Plaintext database entry {row_id}".encode() in body
        assert b"To: alice <alice@localhost>" in body
        assert measure(io.BytesIO(body)).size == info.size
        expected = PlaintextMessage(io.BytesIO(text.encode()), uid=str(row_id),
                                    name=f"Plaintext database entry {row_id}",
                                    date=__import__("datetime").datetime(
                                        2021, 3, 4, 5, 6, 7,
                                        tzinfo=__import__("datetime").UTC),
                                    from_addr="nobody <nobody@localhost>",
                                    to_addr="alice <alice@localhost>").read()
        assert body == expected
    # The second login takes the wrapped sizes from the cache: no body is read.
    session.connection_closed()
    again = login(adapter, "alice")
    before = len(adapter.plaintext_sizes._data)
    assert [i.size for i in again.list_messages()] == [i.size for i in infos]
    assert len(adapter.plaintext_sizes._data) == before == len(texts)
    again.connection_closed()


def test_original_schema_served_unchanged_up_to_16_mib(mariadb: MariaDBServer,  # noqa: F811
                                                       db: str) -> None:
    env = Env(mariadb, db, "pymysql")
    for stmt in [*ORIGINAL_MULTI, ORIGINAL_SINGLE]:
        env.sql(stmt)
    tables = ("pop3sf_multiuser_messages", "pop3sf_multiuser_users",
              "pop3sf_singleuser_messages")
    def ddl() -> dict[str, str]:
        return {t: re.sub(r"AUTO_INCREMENT=\d+ ", "", env.sql(f"SHOW CREATE TABLE {t}")[0][1])
                for t in tables}

    before = ddl()
    bob = env.add_user("bob", "secret")
    # As the original tools inserted: str(message), plain text flagged.
    biggest = "Subject: big\n\n" + ("0123456789abcde\n" * (1 << 20))[: (1 << 24) - 1 - 14]
    assert len(biggest.encode()) == (1 << 24) - 1  # MEDIUMTEXT's limit
    small = "Subject: hi\nFrom: a@b\n\nHello \u00e9\n"
    ids = [env.add_message(small, bob), env.add_message(biggest, bob),
           env.add_message("note", bob, plaintext=True)]
    env.add_message(small)  # single-user table
    multi = env.multi(chunk_size=4 * 1024 * 1024)
    single = env.single()
    try:
        session = login(multi, "bob", "secret")
        infos = session.list_messages()
        assert [i.uid for i in infos] == [str(i) for i in ids]
        assert infos[1].size == len(biggest) + biggest.count("\n") + 2  # no final LF
        assert read_all(session, infos[0].uid) == small.encode()
        stream = session.open_message(infos[1].uid)
        digest, total = hashlib.sha256(), 0
        while data := stream.read(1 << 20):
            digest.update(data)
            total += len(data)
        assert total == (1 << 24) - 1
        assert digest.hexdigest() == hashlib.sha256(biggest.encode()).hexdigest()
        session.connection_closed()
        solo = login(single, "solo", "solo-pw")
        assert [read_all(solo, i.uid) for i in solo.list_messages()] == [small.encode()]
        solo.connection_closed()
    finally:
        multi.close()
        single.close()
    assert ddl() == before


def test_new_tables_have_user_id_index_and_original_columns(env: Env) -> None:
    env.multi()
    env.single()
    index = env.sql("SHOW INDEX FROM pop3sf_multiuser_messages WHERE Column_name = 'user_id'")
    assert index, "INDEX(user_id) missing"
    cols = {r[0]: r[1] for r in env.sql("SHOW COLUMNS FROM pop3sf_multiuser_messages")}
    assert cols == {"id": "int(10) unsigned", "user_id": "int(10) unsigned",
                    "message": "mediumtext", "is_plaintext": "tinyint(1)",
                    "added_timestamp": "datetime"}
    users = {r[0]: r[1] for r in env.sql("SHOW COLUMNS FROM pop3sf_multiuser_users")}
    assert users == {"id": "int(10) unsigned", "username": "varchar(64)",
                     "password_bcrypt": "char(60)"}
    single = {r[0] for r in env.sql("SHOW COLUMNS FROM pop3sf_singleuser_messages")}
    assert single == {"id", "message", "is_plaintext", "added_timestamp"}


def test_message_gone_and_unknown_uid(env: Env) -> None:
    adapter = env.multi()
    alice = env.add_user("alice")
    mid = env.add_message("Subject: x\n\ny\n", alice)
    session = login(adapter, "alice")
    (info,) = session.list_messages()
    env.sql("DELETE FROM pop3sf_multiuser_messages WHERE id = %s", (mid,))
    with pytest.raises(MessageGone):
        session.open_message(info.uid)
    with pytest.raises(MessageGone):
        session.open_message("999999")
    session.connection_closed()


# --- authentication ------------------------------------------------------------------------


def test_multi_user_authentication(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    adapter = env.multi()
    env.add_user("Alice", "right")
    env.sql("INSERT INTO pop3sf_multiuser_users (username, password_bcrypt) "
            "VALUES ('odd', '{MD4}abcdef')")
    session = adapter.new_session(PEER)
    assert session.authenticate(Credentials("Alice", "right")) == AuthResult("Alice")
    # The collation matches case-insensitively; the stored name is the canonical account id.
    assert adapter.new_session(PEER).authenticate(Credentials("alice", "right")) == \
        AuthResult("Alice")
    for user, password in [("Alice", "wrong"), ("nobody", "right"), ("", "x"),
                           ("x" * 65, "right"), ("odd", "abcdef")]:
        with pytest.raises(AuthenticationFailed):
            adapter.new_session(PEER).authenticate(Credentials(user, password))
    assert "unknown scheme" in caplog.text


def test_single_user_authentication(env: Env) -> None:
    adapter = env.single()
    assert adapter.new_session(PEER).authenticate(Credentials("solo", "solo-pw")) == \
        AuthResult("solo")
    for user, password in [("solo", "nope"), ("Solo", "solo-pw"), ("other", "solo-pw")]:
        with pytest.raises(AuthenticationFailed):
            adapter.new_session(PEER).authenticate(Credentials(user, password))


def test_unknown_user_costs_a_bcrypt_verify(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = env.multi()
    calls: list[Any] = []
    real = passwords.dummy_verify
    monkeypatch.setattr(passwords, "dummy_verify", lambda *a, **k: calls.append(a) or real(*a))
    with pytest.raises(AuthenticationFailed):
        adapter.new_session(PEER).authenticate(Credentials("ghost", "pw"))
    assert len(calls) == 1


# --- deletions -----------------------------------------------------------------------------


def test_delete_exactly_the_marked_rows_and_only_own(env: Env) -> None:
    adapter = env.multi()
    alice, bob = env.add_user("alice"), env.add_user("bob")
    a_ids = [env.add_message(f"Subject: a{i}\n\n.\n", alice) for i in range(6)]
    b_ids = [env.add_message(f"Subject: b{i}\n\n.\n", bob) for i in range(3)]
    session = login(adapter, "alice")
    infos = session.list_messages()
    assert [int(i.uid) for i in infos] == a_ids
    # A row of alice's listing reassigned to bob meanwhile must survive alice's QUIT.
    env.sql("UPDATE pop3sf_multiuser_messages SET user_id = %s WHERE id = %s", (bob, a_ids[4]))
    result = session.delete_messages([str(a_ids[1]), str(a_ids[3]), str(a_ids[4]),
                                      str(b_ids[0])])
    assert result.failed == {str(b_ids[0]): "not in this session's listing"}
    session.connection_closed()
    assert env.ids() == sorted([a_ids[0], a_ids[2], a_ids[4], a_ids[5], *b_ids])


def test_single_user_delete(env: Env) -> None:
    adapter = env.single()
    ids = [env.add_message(f"Subject: {i}\n\nx\n") for i in range(4)]
    session = login(adapter, "solo", "solo-pw")
    session.list_messages()
    session.delete_messages([str(ids[0]), str(ids[2])])
    session.connection_closed()
    assert env.ids("pop3sf_singleuser_messages") == [ids[1], ids[3]]


def test_dropped_session_deletes_nothing(env: Env) -> None:
    adapter = env.multi()
    alice = env.add_user("alice")
    ids = [env.add_message("Subject: x\n\ny\n", alice) for _ in range(3)]
    session = login(adapter, "alice")
    session.list_messages()
    session.connection_closed()  # the server calls only this when a client vanishes
    assert env.ids() == ids
    again = login(adapter, "alice")  # and the account lock was released
    assert len(again.list_messages()) == 3
    again.connection_closed()


def test_read_only_session_takes_no_lock_and_deletes_nothing(env: Env) -> None:
    adapter = env.multi()
    alice = env.add_user("alice")
    mid = env.add_message("Subject: x\n\ny\n", alice)
    writer = login(adapter, "alice")
    reader = login(adapter, "alice", read_only=True)  # allowed beside a read-write session
    assert reader.lock_conn is None
    (info,) = reader.list_messages()
    with pytest.raises(PermanentFailure):
        reader.delete_messages([info.uid])
    reader.connection_closed()
    writer.connection_closed()
    assert env.ids() == [mid]


# --- exclusivity (docs/mysql.md) ----------------------------------------------------------------


def test_get_lock_across_adapters_and_within_one_pool(env: Env) -> None:
    first, second = env.multi(pool_size=1), env.multi(pool_size=1)
    env.add_user("alice")
    env.add_user("bob")
    holder = login(first, "alice")
    # Another instance on the same database:
    with pytest.raises(MaildropInUse):
        login(second, "alice")
    # The same instance, although its single pooled connection is shared by both sessions:
    with pytest.raises(MaildropInUse):
        login(first, "alice")
    other = login(first, "bob")  # other accounts are not affected
    name = lock_name(env.database, "pop3sf_multiuser_messages", "alice")
    assert len(name) == 64 and name.startswith("pop3sf:")
    holder_id = env.sql("SELECT IS_USED_LOCK(%s)", (name,))[0][0]
    assert holder_id is not None
    holder.connection_closed()
    assert env.sql("SELECT IS_USED_LOCK(%s)", (name,))[0][0] is None
    taker = login(second, "alice")
    taker.connection_closed()
    other.connection_closed()


def test_lock_lost_before_quit_deletes_nothing(env: Env) -> None:
    adapter = env.multi()
    alice = env.add_user("alice")
    ids = [env.add_message("Subject: x\n\ny\n", alice) for _ in range(2)]
    session = login(adapter, "alice")
    infos = session.list_messages()
    name = lock_name(env.database, "pop3sf_multiuser_messages", "alice")
    conn_id = env.sql("SELECT IS_USED_LOCK(%s)", (name,))[0][0]
    env.sql(f"KILL {int(conn_id)}")  # e.g. a network blip dropped the lock connection
    time.sleep(0.1)
    thief = login(env.multi(), "alice")  # ... and another instance took the account
    with pytest.raises(TemporaryFailure):
        session.delete_messages([i.uid for i in infos])
    session.connection_closed()
    assert env.ids() == ids
    thief.connection_closed()


def test_lock_of_an_idle_session_expires(env: Env) -> None:
    adapter = env.multi(lock_idle_timeout=1)
    alice = env.add_user("alice")
    mid = env.add_message("Subject: x\n\ny\n", alice)
    session = login(adapter, "alice")
    session.list_messages()
    name = lock_name(env.database, "pop3sf_multiuser_messages", "alice")
    deadline = time.monotonic() + 10
    while env.sql("SELECT IS_USED_LOCK(%s)", (name,))[0][0] is not None:
        assert time.monotonic() < deadline, "the idle lock connection was never closed"
        time.sleep(0.2)
    with pytest.raises(TemporaryFailure):
        session.delete_messages([str(mid)])
    session.connection_closed()
    assert env.ids() == [mid]


def test_lock_not_reacquired_by_dead_connection(env: Env) -> None:
    adapter = env.multi()
    alice = env.add_user("alice")
    mid = env.add_message("Subject: x\n\ny\n", alice)
    session = login(adapter, "alice")
    session.list_messages()
    session.lock_conn.close()  # the connection is gone; nobody else holds the lock
    with pytest.raises(TemporaryFailure):
        session.delete_messages([str(mid)])
    session.connection_closed()
    assert env.ids() == [mid]


HOLDER = textwrap.dedent("""
    import json, sys
    from pop3sf.adapters.base import Credentials, MaildropInUse, Peer
    from pop3sf.adapters.mysql import MultiUserMySQLAdapter
    adapter = MultiUserMySQLAdapter(json.loads(sys.argv[1]))
    adapter.start()
    session = adapter.new_session(Peer("127.0.0.1", 1))
    result = session.authenticate(Credentials(sys.argv[2], "pw"))
    try:
        session.login_succeeded(result, False)
        print("locked", flush=True)
    except MaildropInUse:
        print("in-use", flush=True)
    sys.stdin.readline()
    session.connection_closed()
    print("released", flush=True)
""")


def _holder(env: Env, user: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(env.config()), user],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


def test_get_lock_across_two_processes(mariadb: MariaDBServer, db: str) -> None:  # noqa: F811
    env = Env(mariadb, db, "pymysql")  # processes are slow to start; one driver is enough
    env.multi()
    env.add_user("alice")
    first = _holder(env, "alice")
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "locked"
        second = _holder(env, "alice")
        assert second.stdout is not None and second.stdout.readline().strip() == "in-use"
        second.communicate("\n", timeout=30)
        with pytest.raises(MaildropInUse):
            login(env.multi(), "alice")
        first.kill()  # a crashed instance: the server drops its connection and its lock
        first.wait(timeout=10)
        deadline = time.monotonic() + 10
        while True:
            try:
                login(env.multi(), "alice").connection_closed()
                break
            except MaildropInUse:
                assert time.monotonic() < deadline, "lock of a killed process never freed"
                time.sleep(0.05)
    finally:
        first.kill()
        first.wait(timeout=10)
        env.close()


def test_cross_instance_lock_can_be_disabled(env: Env) -> None:
    adapter = env.multi(cross_instance_lock=False)
    alice = env.add_user("alice")
    mid = env.add_message("Subject: x\n\ny\n", alice)
    one, two = login(adapter, "alice"), login(adapter, "alice")
    assert one.lock_conn is None and two.lock_conn is None
    one.list_messages()
    one.delete_messages([str(mid)])
    one.connection_closed()
    two.connection_closed()
    assert env.ids() == []


# --- concurrency and failures --------------------------------------------------------------


def test_twenty_concurrent_sessions(env: Env) -> None:
    adapter = env.multi(pool_size=4)
    expected: dict[str, list[bytes]] = {}
    for n in range(20):
        user = f"user{n:02d}"
        uid_ = env.add_user(user, f"pw{n}")
        expected[user] = [f"Subject: {user} #{i}\n\n{'z' * (n * 37 + i)}\n".encode()
                          for i in range(5)]
        for message in expected[user]:
            env.add_message(message, uid_)
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)

    def client(n: int) -> None:
        user = f"user{n:02d}"
        try:
            barrier.wait(timeout=30)
            session = adapter.new_session(PEER)
            result = session.authenticate(Credentials(user, f"pw{n}"))
            session.login_succeeded(result, False)
            infos = session.list_messages()
            bodies = [read_all(session, i.uid) for i in infos]
            assert bodies == expected[user]
            assert [i.size for i in infos] == [len(wire_bytes(b)) for b in bodies]
            session.delete_messages([infos[0].uid, infos[2].uid])
            session.connection_closed()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(env.ids()) == 20 * 3
    assert adapter.pool.stats()["open"] <= 4


def test_database_stopped_mid_session_and_restarted(env: Env,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pop3sf.adapters.mysql")
    adapter = env.multi(breaker_threshold=2, breaker_cooldown=0.5, connect_timeout=2)
    alice = env.add_user("alice")
    ids = [env.add_message(f"Subject: {i}\n\nbody\n", alice) for i in range(3)]
    session = login(adapter, "alice")
    infos = session.list_messages()
    env.server.stop()
    try:
        with pytest.raises(TemporaryFailure):
            session.open_message(infos[0].uid)
        with pytest.raises(TemporaryFailure):
            login(adapter, "alice")
        with pytest.raises(TemporaryFailure, match="circuit open"):
            login(adapter, "alice")  # fails fast now, no connect attempt
        assert "cannot connect" in caplog.text
    finally:
        env.server.start()
    time.sleep(0.6)  # the breaker lets a trial through after its cooldown
    # The same session recovers for reads (a new pooled connection) ...
    assert read_all(session, infos[0].uid) == b"Subject: 0\n\nbody\n"
    # ... but its lock died with the old server: its QUIT deletes nothing.
    with pytest.raises(TemporaryFailure):
        session.delete_messages([infos[0].uid])
    session.connection_closed()
    assert env.ids() == ids
    fresh = login(adapter, "alice")
    fresh.list_messages()
    fresh.delete_messages([infos[0].uid])
    fresh.connection_closed()
    assert env.ids() == ids[1:]
    assert "circuit closed" in caplog.text


def test_hung_database_times_out(env: Env) -> None:
    adapter = env.multi(read_timeout=1, connect_timeout=1, breaker_threshold=100)
    alice = env.add_user("alice")
    env.add_message("Subject: x\n\ny\n", alice)
    session = login(adapter, "alice")
    (info,) = session.list_messages()
    env.server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(TemporaryFailure):
            session.open_message(info.uid)
        assert time.monotonic() - start < 6
    finally:
        env.server.resume()
    assert read_all(session, info.uid) == b"Subject: x\n\ny\n"
    session.connection_closed()


def test_start_with_database_down_then_first_login_creates_tables(
        mariadb: MariaDBServer, db: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    adapter = MultiUserMySQLAdapter(mariadb.adapter_config(db, breaker_threshold=50))
    mariadb.stop()
    try:
        adapter.start()  # logs, does not raise: the server keeps running
        assert "tables not checked" in caplog.text
    finally:
        mariadb.start()
    with pytest.raises(AuthenticationFailed):
        adapter.new_session(PEER).authenticate(Credentials("nobody", "x"))
    assert mariadb.execute("SHOW TABLES", database=db)
    adapter.close()


def test_missing_table_is_a_permanent_failure(env: Env) -> None:
    adapter = env.multi(create_tables=False)
    with pytest.raises(PermanentFailure):
        adapter.new_session(PEER).authenticate(Credentials("alice", "pw"))


# --- big messages --------------------------------------------------------------------------

def test_big_message_streams_in_bounded_chunks(env: Env) -> None:
    """The adapter's side of RETR: ~16 SUBSTRING queries, one chunk held at a time (the
    50 MB end-to-end test below measures the real server's memory)."""
    adapter = env.multi(message_column_type="LONGTEXT", chunk_size=65536,
                        max_chunk_size=262144)
    big = env.add_user("big")
    line = "x" * 99 + "\n"
    count = 60_000  # 6 MB: the 256 KiB cap applies
    env.sql("INSERT INTO pop3sf_multiuser_messages (user_id, message, is_plaintext) "
            "VALUES (%s, CONCAT('Subject: big\\n\\n', REPEAT(%s, %s)), 0)", (big, line, count))
    length = len("Subject: big\n\n") + len(line) * count
    session = login(adapter, "big", read_only=True)
    (info,) = session.list_messages()
    assert info.size == length + 2 + count  # every LF becomes CRLF
    stream: Any = session.open_message(info.uid)
    digest, total, biggest_buffer = hashlib.sha256(), 0, 0
    while data := stream.read(100_000):
        digest.update(data)
        total += len(data)
        biggest_buffer = max(biggest_buffer, len(stream._buf))
    assert total == length
    assert stream.queries == -(-length // 262144)
    assert biggest_buffer <= 262144
    expected = hashlib.sha256(b"Subject: big\n\n" + line.encode() * count).hexdigest()
    assert digest.hexdigest() == expected
    assert adapter.chunk_for(50_000_000) == 262144
    small = env.multi()
    assert small.chunk_for(1000) == 1 << 20 and small.chunk_for(50_000_000) == 3_125_000
    assert small.chunk_for(1 << 30) == 8 << 20
    session.connection_closed()


# --- configuration -------------------------------------------------------------------------


def test_table_names_are_validated(env: Env) -> None:
    for bad in ["x; DROP TABLE y", "a`b", "", "1abc", "a" * 65, "db.table"]:
        with pytest.raises(ConfigurationError, match="messages_table"):
            MultiUserMySQLAdapter(env.config(messages_table=bad))
    with pytest.raises(ConfigurationError, match="users_table"):
        MultiUserMySQLAdapter(env.config(users_table="users--"))
    assert check_identifier("Mail_2$x", "t") == "`Mail_2$x`"
    adapter = env.multi(messages_table="Mail$2", users_table="People")
    alice = env.add_user("alice", table="People")
    env.add_message("Subject: x\n\ny\n", alice, table="Mail$2")
    session = login(adapter, "alice")
    assert len(session.list_messages()) == 1
    session.connection_closed()


def test_password_file(env: Env, tmp_path: Any) -> None:
    path = tmp_path / "db-password"
    path.write_text(env.server.adapter_config()["password"] + "\n")
    cfg = env.config(password="", password_file=str(path))
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="readable or writable by others"):
        MultiUserMySQLAdapter(cfg)
    os.chmod(path, 0o640)
    adapter = MultiUserMySQLAdapter(cfg)
    adapter.start()
    env.add_user("alice")
    login(adapter, "alice").connection_closed()
    adapter.close()
    with pytest.raises(ConfigurationError, match="password_file"):
        MultiUserMySQLAdapter(env.config(password_file=str(tmp_path / "missing")))


def test_wrong_database_password_is_a_temporary_failure(env: Env,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    adapter = env.multi(password="wrong")
    with pytest.raises(TemporaryFailure):
        adapter.new_session(PEER).authenticate(Credentials("alice", "pw"))
    assert "Access denied" in caplog.text


def test_tcp_connection(env: Env) -> None:
    adapter = MultiUserMySQLAdapter(env.server.adapter_config(env.database, tcp=True,
                                                              driver=env.driver))
    adapter.start()
    env.add_user("alice")
    session = login(adapter, "alice")
    assert session.list_messages() == []
    session.connection_closed()
    adapter.close()


def test_reload_swaps_pool_and_keeps_old_config_on_error(env: Env) -> None:
    adapter = env.multi(pool_size=2)
    old_pool = adapter.pool
    adapter.reload(env.config(pool_size=3))
    assert adapter.pool is not old_pool and adapter.pool.size == 3
    with pytest.raises(ConfigurationError):
        adapter.reload(env.config(messages_table="bad name"))
    assert adapter.options["pool_size"] == 3
    env.add_user("alice")
    login(adapter, "alice").connection_closed()


def test_every_config_key_is_documented() -> None:
    for cls in (MySQLAdapter, MultiUserMySQLAdapter):
        keys = [line.split("=")[0].strip() for line in cls.configspec.splitlines()
                if line.strip()]
        doc = cls.__doc__ or ""
        missing = [k for k in keys if f"``{k}``" not in doc]
        assert not missing, (cls.__name__, missing)


def test_driver_choice(mariadb: MariaDBServer) -> None:  # noqa: F811
    adapter = MultiUserMySQLAdapter(mariadb.adapter_config(driver="pymysql"))
    assert adapter.driver.name == "pymysql"
    auto = MultiUserMySQLAdapter(mariadb.adapter_config())
    expected = "mysql-connector" if importlib.util.find_spec("mysql.connector") else "pymysql"
    assert auto.driver.name == expected
    with pytest.raises(ConfigurationError, match="driver"):
        MultiUserMySQLAdapter(mariadb.adapter_config(driver="oracle"))


# --- end to end: poplib through the real server ---------------------------------------------


def pop_login(srv: RunningServer, user: str, password: str) -> poplib.POP3:
    return login_when_free(srv, user, password)


class _MySQLConformance(AdapterConformance):
    driver = "pymysql"

    @pytest.fixture(autouse=True)
    def _server_fixture(self, mariadb: MariaDBServer) -> None:  # noqa: F811
        self.mariadb = mariadb

    def _login(self, srv: RunningServer) -> poplib.POP3:
        return pop_login(srv, self.user, self.password)


class TestMultiUserConformance(_MySQLConformance):
    adapter_type = "mysql_multi"

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        env = Env(self.mariadb, self.mariadb.new_database(), self.driver)
        env.multi().close()
        user_id = env.add_user(user, password)
        env.add_user("someone-else", password)
        for raw in messages:
            env.add_message(raw, user_id)
            env.add_message(b"Subject: not yours\n\n-\n", user_id + 1)
        return env.config(bcrypt_rounds=4)


@pytest.mark.skipif(importlib.util.find_spec("mysql.connector") is None,
                    reason="mysql-connector-python not installed")
class TestMultiUserConformanceConnector(TestMultiUserConformance):
    driver = "mysql-connector"


class TestSingleUserConformance(_MySQLConformance):
    adapter_type = "mysql"

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        env = Env(self.mariadb, self.mariadb.new_database(), self.driver)
        config = env.config(username=user, password_hash=bcrypt4(password))
        MySQLAdapter(config).ensure_schema()
        for raw in messages:
            env.add_message(raw)
        return config


def test_pop3_database_down_answers_sys_temp_and_recovers(mariadb: MariaDBServer,  # noqa: F811
                                                         db: str) -> None:
    env = Env(mariadb, db, "pymysql")
    env.multi().close()
    alice = env.add_user("alice", "pw")
    env.add_message(b"Subject: hello\r\n\r\nbody\r\n", alice)
    config = env.config(bcrypt_rounds=4, breaker_threshold=2, breaker_cooldown=0.2)
    with running_server("mysql_multi", config) as srv:
        pop = pop_login(srv, "alice", "pw")
        assert pop.stat() == (1, 24)
        mariadb.stop()
        try:
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                pop.retr(1)
            for _ in range(3):  # down, then failing fast: always [SYS/TEMP], never [AUTH]
                other = srv.pop3()
                other.user("alice")
                with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                    other.pass_("pw")
                other.close()
        finally:
            mariadb.start()
        pop.close()
        time.sleep(0.3)  # the breaker's cooldown
        pop = pop_login(srv, "alice", "pw")
        _, lines, _ = pop.retr(1)
        assert lines == [b"Subject: hello", b"", b"body"]
        pop.dele(1)
        pop.quit()
    assert env.ids() == []


def _server_conf(path: Any, adapter: Mapping[str, Any]) -> Any:
    lines = [f"{k} = {json.dumps(v) if isinstance(v, str) else v}" for k, v in adapter.items()]
    path.write_text(textwrap.dedent("""
        [server]
        user = ""
        shutdown_grace = 3
        [logging]
        target = stderr
        level = info
        [listeners]
            [[pop3]]
            addresses = 127.0.0.1:0
        [adapter]
        type = mysql_multi
        """) + "\n".join(lines) + "\n")
    return path


class ServerProcess:
    """``python -m pop3sf.cli --config PATH`` with its port read from its log."""

    def __init__(self, config: Any) -> None:
        # glibc gives each worker thread its own malloc arena, and freed multi-MB chunks stay
        # in them: with 8 workers peak RSS then measures the allocator, not pop3sf. Two
        # arenas (as docs/mysql.md recommends for the unit) make the peak mean live memory.
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pop3sf.cli", "--config",
                                      str(config)], stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stderr is not None
        seen = []
        for line in self.proc.stderr:
            seen.append(line)
            m = re.search(r"listening on pop3 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise AssertionError("server did not start: " + "".join(seen))
        self.log_lines = seen
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_lines.append(line)

    def pop3(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.port, timeout=30)

    def peak_rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_in_use_across_two_server_processes_and_big_message_memory(
        mariadb: MariaDBServer, db: str, tmp_path: Any) -> None:  # noqa: F811
    env = Env(mariadb, db, "pymysql")
    env.multi(message_column_type="LONGTEXT").close()
    alice = env.add_user("alice", "pw")
    count = 500_000  # 50 MB: 100-octet lines
    env.sql("INSERT INTO pop3sf_multiuser_messages (user_id, message, is_plaintext) "
            "VALUES (%s, CONCAT('Subject: big\\n\\n', REPEAT(%s, %s)), 0)",
            (alice, "y" * 99 + "\n", count))
    size = len("Subject: big\r\n\r\n") + 101 * count
    config = _server_conf(tmp_path / "pop3sf.conf", env.config(bcrypt_rounds=4))
    one, two = ServerProcess(config), ServerProcess(config)
    try:
        first = one.pop3()
        first.user("alice")
        first.pass_("pw")
        second = two.pop3()
        second.user("alice")
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[IN-USE\]"):
            second.pass_("pw")
        second.close()
        assert first.stat() == (1, size)
        baseline = one.peak_rss_kib()
        _, lines, _ = first.retr(1)
        assert len(lines) == count + 2 and lines[-1] == b"y" * 99
        grown = one.peak_rss_kib() - baseline
        assert grown < 24 * 1024, f"server peak RSS grew {grown} KiB sending 50 MB"
        first.quit()
        again = two.pop3()  # released at QUIT: the other instance may serve alice now
        again.user("alice")
        again.pass_("pw")
        again.quit()
    finally:
        one.stop()
        two.stop()


@pytest.mark.skipif(importlib.util.find_spec("mysql.connector") is None,
                    reason="mysql-connector-python not installed")
def test_log_keeps_to_pop3sf_lines_with_mysql_connector(
        mariadb: MariaDBServer, db: str, tmp_path: Any) -> None:  # noqa: F811
    """mysql-connector logs its authentication plugin at INFO on every connection."""
    env = Env(mariadb, db, "mysql-connector")
    env.multi().close()
    alice = env.add_user("alice", "pw")
    env.add_message(b"Subject: hello\r\n\r\nbody\r\n", alice)
    server = ServerProcess(_server_conf(tmp_path / "pop3sf.conf", env.config(bcrypt_rounds=4)))
    try:
        for _ in range(3):  # each login after the first may open new pooled connections
            pop = pop_login(server, "alice", "pw")  # type: ignore[arg-type]
            assert pop.stat() == (1, 24)
            pop.quit()
    finally:
        server.stop()
    log = "".join(server.log_lines)
    assert "alice" in log and "listening on pop3" in log  # pop3sf's own lines are there
    for noise in ("mysql.connector", "plugin_name", "AUTHENTICATION_PLUGIN_CLASS", "package:"):
        assert noise not in log, log


# --- the database's max_allowed_packet ------------------------------------------------------


@pytest.fixture(scope="module")
def packet_server() -> Iterator[MariaDBServer]:
    """A server of this module's own, whose max_allowed_packet the test lowers at run time."""
    with running_mariadb() as server:
        yield server


def test_row_over_max_allowed_packet_is_named_never_mislisted(
        packet_server: MariaDBServer, driver: str, caplog: pytest.LogCaptureFixture) -> None:
    """The database answers NULL for a value over its max_allowed_packet: such a row is left
    out of listings (never listed with a wrong size, never sent cut) and the log names the
    setting; the row stays in the table."""
    caplog.set_level(logging.ERROR, logger="pop3sf.adapters.mysql")
    env = Env(packet_server, packet_server.new_database(), driver)
    adapter = env.multi(message_column_type="LONGTEXT")
    alice = env.add_user("alice")
    small = env.add_message(b"Subject: small\r\n\r\nfits\r\n", alice)
    big_body = b"Subject: big\r\n\r\n" + b"y" * 2_000_000 + b"\r\n"
    big = env.add_message(big_body, alice)
    session = login(adapter, "alice", read_only=True)
    assert [(i.uid, i.size) for i in session.list_messages()] == \
        [(str(small), 24), (str(big), len(big_body))]
    opened = session.open_message(str(big))  # length checked under the old limit
    packet_server.execute("SET GLOBAL max_allowed_packet = 1048576", database=None)
    try:
        # New connections get the new limit (a changed pool_size swaps the pool).
        adapter.reload(env.config(message_column_type="LONGTEXT", pool_size=3))
        with pytest.raises(TemporaryFailure, match="max_allowed_packet"):
            opened.read()
        opened.close()
        with pytest.raises(TemporaryFailure, match="max_allowed_packet"):
            session.open_message(str(big))
        assert read_all(session, str(small)) == b"Subject: small\r\n\r\nfits\r\n"
        session.connection_closed()
        caplog.clear()
        session = login(adapter, "alice")
        assert [i.uid for i in session.list_messages()] == [str(small)]
        assert f"message {big} ({len(big_body)} octets) is larger than the database " \
               "server's max_allowed_packet (1048576 octets)" in caplog.text
        assert "left out of the listing of alice" in caplog.text
        assert "[mysqld] max_allowed_packet" in caplog.text
        session.delete_messages([str(small)])
        session.connection_closed()
        # Through the server: STAT counts what can be sent, with its exact size.
        with running_server("mysql_multi", env.config(bcrypt_rounds=4)) as srv:
            env.add_message(b"Subject: new\r\n\r\nx\r\n", alice)
            pop = pop_login(srv, "alice", "pw")
            assert pop.stat() == (1, 19)
            assert pop.retr(1)[1] == [b"Subject: new", b"", b"x"]
            pop.quit()
    finally:
        packet_server.execute("SET GLOBAL max_allowed_packet = 134217728", database=None)
    assert env.ids() == [big, big + 1]


# --- TLS to the database --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_mariadb(tls_files: dict[str, str]) -> Iterator[MariaDBServer]:
    cert, key = tls_files["certificate"], tls_files["private_key"]
    with running_mariadb(extra_args=[f"--ssl-cert={cert}", f"--ssl-key={key}",
                                     f"--ssl-ca={cert}"]) as server:
        yield server


def test_tls_to_the_database(tls_mariadb: MariaDBServer, driver: str,
                             tls_files: dict[str, str], tmp_path: Any) -> None:
    cert = tls_files["certificate"]
    config = tls_mariadb.adapter_config(tcp=True, driver=driver, ssl=True, ssl_ca=cert)
    adapter = MultiUserMySQLAdapter(config)
    adapter.start()
    try:
        cipher = adapter.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'")[0][1]
        assert to_text(cipher), "the connection is not encrypted"
        lock_conn_session = adapter.new_session(PEER)
        lock_conn_session.login_succeeded(AuthResult("alice"), False)
        assert lock_conn_session.lock_conn is not None
        lock_conn_session.connection_closed()
    finally:
        adapter.close()
    # A certificate from another authority is refused: no silent plaintext fallback.
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=other", "-keyout", str(tmp_path / "other.key"),
                    "-out", str(other)], check=True, capture_output=True)
    wrong = MultiUserMySQLAdapter({**config, "ssl_ca": str(other)})
    try:
        with pytest.raises(TemporaryFailure):
            wrong.query("SELECT 1")
    finally:
        wrong.close()
    with pytest.raises(ConfigurationError, match="ssl = yes"):
        MultiUserMySQLAdapter({**config, "ssl": False})
    missing = MultiUserMySQLAdapter({**config, "ssl_ca": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigurationError, match="ssl_ca"):
        missing.check()
    with pytest.raises(ConfigurationError, match="ssl_ca"):
        missing.start()


def test_least_privilege_account_from_the_docs(env: Env) -> None:
    env.multi().close()  # tables created by an account that may
    alice = env.add_user("alice")
    ids = [env.add_message(f"Subject: {i}\n\nx\n", alice) for i in range(3)]
    db, user = env.database, f"ro_{env.driver.replace('-', '_')}"
    for stmt, args in [
            ("CREATE USER %s@'%%' IDENTIFIED BY 'ro-pw'", (user,)),
            (f"GRANT SELECT, DELETE ON `{db}`.pop3sf_multiuser_messages TO %s@'%%'", (user,)),
            (f"GRANT SELECT ON `{db}`.pop3sf_multiuser_users TO %s@'%%'", (user,))]:
        env.server.execute(stmt, args, database=None)
    adapter = env.multi(user=user, password="ro-pw", create_tables=False)
    session = login(adapter, "alice")
    infos = session.list_messages()
    assert read_all(session, infos[0].uid) == b"Subject: 0\n\nx\n"
    session.delete_messages([infos[0].uid])
    session.connection_closed()
    assert env.ids() == ids[1:]
