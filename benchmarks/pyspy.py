"""Profile pop3sf during a scenario with py-spy, and boil the samples down to a table.

py-spy attaches to the running server (``--nonblocking``: the server is never paused, and
py-spy's own CPU is not in the server's process tree) and records only samples where a thread
was running Python, not waiting. ``run.py --pyspy DIR`` does this for every pop3sf run.

    python benchmarks/pyspy.py DIR/session-r1.txt     # summarise a recording
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

PYSPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


class Recorder:
    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [PYSPY, "record", "-p", str(pid), "-r", str(rate), "--nonblocking", "--threads",
             "--format", "raw", "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> Path | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.out if self.out.exists() else None


def available() -> bool:
    return os.access(PYSPY, os.X_OK)


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("/pop3sf/", "/adapters/", "python3.11/", "dist-packages/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker in ("/pop3sf/", "/adapters/"):
                path = marker.strip("/") + "/" + path
            break
    return f"{m.group('func')} ({path})"


def summarise(path: Path, top: int = 25) -> str:
    """Markdown: the functions where samples land (self) and what they sit under (inclusive),
    per thread kind (the loop thread vs worker threads)."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        kind = "loop/main thread" if "MainThread" in thread or "0x" not in thread else "worker"
        threads[re.sub(r"\s*\(0x[0-9a-f]+\)|\s*\d+$", "", thread) or kind] += n
        names = [_name(f) for f in frames[1:]]
        if not names:
            continue
        total += n
        self_c[names[-1]] += n
        for nm in set(names):
            incl[nm] += n
    if not total:
        return "(no samples)\n"
    out = [f"{total} samples (CPU-active only)", "", "| thread | share |", "| --- | --- |"]
    out += [f"| {t} | {c * 100 / total:.0f}% |" for t, c in threads.most_common(6)]
    out += ["", "| self | function |", "| --- | --- |"]
    out += [f"| {c * 100 / total:.1f}% | `{nm}` |" for nm, c in self_c.most_common(top)]
    out += ["", "| inclusive | function |", "| --- | --- |"]
    out += [f"| {c * 100 / total:.1f}% | `{nm}` |" for nm, c in incl.most_common(top)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"## {arg}\n")
        print(summarise(Path(arg)))
