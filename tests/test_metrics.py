"""``[metrics] listen``: the real command serving Prometheus text, with 1 and 2 processes.

Scraped with urllib and parsed with python3-prometheus-client's own parser; the figures must
match what real poplib clients did, summed over processes and kept across a child's death.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_processes import Fleet, children


def samples(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metrics_port(fleet: Fleet) -> int:
    fleet.wait_log(r"metrics on http://127\.0\.0\.1:\d+/metrics")
    line = next(ln for ln in fleet.lines if "metrics on" in ln)
    m = re.search(r":(\d+)/metrics", line)
    assert m
    return int(m.group(1))


def activity(port: int, logins: int) -> None:
    for _ in range(logins):
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("alice")
        pop.pass_("secret")
        pop.retr(1)
        pop.quit()
    bad = poplib.POP3("127.0.0.1", port, timeout=10)
    bad.user("bob")
    with pytest.raises(poplib.error_proto):
        bad.pass_("wrong")
    bad.quit()


def wait_for(port: int, key: str, value: float, timeout: float = 10) -> dict[str, float]:
    """Children report once a second: wait until the sum got there."""
    deadline = time.monotonic() + timeout
    while True:
        got = samples(port)
        if got.get(key) == value or time.monotonic() > deadline:
            assert got.get(key) == value, (key, got.get(key), got)
            return got
        time.sleep(0.3)


@pytest.fixture
def hashed() -> str:
    # A bcrypt user makes the memory adapter blocking: its calls run on the worker pools and
    # land in the latency histograms.
    return "{BLF-CRYPT}" + bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()


@pytest.mark.parametrize("processes", [1, 2])
def test_metrics_count_what_clients_did(tmp_path: Path, hashed: str, processes: int) -> None:
    fleet = Fleet(tmp_path, "[metrics]\nlisten = 127.0.0.1:0\n", processes=processes,
                  users=f"alice:{hashed}, bob:{hashed}")
    try:
        fleet.state("READY=1")
        port = metrics_port(fleet)
        activity(fleet.port, 6)
        got = wait_for(port, "pop3sf_logins_total{mechanism=USER}", 6)
        assert got["pop3sf_login_failures_total{mechanism=USER}"] == 1
        assert got["pop3sf_connections_total"] == 7
        assert got["pop3sf_commands_total{command=RETR}"] == 6
        assert got["pop3sf_commands_total{command=PASS}"] == 7
        assert got["pop3sf_penalty_failures_total"] == 1
        assert got["pop3sf_adapter_call_seconds_count{pool=auth}"] == 7
        assert got["pop3sf_adapter_call_seconds_bucket{le=+Inf,pool=auth}"] == 7
        assert got["pop3sf_sent_bytes_total"] > 6 * 22
        assert got["pop3sf_adapter_calls_stuck{pool=mail}"] == 0
        # OpenMetrics when asked for it.
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert resp.read().endswith(b"# EOF\n")
        # A scraper that never sends its request delays no POP3 client, and is dropped.
        silent = socket.create_connection(("127.0.0.1", port))
        activity(fleet.port, 1)
        silent.settimeout(10)
        assert silent.recv(100) == b""
        silent.close()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    finally:
        assert fleet.stop() == 0


def test_counts_survive_a_dead_child(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, "[metrics]\nlisten = 127.0.0.1:0\n")
    try:
        fleet.state("READY=1")
        port = metrics_port(fleet)
        activity(fleet.port, 8)
        wait_for(port, "pop3sf_logins_total{mechanism=USER}", 8)
        os.kill(children(fleet.proc.pid)[0], signal.SIGKILL)
        fleet.wait_log(r"restarting it in")
        got = wait_for(port, "pop3sf_process_restarts_total", 1)
        assert got["pop3sf_logins_total{mechanism=USER}"] == 8    # what the dead one counted
        fleet.state("READY=1")
        assert wait_for(port, "pop3sf_processes", 2)
    finally:
        assert fleet.stop() == 0
