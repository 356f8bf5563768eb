"""Cross-process maildrop exclusivity for the directory and Maildir sources
(adapters/accountlock.py): another process, or another server instance, holding a read-write
session makes a login answer [IN-USE]; a SIGKILLed holder leaves no stale lock."""

from __future__ import annotations

import os
import poplib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pop3sf.adapters.accountlock import lock_maildrop, unlock_maildrop
from pop3sf.adapters.base import Credentials, MaildropInUse, Peer, TemporaryFailure
from pop3sf.adapters.directory import LOCK_FILE, MultiUserDirectoryAdapter
from test_directory import make_user, put
from test_maildir import Env, deliver, make_maildir

from pop3sf.testing import running_server

PEER = Peer("127.0.0.1", 1)
MSG = b"Subject: hi\r\n\r\nbody\r\n"


def test_lock_primitive(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        held = lock_maildrop(fd, "x.lock", str(tmp_path))
        with pytest.raises(MaildropInUse):  # same process, another open file: excluded too
            lock_maildrop(fd, "x.lock", str(tmp_path))
        unlock_maildrop(held)
        unlock_maildrop(lock_maildrop(fd, "x.lock", str(tmp_path)))
        os.symlink(tmp_path / "x.lock", tmp_path / "link.lock")
        with pytest.raises(TemporaryFailure, match="cannot lock"):
            lock_maildrop(fd, "link.lock", str(tmp_path))
        os.mkdir(tmp_path / "dir.lock")
        with pytest.raises(TemporaryFailure):
            lock_maildrop(fd, "dir.lock", str(tmp_path))
    finally:
        os.close(fd)
    assert (tmp_path / "x.lock").is_file()  # left in place: unlinking would race


def directory_login(adapter: MultiUserDirectoryAdapter, read_only: bool = False) -> object:
    s = adapter.new_session(PEER)
    result = s.authenticate(Credentials("alice", "secret"))
    s.login_succeeded(result, read_only)
    return s


def test_two_directory_adapters_exclude_each_other(tmp_path: Path) -> None:
    d = make_user(tmp_path, "alice")
    put(d, "a.eml", MSG)
    one = MultiUserDirectoryAdapter({"root": str(tmp_path), "bcrypt_rounds": 4})
    two = MultiUserDirectoryAdapter({"root": str(tmp_path), "bcrypt_rounds": 4})
    held = directory_login(one)
    with pytest.raises(MaildropInUse):
        directory_login(two)
    reader = directory_login(two, read_only=True)  # read-only: no lock taken or checked
    reader.connection_closed()  # type: ignore[attr-defined]
    held.connection_closed()  # type: ignore[attr-defined]
    directory_login(two).connection_closed()  # type: ignore[attr-defined]
    off = MultiUserDirectoryAdapter({"root": str(tmp_path), "cross_instance_lock": False})
    held = directory_login(one)
    free = directory_login(off)  # the administrator turned it off
    free.connection_closed()  # type: ignore[attr-defined]
    held.connection_closed()  # type: ignore[attr-defined]


HOLDER = textwrap.dedent("""
    import sys, time
    from pop3sf.adapters.base import Credentials, Peer
    from {module} import {cls}
    adapter = {cls}({config!r})
    session = adapter.new_session(Peer("127.0.0.1", 1))
    session.login_succeeded(session.authenticate(Credentials({user!r}, {password!r})), False)
    print("locked", flush=True)
    time.sleep(120)
""")


def hold_in_other_process(module: str, cls: str, config: dict[str, object], user: str,
                          password: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(module=module, cls=cls, config=config, user=user,
                                              password=password)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def expect_in_use(port: int, user: str, password: str) -> None:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    pop.user(user)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop.pass_(password)
    pop.close()


def test_other_process_holds_directory_until_sigkill(tmp_path: Path) -> None:
    d = make_user(tmp_path, "alice")
    put(d, "a.eml", MSG)
    config = {"root": str(tmp_path), "bcrypt_rounds": 4}
    proc = hold_in_other_process("pop3sf.adapters.directory", "MultiUserDirectoryAdapter",
                                 config, "alice", "secret")
    try:
        with running_server("directory_multi", config) as srv:
            expect_in_use(srv.port, "alice", "secret")
            proc.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel drops the lock
            proc.wait(10)
            pop = srv.pop3()
            pop.user("alice")
            pop.pass_("secret")
            assert pop.stat()[0] == 1
            pop.quit()
    finally:
        proc.kill()
        proc.wait()
    assert (d / LOCK_FILE).exists()


def test_maildir_two_servers_and_other_process(tmp_path: Path) -> None:
    env = Env(tmp_path)
    md = make_maildir(env.add_user("bob@example.org"))
    deliver(md, "1700000000.M1P1.host", MSG)
    config = {"passwd_file": str(env.passwd), "root": str(env.root),
              "mail_location": str(env.root) + "/%d/%n/Maildir"}
    with running_server("maildir", config) as one, running_server("maildir", config) as two:
        pop = one.pop3()
        pop.user("bob@example.org")
        pop.pass_("pw")
        expect_in_use(two.port, "bob@example.org", "pw")  # another instance's session
        pop.quit()
        pop = two.pop3()
        pop.user("bob@example.org")
        pop.pass_("pw")
        pop.quit()
    proc = hold_in_other_process("pop3sf.adapters.maildir", "MaildirAdapter", config,
                                 "bob@example.org", "pw")
    try:
        with running_server("maildir", config) as srv:
            expect_in_use(srv.port, "bob@example.org", "pw")
            proc.kill()
            proc.wait(10)
            pop = srv.pop3()
            pop.user("bob@example.org")
            pop.pass_("pw")
            pop.quit()
    finally:
        proc.kill()
        proc.wait()
    assert (md / "pop3sf.lock").is_file()


def test_maildir_not_yet_created_takes_no_lock(tmp_path: Path) -> None:
    env = Env(tmp_path)
    md = env.add_user("new@example.org")  # no mail delivered yet: no Maildir
    adapter = env.adapter()
    session, infos = env.login(adapter, "new@example.org")
    assert infos == [] and not md.exists()
    assert session._lock_fd is None  # nothing to serve twice, nothing locked
    env.close_sessions()


UNWRITABLE = textwrap.dedent("""
    import os, sys
    from pop3sf.adapters.accountlock import lock_maildrop
    from pop3sf.adapters.base import MaildropInUse
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    try:
        held = lock_maildrop(fd, sys.argv[2], sys.argv[1])
    except MaildropInUse:
        held = "in use"
    print("none" if held is None else "in use" if held == "in use" else "locked", flush=True)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as nobody")
def test_unwritable_maildrop_served_without_lock_unless_the_file_exists() -> None:
    """A service user that can't create the lock file can't delete there either: served with a
    warning (no lock); a lock file the administrator created is still locked, read-only."""
    base = Path(tempfile.mkdtemp(prefix="pop3sf-lock-", dir="/tmp"))  # pytest's is 0700
    try:
        base.chmod(0o755)
        d = base / "maildrop"
        d.mkdir(mode=0o755)
        check_unwritable(d)
    finally:
        shutil.rmtree(base)


def check_unwritable(d: Path) -> None:

    def as_nobody(name: str) -> str:
        run = subprocess.run([sys.executable, "-c", UNWRITABLE, str(d), name], user="nobody",
                             capture_output=True, text=True, timeout=30, cwd="/")
        assert run.returncode == 0, run.stderr
        return run.stdout.strip() + ("|warned" if "not excluded across processes" in run.stderr
                                     else "")

    assert as_nobody("missing.lock") == "none|warned"
    (d / "made.lock").touch(mode=0o644)
    assert as_nobody("made.lock") == "locked"
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        held = lock_maildrop(fd, "made.lock", str(d))
        assert as_nobody("made.lock") == "in use"  # a read-only flock excludes all the same
        unlock_maildrop(held)
    finally:
        os.close(fd)


def test_journal_accounts_exclusive_across_adapters(tmp_path: Path) -> None:
    """The journal source hides DELE'd entries in state_directory: two processes sharing it
    take turns per account, as the directory and Maildir sources do."""
    from pop3sf.adapters.journal import JournalAdapter

    (tmp_path / "logs").mkdir()
    config = {"directory": str(tmp_path / "logs"), "state_directory": str(tmp_path / "st"),
              "alerts": {"password_hash": "{PLAIN}pw"}}
    one, two = JournalAdapter(config), JournalAdapter(config)

    def login(adapter: JournalAdapter, read_only: bool = False) -> Any:
        s = adapter.new_session(PEER)
        s.login_succeeded(s.authenticate(Credentials("alerts", "pw")), read_only)
        return s

    held = login(one)
    assert (tmp_path / "st" / "alerts.lock").is_file()
    with pytest.raises(MaildropInUse):
        login(two)
    login(two, read_only=True).connection_closed()
    held.connection_closed()
    login(two).connection_closed()
