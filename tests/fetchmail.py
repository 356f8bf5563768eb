"""fetchmail, the real client, against a test server: fetch everything, delete it, deliver it
to an mbox file of the test's own (``nokeep fetchall``, UIDLs on)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class Fetchmail:
    def __init__(self, tmp: Path, port: int, user: str, password: str) -> None:
        self.home = tmp / "fetchmail-home"
        self.home.mkdir(mode=0o700)
        self.mbox = tmp / "delivered.mbox"
        self.rc = self.home / "fetchmailrc"
        self.rc.write_text(
            f"set no syslog\n"
            f"poll 127.0.0.1 service {port} protocol pop3 uidl\n"
            f"  user {user} password \"{password}\" is root here\n"
            f"  sslproto '' nokeep fetchall\n"
            f"  mda \"/bin/sh -c 'cat >> {self.mbox}; echo >> {self.mbox}'\"\n")
        self.rc.chmod(0o600)

    def run(self) -> subprocess.CompletedProcess[str]:
        """One run; its exit status is 0 when mail came, 1 when there was none."""
        env = {**os.environ, "FETCHMAILHOME": str(self.home), "HOME": str(self.home)}
        return subprocess.run(["fetchmail", "-f", str(self.rc), "--nodetach", "-v"], env=env,
                              capture_output=True, text=True, timeout=120)

    def delivered(self) -> bytes:
        return self.mbox.read_bytes()
