"""A server under test as a child process: start fresh, wait until it listens, stop cleanly.

Both servers get a private working directory, loopback ports found free, and the same TLS
certificate; start-up cost (CPU and RSS of the process tree once listening) is recorded because
benchmarks/README.md's rules ask for it with every fresh server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import procstat

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nobody listens on right now (bind 0, read it back, close)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed RSA-2048 certificate (like Debian's snakeoil) for the TLS scenarios."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not (cert.exists() and key.exists()):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-subj", "/CN=localhost", "-days", "30", "-keyout", str(key),
                        "-out", str(cert)], check=True, capture_output=True)
        if os.geteuid() == 0:  # pop3sf (re)reads it as `nobody`; Dovecot reads it as root
            os.chown(key, pwd.getpwnam("nobody").pw_uid, -1)
        os.chmod(key, 0o600)
    return cert, key


#: What the shipped systemd unit gives pop3sf (LimitNOFILE= in etc/systemd/pop3sf.service).
NOFILE = 65536


def raise_nofile(want: int = NOFILE) -> int:
    """RLIMIT_NOFILE up to ``want`` (the unit's LimitNOFILE; root may raise the hard limit),
    else soft up to hard; children inherit it. Returns the soft limit now in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    new = min(max(soft, want), hard)
    if new != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


class Server:
    """Base: subclasses write their config in ``prepare()`` and return the command to run."""

    name = "server"

    def __init__(self, workroot: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=workroot))
        os.chmod(self.dir, 0o755)
        self.ports = {"pop3": free_port(), "pop3s": free_port()}
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup: procstat.Snapshot | None = None
        self.base_pids = 1
        self.log_path = self.dir / "server.stderr"

    def prepare(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        cmd = self.prepare()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.dir, env=self.env(), start_new_session=True)
        proc = self.proc
        try:
            procstat.wait_listening(self.ports.values(), alive=lambda: proc.poll() is None,
                                    timeout=timeout)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {exc}\n{self.log_tail()}") from exc
        time.sleep(0.2)  # let the server finish what it does after listen()
        self.startup = procstat.snapshot(self.pid)
        self.startup.cpu_s = procstat.precise_cpu_seconds(procstat.tree_pids(self.pid))
        self.base_pids = self.startup.pids

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server, wait; SIGKILL what is left of its own process tree."""
        if self.proc is None:
            return
        pids = procstat.tree_pids(self.proc.pid) if self.proc.poll() is None else []
        starts = {pid: procstat.start_time(pid) for pid in pids}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in pids:  # stragglers of this server's own tree only, by pid and start time
            if procstat.start_time(pid) != starts[pid]:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Pop3sf(Server):
    """pop3sf from this checkout (``python -m pop3sf.cli --config CONF``), Maildir adapter."""

    name = "pop3sf"

    def __init__(self, workroot: Path, passwd: Path, cert: Path, key: Path,
                 python: str, overrides: dict[str, dict[str, int]] | None = None,
                 source: Path | None = None) -> None:
        super().__init__(workroot)
        self.passwd = passwd
        self.cert, self.key = cert, key
        self.python = python
        self.overrides = overrides or {}
        self.source = source
        self.conf = self.dir / "pop3sf.conf"

    def config_text(self) -> str:
        user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        extra = "".join(f"\n[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                        for section, keys in self.overrides.items() if section != "server")
        server = "".join(f"{k} = {v}\n" for k, v in self.overrides.get("server", {}).items())
        return f"""# written by pop3sf benchmarks/servers.py
[server]
user = {user}
pidfile = {self.dir}/pop3sf.pid
{server}
[logging]
target = stderr

[listeners]
    [[pop3]]
    addresses = {HOST}:{self.ports['pop3']}
    [[pop3s]]
    addresses = {HOST}:{self.ports['pop3s']}
    tls = yes

[tls]
certificate = {self.cert}
private_key = {self.key}

{extra}
[adapter]
type = maildir
passwd_file = {self.passwd}
"""

    def prepare(self) -> list[str]:
        self.conf.write_text(self.config_text())
        return [self.python, "-m", "pop3sf.cli", "--config", str(self.conf)]

    def env(self) -> dict[str, str] | None:
        if self.source is None:
            return None
        return {**os.environ, "PYTHONPATH": str(self.source)}


def snapshot_source(project: Path, dest: Path, rev: str = "HEAD") -> Path:
    """The committed server at ``rev`` laid out as installed (``adapters/`` as
    ``pop3sf/adapters``), so edits in progress in the work tree don't leak into a run."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(project), "archive", rev, "pop3sf", "adapters",
                              "auxiliary"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for sub in ("adapters", "auxiliary"):
        if (dest / sub).is_dir():
            (dest / sub).rename(dest / "pop3sf" / sub)
    os.chmod(dest, 0o755)
    return dest
