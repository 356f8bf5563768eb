"""SIGTERM to the real ``pop3sf`` during retrievals and a commit (docs/protocol.md §11, §17):
exit 0 within the grace period, retrievals under way finish, idle sessions are told and their
marked deletions discarded, a commit already under way completes (even past the grace period),
and nobody new gets in once the signal arrived.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from conftest import Raw
from pop3sf.adapters import DeleteResult, Peer
from pop3sf.adapters.directory import MultiUserDirectoryAdapter
from test_crash_safety import CliServer

from pop3sf import passwords

TESTS = Path(__file__).resolve().parent
BIG = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 30_000  # 30 MB


class SlowDeleteDirectory(MultiUserDirectoryAdapter):
    """``directory_multi`` whose deletions take ``delete_delay`` seconds (a slow disk or
    database), so a test can signal the server while a commit is under way."""

    configspec = MultiUserDirectoryAdapter.configspec + "delete_delay = float(0, 60, default=0)\n"

    def new_session(self, peer: Peer) -> Any:
        session = super().new_session(peer)
        delay = float(self.options["delete_delay"])
        original = session.delete_messages

        def slow(uids: Collection[str]) -> DeleteResult:
            time.sleep(delay)
            return original(uids)

        session.delete_messages = slow
        return session


def mailbox(root: Path, user: str, messages: list[bytes]) -> Path:
    d = root / user
    d.mkdir(parents=True)
    (d / ".pop3sf_password_bcrypt").write_text(passwords.hash_bcrypt(b"pw", rounds=4))
    for i, message in enumerate(messages):
        (d / f"{i}.eml").write_bytes(message)
        mtime = 1_600_000_000 + i
        os.utime(d / f"{i}.eml", (mtime, mtime))
    return d


def start(tmp_path: Path, grace: float, delete_delay: float) -> tuple[CliServer, Path]:
    root = tmp_path / "mail"
    root.mkdir()
    server = CliServer(
        tmp_path, f"type = test_shutdown:SlowDeleteDirectory\nroot = {root}\n"
        f"delete_delay = {delete_delay}\n", env={"PYTHONPATH": str(TESTS)})
    server.config.write_text(server.config.read_text().replace(
        "shutdown_grace = 3", f"shutdown_grace = {grace}"))
    return server, root


def login(port: int, user: bytes) -> Raw:
    c = Raw.connect(port)
    assert c.line().startswith(b"+OK")
    c.cmd(b"USER " + user)
    reply = c.cmd(b"PASS pw")
    assert reply.startswith(b"+OK"), reply
    return c


def test_sigterm_during_retrievals_and_a_commit(tmp_path: Path) -> None:
    grace = 4.0
    server, root = start(tmp_path, grace, delete_delay=1.5)
    small = [b"Subject: %d\r\n\r\nbody\r\n" % i for i in range(3)]
    reader_box = mailbox(root, "reader", [BIG])
    idle_box = mailbox(root, "idle", small)
    committer_box = mailbox(root, "committer", small)
    staller_box = mailbox(root, "staller", [BIG, *small])
    server.start()
    try:
        reader = login(server.port, b"reader")
        idle = login(server.port, b"idle")
        committer = login(server.port, b"committer")
        staller = Raw(socket.create_connection(("127.0.0.1", server.port)))
        staller.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        staller.line()
        staller.cmd(b"USER staller")
        assert staller.cmd(b"PASS pw").startswith(b"+OK")

        assert idle.cmd(b"DELE 1").startswith(b"+OK")
        assert staller.cmd(b"DELE 2").startswith(b"+OK")
        staller.send(b"RETR 1\r\n")  # and never reads it
        assert committer.cmd(b"DELE 1").startswith(b"+OK")
        assert committer.cmd(b"DELE 2").startswith(b"+OK")

        # The reader pulls the 30 MB message slowly: about three seconds in all.
        got = bytearray()
        done = threading.Event()
        reader.send(b"RETR 1\r\n")

        def read_slowly() -> None:
            reader.sock.settimeout(15)
            buf = bytearray(reader.buf)
            while not buf.endswith(b"\r\n.\r\n"):
                chunk = reader.sock.recv(256 * 1024)
                if not chunk:
                    break
                buf += chunk
                time.sleep(0.025)
            got.extend(buf)
            done.set()

        t = threading.Thread(target=read_slowly)
        t.start()
        time.sleep(0.3)
        committer.send(b"QUIT\r\n")  # its commit takes 1.5 s
        time.sleep(0.2)
        term = time.monotonic()
        server.signal(15)
        assert idle.line() == b"-ERR [SYS/TEMP] Server shutting down"
        assert idle.closed(5)
        time.sleep(0.2)
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        assert refused, "a new connection was accepted after SIGTERM"
        assert committer.line().startswith(b"+OK")  # the commit under way completed
        t.join(20)
        code = server.wait(grace + 10)
        elapsed = time.monotonic() - term
    finally:
        server.kill()
    assert code == 0, server.text()[-3000:]
    assert elapsed < grace + 2, elapsed
    assert done.is_set()
    status, _, body = bytes(got).partition(b"\r\n")
    assert status == b"+OK Message follows"
    assert body == BIG + b".\r\n", "the retrieval under way did not finish whole"
    assert sorted(p.name for p in committer_box.glob("*.eml")) == ["2.eml"]
    assert len(list(idle_box.glob("*.eml"))) == 3   # marked, no QUIT: nothing deleted
    assert len(list(staller_box.glob("*.eml"))) == 4
    assert len(list(reader_box.glob("*.eml"))) == 1
    log = server.text()
    assert len(re.findall(r"marked deletions? discarded", log)) >= 2, log[-3000:]
    assert "pop3sf stopped" in log


def test_commit_under_way_outlives_the_grace_period(tmp_path: Path) -> None:
    """A QUIT whose deletions are being applied when the grace period ends is finished, answered
    and only then does the server exit; an idle session is closed at once."""
    server, root = start(tmp_path, grace=1, delete_delay=3)
    box = mailbox(root, "committer", [b"Subject: a\r\n\r\nx\r\n", b"Subject: b\r\n\r\ny\r\n"])
    mailbox(root, "idle", [b"Subject: c\r\n\r\nz\r\n"])
    server.start()
    try:
        c = login(server.port, b"committer")
        idle = login(server.port, b"idle")
        assert c.cmd(b"DELE 1").startswith(b"+OK")
        c.send(b"QUIT\r\n")
        time.sleep(0.3)
        term = time.monotonic()
        server.signal(15)
        assert idle.line().startswith(b"-ERR [SYS/TEMP]")
        assert c.line().startswith(b"+OK")
        code = server.wait(15)
        elapsed = time.monotonic() - term
    finally:
        server.kill()
    assert code == 0, server.text()[-3000:]
    assert 2 < elapsed < 6, elapsed  # waited for the commit, past the 1 s grace
    assert sorted(p.name for p in box.glob("*.eml")) == ["1.eml"]
