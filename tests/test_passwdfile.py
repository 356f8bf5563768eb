"""Dovecot passwd-files: the full line format and reloading when the file changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pop3sf.adapters.passwdfile import PasswdEntry, PasswdFile, parse, parse_line

ALICE = ("alice@example.org:{PLAIN}pw:5000:5000:Alice A.:/var/vmail/example.org/alice::"
         "userdb_mail=maildir:/m/a:LAYOUT=fs quota_rule=*:storage=1G")
SAMPLE = "# Dovecot passwd-file\n" + ALICE + """

bob:{SHA512-CRYPT}$6$x$y
  # indented comment
carol:{BLF-CRYPT}$2y$05$abc:1001:1001
malformed line without colon
:nouser
alice@example.org:{PLAIN}second
"""


def test_full_format(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        entries = parse(SAMPLE, "sample")
    assert list(entries) == ["alice@example.org", "bob", "carol"]
    alice = entries["alice@example.org"]
    assert alice.password == "{PLAIN}pw"  # the first line wins over the repeated one
    assert (alice.uid, alice.gid, alice.gecos, alice.home, alice.shell) == \
        ("5000", "5000", "Alice A.", "/var/vmail/example.org/alice", "")
    # the extra fields are the rest of the line, colons included
    assert alice.extra == {"userdb_mail": "maildir:/m/a:LAYOUT=fs", "quota_rule": "*:storage=1G"}
    assert entries["bob"].password == "{SHA512-CRYPT}$6$x$y"
    assert entries["bob"].home == ""
    assert entries["carol"].uid == "1001" and entries["carol"].home == ""
    text = caplog.text
    assert "line 7" in text and "line 9" in text  # malformed, and the repeated user
    assert "{PLAIN}" not in text  # never a secret in the log


def test_crlf_and_blank_lines() -> None:
    entries = parse("a:{PLAIN}x\r\n\r\n   \r\nb:{PLAIN}y\r\n")
    assert entries["a"].password == "{PLAIN}x" and entries["b"].password == "{PLAIN}y"


def test_to_line_round_trip() -> None:
    line = "u@d:{PLAIN}p:1:2:G:/h:/bin/false:userdb_mail=maildir:/x nopassword"
    entry = parse_line(line)
    assert entry is not None
    assert entry.to_line() == line
    short = PasswdEntry("u", "{PLAIN}p")
    assert short.to_line() == "u:{PLAIN}p"
    assert parse_line(short.to_line()) == PasswdEntry("u", "{PLAIN}p")


def test_lookup_and_case_fallback(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("Alice@Example.org:{PLAIN}a\nbob:{PLAIN}b\nBOB:{PLAIN}B\n")
    pf = PasswdFile(path)
    found = pf.lookup("alice@example.org")
    assert found is not None and found.user == "Alice@Example.org"
    bob, big_bob = pf.lookup("bob"), pf.lookup("BOB")
    assert bob is not None and bob.password == "{PLAIN}b"  # exact match first
    assert big_bob is not None and big_bob.password == "{PLAIN}B"
    assert pf.lookup("carol") is None
    assert len(pf) == 3


def test_reload_on_change(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("a:{PLAIN}one\n")
    pf = PasswdFile(path)
    first = pf.snapshot()
    assert pf.snapshot() is first  # unchanged file: not parsed again
    entry = pf.lookup("a")
    assert entry is not None and entry.password == "{PLAIN}one"

    # atomic replacement (new inode), as the admin tools do
    tmp = tmp_path / ".passwd.tmp"
    tmp.write_text("a:{PLAIN}two\nb:{PLAIN}new\n")
    os.replace(tmp, path)
    entry = pf.lookup("a")
    assert entry is not None and entry.password == "{PLAIN}two"
    assert pf.lookup("b") is not None

    # in-place edit of the same size: the mtime tells
    st = path.stat()
    path.write_text("a:{PLAIN}TWO\nb:{PLAIN}new\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    entry = pf.lookup("a")
    assert entry is not None and entry.password == "{PLAIN}TWO"


def test_missing_file_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("a:{PLAIN}one\n")
    pf = PasswdFile(path)
    assert pf.lookup("a") is not None
    path.unlink()
    with pytest.raises(OSError):
        pf.lookup("a")  # a removed file must not keep old passwords valid


def test_non_utf8_bytes_survive(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_bytes(b"latin:{PLAIN}p\xe4ss\n")
    entry = PasswdFile(path).lookup("latin")
    assert entry is not None
    assert entry.password.encode("utf-8", "surrogateescape") == b"{PLAIN}p\xe4ss"
