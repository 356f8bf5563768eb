"""pop3sf.systemd against the real things: sockets passed by systemd-socket-activate or by an
exec'd child with LISTEN_* set, sd_notify datagrams on a real AF_UNIX socket, and records in a
private journald read back with journalctl."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pop3sf import systemd

HERE = Path(__file__).parent / "deb"
LISTEN_CHILD = HERE / "listen_child.py"
JOURNAL_CHILD = HERE / "journal_child.py"
WITH_JOURNALD = HERE / "with-journald.sh"


# --------------------------------------------------------------------------- listen_fds

def _wait_for(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed")
def test_listen_fds_from_systemd_socket_activate(tmp_path: Path) -> None:
    """Two names, the second with two sockets: grouped by name, non-blocking, CLOEXEC."""
    paths = [tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "c.sock"]
    cmd = ["systemd-socket-activate"]
    for p in paths:
        cmd += ["-l", str(p)]
    cmd += ["--fdname=pop3:pop3s:pop3s", sys.executable, str(LISTEN_CHILD), "--serve"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for p in paths:
            _wait_for(p)
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(10)
        client.connect(str(paths[2]))
        report = json.loads(_read_all(client))
        client.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    socks = report["sockets"]
    assert sorted(socks) == ["pop3", "pop3s"]
    assert [s["addr"] for s in socks["pop3"]] == [str(paths[0])]
    assert sorted(s["addr"] for s in socks["pop3s"]) == sorted([str(paths[1]), str(paths[2])])
    for s in socks["pop3"] + socks["pop3s"]:
        assert s["type"] == "SOCK_STREAM" and s["family"] == "AF_UNIX"
        assert s["blocking"] is False
        assert s["cloexec"] is True
    assert report["env_after"] == {"LISTEN_PID": None, "LISTEN_FDS": None,
                                   "LISTEN_FDNAMES": None}
    assert report["under_systemd"] is True


def _spawn_with_fds(socks: list[socket.socket], names: str | None, args: tuple[str, ...] = (),
                    listen_pid: str | None = None) -> dict:
    """Exec the child with *socks* at fds 3.. and LISTEN_* set, the way systemd does it.

    ``LISTEN_PID`` is the pid of the exec'd program: a shell sets it to its own ``$$`` and execs.
    """
    originals = [s.fileno() for s in socks]

    def preexec() -> None:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in originals]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)          # inheritable, as systemd passes them

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.pop("INVOCATION_ID", None)
    env.pop("JOURNAL_STREAM", None)
    env["LISTEN_FDS"] = str(len(socks))
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    pid = listen_pid or "$$"
    script = f'LISTEN_PID={pid}; export LISTEN_PID; exec "$0" "$@"'
    out = subprocess.run(["/bin/sh", "-c", script, sys.executable, str(LISTEN_CHILD), *args],
                         env=env, close_fds=False, preexec_fn=preexec, capture_output=True,
                         timeout=30, check=True)
    return json.loads(out.stdout)


@pytest.fixture
def tcp_listeners():
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    yield socks
    for s in socks:
        s.close()


def test_listen_fds_by_name_not_position(tcp_listeners) -> None:
    ports = [s.getsockname()[1] for s in tcp_listeners]
    report = _spawn_with_fds(tcp_listeners, "pop3s:pop3:pop3s")
    socks = report["sockets"]
    assert [s["addr"][1] for s in socks["pop3"]] == [ports[1]]
    assert [s["addr"][1] for s in socks["pop3s"]] == [ports[0], ports[2]]
    assert all(s["family"] == "AF_INET" and not s["blocking"] and s["cloexec"]
               for group in socks.values() for s in group)
    assert report["env_after"]["LISTEN_FDS"] is None


def test_listen_fds_missing_names_are_unknown(tcp_listeners) -> None:
    report = _spawn_with_fds(tcp_listeners[:2], None)
    assert list(report["sockets"]) == ["unknown"]
    assert len(report["sockets"]["unknown"]) == 2


def test_listen_fds_for_another_pid_are_ignored(tcp_listeners) -> None:
    report = _spawn_with_fds(tcp_listeners[:1], "pop3", listen_pid="1")
    assert report["sockets"] == {}
    assert report["env_after"]["LISTEN_PID"] is None     # still unset: children must not see it
    assert report["under_systemd"] is False


def test_listen_fds_keep_env(tcp_listeners) -> None:
    report = _spawn_with_fds(tcp_listeners[:1], "pop3", args=("--keep-env",))
    assert list(report["sockets"]) == ["pop3"]
    assert report["env_after"]["LISTEN_FDS"] == "1"
    assert report["env_after"]["LISTEN_FDNAMES"] == "pop3"


def test_listen_fds_without_systemd(monkeypatch) -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert systemd.listen_fds() == {}


# --------------------------------------------------------------------------- sd_notify

@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_notify_sends_datagram(notify_socket) -> None:
    systemd.notify("READY=1\nSTATUS=0 connections")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=0 connections"


def test_notify_abstract_socket(monkeypatch) -> None:
    name = f"pop3sf-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        systemd.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_notify_never_raises(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    systemd.notify("READY=1")                                   # not under systemd: no-op
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    systemd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    systemd.notify("READY=1")


def test_notify_does_not_block_when_the_manager_is_stuck(notify_socket) -> None:
    """The receiver never reads: its queue fills (net.unix.max_dgram_qlen), sends must not wait."""
    start = time.monotonic()
    for i in range(2000):
        systemd.notify(f"STATUS={i} " + "x" * 200)
    assert time.monotonic() - start < 2.0
    assert notify_socket.recv(4096).startswith(b"STATUS=0 ")


def test_notify_status_is_rate_limited(notify_socket) -> None:
    assert systemd.notify_status("one", force=True) is True
    assert systemd.notify_status("two") is False
    assert notify_socket.recv(4096) == b"STATUS=one"
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)
    assert systemd.notify_status("three", min_interval=0.0) is True
    assert notify_socket.recv(4096) == b"STATUS=three"


# --------------------------------------------------------------------------- watchdog, detection

def test_watchdog_interval(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "abc", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


def test_under_systemd(monkeypatch, tmp_path: Path) -> None:
    for key in ("NOTIFY_SOCKET", "LISTEN_PID", "INVOCATION_ID", "JOURNAL_STREAM"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(systemd, "_activated", False)
    assert systemd.under_systemd() is False
    monkeypatch.setenv("INVOCATION_ID", uuid.uuid4().hex)       # a shell in a desktop terminal
    assert systemd.under_systemd() is (os.getppid() == 1)
    monkeypatch.delenv("INVOCATION_ID")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    assert systemd.under_systemd() is True
    monkeypatch.delenv("NOTIFY_SOCKET")
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert systemd.stderr_is_journal() is True
    assert systemd.under_systemd() is True
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert systemd.stderr_is_journal() is False


# --------------------------------------------------------------------------- journald

def _journald_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (private journald in a mount namespace)"
    for tool in ("unshare", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.path.exists("/lib/systemd/systemd-journald"):
        return "systemd-journald not installed"
    return None


@pytest.mark.skipif(_journald_usable() is not None, reason=str(_journald_usable()))
def test_journal_handler_fields(tmp_path: Path) -> None:
    """The native protocol, with python3-systemd hidden: the handler needs nothing else."""
    marker = uuid.uuid4().hex
    jdir = tmp_path / "journal"
    args = [str(WITH_JOURNALD), str(jdir), "--", sys.executable, str(JOURNAL_CHILD), marker,
            "--no-python-systemd"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Logging error" not in run.stderr, run.stderr
    assert run.stdout.strip() == "_NativeJournalHandler"
    out = subprocess.run(["journalctl", "-D", str(jdir), "-o", "json", "--no-pager",
                          f"POP3SF_MARKER={marker}"], capture_output=True, text=True,
                         check=True, timeout=30)
    entries = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    by_message = {e["MESSAGE"] if isinstance(e["MESSAGE"], str) else
                  bytes(e["MESSAGE"]).decode(): e for e in entries}
    assert len(entries) == 5, by_message.keys()

    info = by_message[f"session {marker} ended"]
    assert info["SYSLOG_IDENTIFIER"] == "pop3sf"
    assert info["PRIORITY"] == "6"
    assert info["POP3SF_CLIENT"] == "192.0.2.7"
    assert info["POP3SF_USER"] == "alice"
    assert info["POP3SF_EVENT"] == "logout"
    assert info["POP3SF_BYTES"] == "12345"
    assert info["LOGGER"] == "pop3sf.test"
    assert info["CODE_FUNC"] == "main"
    for absent in ("LOWERCASE_FIELD", "lowercase_field", "POP3SF_lower", "OTHER_FIELD",
                   "CODE_ARGS", "MSG", "ARGS"):
        assert absent not in info, absent

    assert by_message[f"debug {marker}"]["PRIORITY"] == "7"
    assert by_message[f"warning {marker}"]["PRIORITY"] == "4"
    error = by_message[f"multi\nline {marker}"]
    assert error["PRIORITY"] == "3"
    assert error["POP3SF_DETAIL"] == "a\nb" or bytes(error["POP3SF_DETAIL"]) == b"a\nb"
    failed = [e for m, e in by_message.items() if m.startswith(f"failed {marker}")]
    assert len(failed) == 1
    assert "ValueError: boom " + marker in failed[0]["MESSAGE"]
    assert "Traceback" in failed[0]["MESSAGE"]


def test_journal_handler_without_journald_is_silent(tmp_path: Path) -> None:
    """No journald socket: records are dropped, nothing raised, nothing printed."""
    handler = systemd._NativeJournalHandler("pop3sf", str(tmp_path / "no-socket"))
    import logging
    record = logging.LogRecord("pop3sf", logging.INFO, __file__, 1, "hello", None, None)
    errors: list[logging.LogRecord] = []
    handler.handleError = errors.append  # type: ignore[method-assign]
    handler.emit(record)
    handler.close()
    assert errors == []


def test_native_encoding_binary_safe() -> None:
    data = systemd._NativeJournalHandler.encode("a\nb", {"POP3SF_USER": "x"})
    assert data == b"MESSAGE\n" + (3).to_bytes(8, "little") + b"a\nb\nPOP3SF_USER=x\n"
