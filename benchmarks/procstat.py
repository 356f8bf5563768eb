"""Server cost from /proc: CPU of a whole process tree, PSS, RSS and its peak.

CPU is utime+stime+cutime+cstime summed over the tree: a child that exits and is reaped moves its
time into its parent's c-times, so the sum only grows and stays right for a forking server such as
Dovecot (one process per session) as well as for a threaded one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, found by scanning /proc for parent links."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot: with the pid, it names one process for sure."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime of the processes plus what their reaped children used, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # state is fields[0]; utime, stime, cutime, cstime are stat fields 14-17.
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def precise_cpu_seconds(pids: Iterable[int]) -> float:
    """Run time in nanoseconds of every live thread (/proc/PID/task/TID/schedstat) plus the
    reaped children's c-times: for start-up costs of a few ms, which /proc/PID/stat shows in
    10 ms ticks per process (Dovecot's helpers each round to 0)."""
    total = 0.0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue
        fields = _stat_fields(pid)
        if fields is not None:
            total += (int(fields[13]) + int(fields[14])) / CLK_TCK
    return total


def tree_cpu(root: int) -> float:
    return cpu_seconds(tree_pids(root))


def _status_kb(pid: int, key: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pids: Iterable[int]) -> int:
    return sum(_status_kb(pid, b"VmRSS:") for pid in pids)


def pss_kb(pids: Iterable[int]) -> int:
    """Proportional set size: shared pages are split between the processes that map them."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


@dataclass
class Snapshot:
    """What a tree costs at one moment."""

    pids: int
    cpu_s: float
    rss_kb: int
    pss_kb: int


def snapshot(root: int, with_pss: bool = True) -> Snapshot:
    pids = tree_pids(root)
    return Snapshot(len(pids), cpu_seconds(pids), rss_kb(pids),
                    pss_kb(pids) if with_pss else 0)


def wait_quiet(root: int, max_pids: int, timeout: float = 5.0, settle: float = 0.3) -> int:
    """Wait until the sessions' processes are gone: the tree is down to ``max_pids`` processes,
    or its size hasn't changed for ``settle`` seconds (helpers such as Dovecot's auth process
    stay once started)."""
    deadline = time.monotonic() + timeout
    n = len(tree_pids(root))
    since = time.monotonic()
    while n > max_pids and time.monotonic() < deadline:
        time.sleep(0.02)
        m = len(tree_pids(root))
        if m != n:
            n, since = m, time.monotonic()
        elif time.monotonic() - since >= settle:
            break
    return n


class PeakRSS(threading.Thread):
    """Polls the tree's total RSS every ``interval`` seconds and keeps the maximum.

    Polling can miss a short spike; for a single process VmHWM is exact, so the peak also looks at
    VmHWM after resetting it through /proc/PID/clear_refs (needs ownership of the process).
    """

    def __init__(self, root: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak_kb = 0
        self._stop_event = threading.Event()
        self._pids = tree_pids(root)
        self._hwm_ok = reset_hwm(root)

    def run(self) -> None:
        n = 0
        while not self._stop_event.is_set():
            if n % 20 == 0:  # processes come and go (Dovecot); rescanning /proc is slow-ish
                self._pids = tree_pids(self.root)
            n += 1
            self.peak_kb = max(self.peak_kb, rss_kb(self._pids))
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        pids = tree_pids(self.root)
        if self._hwm_ok and pids == [self.root]:
            self.peak_kb = max(self.peak_kb, _status_kb(self.root, b"VmHWM:"))
        return self.peak_kb


def reset_hwm(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) of one process; True if the kernel allowed it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def listening(port: int, host_hex: str = "0100007F") -> bool:
    """True if something listens on 127.0.0.1:port (read from /proc/net/tcp: no connection made,
    so a forking server doesn't spend anything on the check)."""
    want = f"{host_hex}:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want and parts[3] == "0A":
                    return True
    except OSError:
        return False
    return False


def wait_listening(ports: Iterable[int], alive: Callable[[], bool] | None = None,
                   timeout: float = 30.0) -> None:
    """Block until every port listens; raise if ``alive()`` turns false or time runs out."""
    deadline = time.monotonic() + timeout
    todo = list(ports)
    while todo:
        todo = [p for p in todo if not listening(p)]
        if not todo:
            return
        if alive is not None and not alive():
            raise RuntimeError("server exited before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"ports {todo} not listening after {timeout} s")
        time.sleep(0.02)
