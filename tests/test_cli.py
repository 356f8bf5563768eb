"""The real ``pop3sf`` command: --version, --check-config, serving, SIGHUP reload, SIGTERM."""

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
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Raw
from mariadb import MariaDBServer, mariadb  # noqa: F401  (fixture)
from test_daemon import needs_journald

from pop3sf import __version__

POP3SF = [sys.executable, "-m", "pop3sf"]


def write_config(path: Path, mail: Path, extra: str = "") -> Path:
    path.write_text(f"""
[server]
user = ""
shutdown_grace = 3
[logging]
target = stderr
level = debug
[listeners]
    [[pop3]]
    addresses = 127.0.0.1:0
[adapter]
type = list
users = alice:{{PLAIN}}secret
messages = {mail}
{extra}
""")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    mail = tmp_path / "m.eml"
    mail.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
    return write_config(tmp_path / "pop3sf.conf", mail)


class Daemon:
    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen([*POP3SF, "--config", str(config)], stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self.log: list[str] = []
        line = self.proc.stderr.readline().decode()
        self.log.append(line)
        m = re.search(r"listening on pop3 127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.port = int(m.group(1))

    def wait_log(self, pattern: str, timeout: float = 10) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode()
            self.log.append(line)
            if re.search(pattern, line):
                return line
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError(f"no log line matching {pattern!r}: {''.join(self.log)[-2000:]}")


@pytest.fixture
def daemon(config: Path) -> Iterator[Daemon]:
    d = Daemon(config)
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
    d.proc.wait()


def test_version() -> None:
    out = subprocess.run([*POP3SF, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"pop3sf {__version__}"


def test_check_config(config: Path, tmp_path: Path) -> None:
    ok = subprocess.run([*POP3SF, "--check-config", "--config", str(config)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "configuration OK" in ok.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text(config.read_text() + "\n[limits]\nidle_timeout = soon\n")
    out = subprocess.run([*POP3SF, "--check-config", "--config", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 78                      # EX_CONFIG
    assert str(bad) in out.stderr and "[limits] idle_timeout" in out.stderr
    missing = subprocess.run([*POP3SF, "--config", str(tmp_path / "nope.conf")],
                             capture_output=True, text=True)
    assert missing.returncode == 78 and "cannot read" in missing.stderr


def test_serve_reload_and_terminate(daemon: Daemon, config: Path) -> None:
    pop = poplib.POP3("127.0.0.1", daemon.port, timeout=10)
    assert "IMPLEMENTATION" in str(pop.capa())
    assert pop.capa()["IMPLEMENTATION"] == ["pop3sf"]
    pop.user("alice")
    pop.pass_("secret")
    assert pop.stat()[0] == 1
    pop.quit()
    # A broken config on SIGHUP is refused and the old one kept.
    good = config.read_text()
    config.write_text(good + "\n[limits]\nmax_bad_commands = -3\n")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("reload failed, old configuration kept")
    # A good change is applied to new sessions.
    config.write_text(good.replace("[server]", "[protocol]\nimplementation_version = yes\n"
                                   "[server]"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded")
    pop = poplib.POP3("127.0.0.1", daemon.port, timeout=10)
    assert pop.capa()["IMPLEMENTATION"] == ["pop3sf", __version__]
    # SIGTERM: the idle clients are told, the server exits 0 with nothing left held.
    idle = Raw.connect(daemon.port)
    idle.line()
    marked = Raw.connect(daemon.port)
    marked.line()
    marked.cmd(b"USER alice")
    assert marked.cmd(b"PASS secret").startswith(b"+OK")
    assert marked.cmd(b"DELE 1").startswith(b"+OK")
    daemon.proc.send_signal(signal.SIGTERM)
    assert idle.line().startswith(b"-ERR [SYS/TEMP]")
    assert marked.line().startswith(b"-ERR [SYS/TEMP]")
    assert daemon.proc.wait(10) == 0
    daemon.wait_log("pop3sf stopped")
    assert "resources not given back" not in "".join(daemon.log)
    pop.close()


# --------------------------------------------------------------------------- helpers

HERE = Path(__file__).parent
WITH_JOURNALD = HERE / "deb" / "with-journald.sh"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (service user, namespaces)")
SYSTEMD_ENV = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "INVOCATION_ID",
               "JOURNAL_STREAM", "WATCHDOG_USEC")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}
    return subprocess.run([*POP3SF, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd="/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="pop3sf-cli-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def config_text(adapter: dict[str, Any], user: str = "", extra: str = "",
                port: int = 0, group: str = "") -> str:
    lines = ["[server]", f"user = {user}", f"group = {group}", "shutdown_grace = 3",
             "[logging]", "target = stderr",
             "[listeners]", "    [[pop3]]", f"    addresses = 127.0.0.1:{port}", "[adapter]"]
    lines += [f"{k} = {v}" for k, v in adapter.items()]
    return "\n".join(lines) + "\n" + extra


# --------------------------------------------------------------------------- reload

def test_reload_refuses_an_adapter_type_change(daemon: Daemon, config: Path,
                                               tmp_path: Path) -> None:
    """Another adapter type is refused as a whole: the running adapter keeps serving, nothing
    of the new file is applied, and the next valid reload still works."""
    daemon.wait_log("started")                                # SIGHUP handler installed
    good = config.read_text()
    (tmp_path / "dir").mkdir()
    other = good.split("[adapter]")[0] + "[protocol]\nimplementation_version = yes\n" \
        f"[adapter]\ntype = directory_multi\nroot = {tmp_path / 'dir'}\n"
    config.write_text(other)
    daemon.proc.send_signal(signal.SIGHUP)
    line = daemon.wait_log("reload failed, old configuration kept")
    assert "[adapter] type changed from 'list' to 'directory_multi'" in line
    assert "restart" in line
    pop = poplib.POP3("127.0.0.1", daemon.port, timeout=10)
    assert pop.capa()["IMPLEMENTATION"] == ["pop3sf"]          # [protocol] not applied either
    pop.user("alice")
    pop.pass_("secret")                                        # the list adapter still serves
    assert pop.stat()[0] == 1
    pop.quit()
    # Back to the running type, with a change: applied (the stored state was not corrupted).
    config.write_text(good.replace("[server]", "[protocol]\nimplementation_version = yes\n"
                                   "[listeners]\n    [[pop3]]\n    addresses = 127.0.0.1:1\n"
                                   "[server]", 1).replace(
        "[listeners]\n    [[pop3]]\n    addresses = 127.0.0.1:0\n", "", 1))
    daemon.proc.send_signal(signal.SIGHUP)
    warn = daemon.wait_log(r"reload: .*changed; that needs a restart")
    assert "[listeners]" in warn and "[adapter]" not in warn
    daemon.wait_log("configuration reloaded")
    pop = poplib.POP3("127.0.0.1", daemon.port, timeout=10)   # still on the bound listener
    assert pop.capa()["IMPLEMENTATION"] == ["pop3sf", __version__]
    pop.quit()
    # Listeners kept as running: the same file reloaded again warns again.
    daemon.proc.send_signal(signal.SIGHUP)
    assert "[listeners]" in daemon.wait_log(r"reload: .*changed; that needs a restart")
    daemon.wait_log("configuration reloaded")


# --------------------------------------------------------------------------- --check-config

def test_check_config_tries_the_database(mariadb: MariaDBServer, tmp_path: Path) -> None:  # noqa: F811
    """A wrong database password fails the check (78, with the server's answer); offline
    (--no-connect) it passes; the right password passes with the connection tried."""
    cfg = mariadb.adapter_config(tcp=True)
    path = tmp_path / "pop3sf.conf"
    path.write_text(config_text({"type": "mysql_multi", **cfg}))
    path.chmod(0o600)
    ok = run_cli("--check-config", "--config", str(path))
    assert ok.returncode == 0, ok.stderr
    path.write_text(config_text({"type": "mysql_multi", **cfg, "password": "wrong"}))
    bad = run_cli("--check-config", "--config", str(path))
    assert bad.returncode == 78, bad.stderr
    assert "[adapter] (mysql_multi): cannot connect to" in bad.stderr
    assert "Access denied" in bad.stderr and "Traceback" not in bad.stderr
    offline = run_cli("--check-config", "--no-connect", "--config", str(path))
    assert offline.returncode == 0, offline.stderr
    path.write_text(config_text({"type": "mysql_multi", **cfg, "port": free_port()}))
    down = run_cli("--check-config", "--config", str(path))
    assert down.returncode == 78 and "cannot connect to" in down.stderr, down.stderr


@needs_root
def test_check_config_as_the_service_user(shared_dir: Path, tls_files: dict[str, str]) -> None:
    """As root with user = nobody, files only root can read fail the check, as they would fail
    the running server; an unknown user or group is an error."""
    key, cert = shared_dir / "key.pem", shared_dir / "cert.pem"
    shutil.copy(tls_files["private_key"], key)
    shutil.copy(tls_files["certificate"], cert)
    key.chmod(0o600)
    cert.chmod(0o644)
    tls = f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
    path = shared_dir / "pop3sf.conf"
    listed = {"type": "list", "users": "alice:{PLAIN}pw"}

    def check(text: str, *args: str) -> subprocess.CompletedProcess[str]:
        path.write_text(text)
        return run_cli("--check-config", *args, "--config", str(path))

    as_root = check(config_text(listed, "", tls))
    assert as_root.returncode == 0, as_root.stderr            # root reads the key...
    run = check(config_text(listed, "nobody", tls))
    assert run.returncode == 78, run.stderr                    # ...the service user can't
    assert "[tls] private_key" in run.stderr and "Permission denied" in run.stderr
    served = run_cli("--config", str(path))   # the server, too, reads the key as nobody
    assert served.returncode == 78, served.stderr
    assert "[tls] private_key" in served.stderr and "Permission denied" in served.stderr
    nobody = pwd.getpwnam("nobody")
    os.chown(key, nobody.pw_uid, nobody.pw_gid)
    ok = check(config_text(listed, "nobody", tls))
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout

    unknown = "no-such-user-" + uuid.uuid4().hex[:6]
    run = check(config_text(listed, unknown))
    assert run.returncode == 78 and f"unknown user {unknown!r}" in run.stderr, run.stderr
    run = check(config_text(listed, "nobody", group=unknown))
    assert run.returncode == 78 and f"unknown group {unknown!r}" in run.stderr, run.stderr

    # A mail directory only root can open: found only by reaching the data source.
    mail = shared_dir / "mail"
    mail.mkdir(mode=0o700)
    multi = {"type": "directory_multi", "root": str(mail)}
    run = check(config_text(multi, "nobody"))
    assert run.returncode == 78, run.stderr
    assert f"root = '{mail}': cannot open: Permission denied" in run.stderr
    assert check(config_text(multi, "nobody"), "--no-connect").returncode == 0
    passwd = shared_dir / "passwd"
    passwd.write_text(f"alice:{{PLAIN}}pw::::{mail}/alice::\n")
    passwd.chmod(0o644)
    maildir = {"type": "maildir", "passwd_file": str(passwd), "root": str(mail)}
    run = check(config_text(maildir, "nobody"))
    assert run.returncode == 78, run.stderr
    assert f"[adapter] (maildir): root = '{mail}': cannot open" in run.stderr
    os.chown(mail, nobody.pw_uid, nobody.pw_gid)
    assert check(config_text(multi, "nobody")).returncode == 0
    assert check(config_text(maildir, "nobody")).returncode == 0
    passwd.chmod(0o600)                                        # read by check(), as nobody
    run = check(config_text(maildir, "nobody"), "--no-connect")
    assert run.returncode == 78 and "passwd_file" in run.stderr, run.stderr


# --------------------------------------------------------------------------- privileges

UIDPROBE = '''
"""A third-party adapter recording the effective uid of every step of its life."""
import os

from pop3sf.adapters.memory import ListAdapter

RECORD = os.environ["UIDPROBE_RECORD"]


def note(stage):
    with open(RECORD, "a") as f:
        f.write(f"{stage} {os.geteuid()} {os.getpid()}\\n")


note("import")


class Probe(ListAdapter):
    configspec = ListAdapter.configspec + "password = string(default='')\\n"

    def __init__(self, config):
        note("init")
        super().__init__({k: v for k, v in config.items() if k != "password"})

    def check(self):
        note("check")

    def start(self):
        note("start")

    def new_session(self, peer):
        note("session")
        return super().new_session(peer)
'''


@needs_root
def test_adapter_code_runs_as_the_service_user(shared_dir: Path) -> None:
    """Started as root with user = nobody, a third-party adapter is imported, built, checked
    and used only as nobody, by --check-config (in a child that dropped root) and by the server
    (once, after dropping root); and an inline password in a
    world-readable config is warned about in both."""
    (shared_dir / "uidprobe.py").write_text(UIDPROBE)
    record = shared_dir / "record"
    record.touch()
    record.chmod(0o666)
    mail = shared_dir / "m.eml"
    mail.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
    path = shared_dir / "pop3sf.conf"
    adapter = {"type": "uidprobe:Probe", "users": "alice:{PLAIN}secret", "messages": str(mail),
               "password": "hunter2"}
    path.write_text(config_text(adapter, "nobody"))
    path.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}
    env.update(PYTHONPATH=str(shared_dir), UIDPROBE_RECORD=str(record))
    nobody = pwd.getpwnam("nobody").pw_uid

    checked = subprocess.run([*POP3SF, "--check-config", "--config", str(path)], env=env,
                             capture_output=True, text=True, timeout=60, cwd="/")
    assert checked.returncode == 0, checked.stderr
    assert "[adapter] password and is readable by everyone (mode 0644)" in checked.stderr
    stages = [line.split() for line in record.read_text().splitlines()]
    assert [s[0] for s in stages] == ["import", "init", "check"], stages
    assert {int(s[1]) for s in stages} == {nobody}, stages
    record.write_text("")

    proc = subprocess.Popen([*POP3SF, "--config", str(path)], env=env, cwd="/",
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        log = []
        while not any("started" in line for line in log):
            line = proc.stderr.readline()
            assert line, "".join(log)
            log.append(line)
        port = int(re.search(r"listening on pop3 127\.0\.0\.1:(\d+)", "".join(log))[1])
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("alice")
        pop.pass_("secret")
        assert pop.stat()[0] == 1
        pop.quit()
        stages = [line.split() for line in record.read_text().splitlines()]
        # in the foreground, starting is the check: no preflight child builds the adapter first
        assert [s[0] for s in stages] == ["import", "init", "start", "session"], stages
        assert {(int(s[1]), int(s[2])) for s in stages} == {(nobody, proc.pid)}, stages
        assert re.search(r"WARNING pop3sf: .*\[adapter\] password and is readable by everyone",
                         "".join(log)), "".join(log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@needs_root
def test_readable_secret_who_may_read(shared_dir: Path) -> None:
    """The service's own group may read a config holding a secret (it must, under systemd);
    anyone else may not; a secret in a password_file is no inline secret."""
    path = shared_dir / "pop3sf.conf"
    nobody = pwd.getpwnam("nobody")
    path.write_text(config_text({"type": "mysql_multi", "password": "hunter2"}, "nobody"))
    os.chown(path, 0, nobody.pw_gid)
    path.chmod(0o640)
    quiet = run_cli("--check-config", "--no-connect", "--config", str(path))
    assert quiet.returncode == 0 and "readable" not in quiet.stderr, quiet.stderr
    os.chown(path, 0, 0)
    path.chmod(0o604)
    loud = run_cli("--check-config", "--no-connect", "--config", str(path))
    assert loud.returncode == 0
    assert "pop3sf: warning:" in loud.stderr and "readable by everyone" in loud.stderr
    import grp
    other = grp.getgrnam("daemon").gr_gid
    os.chown(path, 0, other)
    path.chmod(0o640)
    group = run_cli("--check-config", "--no-connect", "--config", str(path))
    assert "readable by group daemon" in group.stderr, group.stderr
    secret = shared_dir / "dbpass"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    os.chown(secret, nobody.pw_uid, nobody.pw_gid)
    path.write_text(config_text({"type": "mysql_multi", "password_file": str(secret)}, "nobody"))
    path.chmod(0o644)
    none = run_cli("--check-config", "--no-connect", "--config", str(path))
    assert none.returncode == 0 and "readable" not in none.stderr, none.stderr


# --------------------------------------------------------------------------- journald priorities

STREAM_RUNNER = '''
"""Run pop3sf with stdout and stderr on a journal stream, as systemd runs a service
(SyslogLevelPrefix= on, JOURNAL_STREAM naming the stream)."""
import os, poplib, socket, subprocess, sys, time
from systemd import journal

POP3SF, CONFIGS, PORT = sys.argv[1].split(), sys.argv[2], int(sys.argv[3])


def start(ident, *args):
    stream = journal.stream(ident, level_prefix=True)
    st = os.fstat(stream.fileno())
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID")}
    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    return subprocess.Popen([*POP3SF, *args], stdout=stream, stderr=stream, env=env, cwd="/")


assert start("case-bad", "--check-config", "-c", CONFIGS + "/bad.conf").wait(30) == 78
assert start("case-warn", "--check-config", "-c", CONFIGS + "/warn.conf").wait(30) == 0
assert start("case-start", "-c", CONFIGS + "/bad.conf").wait(30) == 78
server = start("case-serve", "-c", CONFIGS + "/serve.conf")
deadline = time.monotonic() + 20
while True:
    try:
        pop = poplib.POP3("127.0.0.1", PORT, timeout=10)
        break
    except OSError:
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.05)
pop.capa()
pop.quit()
with open(CONFIGS + "/serve.conf", "a") as f:
    f.write("[limits]\\nmax_bad_commands = -1\\n")
server.send_signal(1)                       # SIGHUP: a broken config, refused
for _ in range(3):                          # a few loop turns: the reload ran
    pop = poplib.POP3("127.0.0.1", PORT, timeout=10)
    pop.capa()
    pop.quit()
server.terminate()
assert server.wait(30) == 0
'''


@needs_journald
def test_errors_reach_the_journal_at_their_priority(tmp_path: Path) -> None:
    """With stderr on the journal (as under systemd), every line has the priority of its level,
    from the first error of a start-up that fails to a reload the running server refuses:
    ``journalctl -p err`` shows exactly the error lines."""
    mail = tmp_path / "m.eml"
    mail.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
    port = free_port()
    adapter = {"type": "list", "users": "alice:{PLAIN}secret", "messages": str(mail)}
    (tmp_path / "bad.conf").write_text(config_text(adapter, extra="[limits]\nidle_timeout = x\n"))
    (tmp_path / "warn.conf").write_text(config_text(adapter, extra="[limits]\nidle_timeout = 9\n"))
    (tmp_path / "serve.conf").write_text(config_text(adapter, port=port))
    runner = tmp_path / "runner.py"
    runner.write_text(STREAM_RUNNER)
    jdir = tmp_path / "journal"
    run = subprocess.run([str(WITH_JOURNALD), str(jdir), "--", "/usr/bin/python3", str(runner),
                          " ".join(POP3SF), str(tmp_path), str(port)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr

    def entries(*args: str) -> list[tuple[str, str, str]]:
        out = subprocess.run(["journalctl", "-D", str(jdir), "-o", "json", "--no-pager", *args],
                             capture_output=True, text=True, check=True, timeout=30)
        found = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        return [(e.get("SYSLOG_IDENTIFIER", ""), e["PRIORITY"], e["MESSAGE"]) for e in found
                if str(e.get("SYSLOG_IDENTIFIER", "")).startswith("case-")]

    every = entries()
    by_text = {(ident, text): prio for ident, prio, text in every}

    def priority(ident: str, pattern: str) -> str:
        hits = [p for (i, text), p in by_text.items() if i == ident and re.search(pattern, text)]
        assert len(hits) == 1, (ident, pattern, every)
        return hits[0]

    assert priority("case-bad", r"^pop3sf: error: .*\[limits\] idle_timeout is invalid") == "3"
    assert priority("case-warn", r"^pop3sf: warning: .*idle_timeout 9\.0 s is below") == "4"
    assert priority("case-warn", r"configuration OK") == "6"
    assert priority("case-start", r"^pop3sf: error: .*\[limits\] idle_timeout is invalid") == "3"
    assert priority("case-serve", r"listening on pop3") == "6"
    assert priority("case-serve", r"INFO pop3sf: pop3sf .* started") == "6"
    assert priority("case-serve", r"ERROR pop3sf: reload failed, old configuration kept") == "3"
    assert not [e for e in every if e[2].startswith("<")], every     # prefixes consumed
    errors = entries("-p", "err")
    assert sorted(i for i, _p, _t in errors) == ["case-bad", "case-serve", "case-start"], errors


def test_an_unexpected_crash_is_logged_critical(tmp_path: Path) -> None:
    """A bug (here a third-party adapter with a broken configspec) is not a config error: it
    exits 70 (EX_SOFTWARE) and its traceback goes out as a critical record, not bare stderr."""
    (tmp_path / "brokenspec.py").write_text(
        "from pop3sf.adapters.memory import ListAdapter\n\n"
        "class Broken(ListAdapter):\n    configspec = 42\n")
    path = tmp_path / "pop3sf.conf"
    path.write_text(config_text({"type": "brokenspec:Broken"}))
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}
    env["PYTHONPATH"] = str(tmp_path)
    run = subprocess.run([*POP3SF, "--check-config", "--config", str(path)], env=env,
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert run.returncode == 70, run.stderr
    assert run.stderr.startswith("pop3sf: critical: pop3sf failed unexpectedly\nTraceback")
    assert "TypeError" in run.stderr
