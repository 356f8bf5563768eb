"""Smoke test of the benchmark harness (benchmarks/README.md): the pieces work, not how fast.

Seeds a tiny dataset, serves it with pop3sf, (when installed) a private Dovecot and (when its
benchmark-only venv can be built from PyPI) Twisted's POP3 server, drives them with the load
generator over loopback and checks what comes back. Targets are not tested here.
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
    sha = [ln for ln in lines if ":{SHA512-CRYPT}$6$" in ln]
    assert len(sha) == seed.TINY.sha512_users == len(dataset.groups["sha512"])
    stored = sha[0].split(":")[1].removeprefix("{SHA512-CRYPT}")
    user = sha[0].split(":")[0]
    lib = seed._libcrypt
    assert lib is not None and lib.crypt(seed.password(user).encode(), stored.encode()) == \
        stored.encode()
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


def test_target_check_against_twisted() -> None:
    t = run.Target("cpu_ms_per_login", "<=", 1.0, True, "", ref="twisted")
    med = {"pop3sf": {"cpu_ms_per_login": 0.5}, "dovecot": {"cpu_ms_per_login": 10.0},
           "twisted": {"cpu_ms_per_login": 0.4}}
    assert t.check(med) == (False, "1.25×")
    assert t.check({"pop3sf": {"cpu_ms_per_login": 0.5}}) == (None, "n/a")


def test_pipe_mixed_and_startup_with_the_shipped_config(ctx: run.Ctx) -> None:
    sc = next(s for s in run.SCENARIOS if s.name == "pipe-mixed")
    figs = run.run_one("pop3sf", sc, ctx)
    assert figs["errors"] == 0
    assert figs["cmds_s"] > 0 and figs["cpu_us_per_cmd"] >= 0
    start = next(s for s in run.SCENARIOS if s.name == "startup")
    srv = run.make_server("pop3sf", start, ctx)
    assert isinstance(srv, servers.Pop3sf)
    try:
        out = srv.start_timed(greeting=True)
        text = srv.conf.read_text()
    finally:
        srv.stop()
        srv.cleanup()
    assert out["greeting_ms"] > 0
    assert f"passwd_file = {ctx.ds.passwd()}" in text and "type = directory_multi" not in text
    assert "max_auth_in_flight = 256" in text  # the rest as shipped


@pytest.fixture(scope="module")
def twisted_python() -> str:
    python = servers.twisted_python()  # built once from PyPI, then cached under /var/tmp
    if python is None:
        pytest.skip("the Twisted venv can't be built (no network?)")
    return python


@pytest.mark.timeout(600)  # the first build downloads Twisted
def test_twisted_serves_the_same_bytes_and_the_scenarios_run(ctx: run.Ctx,
                                                             twisted_python: str) -> None:
    ctx.twisted_python = twisted_python
    srv = servers.Twisted(ctx.work, ctx.ds.passwd(), twisted_python)
    with srv:
        assert list(srv.ports) == ["pop3"]
        res, cpu = _retr_bytes(ctx, srv)
        assert cpu >= 0
    srv.cleanup()
    assert res["errors"] == 0, res["err"]
    assert res["bytes"] == _expected_retr(ctx)  # binary reads, LF -> CRLF on the wire
    for name in ("pipe-mixed", "login-sha512"):
        sc = next(s for s in run.SCENARIOS if s.name == name)
        figs = run.run_one("twisted", sc, ctx)
        assert figs["errors"] == 0, name
    assert all("twisted" in sc.na for sc in run.SCENARIOS if "tls" in sc.name)
