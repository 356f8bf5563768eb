"""A private, real systemd-journald for tests: entries are written into a journal directory of
the test's own, never the machine's journal.

``tests/deb/with-journald.sh`` (from the systemd-box tools) runs a command beside a standalone
``systemd-journald`` in a private mount namespace whose ``/var/log/journal`` is the given
directory; :func:`write_entries` runs a small writer there that sends each entry through the
native protocol (``systemd.journal.sendv``, octets as given, so non-UTF-8 values are real) and
returns once journald has flushed them. Needs root (``unshare``) and ``systemd-journald``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "deb" / "with-journald.sh"  # shared with test_daemon
JOURNALD = "/lib/systemd/systemd-journald"

_WRITER = r"""
import json, sys
from systemd import journal
for line in sys.stdin:
    entry = json.loads(line)
    journal.sendv(*[k.encode() + b"=" + bytes.fromhex(v) for k, v in entry.items()])
"""


def available() -> str | None:
    """Why a private journald can't run here, or None if it can."""
    if os.geteuid() != 0:
        return "a private journald needs root (unshare --mount)"
    if not os.path.exists(JOURNALD) or shutil.which("unshare") is None:
        return "systemd-journald or unshare is missing"
    return None


def write_entries(directory: Path, entries: Sequence[Mapping[str, str | bytes]]) -> None:
    """Log *entries* (field -> value; ``MESSAGE`` and friends) through a private journald
    writing into *directory*, in order; the files are complete when this returns."""
    lines = "".join(json.dumps({k: (v.encode() if isinstance(v, str) else v).hex()
                                for k, v in entry.items()}) + "\n" for entry in entries)
    proc = subprocess.run([str(SCRIPT), str(directory), "--", sys.executable, "-c", _WRITER],
                          input=lines, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if proc.returncode != 0:
        raise RuntimeError(f"with-journald.sh failed ({proc.returncode}): {proc.stderr}")
