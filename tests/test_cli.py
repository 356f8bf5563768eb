"""The real ``pop3sf`` command: --version, --check-config, serving, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import poplib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Raw

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
    # SIGTERM: the idle client is told, the server exits 0.
    idle = Raw.connect(daemon.port)
    idle.line()
    daemon.proc.send_signal(signal.SIGTERM)
    assert idle.line().startswith(b"-ERR [SYS/TEMP]")
    assert daemon.proc.wait(10) == 0
    pop.close()
