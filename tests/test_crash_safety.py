"""Nothing is lost (docs/architecture.md §2, docs/protocol.md §11): SIGKILL at random moments
under a fetch-and-delete load, and failures of the storage underneath (read-only, full, files
removed, the database stopped and started).

The crash test runs the real ``pop3sf`` command on a multi-user directory source, kills it with
SIGKILL at random moments while clients fetch and delete, restarts it, and checks afterwards:
every message whose deleting QUIT was answered +OK is gone; a message is gone only if a QUIT was
sent in a session that marked it; every file still there is whole (byte-identical); nothing else
is missing.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Raw
from mariadb import MariaDBServer, mariadb  # noqa: F401  (the session-scoped fixture)

from pop3sf import passwords

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CliServer:
    """The real ``pop3sf`` command in the foreground, logging to stderr (kept for inspection)."""

    def __init__(self, base: Path, adapter: str, *, tls: dict[str, str] | None = None,
                 extra: str = "", level: str = "info", env: dict[str, str] | None = None
                 ) -> None:
        self.base = base
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.config = base / "pop3sf.conf"
        listeners = f"    [[pop3]]\n    addresses = 127.0.0.1:{self.port}\n"
        if tls:
            listeners += (f"    [[pop3s]]\n    addresses = 127.0.0.1:{self.tls_port}\n"
                          "    tls = yes\n")
        tls_section = "".join(f"{k} = {v}\n" for k, v in (tls or {}).items())
        self.config.write_text(
            textwrap.dedent(f"""\
                [server]
                user = root
                shutdown_grace = 3
                [logging]
                target = stderr
                level = {level}
                [listeners]
                """) + listeners + "[tls]\n" + tls_section + extra + "[adapter]\n" +
            textwrap.dedent(adapter))
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                                 "INVOCATION_ID", "JOURNAL_STREAM", "WATCHDOG_USEC")}
        self.env.update(env or {})
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 20) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pop3sf", "--config",
                                      str(self.config)], stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=str(self.base))
        proc, log = self.proc, self.log
        mark = len(log)

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                log.append(line)

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not any(" started (" in line for line in log[mark:]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("pop3sf did not start:\n" + "".join(log[mark:]))
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        # The server's own leak check as it stopped (Server.leaks): nothing a session held
        # may be left over, whatever path the sessions took.
        assert "resources not given back" not in self.text(), self.text()[-3000:]
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait()

    def text(self) -> str:
        return "".join(self.log)


# -- crash safety ------------------------------------------------------------------------------

USERS = 4
PER_USER = 500


@dataclass
class SessionRecord:
    user: str
    marked: set[str] = field(default_factory=set)   # uids marked with DELE (+OK answered)
    quit_sent: bool = False
    quit_ok: bool = False


def message(u: int, i: int) -> bytes:
    return f"Subject: message {u}/{i}\r\nX-Id: {u}-{i}\r\n\r\n".encode() + \
        (b"line of message %d/%d\r\n" % (u, i)) * random.randint(1, 400)


def xid(data: bytes) -> str:
    return data.split(b"X-Id: ", 1)[1].split(b"\r\n", 1)[0].decode()


def make_directory_source(root: Path) -> tuple[str, dict[str, dict[str, bytes]]]:
    """Users u0..u3, PER_USER .eml files each: (adapter config, user -> X-Id -> bytes)."""
    stored = passwords.hash_bcrypt(b"pw", rounds=4)
    boxes: dict[str, dict[str, bytes]] = {}
    for u in range(USERS):
        user = root / f"u{u}"
        user.mkdir()
        (user / ".pop3sf_password_bcrypt").write_text(stored)
        boxes[f"u{u}"] = {}
        for i in range(PER_USER):
            path = user / f"{i:04d}.eml"
            path.write_bytes(data := message(u, i))
            os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i))
            boxes[f"u{u}"][xid(data)] = data
    return f"type = directory_multi\nroot = {root}\nbcrypt_rounds = 4\n", boxes


def make_maildir_source(root: Path) -> tuple[str, dict[str, dict[str, bytes]]]:
    """The same users and messages as Dovecot-style Maildirs behind a passwd-file; half the
    messages in new/, half already seen in cur/ (flags in the name)."""
    lines = []
    boxes: dict[str, dict[str, bytes]] = {}
    for u in range(USERS):
        maildir = root / f"u{u}" / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(parents=True)
        lines.append(f"u{u}:{{PLAIN}}pw:::::")
        boxes[f"u{u}"] = {}
        for i in range(PER_USER):
            name = f"{1_600_000_000 + i}.M{i}P{u}.crash"
            path = maildir / ("new" / Path(name) if i % 2 else "cur" / Path(name + ":2,S"))
            path.write_bytes(data := message(u, i))
            boxes[f"u{u}"][xid(data)] = data
    (root / "passwd").write_text("\n".join(lines) + "\n")
    return (f"type = maildir\npasswd_file = {root / 'passwd'}\nroot = {root}\n"
            f"mail_location = {root}/%u/Maildir\nuidl_format = basename\n"), boxes


#: The cross-process account locks (adapters/accountlock.py): empty, kept on purpose.
LOCK_FILES = (".pop3sf.lock", "pop3sf.lock")


def stored_messages(root: Path, user: str) -> tuple[dict[str, bytes], list[Path]]:
    """What the source holds now: X-Id -> bytes of every message file, and any other file."""
    found: dict[str, bytes] = {}
    other: list[Path] = []
    for path in sorted((root / user).rglob("*")):
        if path.is_dir() or path.name in (".pop3sf_password_bcrypt", *LOCK_FILES) or \
                path.name.startswith("dovecot"):
            continue
        is_message = path.suffix == ".eml" or path.parent.name in ("new", "cur")
        if is_message and not path.name.startswith("."):
            data = path.read_bytes()
            assert xid(data) not in found, f"{path}: a message is there twice"
            found[xid(data)] = data
        else:
            other.append(path)
    return found, other


def map_uids(port: int, user: str) -> dict[str, str]:
    """UIDL -> X-Id for one user, read with TOP before the chaos starts."""
    c = Raw.connect(port)
    c.line()
    c.cmd(b"USER " + user.encode())
    assert c.cmd(b"PASS pw").startswith(b"+OK")
    assert c.cmd(b"UIDL").startswith(b"+OK")
    mapping = {}
    for number, uid in (line.split() for line in c.multiline()):
        assert c.cmd(b"TOP " + number + b" 0").startswith(b"+OK")
        mapping[uid.decode()] = xid(b"\r\n".join(c.multiline()) + b"\r\n")
    c.cmd(b"QUIT")
    c.close()
    return mapping


def client_loop(port: int, user: str, box: dict[str, bytes], uids: dict[str, str],
                records: list[SessionRecord], stop: threading.Event,
                errors: list[str]) -> None:
    rng = random.Random(user)
    while not stop.is_set():
        record = SessionRecord(user)
        try:
            c = Raw.connect(port)
            c.sock.settimeout(5)
            if not c.line().startswith(b"+OK"):
                continue
            c.cmd(b"USER " + user.encode())
            if not c.cmd(b"PASS pw").startswith(b"+OK"):
                c.close()
                time.sleep(0.05)  # e.g. [IN-USE] right after a restart
                continue
            records.append(record)
            assert c.cmd(b"UIDL").startswith(b"+OK")
            listing = [line.split() for line in c.multiline()]
            if not listing:
                stop.wait(0.2)
                continue
            picks = rng.sample(listing, min(len(listing), rng.randint(1, 8)))
            for number, uid in picks:
                message_id = uids[uid.decode()]
                if rng.random() < 0.5:
                    assert c.cmd(b"RETR " + number).startswith(b"+OK")
                    lines = [line[1:] if line.startswith(b".") else line
                             for line in c.multiline()]
                    if b"".join(line + b"\r\n" for line in lines) != box[message_id]:
                        errors.append(f"{user}: RETR {message_id} returned different bytes")
                if c.cmd(b"DELE " + number).startswith(b"+OK"):
                    record.marked.add(message_id)
            if rng.random() < 0.8:
                record.quit_sent = True
                c.send(b"QUIT\r\n")
                record.quit_ok = c.line().startswith(b"+OK")
            c.close()
        except (OSError, EOFError, AssertionError):
            time.sleep(0.02)  # the server was killed: try again


@pytest.mark.parametrize("source", ["directory_multi", "maildir"])
def test_sigkill_under_fetch_and_delete_load(tmp_path: Path, source: str) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    make = make_directory_source if source == "directory_multi" else make_maildir_source
    adapter, boxes = make(root)
    server = CliServer(tmp_path, adapter, extra="[limits]\nmax_sessions_per_user = 1\n")
    server.start()
    uids = {user: map_uids(server.port, user) for user in boxes}
    assert all(sorted(uids[u].values()) == sorted(boxes[u]) for u in boxes)
    records: list[SessionRecord] = []
    errors: list[str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=client_loop,
                                args=(server.port, user, boxes[user], uids[user], records,
                                      stop, errors))
               for user in boxes]
    for t in clients:
        t.start()
    kills = 0
    rng = random.Random(7)
    try:
        end = time.monotonic() + 12
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.05, 0.5))
            server.kill()
            kills += 1
            server.start()
    finally:
        stop.set()
        for t in clients:
            t.join(20)
        server.stop()

    assert not errors, errors[:5]
    assert kills >= 8
    confirmed = {(r.user, m) for r in records if r.quit_ok for m in r.marked}
    allowed = {(r.user, m) for r in records if r.quit_sent for m in r.marked}
    assert len(confirmed) > 20, "too few committed sessions to mean anything"
    leftovers = []
    for user, box in boxes.items():
        present, other = stored_messages(root, user)
        for message_id, original in box.items():
            if message_id in present:
                assert (user, message_id) not in confirmed, \
                    f"{user} {message_id}: deletion confirmed by +OK, still there"
                assert present[message_id] == original, f"{user} {message_id} is not whole"
            else:
                assert (user, message_id) in allowed, \
                    f"{user} {message_id} lost without a QUIT that marked it"
        for path in other:
            # A deletion interrupted between its rename aside and the unlink leaves a hidden,
            # whole copy of a message whose QUIT was received: never served, never partial.
            assert path.name.startswith(".pop3sf-deleting-"), f"unexpected file {path}"
            data = path.read_bytes()
            assert (user, xid(data)) in allowed and data == box[xid(data)], path
            leftovers.append(path)
    print(f"{source}: {kills} kills, {len(records)} sessions, {len(confirmed)} confirmed "
          f"deletions, {len(leftovers)} interrupted-deletion leftovers")


# -- failures underneath -----------------------------------------------------------------------

def _login(port: int, user: bytes = b"alice") -> Raw:
    c = Raw.connect(port)
    c.line()
    c.cmd(b"USER " + user)
    reply = c.cmd(b"PASS pw")
    assert reply.startswith(b"+OK"), reply
    return c


def _user_dir(root: Path, name: str = "alice", messages: int = 3) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / ".pop3sf_password_bcrypt").write_text(passwords.hash_bcrypt(b"pw", rounds=4))
    for i in range(messages):
        (d / f"{i}.eml").write_bytes(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
    return d


@contextlib.contextmanager
def mounted(*args: str) -> Iterator[None]:
    target = args[-1]
    run = subprocess.run(["mount", *args], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount ({run.stderr.strip()}); needs root and mount rights")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", target], check=False)


def test_directory_turned_read_only_mid_session(tmp_path: Path) -> None:
    """The mount under a logged-in session turns read-only: reading goes on, QUIT answers -ERR
    (nothing could be removed), nothing is lost, and once writable again the next QUIT commits,
    without a restart."""
    from pop3sf.testing import running_server

    root = tmp_path / "root"
    user = _user_dir(root)
    with mounted("--bind", str(root), str(root)), \
            running_server("directory_multi", {"root": str(root)}) as srv:
        c = _login(srv.port)  # the session's directory descriptor is on the bind mount
        assert c.cmd(b"DELE 1").startswith(b"+OK")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        try:
            assert c.cmd(b"RETR 2").startswith(b"+OK")  # reading still works
            c.multiline()
            reply = c.cmd(b"QUIT")
            assert reply.startswith(b"-ERR") and not reply.startswith(b"-ERR [SYS/PERM]"), reply
            assert len(list(user.glob("*.eml"))) == 3
        finally:
            subprocess.run(["mount", "-o", "remount,bind,rw", str(root)], check=True)
        c = _login(srv.port)
        assert c.cmd(b"DELE 1").startswith(b"+OK")
        assert c.cmd(b"QUIT").startswith(b"+OK")
        assert sorted(p.name for p in user.glob("*.eml")) == ["1.eml", "2.eml"]


def test_full_disk_size_cache_and_directory(tmp_path: Path) -> None:
    """A tiny tmpfs filled to the last byte holds the messages and the persistent size cache:
    logins, listings and retrievals still work, deletions (which need no space) commit."""
    from pop3sf.testing import running_server

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)):
        user = _user_dir(mnt / "root", messages=4)
        cache = mnt / "cache"
        cache.mkdir()
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        with contextlib.suppress(OSError), open(mnt / "filler2", "wb") as fh:
            while True:
                fh.write(b"\0")
                fh.flush()
        with running_server("directory_multi", {"root": str(mnt / "root"),
                                                "size_cache_dir": str(cache)}) as srv:
            c = _login(srv.port)
            assert c.cmd(b"STAT").startswith(b"+OK 4 ")
            assert c.cmd(b"RETR 3").startswith(b"+OK")
            assert c.multiline() == [b"Subject: 2", b"", b"body 2"]
            assert c.cmd(b"DELE 1").startswith(b"+OK")
            assert c.cmd(b"QUIT").startswith(b"+OK")
            c = _login(srv.port)
            assert c.cmd(b"STAT").startswith(b"+OK 3 ")
            assert c.cmd(b"QUIT").startswith(b"+OK")
        assert sorted(p.name for p in user.glob("*.eml")) == ["1.eml", "2.eml", "3.eml"]


def test_files_removed_and_replaced_under_a_session(tmp_path: Path) -> None:
    """Files removed, atomically replaced or renamed away after the login snapshot: RETR says
    the message no longer exists, the snapshot stays, and QUIT never deletes a replacement."""
    from pop3sf.testing import running_server

    root = tmp_path / "root"
    user = _user_dir(root, messages=4)
    with running_server("directory_multi", {"root": str(root)}) as srv:
        c = _login(srv.port)
        (user / "0.eml").unlink()                                      # removed
        (user / ".new").write_bytes(b"Subject: other\r\n\r\nx\r\n")
        os.replace(user / ".new", user / "1.eml")                       # replaced (new inode)
        os.rename(user / "2.eml", user / ".hidden")                     # renamed away
        assert c.cmd(b"RETR 1") == b"-ERR Message no longer exists"
        assert c.cmd(b"RETR 2") == b"-ERR Message no longer exists"
        assert c.cmd(b"TOP 3 0") == b"-ERR Message no longer exists"
        assert c.cmd(b"RETR 4").startswith(b"+OK")
        c.multiline()
        assert c.cmd(b"STAT").startswith(b"+OK 4 ")  # the snapshot does not change
        for n in (1, 2, 3, 4):
            assert c.cmd(b"DELE %d" % n).startswith(b"+OK")
        reply = c.cmd(b"QUIT")
        assert reply.startswith((b"+OK", b"-ERR Some deleted messages not removed")), reply
        assert (user / "1.eml").read_bytes() == b"Subject: other\r\n\r\nx\r\n"
        assert (user / ".hidden").exists() and not (user / "3.eml").exists()
        c = _login(srv.port)
        assert c.cmd(b"STAT").startswith(b"+OK 1 ")
        assert c.cmd(b"QUIT").startswith(b"+OK")


def test_file_rewritten_in_place_is_not_deleted(tmp_path: Path) -> None:
    from pop3sf.testing import running_server

    root = tmp_path / "root"
    user = _user_dir(root, messages=2)
    with running_server("directory_multi", {"root": str(root)}) as srv:
        c = _login(srv.port)
        (user / "0.eml").write_bytes(b"Subject: rewritten\r\n\r\nnew content\r\n")
        assert c.cmd(b"RETR 1") == b"-ERR Message no longer exists"
        assert c.cmd(b"DELE 1").startswith(b"+OK")
        c.cmd(b"QUIT")
        assert (user / "0.eml").exists(), "a message the client never saw was deleted"


def test_mariadb_stopped_and_started_under_load(mariadb: MariaDBServer) -> None:  # noqa: F811
    """Clients keep logging in and reading while the database goes away and comes back: answers
    during the outage are [SYS/TEMP] (or a closed connection), never a crash or a lost row, and
    service resumes without restarting pop3sf."""
    from pop3sf.testing import running_server

    db = mariadb.new_database()
    config = mariadb.adapter_config(db, driver="pymysql", breaker_threshold=3,
                                    breaker_cooldown=0.5, connect_timeout=1, read_timeout=2)
    from pop3sf.adapters.mysql import MultiUserMySQLAdapter

    setup = MultiUserMySQLAdapter(config)
    setup.start()
    setup.close()
    conn = mariadb.connect(database=db)
    with conn.cursor() as cur:
        for u in range(4):
            cur.execute("INSERT INTO pop3sf_multiuser_users (username, password_bcrypt) "
                        "VALUES (%s, %s)", (f"u{u}", passwords.hash_bcrypt(b"pw", rounds=4)))
            uid = cur.lastrowid
            for i in range(20):
                cur.execute("INSERT INTO pop3sf_multiuser_messages (user_id, message, "
                            "is_plaintext) VALUES (%s, %s, 0)",
                            (uid, f"Subject: {u}/{i}\r\n\r\nbody\r\n"))
    conn.commit()
    conn.close()
    answers: dict[str, int] = {}
    stop = threading.Event()
    bad: list[str] = []

    def worker(port: int, user: bytes) -> None:
        while not stop.is_set():
            try:
                c = Raw.connect(port)
                c.sock.settimeout(15)
                c.line()
                c.cmd(b"USER " + user)
                reply = c.cmd(b"PASS pw")
                key = "ok" if reply.startswith(b"+OK") else reply[:15].decode(errors="replace")
                answers[key] = answers.get(key, 0) + 1
                if reply.startswith(b"+OK"):
                    r = c.cmd(b"RETR 1")
                    if r.startswith(b"+OK"):
                        c.multiline()
                    elif not r.startswith(b"-ERR [SYS/TEMP]"):
                        bad.append(repr(r))
                    c.cmd(b"QUIT")
                elif not reply.startswith(b"-ERR [SYS/TEMP]"):
                    bad.append(repr(reply))
                c.close()
            except (OSError, EOFError):
                pass
            time.sleep(0.05)

    with running_server("mysql_multi", config, auth={"penalty_initial": 0},
                        workers={"call_timeout": 10}) as srv:
        threads = [threading.Thread(target=worker, args=(srv.port, b"u%d" % u))
                   for u in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        mariadb.stop()
        time.sleep(3)
        mariadb.start()
        deadline = time.monotonic() + 30
        outage = dict(answers)
        answers.clear()
        while answers.get("ok", 0) < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
        assert answers.get("ok", 0) >= 8, answers  # recovered without a restart
        assert outage.get("-ERR [SYS/TEMP]", 0) >= 1, outage  # the outage was seen
        assert srv.thread.is_alive()
    assert not bad, bad[:5]
    conn = mariadb.connect(database=db)
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM pop3sf_multiuser_messages")
        assert cur.fetchone()[0] == 80  # nothing deleted: no DELE was ever sent
    conn.close()
