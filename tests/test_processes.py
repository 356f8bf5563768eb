"""``[server] processes = 2``: the real ``pop3sf`` command with a supervising parent.

Real sockets on loopback, poplib and raw clients, a real datagram socket standing in for
systemd's NOTIFY_SOCKET, real signals. Limits must hold across processes: concurrent wrong
passwords from one address are spaced by the one penalty table, an account is locked in every
process, a connection cap counts every process's connections.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Raw

POP3SF = [sys.executable, "-m", "pop3sf"]
SYSTEMD_ENV = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "INVOCATION_ID",
               "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


class Fleet:
    """``pop3sf --config`` (processes = 2 unless told), its log on stderr, a fake
    NOTIFY_SOCKET."""

    def __init__(self, tmp: Path, extra: str = "", watchdog_usec: int = 0, processes: int = 2,
                 users: str = "alice:{PLAIN}secret, bob:{PLAIN}secret",
                 server: str = "", adapter: str = "list", pythonpath: str = "") -> None:
        mail = tmp / "m.eml"
        mail.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
        self.config = tmp / "pop3sf.conf"
        self.config.write_text(f"""
[server]
user = ""
shutdown_grace = 2
processes = {processes}
{server}
[logging]
target = stderr
level = info
[listeners]
    [[pop3]]
    addresses = 127.0.0.1:0
[adapter]
type = {adapter}
users = {users}
messages = {mail}
{extra}
""")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))
        self.notify.settimeout(10)
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}
        env["NOTIFY_SOCKET"] = str(tmp / "notify")
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.proc = subprocess.Popen([*POP3SF, "--config", str(self.config)], env=env,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        self._lock = threading.Condition()
        first = self.proc.stderr.readline()
        m = re.search(r"listening on pop3 127\.0\.0\.1:(\d+)", first)
        assert m, first
        self.port = int(m.group(1))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line)
                self._lock.notify_all()

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(1 for ln in self.lines if re.search(pattern, ln)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{count}× {pattern!r} not logged:\n"
                                         + "".join(self.lines[-40:]))
                self._lock.wait(left)

    def state(self, want: str, timeout: float = 10) -> list[str]:
        """Notifications received until one contains *want*."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.notify.recv(4096).decode()
            seen.append(msg)
            if want in msg.split("\n"):
                return seen
        raise AssertionError(f"no {want}: {seen}")

    def drain(self) -> str:
        """Every notification not read yet."""
        self.notify.settimeout(0.2)
        seen = []
        try:
            while True:
                seen.append(self.notify.recv(4096).decode())
        except (TimeoutError, OSError):
            pass
        return "\n".join(seen)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._reader.join(5)
        self.notify.close()
        return code


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, "[auth]\npenalty_initial = 0.4\npenalty_max = 10\n"
                        "[limits]\nmax_connections_per_address = 6\n")
    f.state("READY=1")
    yield f
    if f.proc.poll() is None:
        f.proc.kill()
    f.proc.wait()
    f.notify.close()


def login(port: int, user: str = "alice", password: str = "secret") -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", port, timeout=15)
    pop.user(user)
    pop.pass_(password)
    return pop


def test_two_children_serve_and_stop_gracefully(fleet: Fleet) -> None:
    kids = children(fleet.proc.pid)
    assert len(kids) == 2
    # The parent never starts a thread: forking a replacement child later is always safe.
    assert os.listdir(f"/proc/{fleet.proc.pid}/task") == [str(fleet.proc.pid)]
    for _ in range(20):         # the kernel spreads accepts over both processes
        pop = login(fleet.port)
        assert pop.stat() == (1, 22)
        pop.quit()
    fleet.wait_log(r"logout 127\.0\.0\.1 alice", 20)
    idle = Raw.connect(fleet.port)
    idle.line()
    assert fleet.stop() == 0
    assert idle.line().startswith(b"-ERR [SYS/TEMP]")
    log = "".join(fleet.lines)
    assert "resources not given back" not in log
    assert log.count("shutting down") == 2 and "pop3sf stopped" in log
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}")


def test_wrong_passwords_are_spaced_across_processes(fleet: Fleet) -> None:
    """Six parallel connections (both processes) guessing at once: the one penalty table
    spaces the verifications 0, 0.4, 0.8, 1.6, 3.2 s apart (not per process)."""
    conns = [Raw.connect(fleet.port) for _ in range(6)]
    for c in conns:
        c.line()
        assert c.cmd(b"USER alice").startswith(b"+OK")
    start = time.monotonic()
    done: list[float] = []

    def guess(c: Raw, i: int) -> None:
        c.sock.settimeout(30)
        assert c.cmd(b"PASS wrong%d" % i).startswith(b"-ERR [AUTH]")
        done.append(time.monotonic() - start)

    threads = [threading.Thread(target=guess, args=(c, i)) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert len(done) == 6
    # One table: at least 0.4 + 0.8 + 1.6 + 3.2 s for the last; two tables would allow ~1.2 s.
    assert max(done) >= 5.5, sorted(done)
    for c in conns:
        c.sock.close()


def test_account_lock_and_connection_cap_span_processes(fleet: Fleet) -> None:
    holder = login(fleet.port)
    for _ in range(6):                      # whichever process takes it, alice is in use
        other = poplib.POP3("127.0.0.1", fleet.port, timeout=10)
        other.user("alice")
        with pytest.raises(poplib.error_proto, match="IN-USE"):
            other.pass_("secret")
        other.close()
    holder.quit()
    login(fleet.port).quit()                # released everywhere
    # max_connections_per_address = 6 counts both processes' connections. (The sessions
    # above may still be closing on the server's side: retry until all 6 are admitted.)
    for _ in range(20):
        open_ = [Raw.connect(fleet.port) for _ in range(6)]
        if all(c.line().startswith(b"+OK") for c in open_):
            break
        for c in open_:
            c.sock.close()
        time.sleep(0.5)
    else:
        raise AssertionError("6 connections from one address never admitted")
    extra = Raw.connect(fleet.port)
    assert extra.line().startswith(b"-ERR")
    for c in open_:
        c.sock.close()
    extra.sock.close()


def test_a_dead_child_is_restarted_and_its_lock_released(fleet: Fleet) -> None:
    holder = login(fleet.port)              # alice locked in one of the two
    for pid in children(fleet.proc.pid):
        os.kill(pid, signal.SIGKILL)
    fleet.wait_log(r"process \d exited with signal 9; restarting", 2)
    fleet.wait_log(r"process \d started", 4)
    deadline = time.monotonic() + 10
    while len(children(fleet.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    fleet.state("READY=1")
    login(fleet.port).quit()                # the dead holder's lock went with it
    holder.close()
    assert fleet.stop() == 0


def test_reload_reaches_every_child(fleet: Fleet) -> None:
    fleet.proc.send_signal(signal.SIGHUP)
    seen = fleet.state("READY=1")
    assert any("RELOADING=1" in s for s in seen)
    fleet.wait_log("configuration reloaded", 2)


def test_watchdog_is_petted_while_children_beat(tmp_path: Path) -> None:
    f = Fleet(tmp_path, watchdog_usec=2_000_000)
    try:
        f.state("READY=1")
        f.state("WATCHDOG=1", timeout=5)
        # A hung child (stopped) stops the pings, then is killed and replaced.
        kid = children(f.proc.pid)[0]
        os.kill(kid, signal.SIGSTOP)
        f.wait_log(r"has not answered for \d+ s; killing it", timeout=20)
        f.wait_log(r"process \d exited with signal 9; restarting")
        f.state("WATCHDOG=1", timeout=10)
    finally:
        assert f.stop() == 0


def test_admin_who_and_kick_see_every_process(tmp_path: Path) -> None:
    """Each process answers on its own control socket (PATH, PATH.1); pop3sf-admin asks all."""
    control = tmp_path / "run" / "control"
    users = ", ".join(f"u{i}:{{PLAIN}}pw" for i in range(8))
    f = Fleet(tmp_path, users=users, server=f"control_socket = {control}")
    try:
        f.state("READY=1")
        assert control.exists() and Path(f"{control}.1").exists()
        sessions = [login(f.port, f"u{i}", "pw") for i in range(8)]
        admin = [sys.executable, "-m", "pop3sf.auxiliary.admin", "--config", str(f.config)]
        out = subprocess.run([*admin, "who", "--json"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert sorted(s["account"] for s in json.loads(out)) == [f"u{i}" for i in range(8)]
        kicked = subprocess.run([*admin, "kick", "u5"], capture_output=True, text=True,
                                timeout=60)
        assert kicked.returncode == 0, kicked.stderr
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            sessions[5].stat()
        for i, pop in enumerate(sessions):
            if i != 5:
                pop.quit()
    finally:
        assert f.stop() == 0
    assert not control.exists() and not Path(f"{control}.1").exists()


FAILING_ADAPTER = """
from pop3sf.adapters import ConfigError
from pop3sf.adapters.memory import ListAdapter


class FailStart(ListAdapter):
    def start(self):
        raise ConfigError("the data source refuses us")
"""


def test_a_child_that_cannot_start_ends_the_start_with_its_status(tmp_path: Path) -> None:
    """An adapter whose start() fails (after --check-config's checks passed): the children
    exit 78 (EX_CONFIG) before the fleet was ready, and so does the parent, without
    restarting anything (RestartPreventExitStatus=78 then stops systemd too)."""
    (tmp_path / "failstart.py").write_text(FAILING_ADAPTER)
    f = Fleet(tmp_path, adapter="failstart:FailStart", pythonpath=str(tmp_path))
    assert f.proc.wait(30) == 78
    notified = f.drain()
    f.stop()
    log = "".join(f.lines)
    assert "the data source refuses us" in log
    assert "while starting; stopping" in log and "restarting" not in log
    assert "READY=1" not in notified


def test_a_client_leaving_while_its_attempt_waits_frees_the_turn(fleet: Fleet) -> None:
    """An attempt queued behind the penalty whose client leaves is dropped from the parent's
    queue: the group's next attempt is answered, not blocked behind a phantom."""
    first = Raw.connect(fleet.port)
    first.line()
    first.cmd(b"USER alice")
    assert first.cmd(b"PASS wrong1").startswith(b"-ERR [AUTH]")     # 0.4 s penalty now
    quitter = Raw.connect(fleet.port)
    quitter.line()
    quitter.cmd(b"USER alice")
    quitter.send(b"PASS wrong2\r\n")                   # waits for the penalty ...
    quitter.sock.close()                                 # ... and its client leaves
    time.sleep(1.0)
    for i in range(3):                                   # later attempts still get turns
        later = Raw.connect(fleet.port)
        later.line()
        later.cmd(b"USER alice")
        later.sock.settimeout(15)
        assert later.cmd(b"PASS wrong%d" % (i + 3)).startswith(b"-ERR [AUTH]")
        later.sock.close()
    pop = login(fleet.port)
    pop.quit()
    first.sock.close()
