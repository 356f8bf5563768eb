"""A server under test as a child process: start fresh, wait until it listens, stop cleanly.

Every server gets a private working directory, loopback ports found free, and the same TLS
certificate; start-up cost (CPU and RSS of the process tree once listening) is recorded because
benchmarks/README.md's rules ask for it with every fresh server.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
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

    def start_timed(self, greeting: bool, timeout: float = 30.0) -> dict[str, float]:
        """Start the server and time it from just before exec: connect to the first port in a
        tight loop (a refused connect costs the server nothing) and, once one is accepted into
        the listen queue (the server called listen()), either read the tree's CPU at once
        (``greeting=False``: CPU from exec to listening) or wait for the greeting's ``+OK``
        (``greeting=True``: wall time from exec to the first greeting). Two separate starts,
        so reading /proc doesn't delay the greeting. Leaves the server running (``stop()``)."""
        cmd = self.prepare()
        port = next(iter(self.ports.values()))
        with open(self.log_path, "wb") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.dir, env=self.env(), start_new_session=True)
        proc = self.proc
        out: dict[str, float] = {}
        try:
            while True:
                s = socket.socket()
                try:
                    s.connect((HOST, port))
                    break
                except ConnectionRefusedError:
                    s.close()
                if proc.poll() is not None:
                    raise RuntimeError("server exited before listening")
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"port {port} not listening after {timeout} s")
                time.sleep(0.0005)
            with s:
                t_listen = time.perf_counter() - t0
                if not greeting:
                    out["cpu_ms"] = procstat.precise_cpu_seconds(
                        procstat.tree_pids(self.pid)) * 1000
                    out["listen_ms"] = t_listen * 1000
                else:
                    s.settimeout(timeout)
                    buf = b""
                    while b"\r\n" not in buf:
                        data = s.recv(4096)
                        if not data:
                            raise ConnectionError("closed before the greeting")
                        buf += data
                    out["greeting_ms"] = (time.perf_counter() - t0) * 1000
                    out["greeting_cpu_ms"] = procstat.precise_cpu_seconds(
                        procstat.tree_pids(self.pid)) * 1000
                    if not buf.startswith(b"+OK"):
                        raise RuntimeError(f"greeting: {buf[:80]!r}")
                    s.sendall(b"QUIT\r\n")
            procstat.wait_listening(self.ports.values(), alive=lambda: proc.poll() is None,
                                    timeout=timeout)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {exc}\n{self.log_tail()}") from exc
        return out

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
                 python: str, overrides: dict[str, dict[str, int | str]] | None = None,
                 source: Path | None = None, shipped: Path | None = None) -> None:
        super().__init__(workroot)
        self.passwd = passwd
        self.cert, self.key = cert, key
        self.python = python
        self.overrides = overrides or {}
        self.source = source
        self.shipped = shipped
        self.conf = self.dir / "pop3sf.conf"

    def run_as(self) -> str:
        return "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def config_text(self) -> str:
        if self.shipped is not None:
            return shipped_config(self.shipped.read_text(), self)
        user = self.run_as()
        extra = "".join(f"\n[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                        for section, keys in self.overrides.items()
                        if section not in ("server", "adapter"))
        adapter = "".join(f"{k} = {v}\n" for k, v in self.overrides.get("adapter", {}).items())
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
{adapter}"""

    def prepare(self) -> list[str]:
        self.conf.write_text(self.config_text())
        return [self.python, "-m", "pop3sf.cli", "--config", str(self.conf)]

    def env(self) -> dict[str, str] | None:
        if self.source is None:
            return None
        return {**os.environ, "PYTHONPATH": str(self.source)}


def shipped_config(text: str, srv: Pop3sf) -> str:
    """etc/pop3sf.conf as shipped, adapted to the bench: every setting kept except the server's
    user, pidfile and control socket (in the server's directory), logging to stderr (what
    ``auto`` does outside systemd), the listeners (loopback, free ports), the certificate, and
    ``[adapter]`` (the bench's passwd-file and Maildirs; ``size_cache_dir`` in the server's
    directory, as shipped it is set)."""
    replace = {
        ("server", "user"): srv.run_as(),
        ("server", "pidfile"): f"{srv.dir}/pop3sf.pid",
        ("server", "control_socket"): f"{srv.dir}/control",
        ("logging", "target"): "stderr",
        ("pop3", "addresses"): f"{HOST}:{srv.ports['pop3']}",
        ("pop3s", "addresses"): f"{HOST}:{srv.ports['pop3s']}",
        ("tls", "certificate"): str(srv.cert),
        ("tls", "private_key"): str(srv.key),
    }
    out, section, sub = [], "", ""
    for line in text.splitlines():
        stripped = line.strip()
        m = re.fullmatch(r"(\[+)\s*([^]\s]+)\s*\]+", stripped)
        if m:
            if len(m.group(1)) == 1:
                section, sub = m.group(2), ""
            else:
                sub = m.group(2)
            if section == "adapter":
                continue
            out.append(line)
            continue
        if section == "adapter":
            continue
        k = re.match(r"\s*([A-Za-z_]+)\s*=", line)
        if k and (sub or section, k.group(1)) in replace:
            indent = line[:len(line) - len(line.lstrip())]
            out.append(f"{indent}{k.group(1)} = {replace[(sub or section, k.group(1))]}")
            continue
        out.append(line)
    (srv.dir / "size-cache").mkdir(exist_ok=True)
    if os.geteuid() == 0:
        pw = pwd.getpwnam(srv.run_as())
        os.chown(srv.dir / "size-cache", pw.pw_uid, pw.pw_gid)
    out += ["", "[adapter]", "type = maildir", f"passwd_file = {srv.passwd}",
            f"size_cache_dir = {srv.dir}/size-cache", ""]
    return "\n".join(out)


#: The reference Twisted release, installed from PyPI into a venv of its own (never the
#: project's .venv): pinned so that runs compare.
TWISTED_VERSION = "26.10.0"
TWISTED_VENV = Path(os.environ.get("POP3SF_BENCH_TWISTED_VENV",
                                   f"/var/tmp/pop3sf-bench/twisted-venv-{TWISTED_VERSION}"))
TWISTED_SCRIPT = Path(__file__).resolve().parent / "twisted_pop3.py"


def twisted_python(venv: Path = TWISTED_VENV, build: bool = True) -> str | None:
    """The venv's Python with Twisted importable, creating the venv (python -m venv, then pip
    install twisted==TWISTED_VERSION from PyPI) on first use; None if that fails (no network)."""
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists():
        return str(python)
    if not build:
        return None
    try:
        if venv.exists():
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-"
                        "check", f"twisted=={TWISTED_VERSION}"], check=True, capture_output=True,
                       timeout=600)
        subprocess.run([str(python), "-c", "import twisted.mail.pop3, twisted.mail.maildir"],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        print(f"cannot build the Twisted venv in {venv}: {exc} "
              f"{err.decode(errors='replace')[-400:]}", file=sys.stderr)
        return None
    for dirpath, _dirs, files in os.walk(venv):  # readable by the user it drops to
        os.chmod(dirpath, 0o755)
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444)
    marker.write_text(f"twisted=={TWISTED_VERSION}\n")
    return str(python)


class Twisted(Server):
    """Twisted's POP3 server (benchmarks/twisted_pop3.py) in the benchmark-only venv; plain
    POP3 on one port (no TLS)."""

    name = "twisted"

    def __init__(self, workroot: Path, passwd: Path, python: str) -> None:
        super().__init__(workroot)
        self.ports = {"pop3": self.ports["pop3"]}
        self.passwd = passwd
        self.python = python

    def prepare(self) -> list[str]:
        cmd = [self.python, str(TWISTED_SCRIPT), "--port", str(self.ports["pop3"]),
               "--passwd", str(self.passwd)]
        if os.geteuid() == 0:
            cmd += ["--user", "nobody"]
        return cmd

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def snapshot_source(project: Path, dest: Path, python: str, rev: str = "HEAD") -> Path:
    """The committed server at ``rev`` laid out as installed (``adapters/`` as
    ``pop3sf/adapters``), so edits in progress in the work tree don't leak into a run, and
    byte-compiled by *python* as the .deb's py3compile does (without it, and with
    PYTHONDONTWRITEBYTECODE, every start would compile every module again)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(project), "archive", rev, "pop3sf", "adapters",
                              "auxiliary"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for sub in ("adapters", "auxiliary"):
        if (dest / sub).is_dir():
            (dest / sub).rename(dest / "pop3sf" / sub)
    subprocess.run([python, "-m", "compileall", "-q", str(dest)], check=True)
    os.chmod(dest, 0o755)
    return dest
