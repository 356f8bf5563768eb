"""``pop3sf-admin`` and the auxiliary library on MySQL sources, against a private MariaDB."""

from __future__ import annotations

import email.message
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mariadb import MariaDBServer, mariadb, running_mariadb  # noqa: F401  (fixture)
from pop3sf.adapters.base import AuthenticationFailed, AuthResult, Credentials, Peer
from pop3sf.adapters.mysql import MultiUserMySQLAdapter, MySQLAdapter
from pop3sf.auxiliary import (
    BadMessage,
    BadName,
    NotSupported,
    SourceError,
    UnknownUser,
    UserExists,
    open_source,
)
from pop3sf.auxiliary.admin import (
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOUSER,
    EX_UNAVAILABLE,
)
from pop3sf.auxiliary.mysql import (
    _PACKET_MARGIN,
    MultiUserMySQLSource,
    MySQLSource,
    SingleUserMySQLSource,
    statement_octets,
)

from pop3sf.passwords import hash_bcrypt
from pop3sf.wire import wire_bytes

ADMIN = [sys.executable, "-m", "pop3sf.auxiliary.admin"]
DRIVERS = ["pymysql", pytest.param("mysql-connector", marks=pytest.mark.skipif(
    importlib.util.find_spec("mysql.connector") is None,
    reason="mysql-connector-python not installed"))]
PEER = Peer("127.0.0.1", 1)


@pytest.fixture
def cfg(mariadb: MariaDBServer) -> dict[str, Any]:  # noqa: F811
    return mariadb.adapter_config(mariadb.new_database(), bcrypt_rounds=4)


def write_config(path: Path, adapter_type: str, adapter: dict[str, Any]) -> Path:
    lines = ["[listeners]", "  [[plain]]", "  addresses = 127.0.0.1:0,", "[adapter]",
             f"type = {adapter_type}"]
    lines += [f"{k} = {json.dumps(v) if isinstance(v, str) else v}" for k, v in adapter.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def conf(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    return write_config(tmp_path / "pop3sf.conf", "mysql_multi", cfg)


def admin(conf: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*ADMIN, "--config", str(conf), *args], input=stdin,
                          capture_output=True, timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def can_login(cfg: dict[str, Any], user: str, password: str) -> bool:
    adapter = MultiUserMySQLAdapter(cfg)
    try:
        adapter.new_session(PEER).authenticate(Credentials(user, password))
    except AuthenticationFailed:
        return False
    finally:
        adapter.close()
    return True


def served(adapter: Any, user: str, password: str) -> list[tuple[int, bytes]]:
    """(listed size, body) of every message, as the server would read them."""
    session = adapter.new_session(PEER)
    session.login_succeeded(session.authenticate(Credentials(user, password)), True)
    out = []
    for info in session.list_messages():
        with session.open_message(info.uid) as f:
            out.append((info.size, f.read()))
    session.connection_closed()
    return out


# --- the command ----------------------------------------------------------------------------


def test_user_add_passwd_list_del(conf: Path, cfg: dict[str, Any]) -> None:
    r = admin(conf, "user", "add", "alice", stdin=b"first pw\n")
    assert r.returncode == 0, r.stderr
    assert can_login(cfg, "alice", "first pw")
    assert admin(conf, "user", "add", "bob", stdin=b"x\n").returncode == 0
    assert admin(conf, "user", "list").stdout == "alice\nbob\n"
    r = admin(conf, "user", "passwd", "alice", stdin=b"second\n")
    assert r.returncode == 0, r.stderr
    assert can_login(cfg, "alice", "second") and not can_login(cfg, "alice", "first pw")
    r = admin(conf, "user", "del", "bob")
    assert r.returncode == 0, r.stderr
    assert admin(conf, "user", "list").stdout == "alice\n"
    assert not can_login(cfg, "bob", "x")


def test_user_errors(conf: Path, cfg: dict[str, Any]) -> None:
    assert admin(conf, "user", "add", "alice", stdin=b"pw\n").returncode == 0
    for name in ("alice", "ALICE"):  # the users table's collation ignores case
        r = admin(conf, "user", "add", name, stdin=b"other\n")
        assert r.returncode == EX_CANTCREAT and "already exists" in r.stderr, r.stderr
    assert can_login(cfg, "alice", "pw")
    r = admin(conf, "user", "add", "two words", stdin=b"pw\n")
    assert r.returncode == EX_DATAERR and "invalid user name" in r.stderr, r.stderr
    with open_source("mysql_multi", cfg) as source:
        for bad in ("", "x" * 65, "a:b", "tab\there", "nul\0", "\u200bzero-width"):
            with pytest.raises(BadName, match="invalid user name"):
                source.add_user(bad, "pw")
    r = admin(conf, "user", "add", "dave", stdin=b"\n")
    assert r.returncode == EX_DATAERR and "empty password" in r.stderr
    r = admin(conf, "user", "del", "nobody")
    assert r.returncode == EX_NOUSER and "unknown user 'nobody'" in r.stderr
    with open_source("mysql_multi", cfg) as source:
        for call in (lambda: source.set_password("nobody", "x"),
                     lambda: source.delete_user("nobody"),
                     lambda: source.list_messages("nobody"),
                     lambda: source.add_message("nobody", "text")):
            with pytest.raises(UnknownUser, match="unknown user 'nobody'"):
                call()
        assert source.list_users() == ["alice"]


def test_user_del_with_messages_needs_force(conf: Path, mariadb: MariaDBServer,  # noqa: F811
                                            cfg: dict[str, Any]) -> None:
    admin(conf, "user", "add", "alice", stdin=b"pw\n")
    admin(conf, "user", "add", "bob", stdin=b"pw\n")
    admin(conf, "message", "add", "alice", stdin=b"hello\n")
    admin(conf, "message", "add", "bob", stdin=b"bob's\n")
    r = admin(conf, "user", "del", "alice")
    assert r.returncode == EX_DATAERR and "nothing deleted" in r.stderr and "--force" in r.stderr
    assert admin(conf, "user", "list").stdout == "alice\nbob\n"
    r = admin(conf, "user", "del", "alice", "--force")
    assert r.returncode == 0 and "1 message(s)" in r.stderr, r.stderr
    rows = mariadb.execute("SELECT u.username FROM pop3sf_multiuser_messages m "
                           "JOIN pop3sf_multiuser_users u ON u.id = m.user_id",
                           database=cfg["database"])
    assert rows == (("bob",),)


def test_message_add_text_and_eml(conf: Path, cfg: dict[str, Any], tmp_path: Path) -> None:
    admin(conf, "user", "add", "alice", stdin=b"pw\n")
    r = admin(conf, "message", "add", "alice", stdin="Grüße, Welt\n".encode())
    assert r.returncode == 0, r.stderr
    text_id = r.stdout.strip()
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    r = admin(conf, "message", "add", "alice", "--text", str(latin1))
    assert r.returncode == 0, r.stderr
    eml = tmp_path / "m.eml"
    eml.write_bytes("Subject: Zpráva\nFrom: a@example.com\n\nbody\n".encode())
    r = admin(conf, "message", "add", "alice", "--eml", str(eml))
    assert r.returncode == 0, r.stderr
    eml_id = r.stdout.strip()

    r = admin(conf, "message", "list", "alice")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == [text_id, str(int(text_id) + 1), eml_id]
    assert rows[0][3] == f"Plaintext database entry {text_id}"
    assert rows[2][3] == "Zpráva"

    adapter = MultiUserMySQLAdapter(cfg)
    try:
        messages = served(adapter, "alice", "pw")
    finally:
        adapter.close()
    assert len(messages) == 3
    for size, body in messages:
        assert size == len(wire_bytes(body))
    assert messages[0][1].endswith("Grüße, Welt\r\n".encode())
    assert messages[1][1].endswith("café\r\n".encode())
    assert messages[2][1] == eml.read_bytes()
    # `message list` shows the sizes the server sends (wrapped text, CRLF), not stored ones.
    assert [int(row[1]) for row in rows] == [size for size, _ in messages]
    assert int(rows[2][1]) == eml.stat().st_size + eml.read_bytes().count(b"\n")


def test_message_add_errors(conf: Path, tmp_path: Path) -> None:
    admin(conf, "user", "add", "alice", stdin=b"pw\n")
    not_mail = tmp_path / "notes.eml"
    not_mail.write_text("just some words\nno header\n")
    r = admin(conf, "message", "add", "alice", "--eml", str(not_mail))
    assert r.returncode == EX_DATAERR and "header" in r.stderr
    r = admin(conf, "message", "add", "alice", stdin=b"  \n")
    assert r.returncode == EX_DATAERR and "empty" in r.stderr
    binary = tmp_path / "latin1.eml"
    binary.write_bytes(b"Subject: x\n\ncaf\xe9\n")  # not UTF-8: a TEXT column refuses it
    r = admin(conf, "message", "add", "alice", "--eml", str(binary))
    assert r.returncode == EX_DATAERR and "not valid UTF-8" in r.stderr, r.stderr
    assert admin(conf, "message", "list", "alice").stdout == ""


def test_single_user_source(tmp_path: Path, mariadb: MariaDBServer) -> None:  # noqa: F811
    cfg = mariadb.adapter_config(mariadb.new_database(), username="reports",
                                 password_hash=hash_bcrypt(b"pw", rounds=4))
    conf = write_config(tmp_path / "single.conf", "mysql", cfg)
    r = admin(conf, "message", "add", "reports", stdin=b"daily report\n")
    assert r.returncode == 0, r.stderr
    assert admin(conf, "user", "list").stdout == "reports\n"
    r = admin(conf, "message", "add", "someone", stdin=b"x\n")
    assert r.returncode == EX_NOUSER
    r = admin(conf, "user", "add", "x", stdin=b"pw\n")
    assert r.returncode == EX_UNAVAILABLE and "pop3sf-admin hash" in r.stderr
    r = admin(conf, "user", "passwd", "reports", stdin=b"pw\n")
    assert r.returncode == EX_UNAVAILABLE
    adapter = MySQLAdapter(cfg)
    try:
        ((size, body),) = served(adapter, "reports", "pw")
    finally:
        adapter.close()
    assert body.endswith(b"\r\n\r\ndaily report\r\n") and size == len(body)
    r = admin(conf, "message", "list", "reports")
    assert r.returncode == 0 and r.stdout.split("\t")[1] == str(size), r.stderr


def test_database_unreachable(tmp_path: Path, mariadb: MariaDBServer) -> None:  # noqa: F811
    cfg = mariadb.adapter_config(unix_socket=str(tmp_path / "no.sock"), bcrypt_rounds=4)
    conf = write_config(tmp_path / "down.conf", "mysql_multi", cfg)
    r = admin(conf, "user", "list")
    assert r.returncode == 1 and "cannot connect to the database" in r.stderr, r.stderr
    bad = write_config(tmp_path / "bad.conf", "mysql_multi", {**cfg, "users_table": "a b"})
    r = admin(bad, "user", "list")
    assert r.returncode != 0 and "users_table" in r.stderr


# --- the library ----------------------------------------------------------------------------


def test_library_all_message_kinds(cfg: dict[str, Any], mariadb: MariaDBServer) -> None:  # noqa: F811
    with open_source("mysql_multi", cfg) as source:
        assert isinstance(source, MultiUserMySQLSource) and source.has_users
        source.add_user("alice", "pw")
        source.add_user("bob", "pw")
        msg = email.message.EmailMessage()
        msg["Subject"] = "Přehled"
        msg["From"] = "app@example.com"
        msg.set_content("Tělo zprávy\n")
        ids = [source.add_message("alice", msg),
               source.add_message("alice", b"Subject: raw\r\n\r\nraw\r\n"),
               source.add_message("alice", "plain text, žluťoučký\n")]
        source.add_message("bob", "not alice's")
        listed = source.list_messages("alice")
        assert [m.id for m in listed] == ids
        assert listed[0].subject == "Přehled"
        assert listed[1].size == len(b"Subject: raw\r\n\r\nraw\r\n")
        plain = mariadb.execute("SELECT is_plaintext FROM pop3sf_multiuser_messages ORDER BY id",
                                database=cfg["database"])
        assert [r[0] for r in plain] == [0, 0, 1, 1]
        with pytest.raises(BadMessage):
            source.add_message("alice", b"")
        with pytest.raises(BadMessage):
            source.add_message("alice", "   ")
        with pytest.raises(UnknownUser):
            source.add_message("carol", "x")
        with pytest.raises(BadName):
            source.add_message(None, "x")
        with pytest.raises(UserExists):
            source.add_user("Alice", "again")
        with pytest.raises(SourceError):
            source.add_user("eve", "")
        assert source.list_users() == ["alice", "bob"]
        source.delete_user("bob")
        assert source.list_users() == ["alice"]
    adapter = MultiUserMySQLAdapter(cfg)
    try:
        session = adapter.new_session(PEER)
        assert session.authenticate(Credentials("alice", "pw")) == AuthResult("alice")
        messages = served(adapter, "alice", "pw")
    finally:
        adapter.close()
    assert len(messages) == 3
    assert all(size == len(wire_bytes(body)) for size, body in messages)
    assert messages[1][1] == b"Subject: raw\r\n\r\nraw\r\n"


def test_library_blob_column_takes_any_bytes(mariadb: MariaDBServer) -> None:  # noqa: F811
    cfg = mariadb.adapter_config(mariadb.new_database(), bcrypt_rounds=4,
                                 message_column_type="LONGBLOB")
    raw = b"Subject: caf\xe9\n\nbody \xff\xfe\n"
    with open_source("mysql_multi", cfg) as source:
        source.add_user("alice", "pw")
        source.add_message("alice", raw)
    adapter = MultiUserMySQLAdapter(cfg)
    try:
        ((size, body),) = served(adapter, "alice", "pw")
    finally:
        adapter.close()
    assert body == raw and size == len(wire_bytes(raw))


def test_open_source_picks_single_or_multi(mariadb: MariaDBServer) -> None:  # noqa: F811
    single_cfg = mariadb.adapter_config(mariadb.new_database(), username="u",
                                        password_hash=hash_bcrypt(b"p", rounds=4))
    single = open_source("mysql", single_cfg)
    assert isinstance(single, SingleUserMySQLSource) and not single.has_users
    with pytest.raises(NotSupported):
        single.delete_user("u")
    single.close()
    multi = MySQLSource(mariadb.adapter_config(mariadb.new_database()))
    assert isinstance(multi, MultiUserMySQLSource)
    multi.close()


def test_admin_account_grants_from_the_docs(mariadb: MariaDBServer) -> None:  # noqa: F811
    db = mariadb.new_database()
    owner = mariadb.adapter_config(db, bcrypt_rounds=4)
    MultiUserMySQLAdapter(owner).ensure_schema()
    for stmt in [
            "CREATE USER 'adm'@'%' IDENTIFIED BY 'adm-pw'",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{db}`.pop3sf_multiuser_users TO 'adm'@'%'",
            f"GRANT SELECT, INSERT, DELETE ON `{db}`.pop3sf_multiuser_messages TO 'adm'@'%'"]:
        mariadb.execute(stmt, database=None)
    cfg = {**owner, "user": "adm", "password": "adm-pw", "create_tables": False}
    with open_source("mysql_multi", cfg) as source:
        source.add_user("alice", "pw")
        source.set_password("alice", "pw2")
        source.add_message("alice", "hello")
        assert [m.subject for m in source.list_messages("alice")] == \
            [f"Plaintext database entry {source.list_messages('alice')[0].id}"]
        source.delete_user("alice")
        assert source.list_users() == []


# --- the database's max_allowed_packet --------------------------------------------------------


@pytest.fixture(scope="module")
def small_packet() -> Iterator[MariaDBServer]:
    """A server of this module's own whose max_allowed_packet is 1 MiB (set at run time)."""
    with running_mariadb() as server:
        server.execute("SET GLOBAL max_allowed_packet = 1048576", database=None)
        yield server


@pytest.mark.parametrize("driver", DRIVERS)
def test_message_over_max_allowed_packet_names_the_setting(
        small_packet: MariaDBServer, tmp_path: Path, driver: str) -> None:
    cfg = small_packet.adapter_config(small_packet.new_database(), bcrypt_rounds=4,
                                      driver=driver)
    conf = write_config(tmp_path / "pop3sf.conf", "mysql_multi", cfg)
    assert admin(conf, "user", "add", "alice", stdin=b"pw\n").returncode == 0
    for text in (b"x" * 2_000_000, b"line\n" * 180_000):  # the second only once escaped
        r = admin(conf, "message", "add", "alice", stdin=text)
        assert r.returncode == EX_DATAERR, r.stderr
        assert "max_allowed_packet is 1048576 octets" in r.stderr, r.stderr
        assert "[mysqld] max_allowed_packet = 2M" in r.stderr
        assert "Lost connection" not in r.stderr and "gone away" not in r.stderr
    # Right up to the limit (less the safety margin) a message is stored, and served whole.
    table = "`pop3sf_multiuser_messages`"
    sql = f"INSERT INTO {table} (message, is_plaintext, user_id) VALUES (%s, %s, %s)"
    fits = 1048576 - _PACKET_MARGIN - statement_octets(sql, (b"", True, 1))
    assert statement_octets(sql, (b"x" * fits, True, 1)) + _PACKET_MARGIN == 1048576
    for size, status in ((fits + 1, EX_DATAERR), (fits, 0)):
        r = admin(conf, "message", "add", "alice", stdin=b"x" * size)
        assert r.returncode == status, (size, r.stderr)
    r = admin(conf, "message", "list", "alice")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stderr
    adapter = MultiUserMySQLAdapter(cfg)
    try:
        ((size, body),) = served(adapter, "alice", "pw")
    finally:
        adapter.close()
    assert body.split(b"\r\n\r\n", 1)[1].count(b"x") == fits and size == len(wire_bytes(body))
    assert int(r.stdout.split("\t")[1]) == size


def test_user_del_counts_rows_the_server_cannot_read(small_packet: MariaDBServer,
                                                     tmp_path: Path) -> None:
    """A row over max_allowed_packet (stored while the limit was higher) is left out of
    listings, but deleting its user still needs --force."""
    cfg = small_packet.adapter_config(small_packet.new_database(), bcrypt_rounds=4,
                                      message_column_type="LONGTEXT")
    conf = write_config(tmp_path / "pop3sf.conf", "mysql_multi", cfg)
    assert admin(conf, "user", "add", "alice", stdin=b"pw\n").returncode == 0
    small_packet.execute("SET GLOBAL max_allowed_packet = 8388608", database=None)
    try:
        small_packet.execute(
            "INSERT INTO pop3sf_multiuser_messages (user_id, message, is_plaintext) "
            "SELECT id, %s, 0 FROM pop3sf_multiuser_users",
            (b"Subject: big\n\n" + b"z" * 2_000_000,),
            database=cfg["database"])
    finally:
        small_packet.execute("SET GLOBAL max_allowed_packet = 1048576", database=None)
    r = admin(conf, "message", "list", "alice")
    assert r.returncode == 0 and r.stdout == ""
    assert "larger than the database server's max_allowed_packet (1048576 octets)" in r.stderr
    r = admin(conf, "user", "del", "alice")
    assert r.returncode == EX_DATAERR and "1 message(s); nothing deleted" in r.stderr
    assert admin(conf, "user", "list").stdout == "alice\n"
