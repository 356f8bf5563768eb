"""Smoke test of the benchmark harness (benchmarks/README.md): the pieces work, not how fast.

Seeds a tiny dataset, serves it with pop3sf and (when installed) a private Dovecot, drives both
with the load generator over loopback and checks what comes back. Targets are not tested here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import dovecot  # noqa: E402
import procstat  # noqa: E402
import run  # noqa: E402
import seed  # noqa: E402
import servers  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are 0700, and the servers run as `nobody` under root.
    d = Path(tempfile.mkdtemp(prefix="pop3sf-bench-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(workdir: Path) -> seed.Dataset:
    return seed.seed(seed.TINY, workdir / "data", log=False)


@pytest.fixture(scope="module")
def ctx(workdir: Path, dataset: seed.Dataset) -> run.Ctx:
    cert, key = servers.make_cert(workdir)
    return run.Ctx(dataset, True, workdir, cert, key, sys.executable)


def test_seed_names_carry_exact_sizes_and_are_deterministic(workdir: Path,
                                                            dataset: seed.Dataset) -> None:
    cur = dataset.home("s000") / "Maildir" / "cur"
    files = sorted(cur.iterdir())
    assert len(files) == seed.TINY.session_messages
    for f in files:
        data = f.read_bytes()
        fields = dict(p.split("=") for p in f.name.split(":")[0].split(",")[1:])
        assert int(fields["S"]) == len(data)
        assert int(fields["W"]) == len(data.replace(b"\n", b"\r\n"))
    stripped = sorted((dataset.home("s000", "nowsize") / "Maildir" / "cur").iterdir())
    assert [f.name for f in stripped] == [
        f.name.replace(f",W={f.name.split(',W=')[1].split(':')[0]}", "") for f in files]
    assert all(",W=" not in f.name for f in stripped)
    lines = dataset.passwd().read_text().splitlines()
    assert lines[0].startswith("s000:{PLAIN}pw-s000:")
    assert any(":{BLF-CRYPT}$2b$04$" in ln for ln in lines)
    again = seed.seed(seed.TINY, workdir / "again", log=False)
    assert again.passwd().read_text().replace(str(again.root), "") == \
        dataset.passwd().read_text().replace(str(dataset.root), "")
    assert sorted(p.name for p in (again.home("s000") / "Maildir" / "cur").iterdir()) == \
        [f.name for f in files]
    assert seed.seed(seed.TINY, workdir / "data", log=False).root == dataset.root  # cached


def _retr_bytes(ctx: run.Ctx, srv: servers.Server) -> tuple[dict, float]:
    user = ctx.ds.groups["big"][0]
    specs = [run.spec(srv, "retr", clients=[[user]], repeat=2, deadline=20)]
    return run.measured(srv, specs, 30)


def _expected_retr(ctx: run.Ctx) -> int:
    f = next((ctx.ds.home(ctx.ds.groups["big"][0]) / "Maildir" / "cur").iterdir())
    return 2 * int(f.name.split(",W=")[1].split(":")[0])  # base64-like lines: nothing stuffed


def test_pop3sf_session_scenario_and_retr_bytes(ctx: run.Ctx) -> None:
    sc = next(s for s in run.SCENARIOS if s.name == "session")
    figs = run.run_one("pop3sf", sc, ctx)
    assert figs["errors"] == 0
    assert figs["sessions_s"] > 0
    assert figs["cpu_ms_per_session"] >= 0
    assert figs["startup_rss_mb"] > 5  # a Python process with its modules
    srv = run.make_server("pop3sf", sc, ctx)
    with srv:
        res, cpu = _retr_bytes(ctx, srv)
    srv.cleanup()
    assert res["errors"] == 0, res["err"]
    assert res["ops"] == 2
    assert res["bytes"] == _expected_retr(ctx)
    assert cpu >= 0


@pytest.mark.skipif(not shutil.which(dovecot.BINARY), reason="dovecot-pop3d not installed")
def test_dovecot_serves_the_same_bytes_and_stops_cleanly(ctx: run.Ctx) -> None:
    srv = dovecot.Dovecot(ctx.work, ctx.ds, ctx.cert, ctx.key)
    with srv:
        pid = srv.pid
        assert srv.startup is not None and srv.startup.pids >= 2  # master + helpers
        res, cpu = _retr_bytes(ctx, srv)
        assert cpu >= 0
        pids = procstat.tree_pids(pid)
        assert len(pids) >= 3 and procstat.rss_kb(pids) > 0  # master, log, config, ...
        assert procstat.precise_cpu_seconds(pids) > 0  # ns, not 10 ms ticks
    assert res["errors"] == 0, res["err"]
    assert res["bytes"] == _expected_retr(ctx)
    assert not Path(f"/proc/{pid}").exists()  # the master is gone after stop()
    text = srv.conf.read_text()
    assert "auth_cache_size = 0" in text and f"base_dir = {srv.dir}/run" in text
    srv.cleanup()


def test_run_py_writes_a_markdown_report(workdir: Path) -> None:
    out = workdir / "report.md"
    rc = run.main(["--profile", "tiny", "--rounds", "1", "--servers", "pop3sf",
                   "--only", "login-plain,pipe-list", "--data-dir", str(workdir / "data"),
                   "--python", sys.executable, "--worktree", "--output", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "## login-plain" in text and "## pipe-list" in text and "+ work tree" in text
    assert "| server CPU per login (ms) |" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| logins/s |"))
    assert float(row.split("|")[2]) > 0
    assert "| login-plain | CPU/login ≤ 0.1 × Dovecot | n/a | n/a |" in text  # no Dovecot run
    assert out.with_suffix(".json").exists()


def test_target_check_uses_the_ratio_to_dovecot() -> None:
    t = run.Target("cpu_ms_per_session", "<=", 0.5, True, "")
    assert t.check({"pop3sf": {"cpu_ms_per_session": 1.0},
                    "dovecot": {"cpu_ms_per_session": 4.0}}) == (True, "0.25×")
    assert t.check({"pop3sf": {"cpu_ms_per_session": 3.0},
                    "dovecot": {"cpu_ms_per_session": 4.0}})[0] is False
    assert run.pct([5, 1, 4, 2, 3], 50) == 3
    assert run.pct(list(range(1, 101)), 99) == 99
