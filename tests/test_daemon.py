"""``pop3sf --daemon`` and pop3sf.daemon for real: forked daemons, pidfiles, signals, a private
journald, and privilege dropping in child processes."""

from __future__ import annotations

import json
import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pop3sf import daemon

HERE = Path(__file__).parent / "deb"
DAEMON_CHILD = HERE / "daemon_child.py"
WITH_JOURNALD = HERE / "with-journald.sh"
IS_ROOT = os.geteuid() == 0


def _journald_missing() -> str | None:
    if not IS_ROOT:
        return "needs root (private journald in a mount namespace)"
    if not (shutil.which("unshare") and shutil.which("journalctl")
            and os.path.exists("/lib/systemd/systemd-journald")):
        return "systemd-journald, journalctl or unshare missing"
    return None


needs_journald = pytest.mark.skipif(_journald_missing() is not None,
                                    reason=str(_journald_missing()))
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        _wait(lambda: not _alive(pid), 10, f"pid {pid} to exit")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)


def _line(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        rest = s.recv(4096)
    assert rest == b"", f"stray data after the reply: {rest[:200]!r}"
    return data.decode()


# --------------------------------------------------------------------------- check_pidfile

def test_check_pidfile_live_pid_is_refused(tmp_path: Path) -> None:
    pidfile = tmp_path / "p.pid"
    pidfile.write_text(f"{os.getppid()}\n")          # alive, and not us
    with pytest.raises(daemon.PidfileError, match=rf"already running as pid {os.getppid()}"):
        daemon.check_pidfile(str(pidfile))
    assert pidfile.exists()


@pytest.mark.parametrize("content", ["DEAD", "", "garbage\n"])
def test_check_pidfile_stale_is_removed(tmp_path: Path, content: str) -> None:
    pidfile = tmp_path / "p.pid"
    pidfile.write_text(f"{_dead_pid()}\n" if content == "DEAD" else content)
    daemon.check_pidfile(str(pidfile))
    assert not pidfile.exists()


def test_check_pidfile_creates_directory(tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "pop3sf" / "p.pid"
    daemon.check_pidfile(str(pidfile), owner="nobody")
    assert pidfile.parent.is_dir()
    if IS_ROOT:
        assert pidfile.parent.stat().st_uid == pwd.getpwnam("nobody").pw_uid


@needs_root
def test_check_pidfile_unwritable_directory(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from pop3sf import daemon
        os.setuid({pwd.getpwnam("nobody").pw_uid})
        try:
            daemon.check_pidfile("/proc/pop3sf-test/p.pid")
        except daemon.PidfileError as exc:
            print("ERR", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.startswith("ERR cannot create pidfile directory /proc/pop3sf-test"), \
        out.stdout + out.stderr


# --------------------------------------------------------------------------- drop_privileges

def _run_dropping(user: str, group: str | None, as_uid: int | None = None) -> dict:
    script = textwrap.dedent(f"""
        import json, logging, os, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from pop3sf import daemon
        if {as_uid!r} is not None:
            os.setgid({as_uid!r}); os.setuid({as_uid!r})
        try:
            daemon.drop_privileges({user!r}, {group!r})
        except daemon.PrivilegeError as exc:
            print(json.dumps({{"error": str(exc)}}))
            sys.exit(0)
        print(json.dumps({{"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                          "groups": sorted(os.getgroups()), "home": os.environ.get("HOME")}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, check=True)
    result = json.loads(out.stdout)
    result["stderr"] = out.stderr
    return result


@needs_root
def test_drop_privileges_to_user_with_its_groups() -> None:
    nobody = pwd.getpwnam("nobody")
    result = _run_dropping("nobody", None)
    assert result["uid"] == result["euid"] == nobody.pw_uid
    assert result["gid"] == nobody.pw_gid
    assert 0 not in result["groups"]
    assert result["home"] == nobody.pw_dir


@needs_root
def test_drop_privileges_group_override() -> None:
    result = _run_dropping("nobody", "daemon")
    import grp
    assert result["gid"] == grp.getgrnam("daemon").gr_gid


@needs_root
def test_drop_privileges_unknown_user_or_group() -> None:
    name = "no-such-user-" + uuid.uuid4().hex[:8]
    assert "unknown user" in _run_dropping(name, None)["error"]
    assert name in _run_dropping(name, None)["error"]
    assert "unknown group" in _run_dropping("nobody", name)["error"]


@needs_root
def test_drop_privileges_not_root_is_a_noop_with_warning() -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    result = _run_dropping("pop3sf-other", None, as_uid=nobody)
    assert result["uid"] == nobody
    assert "not running as root" in result["stderr"]
    assert "pop3sf-other" in result["stderr"]
    same = _run_dropping("nobody", None, as_uid=nobody)
    assert "not running as root" not in same["stderr"]


def test_refuse_daemon_under_systemd(monkeypatch, tmp_path: Path) -> None:
    for key in ("NOTIFY_SOCKET", "LISTEN_PID", "INVOCATION_ID", "JOURNAL_STREAM"):
        monkeypatch.delenv(key, raising=False)
    daemon.refuse_daemon_under_systemd()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    with pytest.raises(daemon.DaemonError, match="under systemd"):
        daemon.refuse_daemon_under_systemd()


# --------------------------------------------------------------------------- daemonize

def _start_child(pidfile: Path, *extra: str, wrap: list[str] | None = None) -> tuple[int, int]:
    start = time.monotonic()
    out = subprocess.run([*(wrap or []), sys.executable, str(DAEMON_CHILD), str(pidfile),
                          *extra], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - start < 10
    port = int(out.stdout.split()[0])
    _wait(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pidfile")
    return port, int(pidfile.read_text().split()[0])


def test_daemonize_detaches_and_keeps_the_listening_socket(tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "d.pid"
    port, pid = _start_child(pidfile)
    try:
        assert _alive(pid)
        reply = _line(port)
        fields = dict(re.findall(r"(\w+)=(\S+)", reply))
        assert int(fields["pid"]) == pid
        assert fields["umask"] == "27"
        assert fields["cwd"] == "/"
        assert int(fields["sid"]) == pid or int(fields["sid"]) != os.getsid(0)
        assert os.getsid(pid) != os.getsid(0)                 # own session, no tty
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        # stdout pipe of the caller, pytest's files etc. were all closed
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [t for t in targets if t.startswith("pipe:")], targets

        os.kill(pid, signal.SIGHUP)                          # mapped: must not kill it
        _wait(lambda: "hups=1" in _line(port), what="SIGHUP handled")
        assert _alive(pid)
    finally:
        _terminate(pid)
    _wait(lambda: not pidfile.exists(), what="pidfile removed")


def test_daemonize_refuses_live_pidfile_before_forking(tmp_path: Path) -> None:
    pidfile = tmp_path / "d.pid"
    _port, pid = _start_child(pidfile)
    try:
        out = subprocess.run([sys.executable, str(DAEMON_CHILD), str(pidfile)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        assert f"already running as pid {pid}" in out.stderr
        assert _alive(pid) and pidfile.read_text().split()[0] == str(pid)
    finally:
        _terminate(pid)


def test_daemonize_replaces_stale_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "d.pid"
    dead = _dead_pid()
    pidfile.write_text(f"{dead}\n")
    port, pid = _start_child(pidfile)
    try:
        assert pid != dead
        assert _line(port).startswith(f"+OK pid={pid} ")
    finally:
        _terminate(pid)


@needs_root
def test_daemonize_then_drop_privileges_still_removes_pidfile(tmp_path: Path) -> None:
    """The pidfile is written as root; after dropping to the service user the daemon must
    still be able to remove it (its directory and the file belong to that user)."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="pop3sf-daemonize-", dir="/tmp"))
    try:
        base.chmod(0o755)
        pidfile = base / "run" / "d.pid"
        port, pid = _start_child(pidfile, "--user", "nobody")
        nobody = pwd.getpwnam("nobody").pw_uid
        _wait(lambda: os.stat(f"/proc/{pid}").st_uid == nobody, what="uid switch")
        assert _line(port).startswith(f"+OK pid={pid} ")
        assert pidfile.parent.stat().st_uid == nobody
        _terminate(pid)
        _wait(lambda: not pidfile.exists(), timeout=5, what="pidfile removed by nobody")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_journald
def test_daemonize_logs_to_journald_not_to_clients(tmp_path: Path) -> None:
    """Logging set up after daemonize: records written while a client's fd is open go to the
    journal, and the client receives exactly its one line."""
    jdir = tmp_path / "journal"
    pidfile = tmp_path / "d.pid"
    marker = uuid.uuid4().hex
    script = tmp_path / "run.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        set -e
        port=$({sys.executable} {DAEMON_CHILD} {pidfile} --journal | head -1)
        for i in $(seq 200); do [ -s {pidfile} ] && break; sleep 0.05; done
        pid=$(cat {pidfile})
        {sys.executable} -c '
        import socket, sys
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        open(sys.argv[2], "wb").write(data)
        ' "$port" {tmp_path}/client-{marker}.txt
        kill -TERM "$pid"
        for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.05; done
        exit 1
        """))
    script.chmod(0o755)
    run = subprocess.run([str(WITH_JOURNALD), str(jdir), "--", str(script)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    client = (tmp_path / f"client-{marker}.txt").read_bytes()
    assert re.fullmatch(rb"\+OK pid=\d+ hups=0 umask=27 cwd=/ sid=\d+ fds=\[[0-9, ]+\]\r\n",
                        client), client
    out = subprocess.run(["journalctl", "-D", str(jdir), "-o", "json", "--no-pager",
                          "SYSLOG_IDENTIFIER=pop3sf"], capture_output=True, text=True,
                         check=True, timeout=30)
    entries = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    events = [e.get("POP3SF_EVENT") for e in entries]
    assert events.count("connect") == 1 and events.count("served") == 1, entries
    assert any(e["MESSAGE"] == "stopping" for e in entries)
    assert all(e.get("POP3SF_CLIENT") == "127.0.0.1" for e in entries if e.get("POP3SF_EVENT"))


# --------------------------------------------------------------------------- pop3sf --daemon

POP3SF = [sys.executable, "-m", "pop3sf"]
ADMIN = [sys.executable, "-m", "pop3sf.auxiliary.admin"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """A config + mail directory for one by-hand pop3sf, with user alice and one message."""

    def __init__(self, base: Path, user: str, target: str = "file") -> None:
        self.base = base
        self.port = _free_port()
        self.pidfile = base / "run" / "pop3sf.pid"
        self.logfile = base / "pop3sf.log"
        self.mail = base / "mail"
        self.mail.mkdir(parents=True)
        self.config = base / "pop3sf.conf"
        self.write_config(user, target)
        subprocess.run([*ADMIN, "--config", str(self.config), "user", "add", "alice"],
                       input="secret\n", text=True, check=True, capture_output=True)
        subprocess.run([*ADMIN, "--config", str(self.config), "message", "add", "alice"],
                       input="hello from the daemon test\n", text=True, check=True,
                       capture_output=True)

    def write_config(self, user: str, target: str, extra: str = "") -> None:
        self.config.write_text(textwrap.dedent(f"""\
            [server]
            user = {user}
            pidfile = {self.pidfile}
            [logging]
            target = {target}
            file = {self.logfile if target == "file" else ""}
            [listeners]
                [[pop3]]
                addresses = 127.0.0.1:{self.port}
            [adapter]
            type = directory_multi
            root = {self.mail}
            """) + extra)

    def start(self, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items()
                 if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
                              "INVOCATION_ID", "JOURNAL_STREAM", "WATCHDOG_USEC")}
        clean.update(env or {})
        return subprocess.run([*POP3SF, "--config", str(self.config), "--daemon"], env=clean,
                              capture_output=True, text=True, timeout=60)

    def pid(self) -> int:
        def current() -> str:
            try:
                return self.pidfile.read_text().strip()
            except FileNotFoundError:
                return ""
        _wait(lambda: bool(current()), what="pidfile")
        return int(current().split()[0])

    def read_mail(self) -> list[bytes]:
        pop = poplib.POP3("127.0.0.1", self.port, timeout=10)
        try:
            pop.user("alice")
            pop.pass_("secret")
            return pop.retr(1)[1]
        finally:
            pop.quit()


@pytest.fixture
def instance(tmp_path: Path):
    inst = Instance(tmp_path, pwd.getpwuid(os.geteuid()).pw_name)
    yield inst
    if inst.pidfile.exists():
        text = inst.pidfile.read_text().split()
        if text:
            _terminate(int(text[0]))


def test_cli_daemon_serves_reloads_and_stops(instance: Instance) -> None:
    start = time.monotonic()
    run = instance.start()
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - start < 30
    assert f"127.0.0.1:{instance.port}" in run.stderr        # "listening on" before detaching
    pid = instance.pid()
    assert _alive(pid) and os.getsid(pid) != os.getsid(0)
    assert b"hello from the daemon test" in instance.read_mail()
    os.kill(pid, signal.SIGHUP)                               # reload must not kill it
    time.sleep(0.5)
    assert _alive(pid)
    assert b"hello from the daemon test" in instance.read_mail()
    os.kill(pid, signal.SIGTERM)
    _wait(lambda: not _alive(pid), what="daemon exit on SIGTERM")
    _wait(lambda: not instance.pidfile.exists(), what="pidfile removed")
    # [logging] target = file: the detached daemon's lines are in the file, none lost.
    log = instance.logfile.read_text()
    for pattern in (r"INFO pop3sf: pop3sf \S+ started", r"INFO pop3sf.session: .*login",
                    r"INFO pop3sf.server: configuration reloaded", r"INFO pop3sf: pop3sf stopped"):
        assert re.search(pattern, log), (pattern, log)
    assert len(re.findall(r"POP3SF|connect 127\.0\.0\.1", log)) >= 2, log


def test_cli_daemon_live_pidfile_is_a_clear_error(instance: Instance) -> None:
    assert instance.start().returncode == 0
    pid = instance.pid()
    second = instance.start()
    assert second.returncode == 1
    assert f"already running as pid {pid}" in second.stderr, second.stderr
    assert _alive(pid) and instance.pidfile.read_text().split()[0] == str(pid)


def test_cli_daemon_stale_pidfile_is_removed(instance: Instance) -> None:
    dead = _dead_pid()
    instance.pidfile.parent.mkdir(parents=True, exist_ok=True)
    instance.pidfile.write_text(f"{dead}\n")
    run = instance.start()
    assert run.returncode == 0, run.stderr
    _wait(lambda: instance.pidfile.exists() and
          instance.pidfile.read_text().split()[:1] not in ([], [str(dead)]), what="new pidfile")
    pid = instance.pid()
    assert pid != dead and _alive(pid)
    assert b"hello from the daemon test" in instance.read_mail()


def test_cli_daemon_refused_under_systemd(instance: Instance, tmp_path: Path) -> None:
    run = instance.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert run.returncode == 1
    assert "systemd" in run.stderr and "--daemon" in run.stderr
    assert not instance.pidfile.exists()


@needs_journald
def test_cli_daemon_logs_to_private_journald_without_leaking(tmp_path: Path) -> None:
    """By hand with --daemon: the session is in the journal with its fields, and the client's
    transcript holds POP3 and nothing else."""
    inst = Instance(tmp_path / "inst", "root", target="journald")
    jdir = tmp_path / "journal"
    transcript = tmp_path / "transcript.bin"
    script = tmp_path / "run.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        set -e
        {' '.join(POP3SF)} --config {inst.config} --daemon
        for i in $(seq 200); do [ -s {inst.pidfile} ] && break; sleep 0.05; done
        pid=$(cat {inst.pidfile})
        {sys.executable} - <<'PY'
        import socket
        s = socket.create_connection(("127.0.0.1", {inst.port}), timeout=10)
        f = s.makefile("rwb", buffering=0)
        out = [f.readline()]
        for cmd in (b"USER alice", b"PASS secret", b"STAT", b"RETR 1", b"QUIT"):
            f.write(cmd + b"\\r\\n")
            line = f.readline()
            out.append(line)
            if cmd == b"RETR 1" and line.startswith(b"+OK"):
                while True:
                    line = f.readline()
                    out.append(line)
                    if line == b".\\r\\n":
                        break
        out.append(s.recv(65536))          # after QUIT: must be the end of the stream
        open("{transcript}", "wb").write(b"".join(out))
        PY
        kill -TERM "$pid"
        for i in $(seq 200); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.05; done
        echo "daemon did not stop" >&2
        exit 1
        """))
    script.chmod(0o755)
    run = subprocess.run([str(WITH_JOURNALD), str(jdir), "--", str(script)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    data = transcript.read_bytes()
    assert b"MESSAGE=" not in data and b"PRIORITY=" not in data and b"CODE_FILE" not in data
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"+OK")
    assert b"hello from the daemon test" in data
    assert data.endswith(b".\r\n+OK") or re.search(rb"\.\r\n\+OK[^\r\n]*\r\n$", data), data[-200:]
    out = subprocess.run(["journalctl", "-D", str(jdir), "-o", "json", "--no-pager",
                          "SYSLOG_IDENTIFIER=pop3sf"], capture_output=True, text=True,
                         check=True, timeout=30)
    entries = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    events = {e.get("POP3SF_EVENT") for e in entries}
    assert {"connect", "login"} <= events, [e.get("MESSAGE") for e in entries]
    login = next(e for e in entries if e.get("POP3SF_EVENT") == "login")
    assert login["POP3SF_USER"] == "alice" and login["POP3SF_CLIENT"] == "127.0.0.1"
    assert login["PRIORITY"] == "6"
    assert any(e.get("POP3SF_BYTES") for e in entries), "no entry with POP3SF_BYTES"
    assert not any("secret" in str(e.get("MESSAGE", "")) for e in entries)


@needs_root
def test_cli_daemon_drops_privileges_and_cleans_up(tmp_path: Path) -> None:
    """Started as root with user = nobody: binds, detaches, runs as nobody, and still removes
    its pidfile at exit (the pidfile directory belongs to the service user)."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="pop3sf-daemon-", dir="/tmp"))
    try:
        base.chmod(0o755)
        inst = Instance(base, "nobody")
        nobody = pwd.getpwnam("nobody")
        for path in [inst.mail, *inst.mail.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        run = inst.start()
        assert run.returncode == 0, run.stderr
        pid = inst.pid()
        _wait(lambda: os.stat(f"/proc/{pid}").st_uid == nobody.pw_uid, what="uid switch")
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{nobody.pw_uid}\s+{nobody.pw_uid}\s+{nobody.pw_uid}", status,
                         re.M), status
        assert b"hello from the daemon test" in inst.read_mail()
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not _alive(pid), what="daemon exit")
        _wait(lambda: not inst.pidfile.exists(), timeout=5, what="pidfile removed by nobody")
    finally:
        if (base / "run" / "pop3sf.pid").exists():
            _terminate(int((base / "run" / "pop3sf.pid").read_text().split()[0]))
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- --daemon logging

def test_cli_daemon_without_any_log_target_refuses_before_detaching(tmp_path: Path) -> None:
    """target = auto with neither journald nor syslog, or target = stderr: a clear error on the
    terminal and no daemon, instead of a daemon logging into nothing."""
    if os.path.exists("/run/systemd/journal/socket") or os.path.exists("/dev/log"):
        pytest.skip("this host has journald or syslog")
    inst = Instance(tmp_path, pwd.getpwuid(os.geteuid()).pw_name, target="auto")
    run = inst.start()
    assert run.returncode == 78, run.stderr
    assert "neither journald" in run.stderr and "target = file" in run.stderr
    inst.write_config(pwd.getpwuid(os.geteuid()).pw_name, "stderr")
    run = inst.start()
    assert run.returncode == 78 and "target = stderr" in run.stderr, run.stderr
    inst.logfile = tmp_path / "no" / "such" / "dir" / "x.log"
    inst.write_config(pwd.getpwuid(os.geteuid()).pw_name, "file")
    run = inst.start()
    assert run.returncode == 78, run.stderr
    assert f"[logging] file = '{inst.logfile}': cannot be written" in run.stderr
    assert not inst.pidfile.exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", inst.port)) != 0


SYSLOG_RUN = """\
set -e
mount -t tmpfs -o mode=755 tmpfs /dev
for spec in null:3 zero:5 random:8 urandom:9; do
    mknod -m 666 /dev/${{spec%:*}} c 1 ${{spec#*:}}
done
mount -t tmpfs -o mode=755 tmpfs /run/systemd
{python} -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/dev/log")
out = open(sys.argv[1], "ab", buffering=0)
while True:
    out.write(s.recv(65536) + b"\\n")
' {out} &
receiver=$!
for i in $(seq 100); do [ -S /dev/log ] && break; sleep 0.05; done
{pop3sf} --config {config} --daemon
for i in $(seq 200); do [ -s {pidfile} ] && break; sleep 0.05; done
pid=$(cat {pidfile})
{python} -c '
import poplib, sys
pop = poplib.POP3("127.0.0.1", int(sys.argv[1]), timeout=10)
pop.user("alice"); pop.pass_("secret"); pop.retr(1); pop.quit()
' {port}
kill -TERM "$pid"
for i in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
kill "$receiver"
"""


@needs_root
def test_cli_daemon_falls_back_to_syslog(tmp_path: Path) -> None:
    """--daemon with target = auto and no journald, but a syslog socket at /dev/log (in a
    private mount namespace): every line goes to syslog, facility daemon, with its priority."""
    if not shutil.which("unshare"):
        pytest.skip("unshare missing")
    inst = Instance(tmp_path, "root", target="auto")
    out = tmp_path / "syslog.out"
    script = tmp_path / "run.sh"
    script.write_text(SYSLOG_RUN.format(python=sys.executable, out=out, config=inst.config,
                                        pidfile=inst.pidfile, port=inst.port,
                                        pop3sf=" ".join(POP3SF)))
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", str(script)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = out.read_text().splitlines()
    pid = next(int(m[1]) for line in lines if (m := re.match(r"<\d+>pop3sf\[(\d+)\]", line)))
    assert f"<30>pop3sf[{pid}]: pop3sf 2.0.0 started (directory_multi adapter, 1 listener)" \
        in lines, lines                                 # 30: facility daemon, priority info
    assert any(re.match(rf"<30>pop3sf\[{pid}\]: .*login", line) for line in lines), lines
    assert f"<30>pop3sf[{pid}]: pop3sf stopped" in lines, lines
