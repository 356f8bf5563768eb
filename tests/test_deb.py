"""The Debian package for real (``pytest -m deb``): build it, lintian it, install it in a
throw-away overlay without systemd, then in boxes whose PID 1 is a real systemd: socket
activation on 110 and 995, the journal, reload, stop, upgrade, remove and purge; what an
admin's mistakes do (a broken config at start and on reload, mail beside mail/ at purge);
the package's own autopkgtest (debian/tests).

Building needs the packages of tests/deb/install-build-deps.sh (not root); installing needs root
(overlayfs and namespaces, tests/deb/ovl-run.sh and sdbox.sh). Nothing is installed on the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.deb

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "tests" / "deb"
SDBOX = HERE / "sdbox.sh"
OVL_RUN = HERE / "ovl-run.sh"
WITH_JOURNALD = HERE / "with-journald.sh"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"       # Debian's python3, never a pyenv shim
MAX_EXPOSURE = 2.0
PASSWORD = "s3cret pw"


def _missing_build_tools() -> str | None:
    for tool in ("dpkg-buildpackage", "dh", "dh_python3", "fakeroot", "lintian"):
        if shutil.which(tool, path=CLEAN_PATH) is None:
            return f"{tool} not installed (run tests/deb/install-build-deps.sh)"
    unmet = subprocess.run(["dpkg-checkbuilddeps"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PATH": CLEAN_PATH})
    if unmet.returncode != 0:
        return f"{unmet.stderr.strip()} (run tests/deb/install-build-deps.sh)"
    return None


def _missing_install_support() -> str | None:
    if os.geteuid() != 0:
        return "needs root (overlayfs, namespaces)"
    for tool in ("unshare", "nsenter", "setpriv", "apt-get", "ss", "systemd-analyze"):
        if shutil.which(tool, path=CLEAN_PATH) is None:
            return f"{tool} not installed"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs"
    return None


def _missing_box_support() -> str | None:
    if not os.path.exists("/lib/systemd/systemd"):
        return "systemd not installed"
    if not any(os.path.exists(p) for p in ("/sys/fs/cgroup/cgroup.controllers",
                                           "/sys/fs/cgroup/unified/cgroup.controllers")):
        return "no cgroup2 hierarchy"
    return None


BUILD_SKIP = _missing_build_tools()
INSTALL_SKIP = BUILD_SKIP or _missing_install_support()
BOX_SKIP = INSTALL_SKIP or _missing_box_support()


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The .deb and .changes built from a copy of this tree."""
    if BUILD_SKIP:
        pytest.skip(BUILD_SKIP)
    out = tmp_path_factory.mktemp("deb")
    run = subprocess.run([str(HERE / "build.sh"), str(ROOT), str(out)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PATH": CLEAN_PATH})
    assert run.returncode == 0, run.stderr + (out / "build.log").read_text(errors="replace")
    deb = Path(run.stdout.strip().splitlines()[-1])
    changes = next(out.glob("*.changes"))
    return {"deb": deb, "changes": changes, "dir": out}


def _deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def _relations(text: str) -> set[str]:
    return {re.sub(r"\s*\(.*\)", "", alt.strip()) for alt in re.split(r"[,|]", text)
            if alt.strip()}


# --------------------------------------------------------------------------- build and lint

def test_deb_control_fields(built: dict[str, Path]) -> None:
    deb = built["deb"]
    depends = _relations(_deb_field(deb, "Depends"))
    assert {"python3-daemon", "python3-configobj", "python3-systemd", "python3-bcrypt",
            "ssl-cert", "procps", "adduser"} <= depends, depends
    assert "python3:any" in depends or "python3" in depends
    # NOTES trap 4: bookworm has no python3-mysql.connector; an install_requires entry for
    # mysql-connector-python would make the package uninstallable.
    assert not any("mysql" in d for d in depends), depends
    assert _relations(_deb_field(deb, "Recommends")) == {"python3-pymysql"}
    assert _relations(_deb_field(deb, "Suggests")) == {"python3-psycopg2"}  # type = sql
    assert _relations(_deb_field(deb, "Provides")) == {"pop3-server"}
    assert _deb_field(deb, "Architecture") == "all"
    assert _deb_field(deb, "Package") == "pop3sf"
    dsc = next(built["dir"].glob("*.dsc")).read_text()
    build_depends = _relations(re.search(r"^Build-Depends: (.*)$", dsc, re.M).group(1))  # type: ignore[union-attr]
    # pyproject.toml names a PEP 517 backend: pybuild builds through it only with the plugin
    assert {"pybuild-plugin-pyproject", "dh-python", "python3-setuptools"} <= build_depends
    assert re.search(r"^Testsuite: autopkgtest$", dsc, re.M), dsc


def test_deb_layout(built: dict[str, Path]) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(built["deb"])], capture_output=True,
                             text=True, check=True).stdout
    entries = {line.split()[5].lstrip("."): line.split()[0] for line in listing.splitlines()}
    for path in ("/usr/sbin/pop3sf", "/usr/sbin/pop3sf-admin"):
        assert entries.get(path, "").startswith("-rwxr-xr-x"), path
    assert "/usr/bin/pop3sf" not in entries
    for unit in ("pop3sf.service", "pop3sf.socket", "pop3sf-tls.socket"):
        assert f"/lib/systemd/system/{unit}" in entries, unit
    for page in ("man8/pop3sf.8.gz", "man5/pop3sf.conf.5.gz", "man8/pop3sf-admin.8.gz"):
        assert f"/usr/share/man/{page}" in entries, page
    assert "/usr/share/doc/pop3sf/examples/virtual-mail.conf.example" in entries
    assert "/usr/lib/python3/dist-packages/pop3sf/configspec.ini" in entries
    assert "/usr/lib/python3/dist-packages/pop3sf/adapters/base.py" in entries
    assert "/etc/pop3sf.conf" in entries
    control = subprocess.run(["dpkg-deb", "-I", str(built["deb"]), "conffiles"],
                             capture_output=True, text=True, check=True).stdout
    assert control.split() == ["/etc/pop3sf.conf"]


def test_lintian_clean(built: dict[str, Path]) -> None:
    """Source and binary package, info tags included (-I; the one override is explained in
    debian/pop3sf.lintian-overrides)."""
    run = subprocess.run(["lintian", "-I", "--fail-on", "error,warning", str(built["changes"])],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PATH": CLEAN_PATH})
    tags = [line for line in run.stdout.splitlines() if re.match(r"^[EWI]: ", line)]
    assert run.returncode == 0 and not tags, run.stdout + run.stderr
    # the source package was checked too (its tags, e.g. the pyproject backend, are there)
    assert re.search(r"^Architecture: source all$", built["changes"].read_text(), re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_offline_security() -> None:
    """Exposure <= 2.0 with the network kept (no PrivateNetwork, no IP deny-list), as the
    "Hardening" part of etc/systemd/pop3sf.service promises."""
    unit = ROOT / "etc" / "systemd" / "pop3sf.service"
    text = unit.read_text()
    assert not re.search(r"^PrivateNetwork=\s*(yes|true|1)", text, re.M)
    assert not re.search(r"^IPAddress(Deny|Allow)=", text, re.M)
    for key in ("Type=notify", "WatchdogSec=", "LimitNOFILE=65536", "User=pop3sf",
                "PartOf=pop3sf.socket pop3sf-tls.socket", "ExecReload=/bin/kill -HUP $MAINPID",
                "ExecStart=/usr/sbin/pop3sf --config /etc/pop3sf.conf",
                "RestartPreventExitStatus=78\n"):
        assert key in text, key
    # the config is checked before the server is signalled (a failing ExecReload= stops there)
    reloads = re.findall(r"^ExecReload=(.*)$", text, re.M)
    assert reloads == ["/usr/sbin/pop3sf --config /etc/pop3sf.conf --check-config --no-connect",
                       "/bin/kill -HUP $MAINPID"], reloads
    stop = float(re.search(r"^TimeoutStopSec=(\d+)s?$", text, re.M).group(1))  # type: ignore[union-attr]
    assert stop > 20, "TimeoutStopSec must exceed the default shutdown grace of 20 s"
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                          str(unit)], capture_output=True, text=True, timeout=60).stdout
    level = float(re.search(r"Overall exposure level for pop3sf.service: ([0-9.]+)",
                            out).group(1))  # type: ignore[union-attr]
    assert level <= MAX_EXPOSURE, out
    for name, fdname in (("pop3sf.socket", "pop3"), ("pop3sf-tls.socket", "pop3s")):
        sock = (ROOT / "etc" / "systemd" / name).read_text()
        assert f"FileDescriptorName={fdname}\n" in sock
        assert "Service=pop3sf.service\n" in sock
        assert "WantedBy=sockets.target" in sock


# --------------------------------------------------------------------------- overlay install

def _parse_checks(output: str) -> tuple[list[str], list[str]]:
    passed = re.findall(r"^ok - (.*)$", output, re.M)
    failed = re.findall(r"^FAIL - (.*)$", output, re.M)
    return passed, failed


@pytest.mark.skipif(INSTALL_SKIP is not None, reason=str(INSTALL_SKIP))
def test_deb_overlay_install(built: dict[str, Path], tmp_path: Path) -> None:
    """Install where no systemd runs: layout, user, conffile, cache directory, verify, security,
    --check-config, pop3sf-admin, by-hand --daemon with a private journald (a stale pidfile
    after SIGKILL named when removed), purge."""
    work = tmp_path / "work"
    work.mkdir()
    for path in (built["deb"], HERE / "pop_check.py", HERE / "overlay_checks.sh"):
        shutil.copy2(path, work)
    journal = work / "journal"         # inside the bind-mounted dir: outlives the overlay
    run = subprocess.run(
        [str(OVL_RUN), str(WITH_JOURNALD), str(journal), "--", str(work / "overlay_checks.sh"),
         str(work / built["deb"].name), str(work)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": CLEAN_PATH, "OVL_BIND": str(work)})
    passed, failed = _parse_checks(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(passed) >= 46, run.stdout
    # the by-hand daemon logged to journald (not to /dev/null), without secrets
    entries = _journal_entries(["journalctl", "-D", str(journal), "-o", "json", "--no-pager",
                                "SYSLOG_IDENTIFIER=pop3sf"])
    logins = [e for e in entries if e.get("POP3SF_EVENT") == "login"]
    if len(logins) < 2:
        failed.append("by-hand --daemon logged both logins to journald "
                      f"({len(entries)} pop3sf entries)")
    if any(PASSWORD in str(e.get("MESSAGE")) for e in entries):
        failed.append("a password reached the journal")
    stale = [e for e in entries if "removing stale pidfile /run/pop3sf/pop3sf.pid" in
             str(e.get("MESSAGE"))]
    if not stale or stale[0].get("PRIORITY") != "4":
        failed.append(f"the daemon's log names the stale pidfile it removed: {stale}")
    else:       # kept until logging exists, then logged ahead of the daemon's first record
        after = [e.get("MESSAGE") for e in entries if e.get("_PID") == stale[0].get("_PID")]
        if after[:1] != [stale[0].get("MESSAGE")] or \
                not any("running as user pop3sf" in str(m) for m in after):
            failed.append(f"the stale pidfile note comes first, nothing lost after it: {after}")
    if any("size cache" in str(e.get("MESSAGE")) for e in entries):
        failed.append("size cache unusable: " + "; ".join(
            str(e.get("MESSAGE")) for e in entries if "size cache" in str(e.get("MESSAGE"))))
    if "already running" not in run.stderr:
        failed.append("second --daemon said 'already running'")
    assert not failed, "failed checks: " + "; ".join(failed) + "\n--- stderr tail:\n" + \
        run.stderr[-4000:]


def _journal_entries(cmd: list[str]) -> list[dict]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------- systemd box

class Box:
    """A throw-away systemd-as-PID-1 box on an overlay of the host root (tests/deb/sdbox.sh)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = {**os.environ, "PATH": CLEAN_PATH}

    def boot(self) -> None:
        subprocess.run([str(SDBOX), "boot", str(self.dir)], check=True, capture_output=True,
                       timeout=180, env=self.env)

    def stop(self) -> None:
        subprocess.run([str(SDBOX), "stop", str(self.dir)], capture_output=True, timeout=180,
                       env=self.env)

    def run(self, *cmd: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SDBOX), "run", str(self.dir), *cmd], input=input,
                              capture_output=True, text=True, timeout=timeout, env=self.env)

    def sh(self, script: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, input=input)

    def out(self, *cmd: str) -> str:
        return self.run(*cmd).stdout.strip()

    def cp(self, dest: str, *sources: Path) -> None:
        subprocess.run([str(SDBOX), "cp", str(self.dir), *map(str, sources), dest], check=True,
                       capture_output=True, timeout=60, env=self.env)

    def listening(self) -> set[int]:
        ports = set()
        for line in self.out("ss", "-Hltn").splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
                ports.add(int(fields[3].rpartition(":")[2]))
        return ports

    def pop(self, mode: str, port: int, user: str | None = "alice") -> dict:
        args = ["/usr/bin/python3", "/root/pop_check.py", mode, "127.0.0.1", str(port)]
        if user:
            args += [user, PASSWORD]
        run = self.run(*args)
        if run.returncode != 0:
            return {"error": (run.stdout + run.stderr)[-2000:]}
        return json.loads(run.stdout)

    def journal(self, *match: str) -> list[dict]:
        out = self.run("journalctl", "--no-pager", "-o", "json", *match).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def implementation(self) -> str:
        """The CAPA IMPLEMENTATION line on 110: shows which config the server runs with."""
        capa = self.pop("capa", 110, user=None).get("capa_before", [])
        return next((c for c in capa if c.startswith("IMPLEMENTATION")), "")

    def show(self, prop: str, unit: str = "pop3sf.service") -> str:
        return self.out("systemctl", "show", "-P", prop, unit)

    def install(self, deb: Path) -> subprocess.CompletedProcess[str]:
        """Copy in the .deb and pop_check.py and install it, the postinst starting the sockets."""
        self.cp("/root", deb, HERE / "pop_check.py")
        # The image's Docker-style policy-rc.d (exit 101) would stop the postinst from starting
        # the sockets (NOTES trap 6); drop it inside the box only.
        self.run("rm", "-f", "/usr/sbin/policy-rc.d")
        return self.run("apt-get", "install", "-y", "--no-install-recommends",
                        f"/root/{deb.name}")


class Checks:
    """ci-e2e.sh style: every check runs, failures are collected and reported together."""

    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[str] = []

    def __call__(self, name: str, ok: bool, detail: object = "") -> bool:
        (self.passed if ok else self.failed).append(name if ok else f"{name}: {detail}"[:3000])
        print(("ok   - " if ok else "FAIL - ") + name, flush=True)
        return ok

    def poll(self, name: str, predicate: Callable[[], bool], timeout: float = 10,
             detail: Callable[[], object] = lambda: "") -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return self(name, False, detail())
            time.sleep(0.2)
        return self(name, True)


def _mail_text(report: dict) -> str:
    return "\n".join(report.get("messages", []))


@pytest.mark.skipif(BOX_SKIP is not None, reason=str(BOX_SKIP))
def test_deb_systemd_box(built: dict[str, Path], tmp_path: Path) -> None:
    box = Box(tmp_path / "box")
    check = Checks()
    box.boot()
    try:
        _box_lifecycle(box, check, built["deb"])
    finally:
        journal = box.run("journalctl", "--no-pager", "-o", "short-precise", "-u",
                          "pop3sf.service", "-u", "pop3sf.socket", "-u", "pop3sf-tls.socket")
        (tmp_path / "box-journal.txt").write_text(journal.stdout)
        box.stop()
    print(f"{len(check.passed)} passed, {len(check.failed)} failed; box journal: "
          f"{tmp_path / 'box-journal.txt'}")
    assert not check.failed, "failed checks:\n" + "\n".join(check.failed)


def _box_lifecycle(box: Box, check: Checks, deb: Path) -> None:
    check("box reached state running", box.out("systemctl", "is-system-running") == "running",
          box.out("systemctl", "--failed", "--no-legend"))
    pkg = f"/root/{deb.name}"
    run = box.install(deb)
    if not check("apt-get install (postinst under systemd)", run.returncode == 0,
                 run.stdout[-2000:] + run.stderr[-2000:]):
        return
    # `systemctl is-active A B` is true if any one is active (NOTES trap 7): one unit per call
    check("pop3sf.socket active", box.out("systemctl", "is-active", "pop3sf.socket") == "active")
    check("pop3sf-tls.socket active",
          box.out("systemctl", "is-active", "pop3sf-tls.socket") == "active")
    check("pop3sf.service not started by the postinst",
          box.out("systemctl", "is-active", "pop3sf.service") == "inactive")
    holders = box.out("ss", "-Hltnp")
    check("PID 1 holds ports 110 and 995",
          {110, 995} <= box.listening() and all('pid=1,' in line for line in holders.splitlines()
                                                if re.search(r":(110|995)\s", line)), holders)

    run = box.run("pop3sf-admin", "user", "add", "alice", input=PASSWORD + "\n")
    check("pop3sf-admin user add alice", run.returncode == 0, run.stderr)
    run = box.run("pop3sf-admin", "message", "add", "alice", input="box test message one\n")
    check("pop3sf-admin message add", run.returncode == 0, run.stderr)
    run = box.run("pop3sf-admin", "message", "add", "alice", input="box test message two\n")

    stls = box.pop("stls", 110)
    check("110: STLS + login activates the service and reads alice's mail",
          "box test message one" in _mail_text(stls) and stls.get("stat", [0])[0] == 2, stls)
    check("110: STLS offered before, gone after the handshake",
          "STLS" in stls.get("capa_before", []) and "STLS" not in stls.get("capa_after_stls",
                                                                            ["STLS"]), stls)
    check("pop3sf.service active after the first connection",
          box.out("systemctl", "is-active", "pop3sf.service") == "active")
    main_pid = box.out("systemctl", "show", "-P", "MainPID", "pop3sf.service")
    check("service runs as user pop3sf",
          box.out("ps", "-o", "user=", "-p", main_pid) == "pop3sf", main_pid)
    tls = box.pop("tls", 995)
    check("995: implicit TLS login reads alice's mail (same service)",
          "box test message two" in _mail_text(tls) and tls.get("tls_version", "") in
          ("TLSv1.2", "TLSv1.3"), tls)
    check("same service process served both ports",
          box.out("systemctl", "show", "-P", "MainPID", "pop3sf.service") == main_pid)
    check("Type=notify: STATUS= with connection counts",
          "connection" in box.out("systemctl", "show", "-P", "StatusText", "pop3sf.service"),
          box.out("systemctl", "show", "-P", "StatusText", "pop3sf.service"))
    check("watchdog armed",
          box.out("systemctl", "show", "-P", "WatchdogUSec", "pop3sf.service") not in ("", "0"),
          box.out("systemctl", "show", "-P", "WatchdogUSec", "pop3sf.service"))
    # 65536, unless systemd itself may not go that high (a CI box without CAP_SYS_RESOURCE)
    ceiling = box.sh("grep 'Max open files' /proc/1/limits").stdout.split()[4]
    want = str(min(65536, int(ceiling))) if ceiling.isdigit() else "65536"
    nofile = box.sh(f"grep 'Max open files' /proc/{main_pid}/limits").stdout
    check(f"LimitNOFILE in effect (soft = hard = {want})", nofile.split()[3:5] == [want, want],
          nofile)

    def logins() -> list[dict]:
        return [e for e in box.journal("-u", "pop3sf.service", "POP3SF_EVENT=login")
                if e.get("POP3SF_USER") == "alice"]
    check.poll("journalctl -u pop3sf.service: both logins with POP3SF_USER/CLIENT/EVENT",
               lambda: len(logins()) >= 2, detail=lambda: box.out(
                   "journalctl", "--no-pager", "-u", "pop3sf.service", "-o", "cat"))
    entries = logins()
    if entries:
        entry = entries[0]
        check("journal fields: client, identifier, unit, priority",
              entry.get("POP3SF_CLIENT") == "127.0.0.1" and
              entry.get("SYSLOG_IDENTIFIER") == "pop3sf" and
              entry.get("_SYSTEMD_UNIT") == "pop3sf.service" and entry.get("PRIORITY") == "6",
              entry)
    ended = box.journal("-u", "pop3sf.service", "POP3SF_USER=alice")
    check("journal: session end with POP3SF_BYTES",
          any(e.get("POP3SF_BYTES") for e in ended), [e.get("MESSAGE") for e in ended])
    check("journal: no password",
          not any(PASSWORD in str(e.get("MESSAGE")) for e in box.journal("-u", "pop3sf.service")))

    # -- reload applies a changed setting; a broken config is refused and the old one kept
    implementation = box.implementation
    before = implementation()
    check("CAPA IMPLEMENTATION without version by default",
          before.startswith("IMPLEMENTATION") and "2.0" not in before, before)
    box.sh("sed -i 's/^implementation_version = no/implementation_version = yes/' "
           "/etc/pop3sf.conf")
    run = box.run("systemctl", "reload", "pop3sf.service")
    check("systemctl reload", run.returncode == 0, run.stderr)
    check.poll("reload applied: CAPA IMPLEMENTATION now has the version",
               lambda: re.search(r"\d+\.\d+", implementation()) is not None,
               detail=implementation)
    check("reload kept the MainPID",
          box.out("systemctl", "show", "-P", "MainPID", "pop3sf.service") == main_pid)
    box.sh("cp /etc/pop3sf.conf /root/good.conf && "
           "sed -i 's/^max_line_length = .*/max_line_length = 10/' /etc/pop3sf.conf")
    # A SIGHUP that bypasses ExecReload's check (kill -HUP by hand): the server's own check.
    # (`systemctl reload` refusing it: test_box_reload_of_a_broken_config_fails_visibly.)
    box.run("systemctl", "kill", "--kill-who=main", "--signal=HUP", "pop3sf.service")
    check.poll("bad config on reload: error logged, old settings kept",
               lambda: any("max_line_length" in str(e.get("MESSAGE")) and
                           int(e.get("PRIORITY", 6)) <= 3
                           for e in box.journal("-u", "pop3sf.service")),
               detail=lambda: box.out("journalctl", "--no-pager", "-u", "pop3sf.service",
                                      "-o", "cat", "-n", "20"))
    check("service still serving after the bad reload",
          box.out("systemctl", "is-active", "pop3sf.service") == "active" and
          "box test message one" in _mail_text(box.pop("tls", 995)))
    box.sh("cp /root/good.conf /etc/pop3sf.conf")

    # -- stop is clean; the sockets stay and re-activate
    run = box.run("systemctl", "stop", "pop3sf.service")
    check("systemctl stop pop3sf.service", run.returncode == 0, run.stderr)
    result = box.out("systemctl", "show", "-P", "Result", "pop3sf.service")
    status = box.out("systemctl", "show", "-P", "ExecMainStatus", "pop3sf.service")
    check("clean stop: Result=success, exit status 0", (result, status) == ("success", "0"),
          (result, status))
    check("pop3sf.socket still listening after the stop",
          box.out("systemctl", "is-active", "pop3sf.socket") == "active")
    check("pop3sf-tls.socket still listening after the stop",
          box.out("systemctl", "is-active", "pop3sf-tls.socket") == "active")
    check("re-activation after the stop", "box test message one" in
          _mail_text(box.pop("stls", 110)))

    # -- an admin may disable the TLS socket: the service then serves 110 alone (it must not
    #    try to bind 995 itself: it has no capabilities)
    box.run("systemctl", "disable", "--now", "pop3sf-tls.socket")
    check("TLS socket disabled: 995 closed", 995 not in box.listening(), box.listening())
    check("TLS socket disabled: 110 still activates the service and serves",
          "box test message one" in _mail_text(box.pop("stls", 110)),
          box.out("journalctl", "--no-pager", "-u", "pop3sf.service", "-o", "cat", "-n", "15"))
    box.run("systemctl", "stop", "pop3sf.service")
    run = box.run("systemctl", "enable", "--now", "pop3sf-tls.socket")
    check("TLS socket enabled again", run.returncode == 0 and
          box.out("systemctl", "is-active", "pop3sf-tls.socket") == "active", run.stderr)
    check("995 served again", "box test message one" in _mail_text(box.pop("tls", 995)))

    # -- upgrade with the service running keeps both ports (NOTES trap 1)
    check("service running before the upgrade",
          box.out("systemctl", "is-active", "pop3sf.service") == "active")
    run = box.run("apt-get", "install", "-y", "--reinstall", "--no-install-recommends", pkg)
    check("reinstall (upgrade path)", run.returncode == 0, run.stderr[-2000:])
    check("pop3sf.socket listening after the upgrade",
          box.out("systemctl", "is-active", "pop3sf.socket") == "active")
    check("pop3sf-tls.socket listening after the upgrade",
          box.out("systemctl", "is-active", "pop3sf-tls.socket") == "active")
    check("995 works after the upgrade",
          "box test message one" in _mail_text(box.pop("tls", 995)))
    check("110 works after the upgrade",
          "box test message one" in _mail_text(box.pop("stls", 110)))
    check("the changed conffile survived the upgrade",
          "implementation_version = yes" in box.out("cat", "/etc/pop3sf.conf"))

    # -- remove stops everything and keeps config and mail; reinstall brings the sockets back
    run = box.run("apt-get", "remove", "-y", "pop3sf")
    check("apt-get remove", run.returncode == 0, run.stderr[-2000:])
    check("remove stopped the service",
          box.out("systemctl", "is-active", "pop3sf.service") != "active")
    check("remove closed both ports", not ({110, 995} & box.listening()), box.listening())
    check("remove kept the conffile and the mail",
          box.run("test", "-f", "/etc/pop3sf.conf").returncode == 0 and
          box.run("test", "-d", "/var/lib/pop3sf/mail/alice").returncode == 0)
    run = box.run("apt-get", "install", "-y", "--no-install-recommends", pkg)
    check("install after remove", run.returncode == 0, run.stderr[-2000:])
    check("sockets listen again after install", {110, 995} <= box.listening(), box.listening())
    check("mail still served after remove + install",
          "box test message one" in _mail_text(box.pop("tls", 995)))

    # -- purge closes the ports, removes the conffile and state, keeps the mail
    run = box.run("apt-get", "purge", "-y", "pop3sf")
    check("apt-get purge", run.returncode == 0, run.stderr[-2000:])
    check("purge closed both ports", not ({110, 995} & box.listening()), box.listening())
    check("purge removed the conffile", box.run("test", "-e", "/etc/pop3sf.conf").returncode != 0)
    check("purge removed the enable symlinks",
          box.run("test", "-e", "/etc/systemd/system/sockets.target.wants/pop3sf.socket"
                  ).returncode != 0)
    check("purge kept the mail",
          box.run("test", "-d", "/var/lib/pop3sf/mail/alice").returncode == 0)


# --------------------------------------------------------------------------- admin mistakes

BREAK_CONFIG = "sed -i 's/^max_line_length = .*/max_line_length = 10/' /etc/pop3sf.conf"
CONFIG_ERROR = "[protocol] max_line_length"     # what the error message names


@pytest.fixture
def installed_box(built: dict[str, Path], tmp_path: Path) -> Iterator[Box]:
    """A fresh box with the package installed: sockets listening, no user, service not run."""
    if BOX_SKIP:
        pytest.skip(BOX_SKIP)
    box = Box(tmp_path / "box")
    box.boot()
    try:
        run = box.install(built["deb"])
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        yield box
    finally:
        journal = box.run("journalctl", "--no-pager", "-o", "short-precise", "-u",
                          "pop3sf.service", "-u", "pop3sf.socket", "-u", "pop3sf-tls.socket")
        (tmp_path / "box-journal.txt").write_text(journal.stdout)
        box.stop()


def _add_alice(box: Box, *messages: str) -> None:
    run = box.run("pop3sf-admin", "user", "add", "alice", input=PASSWORD + "\n")
    assert run.returncode == 0, run.stderr
    for text in messages:
        run = box.run("pop3sf-admin", "message", "add", "alice", input=text + "\n")
        assert run.returncode == 0, run.stderr


def _status(box: Box) -> str:
    return box.run("systemctl", "status", "--no-pager", "-n", "30", "pop3sf.service").stdout


def _wait_until(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_box_config_error_fails_the_unit_without_restarts(installed_box: Box) -> None:
    """A config error exits 78 (EX_CONFIG) and RestartPreventExitStatus=78 keeps systemd from
    restarting it: the unit ends failed with the reason in `systemctl status`; a client that
    connects meanwhile is not left hanging; fixing the config and restarting the sockets
    brings it back."""
    box = installed_box
    _add_alice(box, "config error test")
    box.sh(BREAK_CONFIG)
    run = box.run("systemctl", "start", "pop3sf.service")
    assert run.returncode != 0, run.stdout + run.stderr
    time.sleep(5)                       # more than RestartSec=2s: a restart would have begun
    state = {p: box.show(p) for p in ("ActiveState", "Result", "ExecMainStatus", "NRestarts")}
    assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78",
                     "NRestarts": "0"}, state
    status = _status(box)
    assert CONFIG_ERROR in status and "status=78/CONFIG" in status, status

    # A client arriving now makes the socket start the service again; each start fails at once
    # and systemd's start limit stops the sockets: the client's connection is closed quickly.
    probe = box.run("/usr/bin/python3", "-c", textwrap.dedent("""
        import socket, time
        start = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", 110), timeout=30)
        try:
            data = sock.recv(100)
        except OSError as exc:
            data = repr(exc).encode()
        print(round(time.monotonic() - start, 2), data)
        """))
    seconds, _, answer = probe.stdout.strip().partition(" ")
    assert probe.returncode == 0 and float(seconds) < 10 and "+OK" not in answer, \
        probe.stdout + probe.stderr
    assert box.show("NRestarts") == "0"
    assert box.show("Result", "pop3sf.socket") == "service-start-limit-hit"
    assert 110 not in box.listening()

    box.sh("sed -i 's/^max_line_length = .*/max_line_length = 8192/' /etc/pop3sf.conf")
    run = box.sh("systemctl reset-failed pop3sf.service pop3sf.socket pop3sf-tls.socket && "
                 "systemctl start pop3sf.socket pop3sf-tls.socket")
    assert run.returncode == 0, run.stderr
    assert "config error test" in _mail_text(box.pop("tls", 995))


def test_box_reload_of_a_broken_config_fails_visibly(installed_box: Box) -> None:
    """ExecReload= checks the config before signalling: `systemctl reload` of a broken config
    exits non-zero with the reason in `systemctl status`, the server keeps running on its old
    config; once fixed, the same reload applies it."""
    box = installed_box
    _add_alice(box, "reload test")
    before = box.implementation()                      # also starts the service
    assert before.startswith("IMPLEMENTATION") and not re.search(r"\d+\.\d+", before), before
    main_pid = box.show("MainPID")
    box.sh("cp /etc/pop3sf.conf /root/good.conf")
    # broken, and changing a visible setting: were any of it applied, CAPA would show it
    box.sh("sed -i 's/^implementation_version = no/implementation_version = yes/' "
           f"/etc/pop3sf.conf && {BREAK_CONFIG}")
    run = box.run("systemctl", "reload", "pop3sf.service")
    assert run.returncode != 0, run.stdout + run.stderr
    status = _status(box)
    assert CONFIG_ERROR in status and "Reload failed" in status, status
    assert (box.show("ActiveState"), box.show("MainPID")) == ("active", main_pid)
    time.sleep(1)
    assert box.implementation() == before
    assert "reload test" in _mail_text(box.pop("tls", 995))

    box.sh("cp /root/good.conf /etc/pop3sf.conf && sed -i "
           "'s/^implementation_version = no/implementation_version = yes/' /etc/pop3sf.conf")
    run = box.run("systemctl", "reload", "pop3sf.service")
    assert run.returncode == 0, run.stdout + run.stderr
    assert _wait_until(lambda: re.search(r"\d+\.\d+", box.implementation()) is not None), \
        box.implementation()
    assert box.show("MainPID") == main_pid


def test_box_purge_keeps_mail_and_admin_data(installed_box: Box) -> None:
    """/var/lib/pop3sf is the unit's only writable path, so admins keep mail there beside
    mail/: purge deletes none of it (not even an empty directory the admin made); it removes
    the conffile and the size cache."""
    box = installed_box
    _add_alice(box, "purge test alice")
    box.sh("install -d -o pop3sf -g pop3sf -m 0750 /var/lib/pop3sf/bob /var/lib/pop3sf/archive"
           " && printf 'Subject: bob\\n\\npurge test bob\\n' > /var/lib/pop3sf/bob/1.eml"
           " && chown pop3sf:pop3sf /var/lib/pop3sf/bob/1.eml")
    assert "purge test alice" in _mail_text(box.pop("tls", 995))     # the service has run
    assert box.run("test", "-s", "/var/cache/pop3sf/sizes-v2.log").returncode == 0
    listing = ("cd /var/lib/pop3sf && find . -printf '%p %y %u:%g %m %s\\n' | sort && "
               "find . -type f -exec sha256sum {} + | sort")
    before = box.sh(listing).stdout
    assert "./bob/1.eml" in before and "./mail/alice/" in before and "./archive d" in before
    run = box.run("apt-get", "purge", "-y", "pop3sf")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert box.sh(listing).stdout == before
    for gone in ("/etc/pop3sf.conf", "/var/cache/pop3sf"):
        assert box.run("test", "-e", gone).returncode != 0, gone


def test_box_autopkgtest(installed_box: Box) -> None:
    """debian/tests as autopkgtest would run them against the installed package (fetch a
    message over 110 and 995); they install nothing and clean up after themselves, so a purge
    then removes the (empty) directories the package made."""
    box = installed_box
    box.cp("/root/src/debian", ROOT / "debian" / "tests")
    tests = re.findall(r"^Tests:\s*(.+)$", (ROOT / "debian" / "tests" / "control").read_text(),
                       re.M)
    names = [name for line in tests for name in line.replace(",", " ").split()]
    assert names == ["fetch-110-995"], names
    packages = box.out("dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\\n")
    for name in names:
        run = box.run("sh", "-c", f'cd /root/src && AUTOPKGTEST_TMP=$(mktemp -d) '
                      f'debian/tests/{name}')
        assert run.returncode == 0, run.stdout + run.stderr
        assert "ok - port 110" in run.stdout and "ok - port 995" in run.stdout, run.stdout
    assert box.out("dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\\n") == packages
    assert box.out("pop3sf-admin", "user", "list") == ""
    run = box.run("apt-get", "purge", "-y", "pop3sf")
    assert run.returncode == 0, run.stderr[-2000:]
    for gone in ("/var/lib/pop3sf", "/var/cache/pop3sf", "/etc/pop3sf.conf"):
        assert box.run("test", "-e", gone).returncode != 0, gone


HOLD_SESSION = """
import poplib, sys, time
pop = poplib.POP3_SSL("127.0.0.1", 995, timeout=30,
                      context=__import__("ssl")._create_unverified_context())
pop.user("alice"); pop.pass_(sys.argv[1]); pop.dele(1)
try:
    while True:
        pop.noop(); time.sleep(0.5)
except Exception as exc:
    open("/root/holder.out", "w").write(type(exc).__name__)
"""


def test_box_who_and_kick_under_systemd(installed_box: Box) -> None:
    """The unit's runtime directory holds the control socket: root lists live sessions and
    kicks one (its deletion is not committed); the socket is gone once the service stops."""
    box = installed_box
    _add_alice(box, "kick test message")
    box.sh(f"cat > /root/hold.py <<'PY'\n{HOLD_SESSION}\nPY")
    run = box.run("systemd-run", "--unit=holder", "/usr/bin/python3", "/root/hold.py", PASSWORD)
    assert run.returncode == 0, run.stderr
    assert _wait_until(lambda: "alice" in box.run("pop3sf-admin", "who").stdout), \
        box.run("pop3sf-admin", "who").stderr
    who = box.run("pop3sf-admin", "who").stdout
    assert "127.0.0.1" in who and "pop3s" in who, who
    assert box.out("stat", "-c", "%U:%G %a", "/run/pop3sf") == "pop3sf:pop3sf 750"
    assert box.run("pop3sf-admin", "kick", "alice").returncode == 0
    assert _wait_until(lambda: box.run("test", "-s", "/root/holder.out").returncode == 0)
    assert "kick test message" in _mail_text(box.pop("tls", 995))   # not deleted
    box.run("systemctl", "stop", "pop3sf.service")
    assert box.run("test", "-e", "/run/pop3sf/control").returncode != 0
    gone = box.run("pop3sf-admin", "who")
    assert gone.returncode == 69, (gone.returncode, gone.stderr)


PROCESSES_CONFIG = r"""sed -i -e 's/^# processes = 1$/processes = 2/' \
    -e 's/^# listen = 127.0.0.1:9110$/listen = 127.0.0.1:9110/' /etc/pop3sf.conf"""
SCRAPE = ("import urllib.request; print(urllib.request.urlopen("
          "'http://127.0.0.1:9110/metrics', timeout=10).read().decode())")


def test_box_two_processes_under_socket_activation(installed_box: Box) -> None:
    """``processes = 2`` in the real unit: socket activation starts a parent with two children
    sharing the sockets, READY only once both listen, a killed child is replaced without the
    unit noticing, reload reaches both, metrics are summed, stop leaves nothing behind."""
    box = installed_box
    _add_alice(box, "fleet message one")
    assert box.sh(PROCESSES_CONFIG).returncode == 0
    assert "processes = 2" in box.out("grep", "^processes", "/etc/pop3sf.conf")
    assert "fleet message one" in _mail_text(box.pop("tls", 995))    # activates the service
    assert box.show("ActiveState") == "active", _status(box)
    main = box.show("MainPID")

    def kids() -> list[str]:
        return box.out("pgrep", "-P", main).split()

    def scrape() -> str:
        scraped = box.run("/usr/bin/python3", "-c", SCRAPE)
        assert scraped.returncode == 0, scraped.stderr
        return scraped.stdout

    def logins() -> float:
        found = re.search(r'pop3sf_logins_total\{mechanism="USER"\} (\S+)', scrape())
        return float(found.group(1)) if found else 0.0

    assert _wait_until(lambda: len(kids()) == 2), (kids(), _status(box))
    assert _wait_until(lambda: "2/2 processes" in box.show("StatusText")), _status(box)
    for _ in range(6):                                   # both ports, whichever child accepts
        assert "fleet message one" in _mail_text(box.pop("stls", 110))
        assert "fleet message one" in _mail_text(box.pop("tls", 995))
    # Children report their counters once a second: wait until the 13 logins are in the sum,
    # so that what the child about to be killed counted is known to have reached the parent.
    assert _wait_until(lambda: logins() >= 13), scrape()
    counted = logins()
    # A child killed: replaced, the unit stays active with the same main process.
    victim = kids()[0]
    box.run("kill", "-9", victim)
    assert _wait_until(lambda: len(kids()) == 2 and victim not in kids(), 15), _status(box)
    assert box.show("MainPID") == main and box.show("NRestarts") == "0"
    assert "fleet message one" in _mail_text(box.pop("tls", 995))
    # Reload reaches both children.
    assert box.run("systemctl", "reload", "pop3sf.service").returncode == 0
    assert _wait_until(lambda: sum("configuration reloaded" in e.get("MESSAGE", "")
                                   for e in box.journal("-u", "pop3sf.service")) >= 2)
    # Metrics summed over both children (and the one that died: its logins stay counted).
    scraped = scrape()
    assert "pop3sf_processes 2.0" in scraped
    assert "pop3sf_process_restarts_total 1.0" in scraped
    assert logins() >= counted, scraped
    # Stop: every process gone, a clean result.
    assert box.run("systemctl", "stop", "pop3sf.service").returncode == 0
    assert box.show("ActiveState") == "inactive" and box.show("Result") == "success"
    assert box.run("pgrep", "-u", "pop3sf").returncode == 1
    assert {110, 995} <= box.listening()                 # the sockets wait for the next client
