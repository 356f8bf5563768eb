"""``scripts/demo`` and ``scripts/test`` as the README runs them.

The demo runs for real: its ports and data directory moved by its variables, read with poplib over
plain POP3 and implicit TLS; a second demo on the same data is refused without touching the first
one's config; SIGTERM stops it. Run as root here (the tests' usual case, also without sudo), and
as an unprivileged user once the packages are there.
"""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mariadb import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo"
TEST = ROOT / "scripts" / "test"
START_TIMEOUT = 120.0


def demo_env(data: Path, port: int, tls_port: int) -> dict[str, str]:
    return {**os.environ, "POP3SF_DEMO_DIR": str(data), "POP3SF_DEMO_PORT": str(port),
            "POP3SF_DEMO_TLS_PORT": str(tls_port)}


def as_user(name: str) -> Callable[[], None]:
    entry = pwd.getpwnam(name)

    def drop() -> None:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)

    return drop


class Demo:
    """One ``scripts/demo`` process; the demo execs the server, so its pid is the server's."""

    def __init__(self, data: Path, port: int, tls_port: int,
                 preexec: Callable[[], None] | None = None) -> None:
        self.port, self.tls_port = port, tls_port
        self.proc = subprocess.Popen([str(DEMO)], env=demo_env(data, port, tls_port),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, preexec_fn=preexec)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # let the reader catch up
                raise AssertionError(f"demo: no {text!r} (status {self.proc.poll()}):\n"
                                     + self.output)
            time.sleep(0.05)

    def login(self, tls: bool = False) -> poplib.POP3:
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the demo's own cert
            pop: poplib.POP3 = poplib.POP3_SSL("127.0.0.1", self.tls_port, context=ctx,
                                               timeout=30)
        else:
            pop = poplib.POP3("127.0.0.1", self.port, timeout=30)
        pop.user("demo")
        pop.pass_("demo")
        return pop

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C's alternative; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.kill()


def test_demo_on_moved_ports_refuses_a_second_run(tmp_path: Path, demos: list[Demo]) -> None:
    data = tmp_path / "demo"
    port, tls_port = free_port(), free_port()
    first = Demo(data, port, tls_port)
    demos.append(first)
    first.wait_for("listening on pop3s")
    assert f"127.0.0.1:{port}" in first.output and f"127.0.0.1:{tls_port}" in first.output
    assert f"data in {data}" in first.output and "sudo" not in first.output
    pop = first.login()
    count, size = pop.stat()
    assert count == 2
    assert b"Hello from pop3sf!" in b"\n".join(pop.retr(1)[1])
    pop.quit()
    pop = first.login(tls=True)
    assert pop.stat() == (count, size)
    pop.quit()

    conf = data / "pop3sf.conf"
    before = conf.read_bytes(), conf.stat().st_mtime_ns
    for other_ports in ((free_port(), free_port()), (port, tls_port)):
        second = subprocess.run([str(DEMO)], env=demo_env(data, *other_ports),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1, second.stderr
        assert "a demo is already running" in second.stderr and str(data) in second.stderr
        assert f"pid {first.proc.pid}" in second.stderr
        assert "POP3SF_DEMO_DIR" in second.stderr
    assert (conf.read_bytes(), conf.stat().st_mtime_ns) == before
    pop = first.login()  # the first demo serves on, untouched
    assert pop.stat() == (count, size)
    pop.quit()

    assert first.stop() == 0
    assert "pop3sf stopped" in first.output
    # Its lock went with it: the next demo starts on the same data, adding nothing twice.
    again = Demo(data, port, tls_port)
    demos.append(again)
    again.wait_for("listening on pop3s")
    pop = again.login()
    assert pop.stat() == (count, size)
    pop.quit()
    assert again.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the scripts as another user")
def test_scripts_as_an_unprivileged_user(demos: list[Demo]) -> None:
    """With the packages there, the demo needs no root; scripts/test without root and without
    sudo says what to do instead of failing with "sudo: command not found"."""
    nobody = pwd.getpwnam("nobody")
    data = Path(tempfile.mkdtemp(prefix="pop3sf-demo-"))
    try:
        os.chown(data, nobody.pw_uid, nobody.pw_gid)
        demo = Demo(data / "d", free_port(), free_port(), preexec=as_user("nobody"))
        demos.append(demo)
        demo.wait_for("listening on pop3s")
        assert os.stat(data / "d" / "pop3sf.conf").st_uid == nobody.pw_uid
        pop = demo.login()
        assert pop.stat()[0] == 2
        pop.quit()
        assert demo.stop() == 0
        if shutil.which("sudo") is None:
            r = subprocess.run([str(TEST), "--co"], capture_output=True, text=True, timeout=60,
                               preexec_fn=as_user("nobody"), stdin=subprocess.DEVNULL)
            assert r.returncode == 1
            assert "needs root" in r.stderr and "POP3SF_TEST_AS_USER=1" in r.stderr
            assert "command not found" not in r.stderr
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_readme_quick_start_matches_the_scripts() -> None:
    """The README's commands run as written (no sudo in front: the scripts ask for it), .ci/run
    runs the README's test command, and every variable the demo reads is in the README."""
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in quick.splitlines() if line.startswith("    ")]
    assert "scripts/demo" in commands and "scripts/test" in commands
    assert not [c for c in commands if c.startswith("sudo")]
    assert re.search(r"^exec scripts/test\b", (ROOT / ".ci" / "run").read_text(), re.M)
    script = DEMO.read_text()
    variables = set(re.findall(r"\$\{(POP3SF_DEMO_\w+):-", script))
    assert variables == {"POP3SF_DEMO_PORT", "POP3SF_DEMO_TLS_PORT", "POP3SF_DEMO_DIR"}
    assert all(f"`{name}`" in quick for name in variables)
    for name, default in (("POP3SF_DEMO_PORT", "1110"), ("POP3SF_DEMO_TLS_PORT", "1995")):
        assert f"${{{name}:-{default}}}" in script and f"`127.0.0.1:{default}`" in quick


def test_readme_puts_the_commands_on_path_from_a_checkout() -> None:
    """What the README says to type in a checkout finds ``pop3sf`` and ``pop3sf-admin``."""
    readme = (ROOT / "README.md").read_text()
    assert "`. .venv/bin/activate`" in readme and "`.venv/bin/pop3sf`" in readme
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"}
    for shell in (". .venv/bin/activate && pop3sf --version && pop3sf-admin --help",
                  '.venv/bin/pop3sf --version && .venv/bin/pop3sf-admin --help'):
        r = subprocess.run(["bash", "-c", shell], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, (shell, r.stderr)
        assert "pop3sf" in r.stdout and "exit status" in r.stdout
