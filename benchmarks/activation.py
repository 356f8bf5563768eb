"""Socket activation: time from a client's connect to the first ``+OK`` when pop3sf.service is
stopped and only pop3sf.socket listens (systemd starts the service on that connection).

Builds the .deb from this tree (tests/deb/build.sh; ``--deb`` to reuse one), boots a throw-away
box whose PID 1 is a real systemd (tests/deb/sdbox.sh), installs the package there and copies
this file in: the client must run inside the box (it has only loopback). ``--repeat`` times:
``systemctl stop pop3sf.service`` (the socket keeps listening), then connect to 127.0.0.1:110
and time connect → greeting line, QUIT. The service's CPU for that start is its cgroup's
``CPUUsageNSec`` read just after the greeting (or, without CPU accounting, the main process's
threads from /proc), and once more 1 s later (what the start costs in all). systemd's own
timestamps split the wait: connect → main process forked (ExecMainStartTimestamp) → READY=1
(ActiveEnterTimestamp) → greeting. Then, as a baseline, the greeting of the running service.
Target: ≤ 150 ms to the greeting. Needs root (overlayfs, namespaces)::

    /usr/bin/python3 benchmarks/activation.py --repeat 10
    make -C benchmarks activation ARGS="--deb /path/pop3sf_X_all.deb"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SDBOX = ROOT / "tests" / "deb" / "sdbox.sh"
BUILD = ROOT / "tests" / "deb" / "build.sh"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"       # Debian's python3, never a pyenv shim
ENV = {**os.environ, "PATH": CLEAN_PATH}
TARGET_MS = 150.0
SERVICE = "pop3sf.service"
SPLIT = ("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")


# --------------------------------------------------------------------------- inside the box

def systemctl(*args: str) -> str:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True).stdout.strip()


def show(*props: str) -> dict[str, str]:
    """Several properties in one call: each systemctl call costs a few ms of the box's CPU."""
    out = systemctl("show", SERVICE, *(f"--property={p}" for p in props))
    return dict(line.partition("=")[::2] for line in out.splitlines())


def stop_service() -> None:
    """Stop the service and wait until it is inactive, with the socket still listening.
    reset-failed clears the start rate limit (5 starts in 10 s by default): past it systemd
    fails the socket and resets the connection, and this loop starts every ~2 s."""
    systemctl("stop", SERVICE)
    systemctl("reset-failed", SERVICE)
    deadline = time.monotonic() + 30
    while systemctl("is-active", SERVICE) != "inactive":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{SERVICE} did not become inactive")
        time.sleep(0.05)
    # one unit per call: `is-active A B` is true if any one is active
    if systemctl("is-active", "pop3sf.socket") != "active":
        raise RuntimeError("pop3sf.socket is not listening after stopping the service")


def greet() -> tuple[float, int]:
    """Connect → first line, in seconds, and the CLOCK_MONOTONIC µs of the connect (the clock
    of systemd's *TimestampMonotonic properties)."""
    stamp = time.monotonic_ns() // 1000
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", 110), timeout=30) as sock:
        line = sock.makefile("rb").readline()
        elapsed = time.perf_counter() - start
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"greeting was {line!r}")
        sock.sendall(b"QUIT\r\n")
        sock.recv(512)
    return elapsed, stamp


def thread_cpu_ns(pid: int) -> int:
    """Run time of every thread (schedstat, ns) plus reaped children's c-times: /proc/PID/stat
    alone counts in 10 ms ticks, too coarse for a start of a few tens of ms."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
            total += int(f.read().split()[0])
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return total + (int(fields[13]) + int(fields[14])) * 10**9 // os.sysconf("SC_CLK_TCK")


def service_cpu() -> tuple[float, str]:
    """The service's CPU in ms and where it came from."""
    props = show("CPUUsageNSec", "MainPID")
    if props.get("CPUUsageNSec", "").isdigit() and int(props["CPUUsageNSec"]) < 2**63:
        return int(props["CPUUsageNSec"]) / 1e6, "cgroup CPUUsageNSec"
    return thread_cpu_ns(int(props["MainPID"])) / 1e6, "MainPID /proc schedstat"


def activation() -> dict[str, Any]:
    """One stopped → activated start: latency, CPU and systemd's split of the wait."""
    stop_service()
    time.sleep(0.3)                     # the stop's tail (journal, cgroup removal) settles
    elapsed, connect_us = greet()
    cpu, source = service_cpu()
    stamps = show(*SPLIT)
    time.sleep(1.0)
    settled, _ = service_cpu()
    forked, ready = (int(stamps[p]) for p in SPLIT)
    return {"greeting": elapsed * 1000, "cpu": cpu, "cpu_settled": settled, "source": source,
            "to_fork": (forked - connect_us) / 1000, "to_ready": (ready - forked) / 1000,
            "ready_to_greeting": elapsed * 1000 - (ready - connect_us) / 1000}


def inside(repeat: int, warm: int) -> int:
    """Client mode: runs in the box, prints one JSON document."""
    starts = [activation() for _ in range(repeat)]
    warm_ms = [greet()[0] * 1000 for _ in range(warm)]
    json.dump({"starts": starts, "warm": warm_ms,
               "systemd": systemctl("--version").splitlines()[0]}, sys.stdout)
    return 0


# --------------------------------------------------------------------------- on the host

def missing_tools(build: bool) -> str | None:
    """Why this can't run here, or None."""
    if os.geteuid() != 0:
        return "must run as root (overlayfs and namespaces for the systemd box)"
    tools = ["unshare", "nsenter", "setpriv", "apt-get", "systemctl"]
    tools += ["dpkg-buildpackage", "dh", "fakeroot"] if build else []
    for tool in tools:
        if shutil.which(tool, path=CLEAN_PATH) is None:
            return f"{tool} not installed"
    if not os.path.exists("/lib/systemd/systemd") or not os.path.exists("/usr/bin/python3"):
        return "needs /lib/systemd/systemd and /usr/bin/python3"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs"
    return None


def build_deb(out: Path) -> Path:
    """The .deb of this tree (build.sh prints its path last)."""
    run = subprocess.run([str(BUILD), str(ROOT), str(out)], capture_output=True, text=True,
                         timeout=900, env=ENV)
    if run.returncode != 0:
        raise RuntimeError(f"build failed: {run.stderr[-2000:]}")
    return Path(run.stdout.strip().splitlines()[-1])


def box(directory: Path, *args: str, timeout: float = 300) -> str:
    """sdbox.sh COMMAND DIR ...; its stdout, or an error with its stderr."""
    run = subprocess.run([str(SDBOX), args[0], str(directory), *args[1:]], capture_output=True,
                         text=True, timeout=timeout, env=ENV)
    if run.returncode != 0:
        raise RuntimeError(f"sdbox {args[0]} failed: {(run.stdout + run.stderr)[-2000:]}")
    return run.stdout


def measure(deb: Path, repeat: int, warm: int, workdir: Path) -> dict[str, Any]:
    """Boot a box, install the .deb, run the client inside; always stop the box."""
    directory = workdir / "box"
    box(directory, "boot")
    try:
        box(directory, "cp", str(deb), str(Path(__file__).resolve()), "/root")
        # the image's policy-rc.d (exit 101) would keep the postinst from starting the sockets
        box(directory, "run", "rm", "-f", "/usr/sbin/policy-rc.d")
        box(directory, "run", "apt-get", "install", "-y", "--no-install-recommends",
            f"/root/{deb.name}", timeout=600)
        out = box(directory, "run", "/usr/bin/python3", "/root/activation.py", "--inside",
                  "--repeat", str(repeat), "--warm", str(warm), timeout=120 + 10 * repeat)
        return dict(json.loads(out))
    finally:
        subprocess.run([str(SDBOX), "stop", str(directory)], capture_output=True, timeout=180,
                       env=ENV)


def row(name: str, values: list[float]) -> str:
    return (f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | "
            f"{max(values):.1f} |")


def report(result: dict[str, Any], deb: Path) -> str:
    """The Markdown table and the context it was measured in."""
    starts = result["starts"]
    col = {key: [s[key] for s in starts] for key in starts[0] if key != "source"}
    median = statistics.median(col["greeting"])
    verdict = "met" if median <= TARGET_MS else "not met"
    sources = sorted({s["source"] for s in starts})
    lines = [
        f"# Socket activation: connect → greeting ({datetime.date.today()})", "",
        f"{deb.name}, {result['systemd']}, {len(starts)} activations, {len(result['warm'])} "
        f"warm greetings, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}. "
        f"CPU from {', '.join(sources)}.", "",
        "| figure (ms) | median | min | max |", "| --- | --- | --- | --- |",
        row("greeting after activation (connect → `+OK`)", col["greeting"]),
        row("service CPU at the greeting", col["cpu"]),
        row("service CPU 1 s later", col["cpu_settled"]),
        row("warm greeting (service running)", result["warm"]),
        row("↳ connect → main process forked (systemd)", col["to_fork"]),
        row("↳ fork → READY=1", col["to_ready"]),
        row("↳ READY=1 → greeting received", col["ready_to_greeting"]), "",
        f"Target ≤ {TARGET_MS:.0f} ms to the greeting: {verdict} (median {median:.1f} ms).",
    ]
    return "\n".join(lines) + "\n"


def host(args: argparse.Namespace) -> int:
    problem = missing_tools(build=args.deb is None)
    if problem:
        print(f"activation.py: {problem}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pop3sf-activation-") as tmp:
        deb = args.deb.resolve() if args.deb else build_deb(Path(tmp) / "deb")
        text = report(measure(deb, args.repeat, args.warm or args.repeat, Path(tmp)), deb)
    print(text, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"\nwritten to {args.output}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="activations (default 10)")
    parser.add_argument("--warm", type=int, default=0,
                        help="greetings of the running service (default: --repeat)")
    parser.add_argument("--deb", type=Path, help="install this .deb instead of building one")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" /
                        "ACTIVATION.md", help="Markdown report (default %(default)s)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.inside:
        return inside(args.repeat, args.warm or args.repeat)
    return host(args)


if __name__ == "__main__":
    sys.exit(main())
