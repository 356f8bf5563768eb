"""Run the benchmark: pop3sf against a private Dovecot and Twisted's POP3 server, interleaved,
and write a Markdown report.

    python benchmarks/run.py                 # full data, three rounds (make bench)
    python benchmarks/run.py --quick         # small data, one round (smoke test)
    python benchmarks/run.py --only session,login-plain --servers pop3sf,twisted

Each scenario runs, per round, on a fresh pop3sf, then a fresh Dovecot, then a fresh Twisted
(A B C A B C ...), all serving the same seeded Maildirs (benchmarks/README.md). Figures are
medians over the rounds with min/max and the ratios pop3sf ÷ Dovecot and pop3sf ÷ Twisted, next
to the targets in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dovecot
import loadgen
import procstat
import pyspy
import seed
import servers

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
#: What runs pop3sf: the committed snapshot runs as the .deb runs it, on Debian's Python with
#: Debian's packages and byte-compiled code; the work tree (--worktree) from the venv.
SNAPSHOT_PYTHON = "/usr/bin/python3"
WORKTREE_PYTHON = str(PROJECT / ".venv" / "bin" / "python")

Figures = dict[str, float]

#: figure key -> (label, number format)
LABELS: dict[str, tuple[str, str]] = {
    "cpu_ms_per_session": ("server CPU per session (ms)", "{:.2f}"),
    "sessions_s": ("sessions/s", "{:.1f}"),
    "cpu_s_per_gb": ("server CPU per GB (s)", "{:.3f}"),
    "mb_s": ("throughput (MB/s)", "{:.0f}"),
    "cpu_ms_per_login": ("server CPU per login (ms)", "{:.3f}"),
    "logins_s": ("logins/s", "{:.1f}"),
    "one_core_hash_s": ("bcrypt hashes/s on one core (CPU time)", "{:.1f}"),
    "server_cores": ("server CPU ÷ wall time (cores busy)", "{:.2f}"),
    "x_one_core": ("logins/s ÷ one-core hash rate", "{:.2f}"),
    "cpu_us_per_cmd": ("server CPU per command (µs)", "{:.2f}"),
    "cmds_s": ("commands/s", "{:.0f}"),
    "held": ("connections held", "{:.0f}"),
    "open_s": ("time to open and log in all (s)", "{:.2f}"),
    "pss_kb_per_conn": ("server PSS per connection (KB)", "{:.1f}"),
    "rss_kb_per_conn": ("server RSS per connection (KB)", "{:.1f}"),
    "cpu_ms_per_conn": ("server CPU per connection opened and logged in (ms)", "{:.3f}"),
    "fresh_login_p50_ms": ("fresh login while held, p50 (ms)", "{:.2f}"),
    "fresh_login_max_ms": ("fresh login while held, max (ms)", "{:.2f}"),
    "noop_p50_ms": ("NOOP round trip p50 (ms)", "{:.3f}"),
    "noop_p99_ms": ("NOOP round trip p99 (ms)", "{:.3f}"),
    "noop_max_ms": ("NOOP round trip max (ms)", "{:.3f}"),
    "background": ("background load (connections or logins)", "{:.0f}"),
    "rss_growth_mb": ("server RSS growth (MB)", "{:.2f}"),
    "lat_p50_ms": ("latency p50 (ms)", "{:.2f}"),
    "lat_p99_ms": ("latency p99 (ms)", "{:.2f}"),
    "client_server_cpu": ("client CPU ÷ server CPU", "{:.2f}"),
    "errors": ("client errors", "{:.0f}"),
    "round_trips_per_session": ("worker round trips per session", "{:.1f}"),
    "listen_ms": ("exec to listening, wall (ms)", "{:.0f}"),
    "greeting_ms": ("exec to first greeting, wall (ms)", "{:.0f}"),
    "startup_cpu_ms": ("start-up CPU (ms)", "{:.0f}"),
    "greeting_cpu_ms": ("start-up CPU to the first greeting (ms)", "{:.0f}"),
    "startup_rss_mb": ("start-up RSS (MB)", "{:.1f}"),
}

#: How the report names the servers.
DISPLAY = {"pop3sf": "pop3sf", "dovecot": "Dovecot", "twisted": "Twisted"}


@dataclass
class Target:
    """``figure`` of pop3sf (or its ratio to the reference ``ref`` if ``relative``) ``op``
    ``value``."""

    figure: str
    op: str  # "<=" or ">="
    value: float
    relative: bool
    text: str
    ref: str = "dovecot"
    #: Relative to pop3sf in this other scenario instead of to ``ref`` (processes = 1 vs 2).
    against: str = ""

    def check(self, med: dict[str, Figures],
              med_all: dict[str, dict[str, Figures]] | None = None) -> tuple[bool | None, str]:
        a = med.get("pop3sf", {}).get(self.figure)
        if a is None:
            return None, "n/a"
        x = a
        if self.relative:
            if self.against:
                other = (med_all or {}).get(self.against, {})
                b = other.get("pop3sf", {}).get(self.figure)
            else:
                b = med.get(self.ref, {}).get(self.figure)
            if not b:
                return None, "n/a"
            x = a / b
        ok = x <= self.value if self.op == "<=" else x >= self.value
        shown = f"{x:.2f}×" if self.relative else LABELS[self.figure][1].format(x)
        return ok, shown


@dataclass
class Ctx:
    ds: seed.Dataset
    quick: bool
    work: Path
    cert: Path
    key: Path
    python: str
    twisted_python: str | None = None
    notes: list[str] = field(default_factory=list)
    pyspy_dir: Path | None = None
    source: Path | None = None  # snapshot of the committed server (None: the work tree)
    rev: str = "?"
    round: int = 0

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def one_core_hash_rate(self) -> float:
        """bcrypt checks per second on one core at the dataset's cost (what the pool must beat),
        measured again for every run: other load on the machine moves it."""
        import bcrypt
        user = self.ds.groups["bcrypt"][0]
        line = next(ln for ln in self.ds.passwd().read_text().splitlines()
                    if ln.startswith(user + ":"))
        stored = line.split(":")[1].removeprefix("{BLF-CRYPT}").encode()
        pw = seed.password(user).encode()
        bcrypt.checkpw(pw, stored)
        # CPU time, not wall time: what a core can do, whatever else runs on the machine
        n, t0 = 0, time.thread_time()
        while time.thread_time() - t0 < 1.0:
            bcrypt.checkpw(pw, stored)
            n += 1
        return n / (time.thread_time() - t0)


@dataclass
class Scenario:
    name: str
    title: str
    fn: Callable[[Ctx, Any], Figures]
    targets: list[Target]
    variant: str = "full"
    many: int = 0  # connections from one address the servers must accept (caps lifted)
    na: dict[str, str] = field(default_factory=dict)  # server -> why it can't run this
    own_start: bool = False  # fn(ctx, make_server) starts (and stops) servers itself
    processes: int = 1  # pop3sf's [server] processes


# --- measuring ---------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def measured(srv: servers.Server, specs: list[dict[str, Any]],
             timeout: float) -> tuple[dict[str, Any], float]:
    """Run workers to completion; return their merged result and the server's CPU seconds."""
    with loadgen.Fleet(specs) as fleet:
        fleet.ready()
        before = procstat.snapshot(srv.pid, with_pss=False)
        fleet.go()
        res = loadgen.merge(fleet.results(timeout))
    procstat.wait_quiet(srv.pid, srv.base_pids)
    after = procstat.snapshot(srv.pid, with_pss=False)
    return res, after.cpu_s - before.cpu_s


def common(res: dict[str, Any], cpu: float, ctx: Ctx, what: str) -> Figures:
    if res["errors"]:
        ctx.notes.append(f"{what}: {res['errors']} client errors, e.g. {res['err'][:2]}")
    return {"client_server_cpu": res["cpu"] / cpu if cpu else math.nan,
            "errors": res["errors"]}


def spec(srv: servers.Server, task: str, tls: bool = False, **kw: Any) -> dict[str, Any]:
    port = srv.ports["pop3s" if tls else "pop3"]
    return {"task": task, "port": port, "tls": tls, **kw}


def clients_for(users: list[str], n: int) -> list[list[str]]:
    return [c for c in loadgen.split(users, min(n, len(users))) if c]


# --- scenarios ---------------------------------------------------------------------------------

def sessions(ctx: Ctx, srv: servers.Server, n_clients: int = 16, passes: int = 2) -> Figures:
    """16 clients: login, STAT, UIDL, LIST, RETR all, QUIT; two passes over the 100 users."""
    clients = clients_for(ctx.ds.groups["session"], n_clients)
    per = passes * max(len(c) for c in clients)
    specs = [spec(srv, "session", clients=part, per_client=per, deadline=90)
             for part in loadgen.split(clients, 2) if part]
    res, cpu = measured(srv, specs, 150)
    ops = max(res["ops"], 1)
    return {"cpu_ms_per_session": cpu * 1000 / ops, "sessions_s": res["ops"] / res["wall"],
            "lat_p50_ms": pct(res["lat"], 50) * 1000, "lat_p99_ms": pct(res["lat"], 99) * 1000,
            **common(res, cpu, ctx, f"{srv.name} session")}


def retr_big(n_sessions: int, tls: bool) -> Callable[[Ctx, servers.Server], Figures]:
    def run(ctx: Ctx, srv: servers.Server) -> Figures:
        users = ctx.ds.groups["big"][:n_sessions]
        repeat = ctx.n(15 if n_sessions == 1 else 8, 3)
        specs = [spec(srv, "retr", tls, clients=[[u] for u in part], repeat=repeat, deadline=120)
                 for part in loadgen.split(users, min(2, len(users))) if part]
        res, cpu = measured(srv, specs, 180)
        gb = max(res["bytes"], 1) / 1e9
        return {"cpu_s_per_gb": cpu / gb, "mb_s": res["bytes"] / 1e6 / res["wall"],
                **common(res, cpu, ctx, f"{srv.name} retr")}
    return run


def login_storm(kind: str) -> Callable[[Ctx, servers.Server], Figures]:
    def run(ctx: Ctx, srv: servers.Server) -> Figures:
        group = {"bcrypt": "bcrypt", "sha512": "sha512"}.get(kind, "small")
        clients = clients_for(ctx.ds.groups[group], 16)
        if kind == "bcrypt":
            per, deadline = 10_000, ctx.n(8, 2)
        elif kind == "sha512":
            per, deadline = ctx.n(24, 6), 90
        else:
            per, deadline = ctx.n(64 if kind == "plain" else 40, 10), 90
        specs = [spec(srv, "login", kind == "tls", clients=part, per_client=per,
                      deadline=deadline) for part in loadgen.split(clients, 2) if part]
        res, cpu = measured(srv, specs, deadline + 60)
        ops = max(res["ops"], 1)
        out = {"cpu_ms_per_login": cpu * 1000 / ops, "logins_s": res["ops"] / res["wall"],
               "lat_p50_ms": pct(res["lat"], 50) * 1000, "lat_p99_ms": pct(res["lat"], 99) * 1000,
               **common(res, cpu, ctx, f"{srv.name} login-{kind}")}
        if kind == "bcrypt":
            out["server_cores"] = cpu / res["wall"]  # > 1: the hashing really runs in parallel
            out["one_core_hash_s"] = ctx.one_core_hash_rate()
            out["x_one_core"] = out["logins_s"] / out["one_core_hash_s"]
        return out
    return run


def pipelined(command: str | list[str], batches: int,
              batch: int = 100) -> Callable[[Ctx, servers.Server], Figures]:
    def run(ctx: Ctx, srv: servers.Server) -> Figures:
        users = ctx.ds.groups["session"][:4]
        specs = [spec(srv, "pipeline", clients=[[u] for u in users], command=command,
                      batch=batch, batches=ctx.n(batches, 5), deadline=90)]
        res, cpu = measured(srv, specs, 150)
        ops = max(res["ops"], 1)
        return {"cpu_us_per_cmd": cpu * 1e6 / ops, "cmds_s": res["ops"] / res["wall"],
                **common(res, cpu, ctx, f"{srv.name} {command}")}
    return run


#: Dovecot proxies a TLS session through its own login process: 10,000 TLS connections are
#: 20,000 processes, several minutes to open and near the pid limit. It holds this many instead
#: (the figure compared is per connection; the report says so).
DOVECOT_IDLE_TLS = 2_500


def idle(tls: bool) -> Callable[[Ctx, servers.Server], Figures]:
    def run(ctx: Ctx, srv: servers.Server) -> Figures:
        users = ctx.ds.groups["small"]
        if tls and srv.name == "dovecot":
            users = users[:DOVECOT_IDLE_TLS]
        holders = [spec(srv, "hold", tls, clients=[part], parallel=100, deadline=400, nofile=1)
                   for part in loadgen.split(users, 2)]
        prober = spec(srv, "login", clients=[ctx.ds.groups["session"][-1:]], per_client=20,
                      deadline=30)
        with loadgen.Fleet([*holders, prober]) as fleet:
            hold, probe = fleet.workers[:2], fleet.workers[2]
            fleet.ready()
            before = procstat.snapshot(srv.pid)
            for w in hold:
                w.send("go")
            loaded = [w.expect("loaded", 420) for w in hold]
            time.sleep(0.5)
            mid = procstat.snapshot(srv.pid)
            probe.send("go")
            fresh = probe.expect("result", 60)
            for w in hold:
                w.send("stop")
            res = loadgen.merge([w.expect("result", 120) for w in hold])
        procstat.wait_quiet(srv.pid, srv.base_pids, timeout=60)
        held = max(sum(x["held"] for x in loaded), 1)
        if res["errors"]:
            ctx.notes.append(f"{srv.name} idle: {res['errors']} errors, e.g. {res['err'][:2]}")
        return {"held": held, "open_s": max(x["open_s"] for x in loaded),
                "pss_kb_per_conn": (mid.pss_kb - before.pss_kb) / held,
                "rss_kb_per_conn": (mid.rss_kb - before.rss_kb) / held,
                "cpu_ms_per_conn": (mid.cpu_s - before.cpu_s) * 1000 / held,
                "fresh_login_p50_ms": pct(fresh["lat"], 50) * 1000,
                "fresh_login_max_ms": max(fresh["lat"] or [math.nan]) * 1000,
                "errors": res["errors"] + fresh["errors"]}
    return run


def isolation(kind: str) -> Callable[[Ctx, servers.Server], Figures]:
    def run(ctx: Ctx, srv: servers.Server) -> Figures:
        if kind == "tls":
            background = spec(srv, "silent", connections=ctx.n(1000, 100), deadline=120,
                              nofile=1)
            background["port"] = srv.ports["pop3s"]
        else:
            background = spec(srv, "login", clients=clients_for(ctx.ds.groups["bcrypt"], 16),
                              per_client=100_000, deadline=120)
        prober = spec(srv, "noop", clients=[ctx.ds.groups["session"][:1]],
                      count=ctx.n(1000, 200), gap=0.002, deadline=60)
        with loadgen.Fleet([background, prober]) as fleet:
            bg, probe = fleet.workers
            fleet.ready()
            bg.send("go")
            if kind == "tls":
                bg.expect("loaded", 90)
            time.sleep(1.0)  # let the load settle (bcrypt logins in flight)
            probe.send("go")
            res = probe.expect("result", 90)
            bg.send("stop")
            bgres = bg.expect("result", 90)
        procstat.wait_quiet(srv.pid, srv.base_pids, timeout=30)
        if res["errors"] or bgres["errors"]:
            ctx.notes.append(f"{srv.name} isolation-{kind}: errors {res['err'][:1]}"
                             f" {bgres['err'][:1]}")
        return {"noop_p50_ms": pct(res["lat"], 50) * 1000,
                "noop_p99_ms": pct(res["lat"], 99) * 1000,
                "noop_max_ms": max(res["lat"] or [math.nan]) * 1000,
                "background": bgres["ops"], "errors": res["errors"]}
    return run


def startup(ctx: Ctx, make: Callable[[], servers.Server]) -> Figures:
    """Fresh starts, each timed from just before exec (servers.Server.start_timed): one start
    measures the CPU of the process tree from exec to listening, the next the wall time from
    exec to the first greeting's +OK (connecting as soon as the port accepts) and the CPU spent
    by then (a server that listens before it is ready to serve shows it here); medians of
    ``repeat`` pairs. pop3sf runs etc/pop3sf.conf as shipped, adapted to the bench data."""
    cpu, listen, greet, greet_cpu, rss = [], [], [], [], []
    for _ in range(ctx.n(5, 2)):
        for greeting in (False, True):
            srv = make()
            try:
                out = srv.start_timed(greeting)
                if greeting:
                    greet.append(out["greeting_ms"])
                    greet_cpu.append(out["greeting_cpu_ms"])
                else:
                    cpu.append(out["cpu_ms"])
                    listen.append(out["listen_ms"])
                    time.sleep(0.2)
                    rss.append(procstat.snapshot(srv.pid, with_pss=False).rss_kb / 1024)
            finally:
                srv.stop()
                srv.cleanup()
    return {"startup_cpu_ms": statistics.median(cpu), "listen_ms": statistics.median(listen),
            "greeting_ms": statistics.median(greet),
            "greeting_cpu_ms": statistics.median(greet_cpu),
            "startup_rss_mb": statistics.median(rss)}


def memory(ctx: Ctx, srv: servers.Server) -> Figures:
    user = ctx.ds.groups["huge"][0]
    specs = [spec(srv, "retr", clients=[[user]], repeat=1, deadline=120)]
    with loadgen.Fleet(specs) as fleet:
        fleet.ready()  # logged in: the session's own process (Dovecot) already exists
        before = procstat.snapshot(srv.pid)
        peak = procstat.PeakRSS(srv.pid)
        peak.start()
        fleet.go()
        res = loadgen.merge(fleet.results(180))
        top = peak.stop()
    procstat.wait_quiet(srv.pid, srv.base_pids)
    after = procstat.snapshot(srv.pid, with_pss=False)
    cpu = after.cpu_s - before.cpu_s
    return {"rss_growth_mb": (top - before.rss_kb) / 1024,
            "cpu_s_per_gb": cpu / (max(res["bytes"], 1) / 1e9),
            "mb_s": res["bytes"] / 1e6 / res["wall"], **common(res, cpu, ctx, "memory")}


def rel(fig: str, op: str, v: float, text: str) -> Target:
    return Target(fig, op, v, True, text)


def ab(fig: str, op: str, v: float, text: str) -> Target:
    return Target(fig, op, v, False, text)


def tw(fig: str, op: str, v: float, text: str) -> Target:
    return Target(fig, op, v, True, text, ref="twisted")


#: Twisted's server here serves plain POP3 only (twisted_pop3.py).
NO_TLS = {"twisted": "no TLS listener in the Twisted reference"}
#: pop3sf's processes = 1 against 2: nothing to compare the others with.
POP3SF_ONLY = {"dovecot": "pop3sf's own processes comparison",
               "twisted": "pop3sf's own processes comparison"}


SCENARIOS = [
    Scenario("session", "16 clients: login, STAT, UIDL, LIST, RETR all, QUIT", sessions,
             [rel("cpu_ms_per_session", "<=", 0.35, "CPU/session ≤ 0.35 × Dovecot"),
              tw("cpu_ms_per_session", "<=", 0.6, "CPU/session ≤ 0.6 × Twisted")]),
    # processes = 1 against 2 (docs/architecture.md §8), rounds interleaved: 48 clients, so
    # that one process is CPU-bound rather than bound by the 16 clients' round trips.
    Scenario("session-1p", "48 clients' sessions, [server] processes = 1",
             lambda ctx, srv: sessions(ctx, srv, 48, 4), [], na=POP3SF_ONLY),
    Scenario("session-2p", "48 clients' sessions, [server] processes = 2",
             lambda ctx, srv: sessions(ctx, srv, 48, 4),
             [Target("sessions_s", ">=", 1.5, True, "sessions/s ≥ 1.5 × processes = 1",
                     against="session-1p"),
              Target("cpu_ms_per_session", "<=", 1.1, True,
                     "CPU/session ≤ 1.1 × processes = 1", against="session-1p")],
             processes=2, na=POP3SF_ONLY),
    Scenario("session-nowsize", "the same on Maildir names with ,W= stripped", sessions,
             [rel("cpu_ms_per_session", "<=", 0.5, "CPU/session ≤ 0.5 × Dovecot")],
             variant="nowsize"),
    Scenario("retr-big-1", "RETR of a 20 MB message, 1 session, plain", retr_big(1, False),
             [rel("cpu_s_per_gb", "<=", 0.4, "CPU/GB ≤ 0.4 × Dovecot"),
              rel("mb_s", ">=", 1.0, "MB/s ≥ Dovecot")]),
    Scenario("retr-big-4", "RETR of a 20 MB message, 4 sessions, plain", retr_big(4, False),
             [rel("cpu_s_per_gb", "<=", 0.4, "CPU/GB ≤ 0.4 × Dovecot")]),
    Scenario("retr-big-tls", "RETR of a 20 MB message over implicit TLS, 1 session",
             retr_big(1, True), [rel("cpu_s_per_gb", "<=", 1.0, "CPU/GB ≤ 1.0 × Dovecot")],
             na=NO_TLS),
    Scenario("login-plain", "login storm, 16 concurrent, {PLAIN}", login_storm("plain"),
             [rel("cpu_ms_per_login", "<=", 0.1, "CPU/login ≤ 0.1 × Dovecot"),
              tw("cpu_ms_per_login", "<=", 1.0, "CPU/login ≤ 1.0 × Twisted")]),
    Scenario("login-sha512", "login storm, 16 concurrent, {SHA512-CRYPT} (5,000 rounds)",
             login_storm("sha512"),
             [tw("cpu_ms_per_login", "<=", 1.1, "CPU/login ≤ 1.1 × Twisted")]),
    Scenario("login-tls", "login storm, 16 concurrent, {PLAIN}, TLS handshake per login",
             login_storm("tls"), [rel("cpu_ms_per_login", "<=", 0.5, "CPU/login ≤ 0.5 × Dovecot")],
             na=NO_TLS),
    Scenario("login-bcrypt", "login storm, 16 concurrent, bcrypt", login_storm("bcrypt"),
             [ab("x_one_core", ">=", 1.6, "logins/s ≥ 1.6 × one core's hash rate")]),
    Scenario("pipe-list", "pipelined LIST n (batches of 100)", pipelined("LIST {n}", 1000),
             [rel("cpu_us_per_cmd", "<=", 1.5, "CPU/command ≤ 1.5 × Dovecot")]),
    Scenario("pipe-uidl", "pipelined UIDL n (batches of 100)", pipelined("UIDL {n}", 1000),
             [rel("cpu_us_per_cmd", "<=", 1.5, "CPU/command ≤ 1.5 × Dovecot")]),
    Scenario("pipe-top", "pipelined TOP n 0 (batches of 100)", pipelined("TOP {n} 0", 250),
             [rel("cpu_us_per_cmd", "<=", 2.0, "CPU/command ≤ 2 × Dovecot")]),
    Scenario("pipe-mixed", "pipelined LIST n, UIDL n, TOP n 0 in rotation, 1,000 per write",
             pipelined(["LIST {n}", "UIDL {n}", "TOP {n} 0"], 50, batch=1000),
             [rel("cpu_us_per_cmd", "<=", 1.5, "CPU/command ≤ 1.5 × Dovecot")]),
    Scenario("idle-plain", "10,000 logged-in connections held, plain", idle(False),
             [ab("pss_kb_per_conn", "<=", 3, "PSS ≤ 3 KB per connection"),
              ab("open_s", "<=", 3, "all opened and logged in within 3 s"),
              tw("cpu_ms_per_conn", "<=", 1.0, "CPU/connection (open + login) ≤ 1.0 × Twisted"),
              ab("fresh_login_max_ms", "<=", 5, "a fresh login answers within 5 ms")],
             many=10_000),
    Scenario("idle-tls", "10,000 logged-in connections held, implicit TLS (Dovecot: "
             f"{DOVECOT_IDLE_TLS:,})", idle(True),
             [ab("pss_kb_per_conn", "<=", 24, "PSS ≤ 24 KB per TLS connection"),
              ab("fresh_login_max_ms", "<=", 5, "a fresh login answers within 5 ms")],
             many=10_000, na=NO_TLS),
    Scenario("iso-tls", "NOOP round trips while 1,000 clients sit silent in TLS handshakes",
             isolation("tls"), [ab("noop_p99_ms", "<=", 5, "NOOP p99 ≤ 5 ms")], many=1_000,
             na=NO_TLS),
    Scenario("iso-bcrypt", "NOOP round trips while 16 bcrypt logins are in flight",
             isolation("bcrypt"), [ab("noop_p99_ms", "<=", 10, "NOOP p99 ≤ 10 ms")]),
    Scenario("memory", "RETR of a 100 MB message", memory,
             [ab("rss_growth_mb", "<=", 4, "server RSS grows ≤ 4 MB")]),
    Scenario("startup", "start-up: CPU from exec to listening, time to the first greeting "
             "(pop3sf: etc/pop3sf.conf as shipped, adapted to the bench data)", startup,
             [ab("startup_cpu_ms", "<=", 100, "start-up CPU ≤ 100 ms")], own_start=True),
]


# --- servers -----------------------------------------------------------------------------------

def overrides(sc: Scenario, ctx: Ctx) -> tuple[dict[str, dict[str, int | str]], str]:
    """Caps lifted for the scenarios that hold many connections from one address (reported)."""
    pop3sf: dict[str, dict[str, int | str]] = {}
    if sc.processes > 1:
        pop3sf["server"] = {"processes": sc.processes}
    if sc.name in ("session-1p", "session-2p"):
        # 48 clients log in at once from 127.0.0.1 (the default allows 16 in flight)
        pop3sf["auth"] = {"max_auth_in_flight_per_address": 64}
    if not sc.many:
        return pop3sf, ""
    n = ctx.n(sc.many, min(sc.many, 400))
    pop3sf["limits"] = {"max_connections_per_address": n + 200}
    extra = ""
    if sc.name.startswith("idle"):
        # 200 logins in flight from 127.0.0.1 (100 per client process) to open 10,000 fast
        pop3sf["auth"] = {"max_auth_in_flight_per_address": 256}
        extra = dovecot.many_connections(n)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard < 2 * n + 1000:
            # A read-write Maildir session holds its lock file besides its socket: under this
            # fd limit pop3sf would (rightly) turn connections away before n. Without the
            # cross-process lock (no other process serves these Maildirs) it holds one fd per
            # session, as Twisted does.
            pop3sf["adapter"] = {"cross_instance_lock": "no"}
            note = (f"{sc.name}: the fd hard limit ({hard}) can't hold {n} sessions with their "
                    "lock files: pop3sf ran with [adapter] cross_instance_lock = no")
            if note not in ctx.notes:
                ctx.notes.append(note)
    return pop3sf, extra


def shipped_conf(ctx: Ctx) -> Path:
    """etc/pop3sf.conf of the server under test: the committed one (like the snapshot of the
    code) unless the run is on the work tree."""
    path = ctx.work / "shipped-pop3sf.conf"
    if not path.exists():
        text = None
        if ctx.source is not None:
            got = subprocess.run(["git", "-C", str(PROJECT), "show", "HEAD:etc/pop3sf.conf"],
                                 capture_output=True, text=True)
            text = got.stdout if got.returncode == 0 else None
        path.write_text(text if text is not None else
                        (PROJECT / "etc" / "pop3sf.conf").read_text())
    return path


def make_server(name: str, sc: Scenario, ctx: Ctx) -> servers.Server:
    pop3sf, extra = overrides(sc, ctx)
    if name == "pop3sf":
        return servers.Pop3sf(ctx.work, ctx.ds.passwd(sc.variant), ctx.cert, ctx.key,
                              ctx.python, pop3sf, ctx.source,
                              shipped_conf(ctx) if sc.name == "startup" else None)
    if name == "twisted":
        if ctx.twisted_python is None:
            raise RuntimeError("no Twisted venv")
        return servers.Twisted(ctx.work, ctx.ds.passwd(sc.variant), ctx.twisted_python)
    return dovecot.Dovecot(ctx.work, ctx.ds, ctx.cert, ctx.key, sc.variant, extra)


def warm_dovecot(ctx: Ctx, variant: str) -> None:
    """Log in to every user once so Dovecot's on-disk index exists, as on a server in use."""
    marker = ctx.ds.dovecot_index(variant) / ".warm"
    if marker.exists():
        return
    users = [ln.split(":", 1)[0] for ln in ctx.ds.passwd(variant).read_text().splitlines()]
    t0 = time.monotonic()
    srv = dovecot.Dovecot(ctx.work, ctx.ds, ctx.cert, ctx.key, variant)
    with srv:
        clients = clients_for(users, 16)
        specs = [spec(srv, "session", clients=part, per_client=max(len(c) for c in clients),
                      retr=False, deadline=600) for part in loadgen.split(clients, 2)]
        res, _ = measured(srv, specs, 700)
    srv.cleanup()
    if res["errors"]:
        raise RuntimeError(f"Dovecot warm-up failed: {res['err']}")
    marker.write_text("warm\n")
    print(f"warmed Dovecot's index for {variant} ({len(users)} users) in "
          f"{time.monotonic() - t0:.0f} s", file=sys.stderr)


def run_one(name: str, sc: Scenario, ctx: Ctx) -> Figures:
    if sc.own_start:
        return sc.fn(ctx, lambda: make_server(name, sc, ctx))
    srv = make_server(name, sc, ctx)
    srv.start()
    rec = None
    if ctx.pyspy_dir is not None and name == "pop3sf":
        rec = pyspy.Recorder(srv.pid, ctx.pyspy_dir / f"{sc.name}-r{ctx.round}.txt")
        time.sleep(0.5)  # attached before the load starts
    try:
        assert srv.startup is not None
        figs = sc.fn(ctx, srv)
        if rec is not None:
            raw = rec.stop()
            if raw is not None:
                raw.with_suffix(".md").write_text(f"# {sc.name}: {sc.title}\n\n"
                                                  + pyspy.summarise(raw))
        figs["startup_cpu_ms"] = srv.startup.cpu_s * 1000
        figs["startup_rss_mb"] = srv.startup.rss_kb / 1024
    finally:
        srv.stop()
    rt = round_trips(srv)  # the log is complete once the server has stopped
    if rt is not None and sc.name.startswith("session"):
        figs["round_trips_per_session"] = rt
    srv.cleanup()
    return figs


ROUND_TRIPS = re.compile(r"logout .*\bcalls=(\d+)")


def round_trips(srv: servers.Server) -> float | None:
    """Worker round trips per session, if the server's log reports them (a ``calls=N`` field on
    pop3sf's logout line; Dovecot has no worker pool: n/a)."""
    if srv.name != "pop3sf":
        return None
    try:
        calls = [int(m.group(1)) for m in ROUND_TRIPS.finditer(srv.log_path.read_text("utf-8",
                                                                                       "replace"))]
    except OSError:
        return None
    return sum(calls) / len(calls) if calls else None


# --- report ------------------------------------------------------------------------------------

def summarise(runs: list[Figures]) -> dict[str, tuple[float, float, float]]:
    keys = {k for r in runs for k in r}
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if k in r and not math.isnan(r[k])]
        if vals:
            out[k] = (statistics.median(vals), min(vals), max(vals))
    return out


def fmt(key: str, v: tuple[float, float, float] | None, rounds: int) -> str:
    if v is None:
        return "n/a"
    f = LABELS.get(key, (key, "{:.3g}"))[1]
    if rounds == 1:
        return f.format(v[0])
    return f"{f.format(v[0])} ({f.format(v[1])}–{f.format(v[2])})"


def ratio_refs(names: list[str]) -> list[str]:
    """The references pop3sf is divided by in the report: every other server run."""
    return [n for n in names if n != "pop3sf"] if "pop3sf" in names else []


def report(ctx: Ctx, results: dict[str, dict[str, list[Figures]]], rounds: int,
           names: list[str], elapsed: float) -> str:
    refs = ratio_refs(names)
    title = " and ".join(DISPLAY.get(r, r) for r in refs) or "nothing"
    lines = [f"# pop3sf vs {title} — {ctx.ds.profile.name} data, {rounds} round(s)", ""]
    versions = [dovecot_version()] if "dovecot" in names else []
    if "twisted" in names:
        versions.append(f"Twisted {servers.TWISTED_VERSION} (benchmarks/twisted_pop3.py)")
    lines += [f"- {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
              f"{os.cpu_count()} cores, Linux {platform.release()}, Python "
              f"{platform.python_version()}, " + ", ".join(versions) + ", pop3sf "
              + (f"{ctx.rev} (committed)" if ctx.source else f"{ctx.rev} + work tree"),
              f"- data: {ctx.ds.root}; total run time {elapsed / 60:.1f} min",
              "- figures: median (min–max) over rounds; ratios = pop3sf ÷ each reference; "
              "server CPU is utime+stime of the whole server process tree from /proc",
              "- overrides: pop3sf `[limits] max_connections_per_address` raised to N+200 for "
              "idle-* and iso-tls, `[auth] max_auth_in_flight_per_address = 256` for idle-*; "
              "Dovecot `default_process_limit`, `default_client_limit`, "
              "`service pop3/pop3-login process_limit` raised for idle-* only; Twisted has no "
              "caps to lift (listen backlog 1024 like pop3sf); every server runs as `nobody` "
              "(the data's owner) when started as root", ""]
    med_all: dict[str, dict[str, Figures]] = {}
    for sc_name, per in results.items():
        med_all[sc_name] = {s: {k: v[0] for k, v in summarise(runs).items()}
                            for s, runs in per.items()}

    lines += ["## Targets", "", "| scenario | target | pop3sf | met |", "| --- | --- | --- | --- |"]
    for sc in SCENARIOS:
        if sc.name not in results:
            continue
        for t in sc.targets:
            ok, shown = t.check(med_all[sc.name], med_all)
            verdict = "n/a" if ok is None else ("met" if ok else "**not met**")
            lines.append(f"| {sc.name} | {t.text} | {shown} | {verdict} |")
    lines.append("")

    for sc in SCENARIOS:
        if sc.name not in results:
            continue
        per = results[sc.name]
        summ = {s: summarise(per.get(s, [])) for s in names}
        keys = [k for k in LABELS if any(k in summ[s] for s in names)]
        lines += [f"## {sc.name}: {sc.title}", ""]
        head = ("| figure | " + " | ".join(DISPLAY.get(s, s) for s in names) + " |"
                + "".join(f" pop3sf ÷ {DISPLAY.get(r, r)} |" for r in refs))
        lines += [head, "| --- " * (len(names) + 1 + len(refs)) + "|"]
        for k in keys:
            cells = [fmt(k, summ[s].get(k), rounds) for s in names]
            ratios = ""
            for r in refs:
                a, b = summ["pop3sf"].get(k), summ[r].get(k)
                ratios += f" {a[0] / b[0]:.2f} |" if a and b and b[0] else " n/a |"
            lines.append(f"| {LABELS[k][0]} | " + " | ".join(cells) + " |" + ratios)
        if "pop3sf" in names and "round_trips_per_session" not in summ["pop3sf"] \
                and sc.name.startswith("session"):
            others = ["n/a (forks)" if s == "dovecot" else "n/a" for s in names if s != "pop3sf"]
            lines.append("| worker round trips per session | n/a (not exposed by the server) | "
                         + " | ".join(others) + " |" + " |" * len(refs))
        for s in names:
            if s in sc.na:
                lines.append(f"\n{DISPLAY.get(s, s)}: n/a ({sc.na[s]}).")
        lines.append("")
    if ctx.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in ctx.notes] + [""]
    return "\n".join(lines)


def dovecot_version() -> str:
    try:
        out = subprocess.run([dovecot.BINARY, "--version"], capture_output=True, text=True)
        return f"Dovecot {out.stdout.split()[0]}"
    except (OSError, IndexError):
        return "Dovecot ?"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def pop3sf_available(python: str, source: Path | None) -> bool:
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
    return subprocess.run([python, "-c", "import pop3sf.cli, pop3sf.adapters.maildir"], env=env,
                          capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pop3sf vs Dovecot and Twisted benchmark")
    ap.add_argument("--quick", action="store_true", help="small data, one round")
    ap.add_argument("--profile", choices=sorted(seed.PROFILES),
                    help="dataset size (default full; quick with --quick)")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, or 1 with --quick)")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--servers", default="pop3sf,dovecot,twisted",
                    help="comma-separated, run in this order per round (default: all three)")
    ap.add_argument("--twisted-venv", type=Path, default=servers.TWISTED_VENV,
                    help="the benchmark-only venv with Twisted (created on first use)")
    ap.add_argument("--data-dir", type=Path, default=seed.DEFAULT_ROOT)
    ap.add_argument("--python", help=f"the Python that runs pop3sf (default {SNAPSHOT_PYTHON}, "
                    f"or {WORKTREE_PYTHON} with --worktree)")
    ap.add_argument("--output", type=Path, help="Markdown report (default benchmarks/results/"
                    "RESULTS-<profile>.md)")
    ap.add_argument("--list", action="store_true", help="list the scenarios")
    ap.add_argument("--worktree", action="store_true",
                    help="run pop3sf from the work tree as it is (default: the committed HEAD, "
                    "copied aside with git archive)")
    ap.add_argument("--pyspy", type=Path, metavar="DIR",
                    help="profile every pop3sf run with py-spy into DIR (raw + summary .md)")
    args = ap.parse_args(argv)

    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:16} {sc.title}")
        return 0
    # servers run in their own directories
    args.python = os.path.abspath(args.python or (WORKTREE_PYTHON if args.worktree
                                                  else SNAPSHOT_PYTHON))
    rounds = args.rounds or (1 if args.quick else 3)
    names = [s for s in args.servers.split(",") if s]
    unknown = set(names) - set(DISPLAY)
    if unknown:
        ap.error(f"unknown server(s) {', '.join(sorted(unknown))}; choose from "
                 + ", ".join(DISPLAY))
    chosen = [sc for sc in SCENARIOS if not args.only or sc.name in args.only.split(",")]
    if not chosen or not names:
        ap.error("nothing to run")

    servers.raise_nofile()
    t0 = time.monotonic()
    profile = seed.PROFILES[args.profile or ("quick" if args.quick else "full")]
    ds = seed.seed(profile, args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="pop3sf-bench-"))
    os.chmod(work, 0o755)
    cert, key = servers.make_cert(work)
    ctx = Ctx(ds, profile.name != "full", work, cert, key, args.python)
    if "twisted" in names:
        ctx.twisted_python = servers.twisted_python(args.twisted_venv)
        if ctx.twisted_python is None:
            print("no Twisted venv: running without Twisted", file=sys.stderr)
            names.remove("twisted")
            if not names:
                ap.error("nothing to run")
    if "pop3sf" in names and not args.worktree:
        try:
            ctx.source = servers.snapshot_source(PROJECT, work / "pop3sf-src", args.python)
        except (OSError, subprocess.CalledProcessError) as exc:  # no git checkout: the tree
            print(f"no git snapshot ({exc}); running pop3sf from the tree", file=sys.stderr)
    if "pop3sf" in names and not pop3sf_available(args.python, ctx.source):
        print("pop3sf (pop3sf.cli with the maildir adapter) not importable with "
              f"{args.python}: running without it", file=sys.stderr)
        names.remove("pop3sf")
        if not names:
            ap.error("nothing to run")
    ctx.rev = git_rev()
    if args.pyspy:
        if not pyspy.available():
            ap.error(f"py-spy not found ({pyspy.PYSPY}): pip install py-spy into the venv")
        args.pyspy.mkdir(parents=True, exist_ok=True)
        ctx.pyspy_dir = args.pyspy.resolve()
    results: dict[str, dict[str, list[Figures]]] = {}
    out = args.output or HERE / "results" / f"RESULTS-{ds.profile.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if "dovecot" in names:
            for variant in sorted({sc.variant for sc in chosen}):
                warm_dovecot(ctx, variant)
        for sc in chosen:
            results[sc.name] = {s: [] for s in names}
        # Rounds outermost: scenarios compared with each other (session-2p against session)
        # run under the same conditions of the machine, round by round.
        for r in range(rounds):
            ctx.round = r + 1
            for sc in chosen:
                for name in names:
                    if name in sc.na:
                        continue
                    t1 = time.monotonic()
                    try:
                        figs = run_one(name, sc, ctx)
                    except Exception as exc:
                        ctx.notes.append(f"{sc.name} round {r + 1} {name} failed: "
                                         f"{type(exc).__name__}: {exc}"[:600])
                        print(f"  {sc.name} {name} FAILED: {exc}", file=sys.stderr)
                        continue
                    results[sc.name][name].append(figs)
                    brief = ", ".join(f"{k}={v:.4g}" for k, v in figs.items()
                                      if k in {t.figure for t in sc.targets} or k == "errors")
                    print(f"{sc.name} r{r + 1} {name}: {brief} ({time.monotonic() - t1:.0f} s)",
                          file=sys.stderr)
            out.write_text(report(ctx, results, rounds, names, time.monotonic() - t0))
            out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
