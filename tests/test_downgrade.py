"""The RFC 6858 downgrade end to end: real files, a real server, poplib without UTF8.

Long internationalized header fields must reach an old client as RFC 2047 encoded-words that
fit its limits (a line holding one at most 76 characters), decode back to the original text, and
the size LIST announced must be the exact number of octets RETR sends.
"""

from __future__ import annotations

import email
import email.policy
import os
from pathlib import Path

from pop3sf.adapters.sizecache import JOURNAL, STALE_JOURNALS, key_for

from pop3sf.passwords import hash_bcrypt
from pop3sf.testing import RunningServer, running_server
from pop3sf.wire import wire_bytes

WORDS = ["Grüße", "aus", "München,", "Ελλάδα", "и", "Россия", "日本語のテキスト", "🙂🙂"]
SUBJECT = "Re: " + " ".join(WORDS * 8)[:296]
NAME = "Jörg-Ünal Çelik-Øberg " * 4
MESSAGE = (f"From: a@example.org\nTo: {NAME.strip()} <j@example.org>, Zoë <zoë@example.org>\n"
           f"Subject: {SUBJECT}\nMessage-ID: <1@example.org>\n\nKörper\n.dot\n").encode()


def retr_all(srv: RunningServer, user: str, password: str) -> list[tuple[int, bytes]]:
    """(LIST size, octets received by RETR) for every message, without enabling UTF8."""
    pop = srv.pop3()
    pop.user(user)
    pop.pass_(password)
    sizes = [int(line.split()[1]) for line in pop.list()[1]]
    out = []
    for n, size in enumerate(sizes, 1):
        _, lines, octets = pop.retr(n)
        data = b"".join(line + b"\r\n" for line in lines)
        assert octets == len(data)
        out.append((size, data))
    pop.quit()
    return out


def check_downgraded(size: int, data: bytes) -> email.message.EmailMessage:
    assert size == len(data), f"LIST said {size}, RETR sent {len(data)}"
    head = data.partition(b"\r\n\r\n")[0]
    assert max(head) < 0x80
    long_lines = [line for line in head.split(b"\r\n") if len(line) > 76]
    assert not long_lines, long_lines
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_maildir_long_utf8_subject_measured_all(tmp_path: Path) -> None:
    vmail = tmp_path / "vmail"
    md = vmail / "example.org" / "u" / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    (tmp_path / "passwd").write_text("u@example.org:{PLAIN}pw:5000:5000::::\n")
    raw_size = len(wire_bytes(MESSAGE))
    named = md / "cur" / f"1700000001.M1P1.h,S={len(MESSAGE)},W={raw_size}:2,S"
    named.write_bytes(MESSAGE)
    plain = md / "new" / "1700000002.M2P1.h"
    plain.write_bytes(MESSAGE)
    cache = tmp_path / "cache"
    cache.mkdir()
    # a journal left by an older release, whose downgrade measured other sizes
    st = os.stat(plain)
    k = key_for(st)
    (cache / STALE_JOURNALS[0]).write_text(
        f"{k.device} {k.inode} {k.size} {k.mtime_ns} - {raw_size} 1 {raw_size + 7}\n")
    config = {"passwd_file": str(tmp_path / "passwd"), "root": str(vmail),
              "mail_location": str(vmail) + "/%d/%n/Maildir", "measure_all": True,
              "size_cache_dir": str(cache)}
    for _ in range(2):  # measured, then served from the size journal by a fresh server
        with running_server("maildir", config) as srv:
            got = retr_all(srv, "u@example.org", "pw")
        assert len(got) == 2
        for size, data in got:
            msg = check_downgraded(size, data)
            assert str(msg["Subject"]) == SUBJECT
            assert msg["To"].addresses[0].addr_spec == "j@example.org"
            assert data.endswith("\r\n\r\nKörper\r\n.dot\r\n".encode())  # body unchanged
            assert size > raw_size  # really downgraded, not sent as 8-bit
    assert (cache / JOURNAL).is_file() and not (cache / STALE_JOURNALS[0]).exists()


def test_directory_long_utf8_subject_and_file_name(tmp_path: Path) -> None:
    d = tmp_path / "mail"
    d.mkdir()
    (d / "a.eml").write_bytes(MESSAGE)
    dense = "€" * 300  # one run of 900 octets without a space to fold at
    (d / "b.eml").write_bytes(f"Subject: {dense}\n\nx\n".encode())
    txt_name = "Ž" * 120 + ".txt"  # wrapped: the file name becomes the Subject
    (d / txt_name).write_text("Dobrý den\n")
    sender = "a-rather-long-sender-address@example.org"
    config = {"directory": str(d), "username": "alice", "from_address": f"{NAME} <{sender}>",
              "password_hash": hash_bcrypt(b"secret", rounds=4)}
    with running_server("directory", config) as srv:
        got = retr_all(srv, "alice", "secret")
    msgs = {str(m["Subject"]): m for m in (check_downgraded(*one) for one in got)}
    assert set(msgs) == {SUBJECT, dense, txt_name}
    wrapped = msgs[txt_name]["From"].addresses[0]
    assert wrapped.addr_spec == sender
    # (Python's parser keeps the space between adjacent encoded-words of a display name)
    assert "".join(wrapped.display_name.split()) == "".join(NAME.split())


def test_poplib_with_utf8_gets_the_original(tmp_path: Path) -> None:
    """A client that enabled UTF8 receives the bytes as stored, and LIST says so."""
    d = tmp_path / "mail"
    d.mkdir()
    (d / "a.eml").write_bytes(MESSAGE)
    config = {"directory": str(d), "username": "alice",
              "password_hash": hash_bcrypt(b"secret", rounds=4)}
    with running_server("directory", config) as srv:
        pop = srv.pop3()
        pop.utf8()
        pop.user("alice")
        pop.pass_("secret")
        size = int(pop.list()[1][0].split()[1])
        _, lines, octets = pop.retr(1)
        pop.quit()
    assert size == octets == len(wire_bytes(MESSAGE))
    assert b"\r\n".join(lines) + b"\r\n" == wire_bytes(MESSAGE)

