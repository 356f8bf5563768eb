"""``type = sql``: login + LIST of a 100,000-row table, per driver; prints figures (not a test).

For each database — an SQLite file, a private PostgreSQL and a private MariaDB, started in
temporary directories exactly as the tests start them (tests/postgres.py, tests/mariadb.py) —
fill a table with ``--rows`` rows (default 100,000; two short lines of body each), start pop3sf
as its own process (``python -m pop3sf --config ...``, logging at INFO to a file), and run
``--logins`` sequential sessions of USER/PASS ({PLAIN}), LIST, QUIT with poplib. Printed per
driver: wall time per login (median, min), pop3sf's CPU per login (its process from /proc,
utime+stime), the database server's CPU per login (PostgreSQL's and MariaDB's process trees;
SQLite's work is inside pop3sf), and pop3sf's peak RSS::

    .venv/bin/python benchmarks/sql_source.py                 # all three
    .venv/bin/python benchmarks/sql_source.py --only sqlite --rows 20000 --logins 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import poplib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import procstat  # noqa: E402
from servers import free_port  # noqa: E402

T0 = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
QUERIES = {
    "list_query": '"""SELECT id, at AS date, title AS subject, body FROM ev ORDER BY id"""',
    "body_query": '"SELECT body FROM ev WHERE id = :id"',
}


def rows(count: int) -> Iterator[tuple[Any, ...]]:
    for i in range(count):
        yield (T0 + datetime.timedelta(seconds=i), f"event {i}: job finished",
               f"job {i} finished with status 0\nnothing to report\n")


@contextlib.contextmanager
def sqlite_source(count: int, work: Path) -> Iterator[tuple[dict[str, Any], int | None]]:
    path = work / "rows.sqlite3"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, at REAL, title TEXT, body TEXT)")
        conn.executemany("INSERT INTO ev (at, title, body) VALUES (?, ?, ?)",
                         ((at.timestamp(), t, b) for at, t, b in rows(count)))
    conn.close()
    yield {"driver": "sqlite", "database": str(path)}, None


def _fill(conn: Any, count: int, ddl: str) -> None:
    cur = conn.cursor()
    cur.execute(ddl)
    batch = list(rows(count))
    for start in range(0, count, 5000):
        cur.executemany("INSERT INTO ev (at, title, body) VALUES (%s, %s, %s)",
                        [(at if "SERIAL" in ddl else at.replace(tzinfo=None), t, b)
                         for at, t, b in batch[start:start + 5000]])
    cur.close()


@contextlib.contextmanager
def postgres_source(count: int, work: Path) -> Iterator[tuple[dict[str, Any], int | None]]:
    from postgres import running_postgres

    with running_postgres() as server:
        database = server.new_database()
        conn = server.connect(database)
        _fill(conn, count, "CREATE TABLE ev (id SERIAL PRIMARY KEY, at TIMESTAMPTZ, "
                           "title TEXT, body TEXT)")
        conn.cursor().execute("ALTER TABLE ev OWNER TO pop3sf_test")
        conn.cursor().execute("VACUUM ANALYZE ev")
        conn.close()
        assert server.proc is not None
        yield server.adapter_config(database), server.proc.pid


@contextlib.contextmanager
def mariadb_source(count: int, work: Path) -> Iterator[tuple[dict[str, Any], int | None]]:
    from mariadb import running_mariadb

    with running_mariadb() as server:
        database = server.new_database()
        conn = server.connect(database)
        _fill(conn, count, "CREATE TABLE ev (id INT AUTO_INCREMENT PRIMARY KEY, at DATETIME, "
                           "title TEXT, body MEDIUMTEXT) CHARSET=utf8mb4")
        conn.close()
        assert server.proc is not None
        cfg = server.adapter_config(database)
        cfg.update(driver="mysql", mysql_driver="pymysql")
        yield cfg, server.proc.pid


SOURCES = {"sqlite": sqlite_source, "postgresql": postgres_source, "mysql": mariadb_source}


def config_text(adapter: dict[str, Any], port: int, log: Path) -> str:
    lines = ["[server]", 'user = ""', "[logging]", "target = file", f"file = {log}",
             "level = info", "[listeners]", "    [[pop3]]", f"    addresses = 127.0.0.1:{port}",
             "[adapter]", "type = sql", "username = bench", "password_hash = {PLAIN}pw"]
    lines += [f"{k} = {v}" for k, v in {**adapter, **QUERIES}.items()]
    return "\n".join(lines) + "\n"


def one_login(port: int) -> int:
    pop = poplib.POP3("127.0.0.1", port, timeout=120)
    pop.user("bench")
    pop.pass_("pw")
    _, listing, _ = pop.list()
    pop.quit()
    return len(listing)


def run(name: str, count: int, logins: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="pop3sf-sqlbench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        with SOURCES[name](count, work) as (adapter, db_pid):
            port = free_port()
            conf = work / "pop3sf.conf"
            conf.write_text(config_text(adapter, port, work / "pop3sf.log"))
            proc = subprocess.Popen([sys.executable, "-m", "pop3sf", "--config", str(conf)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                procstat.wait_listening([port], alive=lambda: proc.poll() is None)
                assert one_login(port) == count  # warm: the column check, the pool
                cpu0 = procstat.precise_cpu_seconds([proc.pid])
                db0 = procstat.tree_cpu(db_pid) if db_pid else 0.0
                walls = []
                for _ in range(logins):
                    started = time.perf_counter()
                    assert one_login(port) == count
                    walls.append(time.perf_counter() - started)
                cpu = (procstat.precise_cpu_seconds([proc.pid]) - cpu0) / logins
                db = ((procstat.tree_cpu(db_pid) - db0) / logins) if db_pid else 0.0
                rss = procstat.rss_kb([proc.pid]) / 1024
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return {"median": statistics.median(walls), "min": min(walls), "cpu": cpu, "db": db,
            "rss": rss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--logins", type=int, default=5)
    parser.add_argument("--only", default=",".join(SOURCES))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"type = sql: login + LIST of {args.rows:,} rows, {args.logins} logins per driver "
          f"(load average {load:.1f} on {os.cpu_count()} cores)\n")
    print("| driver | wall per login, median (min) | pop3sf CPU per login | "
          "database CPU per login | pop3sf RSS |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.only.split(","):
        r = run(name, args.rows, args.logins)
        db = f"{r['db']:.3f} s" if name != "sqlite" else "(in pop3sf)"
        print(f"| {name} | {r['median']:.3f} s ({r['min']:.3f} s) | {r['cpu']:.3f} s | {db} | "
              f"{r['rss']:.0f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
