"""``pop3sf-admin who`` and ``kick`` against a real server over its control socket."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import poplib
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pop3sf.auxiliary import open_source
from pop3sf.auxiliary.admin import EX_NOPERM, EX_NOUSER, EX_UNAVAILABLE

from pop3sf import control
from pop3sf.config import ConfigError, settings_from_dict
from pop3sf.testing import RunningServer, running_server, server_config

_SCRIPT = Path(sys.executable).with_name("pop3sf-admin")
ADMIN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "pop3sf.auxiliary.admin"]
POP3SF = [sys.executable, "-m", "pop3sf"]
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")
USERS = ("alice", "bob", "carol")
MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody %d\r\n"


def make_mail(root: Path, count: int = 3) -> dict[str, Any]:
    """A directory_multi source with USERS (password = name + '-pw'), ``count`` messages each."""
    root.mkdir(parents=True, exist_ok=True)
    adapter = {"type": "directory_multi", "root": str(root), "bcrypt_rounds": "4"}
    with open_source("directory_multi", adapter) as source:
        for user in USERS:
            source.add_user(user, user + "-pw")
            for i in range(count):
                source.add_message(user, MESSAGE % i)
    return adapter


def write_config(path: Path, adapter: dict[str, Any], control_socket: str) -> Path:
    lines = ["[server]", f"control_socket = {control_socket}",
             "[listeners]", "  [[plain]]", "  addresses = 127.0.0.1:0,", "[adapter]"]
    lines += [f"{k} = {v}" for k, v in adapter.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def admin(conf: Path, *args: str, groups: list[int] | None = None,
          as_user: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real pop3sf-admin command, optionally as another user with given groups."""
    preexec = None
    if as_user is not None:
        entry = pwd.getpwnam(as_user)

        def preexec() -> None:
            os.setgroups(groups or [])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)

    return subprocess.run([*ADMIN, "--config", str(conf), *args], capture_output=True,
                          text=True, timeout=60, preexec_fn=preexec)


def who(conf: Path) -> list[dict[str, str]]:
    """``pop3sf-admin who`` parsed from its table (the columns an admin reads)."""
    run = admin(conf, "who")
    assert run.returncode == 0, run.stderr
    header, *rows = run.stdout.splitlines()
    names = header.split()
    assert names == ["ACCOUNT", "ADDRESS", "LISTENER", "TLS", "SINCE", "SENT", "MODE"]
    result = []
    for row in rows:
        account, address, listener, tls, day, clock, sent, mode = row.split()
        result.append({"account": account, "address": address, "listener": listener,
                       "tls": tls, "since": f"{day} {clock}", "sent": sent, "mode": mode})
    return result


def login(pop: poplib.POP3, user: str, read_only: bool = False) -> poplib.POP3:
    if read_only:
        assert pop._shortcmd("XPRO").startswith(b"+OK")
    pop.user(user)
    pop.pass_(user + "-pw")
    return pop


def files(root: Path, user: str) -> list[str]:
    return sorted(p.name for p in (root / user).iterdir() if not p.name.startswith("."))


@contextlib.contextmanager
def served(tmp_path: Path, tls_files: dict[str, str] | None = None,
           socket_path: Path | None = None) -> Iterator[tuple[RunningServer, Path, Path]]:
    """A real server with a control socket, the matching config file and the mail root."""
    root = tmp_path / "mail"
    adapter = make_mail(root)
    path = socket_path or tmp_path / "run" / "control"
    conf = write_config(tmp_path / "pop3sf.conf", adapter, str(path))
    with running_server("directory_multi", {k: v for k, v in adapter.items() if k != "type"},
                        tls=tls_files, server={"control_socket": str(path)}) as srv:
        yield srv, conf, root


def test_who_lists_sessions_and_kick_ends_them_without_committing(
        tmp_path: Path, tls_files: dict[str, str], client_context: ssl.SSLContext,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with served(tmp_path, tls_files) as (srv, conf, root):
        before = time.time()
        alice = login(srv.pop3(), "alice")
        bob = login(srv.pop3_ssl(client_context), "bob")
        carol = login(srv.pop3(), "carol", read_only=True)
        anonymous = srv.pop3()  # connected, not logged in: not a session
        alice.retr(1)
        alice.dele(1)
        alice.dele(2)
        kept = files(root, "alice")

        rows = {r["account"]: r for r in who(conf)}
        assert sorted(rows) == ["alice", "bob", "carol"]
        ports = {"alice": alice.sock.getsockname()[1], "bob": bob.sock.getsockname()[1],
                 "carol": carol.sock.getsockname()[1]}
        for name, row in rows.items():
            assert row["address"] == f"127.0.0.1:{ports[name]}"
        assert (rows["alice"]["listener"], rows["alice"]["tls"]) == ("pop3", "no")
        assert (rows["bob"]["listener"], rows["bob"]["tls"]) == ("pop3s", "yes")
        assert rows["carol"]["mode"] == "read-only" and rows["alice"]["mode"] == "read-write"
        assert int(rows["alice"]["sent"]) > 150  # greeting, login replies, a whole message
        assert int(rows["bob"]["sent"]) > 1000  # TLS handshake included
        since = time.mktime(time.strptime(rows["alice"]["since"], "%Y-%m-%d %H:%M:%S"))
        assert before - 1 <= since <= time.time()
        raw = json.loads(admin(conf, "who", "--json").stdout)
        assert {s["account"] for s in raw} == {"alice", "bob", "carol"}

        kick = admin(conf, "kick", "alice")
        assert kick.returncode == 0, kick.stderr
        assert f"ended alice from 127.0.0.1:{ports['alice']} on pop3" in kick.stderr
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            alice.noop()  # the kicked client sees the connection close
        assert files(root, "alice") == kept  # its two DELE marks were not committed
        assert [r["account"] for r in who(conf)] == ["bob", "carol"]
        assert bob.noop().startswith(b"+OK") and carol.noop().startswith(b"+OK")
        log = caplog.text
        assert "session ended without QUIT, 2 marked deletions discarded" in log
        assert "(kicked by admin)" in log and "kick alice (asked by uid" in log

        again = login(srv.pop3(), "alice")  # the account is free again
        assert again.stat()[0] == len(kept)

        kick = admin(conf, "kick", "127.0.0.1")  # by address: every connection from it
        assert kick.returncode == 0, kick.stderr
        assert kick.stderr.count("ended ") == 4, kick.stderr
        assert "(not logged in)" in kick.stderr
        for pop in (bob, carol, again, anonymous):
            with pytest.raises((poplib.error_proto, OSError, EOFError)):
                pop.noop()
        assert who(conf) == []

        nobody_there = admin(conf, "kick", "dave")
        assert nobody_there.returncode == EX_NOUSER
        assert "no session of account or from address dave" in nobody_there.stderr


def test_who_without_a_running_server(tmp_path: Path) -> None:
    adapter = make_mail(tmp_path / "mail", 0)
    path = tmp_path / "run" / "control"
    conf = write_config(tmp_path / "pop3sf.conf", adapter, str(path))
    run = admin(conf, "who")
    assert run.returncode == EX_UNAVAILABLE
    assert run.stderr.strip() == f"pop3sf-admin: pop3sf is not running (nothing answers on {path})"
    assert run.stdout == ""

    # A server that died left its socket behind: same answer, and the next server replaces it.
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert admin(conf, "kick", "alice").returncode == EX_UNAVAILABLE
    with running_server("directory_multi", {"root": adapter["root"]},
                        server={"control_socket": str(path)}):
        assert admin(conf, "who").returncode == 0
    assert not path.exists()  # removed at shutdown
    assert admin(conf, "who").returncode == EX_UNAVAILABLE

    disabled = write_config(tmp_path / "off.conf", adapter, "")
    run = admin(disabled, "who")
    assert run.returncode == EX_UNAVAILABLE and "control socket is disabled" in run.stderr


def test_second_server_leaves_a_live_control_socket_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with served(tmp_path) as (srv, conf, root):
        first = os.stat(srv.server.settings.server.control_socket).st_ino
        pop = login(srv.pop3(), "alice")
        with running_server("directory_multi", {"root": str(root)},
                            server={"control_socket": srv.server.settings.server.control_socket}
                            ) as second:
            assert second.server.control is None
            assert "another server is answering" in caplog.text
            assert [r["account"] for r in who(conf)] == ["alice"]  # still the first one
        assert os.stat(srv.server.settings.server.control_socket).st_ino == first
        assert [r["account"] for r in who(conf)] == ["alice"]
        pop.quit()


def test_control_socket_path_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match="control_socket must be an absolute path"):
        settings_from_dict(server_config("list", {}, server={"control_socket": "run/ctl"}))


@needs_root
def test_only_root_and_the_service_group_may_connect(tmp_path: Path) -> None:
    """Socket 0660 in a 0750 directory: a user outside the group is refused, a member is not."""
    base = Path(tempfile.mkdtemp(prefix="pop3sf-control-", dir="/tmp"))
    try:
        base.chmod(0o755)  # traversable, so only the control directory decides
        with served(base, socket_path=base / "run" / "control") as (_srv, conf, _root):
            conf.chmod(0o644)
            path = base / "run" / "control"
            assert stat.S_IMODE(path.stat().st_mode) == 0o660
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
            group = path.stat().st_gid
            outsider = admin(conf, "who", as_user="nobody")
            assert outsider.returncode == EX_NOPERM, outsider.stderr
            assert "permission denied" in outsider.stderr and "run as root" in outsider.stderr
            member = admin(conf, "who", as_user="nobody", groups=[group])
            assert member.returncode == 0, member.stderr
            assert member.stdout.startswith("ACCOUNT")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _raw_control(path: Path, data: bytes, eof: bool = False) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        with contextlib.suppress(OSError):  # the server may close before all is sent
            sock.sendall(data)
            if eof:
                sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):  # the reply line, then EOF (or a reset: the
            chunk = sock.recv(65536)       # server does not read what it refused)
            assert chunk, f"closed after {reply!r}"
            reply += chunk
    return json.loads(reply)


def test_hostile_control_clients_cost_pop3_sessions_nothing(tmp_path: Path) -> None:
    with served(tmp_path) as (srv, conf, _root):
        path = Path(srv.server.settings.server.control_socket)
        srv.server.control.timeout = 1.0  # type: ignore[union-attr]
        pop = login(srv.pop3(), "alice")
        latencies: list[float] = []
        stop = threading.Event()

        def noops() -> None:
            while not stop.is_set():
                start = time.monotonic()
                assert pop.noop().startswith(b"+OK")
                latencies.append(time.monotonic() - start)
                time.sleep(0.01)

        pinger = threading.Thread(target=noops)
        pinger.start()
        try:
            garbage = _raw_control(path, b"\x00\xffnot json at all\n")
            assert garbage == {"ok": False, "error": "bad request: not a JSON line"}
            assert _raw_control(path, b'{"command": "reboot"}\n')["error"] == \
                "unknown command 'reboot'"
            assert _raw_control(path, b"[1, 2]\n")["ok"] is False
            huge = _raw_control(path, b"x" * (4 * 1024 * 1024) + b"\n")
            assert huge == {"ok": False, "error": "request longer than 4096 bytes"}
            assert _raw_control(path, b'{"command": "who"', eof=True)["error"] == \
                "incomplete request (no newline)"
            start = time.monotonic()
            assert _raw_control(path, b'{"command": "who"') == \
                {"ok": False, "error": "timed out"}
            assert 0.9 < time.monotonic() - start < 3
            # Clients that connect and say nothing: the limit turns others away, the
            # deadline closes them, and the loop never waits for them.
            stalled = [socket.socket(socket.AF_UNIX) for _ in range(control.MAX_CLIENTS)]
            for sock in stalled:
                sock.connect(str(path))
            time.sleep(0.2)
            busy = _raw_control(path, b'{"command": "who"}\n')
            assert busy == {"ok": False, "error": "busy: too many control clients"}
            assert admin(conf, "who").returncode == 75  # EX_TEMPFAIL, said so
            for sock in stalled:
                sock.settimeout(5)
                start = time.monotonic()
                assert sock.recv(100) == b'{"ok":false,"error":"timed out"}\n'
                assert sock.recv(100) == b""  # closed by the server's deadline
                assert time.monotonic() - start < 3
                sock.close()
            assert [r["account"] for r in who(conf)] == ["alice"]
        finally:
            stop.set()
            pinger.join(10)
        assert len(latencies) > 20
        assert max(latencies) < 0.5, sorted(latencies)[-5:]
        pop.quit()


def test_who_with_many_sessions(tmp_path: Path) -> None:
    """More sessions than one reply batch: all listed, in turns with the POP3 sessions."""
    count = 2 * control.BATCH + 50
    root = tmp_path / "mail"
    adapter = make_mail(root, 1)
    path = tmp_path / "control"
    conf = write_config(tmp_path / "pop3sf.conf", adapter, str(path))
    with running_server("directory_multi", {"root": adapter["root"], "bcrypt_rounds": 4},
                        server={"control_socket": str(path)},
                        limits={"max_sessions_per_user": 1000,
                                "max_connections_per_address": 1000}) as srv:
        pops = [login(srv.pop3(), "carol", read_only=True) for _ in range(count)]
        try:
            run = admin(conf, "who", "--json")
            assert run.returncode == 0, run.stderr
            sessions = json.loads(run.stdout)
            assert len(sessions) == count
            assert {s["port"] for s in sessions} == {p.sock.getsockname()[1] for p in pops}
            assert all(s["account"] == "carol" and s["read_only"] for s in sessions)
        finally:
            for pop in pops:
                pop.close()


@needs_root
def test_real_daemon_as_root_drops_privileges_and_removes_its_socket(tmp_path: Path) -> None:
    """``pop3sf`` started as root with user = nobody: the control directory is made for nobody
    before the switch, root can ask the server, and nobody removes the socket at exit."""
    base = Path(tempfile.mkdtemp(prefix="pop3sf-control-", dir="/tmp"))
    proc = None
    try:
        base.chmod(0o755)
        nobody = pwd.getpwnam("nobody")
        adapter = make_mail(base / "mail", 1)
        for p in [base / "mail", *(base / "mail").rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path = base / "run" / "control"
        conf = base / "pop3sf.conf"
        conf.write_text(textwrap.dedent(f"""\
            [server]
            user = nobody
            control_socket = {path}
            [logging]
            target = stderr
            [listeners]
                [[pop3]]
                addresses = 127.0.0.1:{port}
            [adapter]
            type = directory_multi
            root = {adapter['root']}
            """))
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
        proc = subprocess.Popen([*POP3SF, "--config", str(conf)], env=env,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no control socket"
            time.sleep(0.05)
        assert os.stat(f"/proc/{proc.pid}").st_uid == nobody.pw_uid
        assert (path.parent.stat().st_uid, stat.S_IMODE(path.parent.stat().st_mode)) == \
            (nobody.pw_uid, 0o750)
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        pop = login(poplib.POP3("127.0.0.1", port, timeout=10), "bob")
        assert [r["account"] for r in who(conf)] == ["bob"]
        assert admin(conf, "kick", "bob").returncode == 0
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            pop.noop()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not path.exists(), "the service user could not remove its socket"
        assert "logout 127.0.0.1 bob" in err and "(kicked by admin)" in err
        assert admin(conf, "who").returncode == EX_UNAVAILABLE
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)
