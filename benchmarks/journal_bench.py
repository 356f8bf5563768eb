"""Login + LIST of a 10,000-entry journal view: the server's CPU per login (``type = journal``).

    .venv/bin/python benchmarks/journal_bench.py [--entries 10000] [--logins 20]

Writes the entries into a private journald (tests/journald: needs root), then serves them with
pop3sf in this process and logs in from a separate client process: login, LIST, QUIT. The CPU
figures are this process's (the server's loop and worker threads) per login, so the client's
parsing doesn't count. The first login of an account measures what isn't cached yet (each
entry rendered once for its size); the rest are the steady state. Prints figures, asserts
nothing: not a timed test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from journald import available, write_entries  # noqa: E402
from pop3sf.adapters.journal import JournalAdapter  # noqa: E402

from pop3sf.testing import running_server  # noqa: E402

CLIENT = r"""
import json, poplib, sys, time
port, user, logins = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
poplib._MAXLINE = 1 << 20
walls = []
for _ in range(logins):
    start = time.perf_counter()
    pop = poplib.POP3("127.0.0.1", port, timeout=120)
    pop.user(user); pop.pass_("pw")
    count = len(pop.list()[1])
    pop.quit()
    walls.append(time.perf_counter() - start)
print(json.dumps({"count": count, "walls": walls}))
"""


def entries(n: int) -> list[dict[str, str]]:
    """*n* entries of 20 services, every priority, messages of varied length."""
    return [{"MESSAGE": f"job {i} of service{i % 20}: " + "status ok; " * (i % 17),
             "SYSLOG_IDENTIFIER": f"service{i % 20}", "PRIORITY": str(i % 8)}
            for i in range(n)]


def clients(port: int, user: str, logins: int) -> dict[str, Any]:
    cpu = time.process_time()
    proc = subprocess.run([sys.executable, "-c", CLIENT, str(port), user, str(logins)],
                          capture_output=True, text=True, timeout=1800, check=True)
    result: dict[str, Any] = json.loads(proc.stdout)
    result["cpu"] = (time.process_time() - cpu) / logins
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--logins", type=int, default=20)
    args = parser.parse_args()
    if (why := available()) is not None:
        print(f"journal_bench: {why}", file=sys.stderr)
        return 77
    with tempfile.TemporaryDirectory(prefix="pop3sf-journal-bench-") as tmp:
        directory = Path(tmp) / "journal"
        start = time.perf_counter()
        write_entries(directory, entries(args.entries))
        print(f"{args.entries} entries written through journald in "
              f"{time.perf_counter() - start:.1f} s")
        accounts = {
            "all": {"max_messages": args.entries + 10},
            "alerts": {"priority": "err"},
            "hourly": {"group": "unit-hour"},
        }
        config = {"directory": str(directory), "state_directory": f"{tmp}/state",
                  **{name: {"password_hash": "{PLAIN}pw", **keys}
                     for name, keys in accounts.items()}}
        adapter = JournalAdapter(config)
        adapter.clock = lambda: time.time() + 3700  # this hour closed: digests are offered
        print(f"{'account':8} {'listed':>7} {'first login CPU':>16} {'CPU/login':>10} "
              f"{'wall/login':>11}")
        with running_server("journal", config, adapter=adapter,
                            logging={"level": "warning"}) as srv:
            for name in accounts:
                cold = clients(srv.port, name, 1)
                warm = clients(srv.port, name, args.logins)
                wall = sorted(warm["walls"])[len(warm["walls"]) // 2]
                print(f"{name:8} {warm['count']:>7} {cold['cpu'] * 1000:>13.0f} ms "
                      f"{warm['cpu'] * 1000:>7.0f} ms {wall * 1000:>8.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
