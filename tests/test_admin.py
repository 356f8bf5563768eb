"""``pop3sf-admin`` run as a real command, and the auxiliary library it is built on."""

from __future__ import annotations

import email.message
import fcntl
import os
import pty
import pwd
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pop3sf.adapters import registered
from pop3sf.adapters.base import AuthenticationFailed, AuthResult, Credentials, Peer
from pop3sf.adapters.directory import PASSWORD_FILE, DirectoryAdapter, MultiUserDirectoryAdapter
from pop3sf.auxiliary import (
    GROUP,
    BadMessage,
    BadName,
    NotSupported,
    SourceError,
    UnknownUser,
    UserExists,
    open_source,
)
from pop3sf.auxiliary.admin import (
    EPILOG,
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_UNAVAILABLE,
    EX_USAGE,
)

from pop3sf.passwords import hash_bcrypt, verify
from pop3sf.wire import wire_bytes

ADMIN = [sys.executable, "-m", "pop3sf.auxiliary.admin"]
IS_ROOT = os.geteuid() == 0


def write_config(path: Path, adapter: dict[str, str], server_user: str = "") -> Path:
    lines = ["[listeners]", "  [[plain]]", "  addresses = 127.0.0.1:0,"]
    if server_user:
        lines[:0] = ["[server]", f"user = {server_user}"]
    lines.append("[adapter]")
    lines += [f"{k} = {v}" for k, v in adapter.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "mail"
    r.mkdir()
    return r


@pytest.fixture
def conf(tmp_path: Path, root: Path) -> Path:
    return write_config(tmp_path / "pop3sf.conf",
                        {"type": "directory_multi", "root": str(root), "bcrypt_rounds": "4"})


def admin(conf: Path, *args: str, stdin: bytes = b"",
          as_user: str | None = None) -> subprocess.CompletedProcess[str]:
    preexec = None
    if as_user is not None:
        entry = pwd.getpwnam(as_user)

        def preexec() -> None:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)

    proc = subprocess.run([*ADMIN, "--config", str(conf), *args], input=stdin,
                          capture_output=True, timeout=60, preexec_fn=preexec)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def can_login(root: Path, user: str, password: str) -> bool:
    adapter = MultiUserDirectoryAdapter({"root": str(root), "bcrypt_rounds": 4})
    try:
        adapter.new_session(Peer("127.0.0.1", 1)).authenticate(Credentials(user, password))
    except AuthenticationFailed:
        return False
    return True


# --- users ----------------------------------------------------------------------------------


def test_user_add_passwd_list_del(conf: Path, root: Path) -> None:
    r = admin(conf, "user", "add", "alice", stdin=b"first pw\n")
    assert r.returncode == 0, r.stderr
    assert "added user alice" in r.stderr
    assert can_login(root, "alice", "first pw")
    assert not can_login(root, "alice", "first pw\n")
    mode = stat.S_IMODE(os.stat(root / "alice" / PASSWORD_FILE).st_mode)
    assert mode == 0o640
    assert stat.S_IMODE(os.stat(root / "alice").st_mode) == 0o750
    assert admin(conf, "user", "add", "bob", stdin=b"x\r\n").returncode == 0
    assert can_login(root, "bob", "x")

    r = admin(conf, "user", "list")
    assert (r.returncode, r.stdout) == (0, "alice\nbob\n")

    r = admin(conf, "user", "passwd", "alice", stdin=b"second\n")
    assert r.returncode == 0, r.stderr
    assert can_login(root, "alice", "second") and not can_login(root, "alice", "first pw")

    r = admin(conf, "user", "del", "bob")
    assert r.returncode == 0, r.stderr
    assert not (root / "bob").exists()
    assert admin(conf, "user", "list").stdout == "alice\n"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no leftovers


def test_password_normalised_nfc(conf: Path, root: Path) -> None:
    nfd = "Bre\u0301sil".encode()  # é as e + combining acute
    assert admin(conf, "user", "add", "carol", stdin=nfd + b"\n").returncode == 0
    assert can_login(root, "carol", "Brésil")  # the NFC form the server passes on


def test_user_errors(conf: Path, root: Path) -> None:
    assert admin(conf, "user", "add", "alice", stdin=b"pw\n").returncode == 0
    r = admin(conf, "user", "add", "alice", stdin=b"other\n")
    assert r.returncode == EX_CANTCREAT and "already exists" in r.stderr
    assert can_login(root, "alice", "pw")  # unchanged
    for bad in ("../evil", "a/b", "", "x" * 65, ".hidden", "ünï"):
        r = admin(conf, "user", "add", bad, stdin=b"pw\n")
        assert r.returncode == EX_DATAERR, (bad, r.stderr)
        assert "invalid user name" in r.stderr
    assert sorted(p.name for p in root.parent.iterdir()) == ["mail", "pop3sf.conf"]
    r = admin(conf, "user", "add", "dave", stdin=b"\n")
    assert r.returncode == EX_DATAERR and "empty password" in r.stderr
    assert not (root / "dave").exists()
    r = admin(conf, "user", "add", "dave", stdin=b"\xff\xfe\n")
    assert r.returncode == EX_DATAERR and "not UTF-8" in r.stderr
    for args in (("user", "passwd", "nobody"), ("user", "del", "nobody"),
                 ("message", "list", "nobody"), ("message", "add", "nobody")):
        r = admin(conf, *args, stdin=b"text\n")
        assert r.returncode == EX_NOUSER, (args, r.stderr)
        assert "unknown user 'nobody'" in r.stderr
    r = admin(conf, "user", "passwd", "../alice", stdin=b"pw\n")
    assert r.returncode == EX_DATAERR


def test_user_del_with_messages_needs_force(conf: Path, root: Path) -> None:
    admin(conf, "user", "add", "alice", stdin=b"pw\n")
    admin(conf, "message", "add", "alice", stdin=b"hello\n")
    r = admin(conf, "user", "del", "alice")
    assert r.returncode == EX_DATAERR
    assert "still has 1 message(s); nothing deleted" in r.stderr and "add --force" in r.stderr
    assert (root / "alice").is_dir() and len(list((root / "alice").glob("*.txt"))) == 1
    r = admin(conf, "user", "del", "alice", "--force")
    assert r.returncode == 0 and "1 message(s)" in r.stderr
    assert list(root.iterdir()) == []


def test_user_del_counts_messages_the_server_does_not_list(conf: Path, root: Path) -> None:
    """A file a writer still holds locked is not listed yet, but it is mail all the same."""
    admin(conf, "user", "add", "alice", stdin=b"pw\n")
    with open(root / "alice" / "incoming.eml", "wb") as f:
        f.write(b"Subject: still being written\n\n")
        fcntl.flock(f, fcntl.LOCK_EX)
        assert admin(conf, "message", "list", "alice").stdout == ""  # not served yet
        r = admin(conf, "user", "del", "alice")
        assert r.returncode == EX_DATAERR and "1 message(s); nothing deleted" in r.stderr
    assert (root / "alice" / "incoming.eml").exists()


def _pty_run(argv: list[str], answers: list[bytes]) -> tuple[int, bytes]:
    """Run argv on a new terminal, answering each password prompt in turn."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        os.execv(argv[0], argv)
    output = b""
    deadline = time.monotonic() + 30
    answered = 0
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
            if answered < len(answers) and output.count(b"assword: ") > answered:
                os.write(fd, answers[answered] + b"\n")
                answered += 1
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output


def test_password_asked_twice_on_a_terminal(conf: Path, root: Path) -> None:
    code, out = _pty_run([*ADMIN, "--config", str(conf), "user", "add", "tty"],
                         [b"tty pw", b"tty pw"])
    assert code == 0, out
    assert out.count(b"assword:") == 2 and b"tty pw" not in out  # not echoed
    assert can_login(root, "tty", "tty pw")
    code, out = _pty_run([*ADMIN, "--config", str(conf), "user", "passwd", "tty"],
                         [b"new one", b"typo"])
    assert code == EX_DATAERR and b"passwords differ" in out
    assert can_login(root, "tty", "tty pw")


# --- messages -------------------------------------------------------------------------------


def test_message_add_text_and_eml(conf: Path, root: Path, tmp_path: Path) -> None:
    admin(conf, "user", "add", "alice", stdin=b"pw\n")
    r = admin(conf, "message", "add", "alice", stdin="Grüße, Welt\n".encode())
    assert r.returncode == 0, r.stderr
    text_name = r.stdout.strip()
    assert text_name.endswith(".txt")
    assert (root / "alice" / text_name).read_bytes() == "Grüße, Welt\n".encode()
    assert stat.S_IMODE(os.stat(root / "alice" / text_name).st_mode) == 0o640

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9\n")
    r = admin(conf, "message", "add", "alice", "--text", str(latin1))
    assert r.returncode == 0, r.stderr
    assert (root / "alice" / r.stdout.strip()).read_text() == "café\n"

    eml = tmp_path / "m.eml"
    eml.write_bytes("Subject: Zpráva\nFrom: a@example.com\n\nbody\n".encode())
    r = admin(conf, "message", "add", "alice", "--eml", str(eml))
    assert r.returncode == 0, r.stderr
    eml_name = r.stdout.strip()
    assert (root / "alice" / eml_name).read_bytes() == eml.read_bytes()

    r = admin(conf, "message", "list", "alice")
    assert r.returncode == 0
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == [text_name, rows[1][0], eml_name]  # oldest first
    assert rows[2][3] == "Zpráva"
    hidden = [p.name for p in (root / "alice").iterdir() if p.name.startswith(".")]
    assert hidden == [PASSWORD_FILE]  # no temporary files left behind

    # What the tool wrote is what the server serves.
    adapter = MultiUserDirectoryAdapter({"root": str(root), "bcrypt_rounds": 4})
    s = adapter.new_session(Peer("127.0.0.1", 1))
    s.login_succeeded(s.authenticate(Credentials("alice", "pw")), False)
    listing = s.list_messages()
    assert len(listing) == 3
    for m in listing:
        with s.open_message(m.uid) as f:
            assert m.size == len(wire_bytes(f.read()))
    # `message list` shows the sizes the server sends, not the sizes of the files.
    assert [int(row[1]) for row in rows] == [m.size for m in listing]
    stored = [(root / "alice" / row[0]).stat().st_size for row in rows]
    assert all(int(row[1]) > size for row, size in zip(rows, stored, strict=True))


def test_message_list_sizes_single_user_source(tmp_path: Path) -> None:
    """The single-user source too, with the settings that change a wrapped .txt message."""
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "a.txt").write_bytes("Grüße\nzweite Zeile\n".encode())
    (folder / "b.eml").write_bytes(b"Subject: lf only\n\nline\n.dot\n")
    adapter_conf = {"type": "directory", "directory": str(folder), "username": "reports",
                    "password_hash": hash_bcrypt(b"pw", rounds=4), "uid_root": "/old/place",
                    "from_address": "reports of %u <r@example.org>"}
    conf = write_config(tmp_path / "pop3sf.conf", adapter_conf)
    r = admin(conf, "message", "list", "reports")
    assert r.returncode == 0, r.stderr
    listed = {row.split("\t")[0]: int(row.split("\t")[1]) for row in r.stdout.splitlines()}
    adapter = DirectoryAdapter({k: v for k, v in adapter_conf.items() if k != "type"})
    s = adapter.new_session(Peer("127.0.0.1", 1))
    s.login_succeeded(s.authenticate(Credentials("reports", "pw")), True)
    served = {}
    for m in s.list_messages():
        with s.open_message(m.uid) as f:
            data = wire_bytes(f.read())
        assert len(data) == m.size
        served[s.name_of(m.uid)] = len(data)
    assert listed == served
    raw = (folder / "b.eml").read_bytes()
    assert listed["b.eml"] == len(raw) + raw.count(b"\n")  # served with CRLF line ends
    assert listed["a.txt"] > 200  # wrapped into a message


def test_message_add_errors(conf: Path, root: Path, tmp_path: Path) -> None:
    admin(conf, "user", "add", "alice", stdin=b"pw\n")
    r = admin(conf, "message", "add", "alice", "--eml", str(tmp_path / "missing.eml"))
    assert r.returncode == EX_NOINPUT and "cannot read" in r.stderr
    r = admin(conf, "message", "add", "alice", "--eml", str(tmp_path))  # a directory
    assert r.returncode == EX_NOINPUT
    not_mail = tmp_path / "notes.eml"
    not_mail.write_text("just some words\nno header\n")
    r = admin(conf, "message", "add", "alice", "--eml", str(not_mail))
    assert r.returncode == EX_DATAERR and "header" in r.stderr
    r = admin(conf, "message", "add", "alice", stdin=b"  \n")
    assert r.returncode == EX_DATAERR and "empty" in r.stderr
    r = admin(conf, "message", "add", "alice", "--eml", "-", stdin=b"")
    assert r.returncode == EX_DATAERR
    r = admin(conf, "message", "add", "../alice", stdin=b"x\n")
    assert r.returncode == EX_DATAERR
    assert sorted(p.name for p in (root / "alice").iterdir()) == [PASSWORD_FILE]


# --- configuration and permissions ------------------------------------------------------------


def test_bad_configuration(tmp_path: Path, root: Path) -> None:
    r = admin(tmp_path / "missing.conf", "user", "list")
    assert r.returncode == EX_CONFIG and "does not exist" in r.stderr
    broken = tmp_path / "broken.conf"
    broken.write_text("[adapter\ntype = directory_multi\n")
    r = admin(broken, "user", "list")
    assert r.returncode == EX_CONFIG and "bad configuration" in r.stderr
    no_root = write_config(tmp_path / "noroot.conf", {"type": "directory_multi"})
    r = admin(no_root, "user", "list")
    assert r.returncode == EX_CONFIG and "root" in r.stderr
    unknown = write_config(tmp_path / "unknown.conf", {"type": "list"})
    r = admin(unknown, "user", "list")
    assert r.returncode == 1 and "no tool support" in r.stderr
    gone = write_config(tmp_path / "gone.conf",
                        {"type": "directory_multi", "root": str(tmp_path / "nope")})
    r = admin(gone, "user", "list")
    assert r.returncode == 1 and "does not exist" in r.stderr


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the tool as another user")
def test_no_permission() -> None:
    base = Path(tempfile.mkdtemp(prefix="pop3sf-admin-"))
    try:
        base.chmod(0o755)
        root = base / "mail"
        root.mkdir(mode=0o755)
        conf = write_config(base / "pop3sf.conf", {"type": "directory_multi",
                                                   "root": str(root), "bcrypt_rounds": "4"})
        conf.chmod(0o644)
        r = admin(conf, "user", "add", "alice", stdin=b"pw\n", as_user="nobody")
        assert r.returncode == EX_NOPERM and "permission denied" in r.stderr, r.stderr
        assert list(root.iterdir()) == []
        conf.chmod(0o600)
        r = admin(conf, "user", "list", as_user="nobody")
        assert r.returncode == EX_NOPERM and "permission denied" in r.stderr
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_files_owned_by_service_user(tmp_path: Path, root: Path) -> None:
    conf = write_config(tmp_path / "owned.conf", {"type": "directory_multi", "root": str(root),
                                                  "bcrypt_rounds": "4"}, server_user="nobody")
    assert admin(conf, "user", "add", "alice", stdin=b"pw\n").returncode == 0
    name = admin(conf, "message", "add", "alice", stdin=b"hi\n").stdout.strip()
    nobody = pwd.getpwnam("nobody")
    for path in (root / "alice", root / "alice" / PASSWORD_FILE, root / "alice" / name):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path


# --- single-user source and hash ------------------------------------------------------------


def test_single_user_source(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    conf = write_config(tmp_path / "single.conf", {
        "type": "directory", "directory": str(inbox), "username": "reports",
        "password_hash": hash_bcrypt(b"pw", rounds=4)})
    r = admin(conf, "message", "add", "reports", stdin=b"daily report\n")
    assert r.returncode == 0, r.stderr
    assert (inbox / r.stdout.strip()).read_bytes() == b"daily report\n"
    assert admin(conf, "user", "list").stdout == "reports\n"
    r = admin(conf, "message", "add", "someone", stdin=b"x\n")
    assert r.returncode == EX_NOUSER
    r = admin(conf, "user", "add", "x", stdin=b"pw\n")
    assert r.returncode == EX_UNAVAILABLE and "pop3sf-admin hash" in r.stderr
    r = admin(conf, "user", "passwd", "reports", stdin=b"pw\n")
    assert r.returncode == EX_UNAVAILABLE


def test_hash_command(tmp_path: Path) -> None:
    r = admin(tmp_path / "unused.conf", "hash", "--rounds", "4", stdin=b"s3cret\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("$2b$04$") and verify(r.stdout.strip(), b"s3cret")


def test_usage_errors_exit_64_as_documented(conf: Path) -> None:
    for args in ((), ("user", "frobnicate"), ("user", "add"), ("--bogus", "user", "list"),
                 ("hash", "--rounds", "3"), ("message", "add", "a", "--eml", "x", "--text", "y")):
        r = admin(conf, *args)
        assert r.returncode == EX_USAGE == 64, (args, r.returncode, r.stderr)
        assert "usage: pop3sf-admin" in r.stderr and "error:" in r.stderr
    r = admin(conf, "--help")
    assert r.returncode == 0 and "exit status" in r.stdout and "64 usage" in r.stdout


def test_exit_statuses_and_sources_in_the_man_page() -> None:
    """--help's exit status list, the constants and the man page say the same."""
    page = (Path(__file__).parent.parent / "man" / "pop3sf-admin.8").read_text()
    section = page.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    in_page = {int(n) for n in re.findall(r"^\.B (\d+)$", section, re.M)}
    in_help = {int(n) for n in re.findall(r"(\d+) [A-Za-z]", EPILOG)}
    assert in_page == in_help == {0, 1, 64, 65, 66, 67, 69, 70, 73, 74, 75, 77, 78}
    assert "user del" in section.split(".B 65", 1)[1].split(".TP", 1)[0]
    described = page.split(".SH DESCRIPTION", 1)[1].split(".SH ", 1)[0]
    for source in registered(GROUP):
        assert re.search(rf"\b{source}\b", described), source


# --- the library ------------------------------------------------------------------------------


def test_library_all_message_kinds(root: Path) -> None:
    with open_source("directory_multi", {"root": str(root), "bcrypt_rounds": 4}) as source:
        source.add_user("alice", "pw")
        msg = email.message.EmailMessage()
        msg["Subject"] = "Přehled"
        msg["From"] = "app@example.com"
        msg.set_content("Tělo zprávy\n")
        ids = [source.add_message("alice", msg),
               source.add_message("alice", b"Subject: raw\r\n\r\nraw\r\n"),
               source.add_message("alice", "plain text, žluťoučký\n")]
        assert [i.rsplit(".", 1)[1] for i in ids] == ["eml", "eml", "txt"]
        assert [m.id for m in source.list_messages("alice")] == ids
        assert source.list_messages("alice")[0].subject == "Přehled"
        with pytest.raises(BadMessage):
            source.add_message("alice", b"")
        with pytest.raises(BadMessage):
            source.add_message("alice", "   ")
        with pytest.raises(UnknownUser):
            source.add_message("bob", "x")
        with pytest.raises(BadName):
            source.add_message(None, "x")
        with pytest.raises(UserExists):
            source.add_user("alice", "again")
        with pytest.raises(SourceError):
            source.add_user("eve", "")
    adapter = MultiUserDirectoryAdapter({"root": str(root), "bcrypt_rounds": 4})
    s = adapter.new_session(Peer("127.0.0.1", 1))
    login = s.authenticate(Credentials("alice", "pw"))
    assert login == AuthResult("alice")
    s.login_succeeded(login, False)  # the very result, as the server hands it back
    listing = s.list_messages()
    assert len(listing) == 3
    for m in listing:
        with s.open_message(m.uid) as f:
            assert m.size == len(wire_bytes(f.read()))


def test_library_adopts_directory_without_password(root: Path) -> None:
    (root / "legacy").mkdir()
    (root / "legacy" / "old.eml").write_bytes(b"Subject: old\n\n")
    source = open_source("directory_multi", {"root": str(root), "bcrypt_rounds": 4})
    assert source.list_users() == []
    source.add_user("legacy", "pw")
    assert source.list_users() == ["legacy"]
    assert (root / "legacy" / "old.eml").exists()


def test_open_source_registry(root: Path) -> None:
    with pytest.raises(SourceError, match="no tool support"):
        open_source("list", {})
    single = open_source("directory", {"directory": str(root), "username": "u",
                                       "password_hash": hash_bcrypt(b"p", rounds=4)})
    assert not single.has_users
    with pytest.raises(NotSupported):
        single.delete_user("u")
