"""The Maildir adapter (docs/adapters.md#bundled) on real Maildirs in temporary directories."""

from __future__ import annotations

import concurrent.futures
import email.message
import hashlib
import logging
import os
import poplib
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pop3sf.adapters.base import (
    AuthenticationFailed,
    AuthResult,
    ConfigurationError,
    Credentials,
    MessageGone,
    MessageInfo,
    Peer,
    PermanentFailure,
)
from pop3sf.adapters.maildir import MaildirAdapter, MaildirSession
from pop3sf.adapters.maildir_names import (
    basename_uidl,
    delivery_key,
    format_uidl,
    is_valid_uidl,
    parse_uidlist,
)
from pop3sf.auxiliary import BadMessage, BadName, UnknownUser, UserExists, open_source
from pop3sf.auxiliary.maildir import MaildirSource, unique_name

from pop3sf import passwords
from pop3sf.testing import AdapterConformance, running_server
from pop3sf.wire import wire_bytes

PEER = Peer("127.0.0.1", 40000)
MSG_A = b"From: a@example.org\nSubject: first\n\nhello\n"
MSG_B = b"From: b@example.org\nSubject: second\n\nworld\r\nline two\n"
MSG_C = b"From: c@example.org\nSubject: third\n\n.dot line\n"


def make_maildir(path: Path) -> Path:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def deliver(maildir: Path, name: str, data: bytes, sub: str = "new") -> Path:
    target = maildir / sub / name
    target.write_bytes(data)
    return target


class Env:
    """A vmail root, a passwd-file and helpers to log in."""

    def __init__(self, root: Path) -> None:
        self.root = root / "vmail"
        self.root.mkdir()
        self.passwd = root / "passwd"
        self.users: dict[str, str] = {}
        self.sessions: list[MaildirSession] = []

    def add_user(self, user: str, secret: str = "{PLAIN}pw", home: str = "",
                 extra: str = "") -> Path:
        local, _, domain = user.partition("@")
        self.users[user] = ":".join([user, secret, "5000", "5000", "", home, "", extra])
        self.passwd.write_text("\n".join(self.users.values()) + "\n")
        return self.root / domain / local / "Maildir"

    def adapter(self, **options: Any) -> MaildirAdapter:
        config = {"passwd_file": str(self.passwd), "root": str(self.root),
                  "mail_location": str(self.root) + "/%d/%n/Maildir"}
        config.update(options)
        adapter = MaildirAdapter(config)
        adapter.start()
        return adapter

    def login(self, adapter: MaildirAdapter, user: str, password: str = "pw",
              read_only: bool = False) -> tuple[MaildirSession, list[MessageInfo]]:
        """A logged-in session and its listing. A test's logins are one client after the
        other, as a real client's are: the previous session ends first (it holds the lock)."""
        self.close_sessions()
        session = adapter.new_session(PEER)
        self.sessions.append(session)
        result = session.authenticate(Credentials(user, password))
        session.login_succeeded(result, read_only)
        return session, list(session.list_messages())


    def close_sessions(self) -> None:
        while self.sessions:
            self.sessions.pop().connection_closed()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close_sessions()


def read(session: MaildirSession, uid: str) -> bytes:
    with session.open_message(uid) as stream:
        return stream.read()


# --- UIDLs ----------------------------------------------------------------------------------

def test_dovecot_uidlist_gives_dovecots_uidls(env: Env) -> None:
    md = make_maildir(env.add_user("alice@example.org"))
    deliver(md, "1700000000.M1P1.host,S=42,W=45:2,S", MSG_A, "cur")
    deliver(md, "1700000001.M2P1.host:2,", MSG_B, "cur")
    deliver(md, "1700000002.M3P1.host", MSG_C)
    deliver(md, "1699999999.M9P1.host", MSG_A)  # older, but not in the uidlist yet
    (md / "dovecot-uidlist").write_text(
        "3 V1795703107 N4 Gb7ff612a4341086b623c000083ecc375\n"
        "1 :1700000000.M1P1.host,S=42,W=45\n"
        "2 W57 :1700000001.M2P1.host\n"
        "3 P+OLD-SERVER-UIDL-17 :1700000002.M3P1.host\n"
        "5 :1600000000.gone.host\n")
    session, infos = env.login(env.adapter(), "alice@example.org")
    # uid 1, 2 by Dovecot's %08Xu%08Xv (lowercase hex, as Dovecot prints it), 3 its stored
    # POP3 UIDL, then the message Dovecot hasn't seen, by base name
    assert [i.uid for i in infos] == ["000000016b084143", "000000026b084143",
                                     "+OLD-SERVER-UIDL-17", "1699999999.M9P1.host"]
    assert read(session, "+OLD-SERVER-UIDL-17") == MSG_C
    assert infos[0].size == 45  # from ,W= in the name
    assert infos[1].size == len(wire_bytes(MSG_B))  # measured, not the uidlist's W
    assert infos[3].size == len(wire_bytes(MSG_A))


def test_pop3_order_extension_and_uid_order(env: Env) -> None:
    md = make_maildir(env.add_user("o@example.org"))
    for n in (1, 2, 3):
        deliver(md, f"170000000{n}.M{n}P1.h", MSG_A, "cur")
    (md / "dovecot-uidlist").write_text(
        "3 V7 N4\n1 :1700000001.M1P1.h\n2 O1 :1700000002.M2P1.h\n3 :1700000003.M3P1.h\n")
    _, infos = env.login(env.adapter(), "o@example.org")
    # O-numbered messages first (Dovecot's migration ordering), then by uid
    assert [i.uid for i in infos] == ["0000000200000007", "0000000100000007",
                                     "0000000300000007"]


def test_uidlist_v1_and_broken_uidlist(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    md = make_maildir(env.add_user("v1@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    (md / "dovecot-uidlist").write_text("1 1234 2\n1 1700000001.M1P1.h:2,S\n")
    adapter = env.adapter()
    _, infos = env.login(adapter, "v1@example.org")
    assert [i.uid for i in infos] == ["00000001000004d2"]
    (md / "dovecot-uidlist").write_text("garbage\n")
    with caplog.at_level(logging.WARNING, "pop3sf.adapters.maildir"):
        _, infos = env.login(adapter, "v1@example.org")
    assert [i.uid for i in infos] == ["1700000001.M1P1.h"]
    assert "unknown format" in caplog.text


def test_pop3_uidl_format_setting(env: Env) -> None:
    md = make_maildir(env.add_user("f@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    (md / "dovecot-uidlist").write_text("3 V255 N2 Gabc\n1 :1700000001.M1P1.h\n")
    _, infos = env.login(env.adapter(pop3_uidl_format="%v.%u-%f"), "f@example.org")
    assert [i.uid for i in infos] == ["255.1-1700000001.M1P1.h"]
    assert format_uidl("%08Xu%08Xv", 0x1F, 0xABCDEF12, "b", "") == "0000001fabcdef12"
    assert format_uidl("%g", 1, 1, "base", "") == "base"


def test_basename_uidls(env: Env) -> None:
    md = make_maildir(env.add_user("b@example.org"))
    long_base = "1700000000.M123456P7890V0000000000000801I00000000000A1B2C.mail.example.org,S=42"
    assert len(long_base) > 70
    deliver(md, long_base + ",W=45:2,S", MSG_A, "cur")
    deliver(md, "1700000001.short.host", MSG_B)
    deliver(md, "1700000002.ünïcode.host", MSG_C)
    (md / "dovecot-uidlist").write_text("3 V1 N2\n1 :1700000001.short.host\n")
    _, infos = env.login(env.adapter(uidl_format="basename"), "b@example.org")
    sha = hashlib.sha1((long_base + ",W=45").encode()).hexdigest()
    uids = [i.uid for i in infos]
    # the uidlist still orders (uid 1 first), but UIDLs are base names
    assert uids[0] == "1700000001.short.host"
    assert set(uids[1:]) == {sha, hashlib.sha1("1700000002.ünïcode.host".encode()).hexdigest()}
    assert uids[1] == sha  # older delivery time first
    assert basename_uidl("x" * 70) == "x" * 70
    assert basename_uidl("x" * 71) == hashlib.sha1(b"x" * 71).hexdigest()


def test_duplicate_stored_uidls_made_unique(env: Env) -> None:
    md = make_maildir(env.add_user("d@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    deliver(md, "1700000002.M2P1.h", MSG_B)
    (md / "dovecot-uidlist").write_text(
        "3 V1 N3\n1 Psame :1700000001.M1P1.h\n2 Psame :1700000002.M2P1.h\n")
    session, infos = env.login(env.adapter(), "d@example.org")
    assert [i.uid for i in infos] == ["same", "same-2"]
    assert read(session, "same-2") == MSG_B


def test_parse_uidlist_ignores_bad_lines() -> None:
    parsed = parse_uidlist(b"3 V9 N5 Gxyz\n1 :a\n0 :zero\nx :bad\n2 P1 W2\n1 :again\n"
                           b"3 :sub/dir\n4 P:colon :d:2,S\n")
    assert parsed is not None
    assert (parsed.uidvalidity, parsed.next_uid, parsed.guid) == (9, 5, "xyz")
    assert {k: v.uid for k, v in parsed.records.items()} == {"a": 1, "d": 4}
    assert parsed.records["d"].ext == {"P": ":colon"}
    assert parse_uidlist(b"2 whatever\n") is None


# --- sizes and order --------------------------------------------------------------------------

def test_w_sizes_trusted_and_others_measured_once(env: Env) -> None:
    md = make_maildir(env.add_user("s@example.org"))
    deliver(md, "1700000001.M1P1.h,S=10,W=999", MSG_A)  # W wins: the body isn't read
    deliver(md, "1700000002.M2P1.h", MSG_B)
    adapter = env.adapter(uidl_format="basename")
    _, infos = env.login(adapter, "s@example.org")
    assert [i.size for i in infos] == [999, len(wire_bytes(MSG_B))]
    assert (adapter.size_cache.hits, adapter.size_cache.misses) == (0, 1)
    # a flag change renames the file but keeps the measured size cached
    os.rename(md / "new" / "1700000002.M2P1.h", md / "cur" / "1700000002.M2P1.h:2,S")
    _, infos = env.login(adapter, "s@example.org")
    assert infos[1].size == len(wire_bytes(MSG_B))
    assert (adapter.size_cache.hits, adapter.size_cache.misses) == (1, 1)
    _, infos = env.login(env.adapter(uidl_format="basename", measure_all=True), "s@example.org")
    assert infos[0].size == len(wire_bytes(MSG_A))


def test_utf8_header_measured(env: Env) -> None:
    md = make_maildir(env.add_user("u@example.org"))
    deliver(md, "1700000001.M1P1.h", "Subject: Grüße\n\nbody\n".encode())
    _, infos = env.login(env.adapter(), "u@example.org")
    assert infos[0].utf8_header and infos[0].downgraded_size is not None


def test_order_by_delivery_time_then_mtime(env: Env) -> None:
    md = make_maildir(env.add_user("t@example.org"))
    deliver(md, "1700000005.M2P1.h", MSG_A)
    deliver(md, "1700000005.M10P1.h", MSG_A)  # same second: microseconds decide
    deliver(md, "1700000001.M99P1.h", MSG_A, "cur")
    odd = deliver(md, "no-timestamp-name", MSG_A)
    os.utime(odd, (1600000000, 1600000000))
    deliver(md, ".hidden", MSG_A)
    deliver(md, "1500000000.intmp", MSG_A, "tmp")
    _, infos = env.login(env.adapter(uidl_format="basename"), "t@example.org")
    assert [i.uid for i in infos] == ["no-timestamp-name", "1700000001.M99P1.h",
                                     "1700000005.M2P1.h", "1700000005.M10P1.h"]


def test_missing_maildir_is_empty(env: Env) -> None:
    env.add_user("new@example.org")
    session, infos = env.login(env.adapter(), "new@example.org")
    assert infos == []
    session.connection_closed()


# --- renames, removal, deletion ---------------------------------------------------------------

def test_open_follows_flag_changes_and_new_to_cur(env: Env) -> None:
    md = make_maildir(env.add_user("r@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    deliver(md, "1700000002.M2P1.h:2,", MSG_B, "cur")
    session, infos = env.login(env.adapter(uidl_format="basename"), "r@example.org")
    os.rename(md / "new/1700000001.M1P1.h", md / "cur/1700000001.M1P1.h:2,S")
    os.rename(md / "cur/1700000002.M2P1.h:2,", md / "cur/1700000002.M2P1.h:2,FRS")
    assert read(session, infos[0].uid) == MSG_A
    assert read(session, infos[1].uid) == MSG_B
    os.rename(md / "cur/1700000001.M1P1.h:2,S", md / "cur/1700000001.M1P1.h:2,RS")
    assert read(session, infos[0].uid) == MSG_A


def test_removed_by_someone_else_is_gone(env: Env) -> None:
    md = make_maildir(env.add_user("g@example.org"))
    path = deliver(md, "1700000001.M1P1.h", MSG_A)
    session, infos = env.login(env.adapter(), "g@example.org")
    path.unlink()
    with pytest.raises(MessageGone):
        session.open_message(infos[0].uid)
    with pytest.raises(MessageGone):
        session.open_message("never-listed")
    # deleting what is already gone is no failure: the wanted state holds
    assert session.delete_messages([infos[0].uid]).failed == {}


def test_delete_unlink_exactly_the_marked(env: Env) -> None:
    md = make_maildir(env.add_user("del@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    deliver(md, "1700000002.M2P1.h", MSG_B)
    deliver(md, "1700000003.M3P1.h:2,S", MSG_C, "cur")
    session, infos = env.login(env.adapter(uidl_format="basename"), "del@example.org")
    # one of them is renamed by an IMAP client meanwhile, and new mail arrives
    os.rename(md / "new/1700000002.M2P1.h", md / "cur/1700000002.M2P1.h:2,S")
    deliver(md, "1700000009.M9P1.h", MSG_A)
    result = session.delete_messages([infos[1].uid, infos[2].uid])
    assert result.failed == {}
    assert sorted(os.listdir(md / "new")) == ["1700000001.M1P1.h", "1700000009.M9P1.h"]
    assert os.listdir(md / "cur") == []
    session.connection_closed()


def test_delete_flag_mode(env: Env) -> None:
    md = make_maildir(env.add_user("fl@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    deliver(md, "1700000002.M2P1.h:2,RS", MSG_B, "cur")
    deliver(md, "1700000003.M3P1.h:2,T", MSG_C, "cur")  # trashed already: hidden
    adapter = env.adapter(deleted="flag", uidl_format="basename")
    session, infos = env.login(adapter, "fl@example.org")
    assert [i.uid for i in infos] == ["1700000001.M1P1.h", "1700000002.M2P1.h"]
    assert session.delete_messages([i.uid for i in infos]).failed == {}
    assert os.listdir(md / "new") == []
    assert sorted(os.listdir(md / "cur")) == ["1700000001.M1P1.h:2,T",
                                             "1700000002.M2P1.h:2,RST",
                                             "1700000003.M3P1.h:2,T"]
    _, infos = env.login(adapter, "fl@example.org")
    assert infos == []
    # unlink mode lists T-flagged messages (Dovecot's POP3 ignores \\Deleted)
    _, infos = env.login(env.adapter(uidl_format="basename"), "fl@example.org")
    assert len(infos) == 3


def test_flagged_by_someone_else_is_gone_in_flag_mode(env: Env) -> None:
    md = make_maildir(env.add_user("x@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    session, infos = env.login(env.adapter(deleted="flag"), "x@example.org")
    os.rename(md / "new/1700000001.M1P1.h", md / "cur/1700000001.M1P1.h:2,ST")
    with pytest.raises(MessageGone):
        session.open_message(infos[0].uid)


def test_read_only_session_deletes_nothing(env: Env) -> None:
    md = make_maildir(env.add_user("ro@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    session, infos = env.login(env.adapter(), "ro@example.org", read_only=True)
    assert set(session.delete_messages([infos[0].uid]).failed) == {infos[0].uid}
    assert os.listdir(md / "new") == ["1700000001.M1P1.h"]


# --- users, passwords, locations ---------------------------------------------------------------

def test_canonical_account_and_wrong_password(env: Env) -> None:
    env.add_user("alice@example.org")
    adapter = env.adapter()
    session = adapter.new_session(PEER)
    assert session.authenticate(Credentials("ALICE@Example.ORG", "pw")) == \
        AuthResult("alice@example.org")
    with pytest.raises(AuthenticationFailed):
        adapter.new_session(PEER).authenticate(Credentials("alice@example.org", "PW"))
    with pytest.raises(AuthenticationFailed):
        adapter.new_session(PEER).authenticate(Credentials("nobody@example.org", "pw"))


def test_unknown_scheme_denied_with_one_warning(env: Env,
                                                caplog: pytest.LogCaptureFixture) -> None:
    env.add_user("m1@example.org", "{MD4}0123456789abcdef")
    env.add_user("m2@example.org", "{MD4}fedcba9876543210")
    env.add_user("ok@example.org")
    adapter = env.adapter()
    with caplog.at_level(logging.WARNING, "pop3sf.adapters.maildir"):
        for user in ("m1@example.org", "m2@example.org", "m1@example.org"):
            with pytest.raises(AuthenticationFailed):
                adapter.new_session(PEER).authenticate(Credentials(user, "0123456789abcdef"))
    warnings = [r for r in caplog.records if "unknown scheme" in r.getMessage()]
    assert len(warnings) == 1 and "MD4" in warnings[0].getMessage()
    assert "0123456789abcdef" not in caplog.text
    env.login(adapter, "ok@example.org")  # others still log in


@pytest.mark.skipif(not passwords.crypt_available(), reason="no libcrypt")
def test_unknown_user_costs_like_a_wrong_password(env: Env) -> None:
    """Every attempt costs one check of the file's most common slow hash: unknown and invalid
    names, broken entries and cheap hashes (CPU time of this thread, which load barely moves)."""
    stored = passwords.crypt(b"pw", "$6$rounds=100000$saltsalt")
    for name in ("slow", "slow2"):
        env.add_user(f"{name}@example.org", "{SHA512-CRYPT}" + str(stored))
    env.add_user("fast@example.org", passwords.hash_bcrypt(b"pw", rounds=4))  # a minority
    env.add_user("plain@example.org", "{PLAIN}pw")
    env.add_user("ssha@example.org", passwords.hash_salted("SSHA256", b"pw", b"salt"))
    env.add_user("md4@example.org", "{MD4}0123456789abcdef")
    env.add_user("nopw@example.org", "")
    adapter = env.adapter()

    def attempt(user: str) -> float:
        start = time.thread_time()
        with pytest.raises(AuthenticationFailed):
            adapter.new_session(PEER).authenticate(Credentials(user, "wrong"))
        return time.thread_time() - start

    users = ["slow@example.org", "ghost@example.org", "../../etc", "plain@example.org",
             "ssha@example.org", "md4@example.org", "nopw@example.org", "fast@example.org"]
    samples: dict[str, list[float]] = {user: [] for user in users}
    for _ in range(5):  # interleaved, medians
        for user in users:
            samples[user].append(attempt(user))
    known, *others = (statistics.median(samples[user]) for user in users)
    assert known > 0.01
    assert all(0.6 < other / known < 1.6 for other in others), samples


def test_broken_entries_are_logged_with_their_account(env: Env,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    env.add_user("nopw@example.org", "")
    env.add_user("ok@example.org")
    adapter = env.adapter()
    with caplog.at_level(logging.WARNING, "pop3sf.adapters.maildir"):
        for user in ("nopw@example.org", "ghost@example.org"):
            with pytest.raises(AuthenticationFailed):
                adapter.new_session(PEER).authenticate(Credentials(user, "pw"))
    assert "'nopw@example.org' has an empty password" in caplog.text
    assert "ghost" not in caplog.text  # unknown names are no news for the admin


def test_passwd_file_change_needs_no_reload(env: Env) -> None:
    env.add_user("a@example.org")
    adapter = env.adapter()
    with pytest.raises(AuthenticationFailed):
        adapter.new_session(PEER).authenticate(Credentials("late@example.org", "pw"))
    time.sleep(0.01)
    env.add_user("late@example.org")
    assert adapter.new_session(PEER).authenticate(Credentials("late@example.org", "pw")) == \
        AuthResult("late@example.org")


def test_locations(env: Env) -> None:
    home = env.root / "homes" / "h1"
    make_maildir(home / "Maildir")
    deliver(home / "Maildir", "1700000001.M1P1.h", MSG_A)
    env.add_user("h1", home=str(home))
    other = make_maildir(env.root / "custom" / "box")
    deliver(other, "1700000002.M2P1.h", MSG_B)
    env.add_user("c1@example.org", extra=f"userdb_mail=maildir:{other}:LAYOUT=fs")
    adapter = env.adapter(mail_location="maildir:~/Maildir")
    _, infos = env.login(adapter, "h1")
    assert len(infos) == 1
    _, infos = env.login(adapter, "c1@example.org")
    assert [i.size for i in infos] == [len(wire_bytes(MSG_B))]
    lower = make_maildir(env.root / "example.org" / "mixed")
    deliver(lower, "1700000003.M3P1.h", MSG_C)
    env.add_user("Mixed@Example.org")
    _, infos = env.login(env.adapter(mail_location=str(env.root) + "/%Ld/%Ln"),
                         "Mixed@Example.org")
    assert len(infos) == 1


def test_control_dir_uidlist(env: Env) -> None:
    md = make_maildir(env.add_user("ctl@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    control = env.root.parent / "control" / "ctl@example.org"
    control.mkdir(parents=True)
    (control / "dovecot-uidlist").write_text("3 V16 N2\n1 :1700000001.M1P1.h\n")
    location = f"maildir:{env.root}/%d/%n/Maildir:CONTROL={env.root.parent}/control/%u"
    _, infos = env.login(env.adapter(mail_location=location), "ctl@example.org")
    assert [i.uid for i in infos] == ["0000000100000010"]


@pytest.mark.parametrize("options", [
    {"uidl_format": "imap"}, {"deleted": "shred"}, {"passwd_file": "relative/passwd"},
    {"mail_location": "mbox:~/mail"}, {"mail_location": "/var/vmail/%x/%n"},
    {"root": "relative"}, {"pop3_uidl_format": "%u %v"}, {"pop3_uidl_format": "%m"},
])
def test_bad_config(env: Env, options: dict[str, str]) -> None:
    env.add_user("a@example.org")
    with pytest.raises(ConfigurationError):
        env.adapter(**options)


def test_missing_passwd_file_at_start(tmp_path: Path) -> None:
    adapter = MaildirAdapter({"passwd_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigurationError, match="nope"):
        adapter.start()


# --- traversal ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "x@..", "x@../../etc", "..",
                                  "a@b@c", "", "a\0b", "x@.example.org", "%u", "a:b"])
def test_bad_user_names(env: Env, name: str) -> None:
    env.users[name] = f"{name}:{{PLAIN}}pw"  # even a passwd-file entry can't make them valid
    env.passwd.write_text("\n".join(env.users.values()) + "\n")
    with pytest.raises(AuthenticationFailed):
        env.adapter().new_session(PEER).authenticate(Credentials(name, "pw"))


def test_maildir_outside_root_refused(env: Env, tmp_path: Path) -> None:
    outside = make_maildir(tmp_path / "outside" / "Maildir")
    deliver(outside, "1700000001.M1P1.h", MSG_A)
    env.add_user("home@example.org", home=str(tmp_path / "outside"))
    adapter = env.adapter(mail_location="%h/Maildir")
    with pytest.raises(PermanentFailure):
        adapter.new_session(PEER).authenticate(Credentials("home@example.org", "pw"))
    # a symlink inside the root that leads out of it
    link_parent = env.root / "example.org" / "sym"
    link_parent.mkdir(parents=True)
    (link_parent / "Maildir").symlink_to(outside)
    env.add_user("sym@example.org")
    with pytest.raises(PermanentFailure):
        env.login(env.adapter(), "sym@example.org")
    # without a root, the admin's locations are trusted
    _, infos = env.login(env.adapter(root=""), "sym@example.org")
    assert len(infos) == 1


def test_symlinks_and_special_files_not_served(env: Env, tmp_path: Path) -> None:
    md = make_maildir(env.add_user("l@example.org"))
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"Subject: secret\n\nroot's data\n")
    (md / "new" / "1700000001.M1P1.h").symlink_to(secret)
    os.mkfifo(md / "new" / "1700000002.M2P1.h")
    (md / "new" / "1700000003.M3P1.h").mkdir()
    good = deliver(md, "1700000004.M4P1.h", MSG_A)
    session, infos = env.login(env.adapter(), "l@example.org")
    assert [i.uid for i in infos] == ["1700000004.M4P1.h"]
    # swapped for a symlink between LIST and RETR
    good.unlink()
    good.symlink_to(secret)
    with pytest.raises(MessageGone):
        session.open_message(infos[0].uid)
    # and for a FIFO: no hang
    good.unlink()
    os.mkfifo(good)
    with pytest.raises(MessageGone):
        session.open_message(infos[0].uid)


def test_symlinked_subdirectory_ignored(env: Env, tmp_path: Path) -> None:
    md = env.add_user("sd@example.org")
    md.mkdir(parents=True)
    elsewhere = make_maildir(tmp_path / "elsewhere")
    deliver(elsewhere, "1700000001.M1P1.h", MSG_A)
    (md / "new").symlink_to(elsewhere / "new")
    (md / "cur").mkdir()
    _, infos = env.login(env.adapter(root=""), "sd@example.org")
    assert infos == []


# --- Dovecot itself -----------------------------------------------------------------------------

DOVECOT_POP3 = "/usr/lib/dovecot/pop3"


@pytest.fixture
def dovecot_maildir() -> Iterator[Path]:
    """A Maildir Dovecot can use: readable by 'nobody' when the tests run as root."""
    top = Path(tempfile.mkdtemp(prefix="pop3sf-dovecot-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def dovecot_pop3(top: Path, commands: str) -> str:
    uid = os.getuid()
    user = "nobody" if uid == 0 else os.environ.get("USER", "pop3sf")
    mail_uid = 65534 if uid == 0 else uid
    if uid == 0:
        subprocess.run(["chown", "-R", f"{mail_uid}:{mail_uid}", str(top / "Maildir")],
                       check=True)
    conf = top / "dovecot.conf"
    conf.write_text(f"mail_location = maildir:{top}/Maildir\nlog_path = /dev/stderr\n"
                    f"ssl = no\nbase_dir = {top}/run\nstate_dir = {top}/state\n"
                    f"mail_uid = {mail_uid}\nmail_gid = {mail_uid}\nfirst_valid_uid = 1\n"
                    "first_valid_gid = 1\n")
    env = {"USER": user, "HOME": str(top), "PATH": os.environ.get("PATH", "/usr/bin")}
    out = subprocess.run([DOVECOT_POP3, "-c", str(conf)], input=commands.encode(),
                         capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode()


def blocks(text: str) -> list[list[list[str]]]:
    """The multi-line responses of a POP3 transcript (preauth mode has no greeting)."""
    found: list[list[list[str]]] = []
    block: list[list[str]] | None = None
    for line in text.split("\r\n"):
        if block is None:
            if line.startswith("+OK"):
                block = []
        elif line == ".":
            found.append(block)
            block = None
        else:
            block.append(line.split())
    return found


@pytest.mark.skipif(not os.access(DOVECOT_POP3, os.X_OK),
                    reason="Dovecot's POP3 server (dovecot-pop3d) not installed")
def test_same_uidls_sizes_and_order_as_dovecot(dovecot_maildir: Path, tmp_path: Path) -> None:
    """Dovecot's own POP3 server reads a Maildir first; then pop3sf must list it identically."""
    md = make_maildir(dovecot_maildir / "Maildir")
    deliver(md, "1700000300.M3P9.host", MSG_C)
    deliver(md, f"1700000100.M1P9.host,S={len(MSG_A)},W={len(wire_bytes(MSG_A))}", MSG_A)
    deliver(md, "1700000200.M2P9.host:2,S", MSG_B, "cur")
    deliver(md, "1700000200.M10P9.host", b"Subject: no final newline\n\nlast line")
    first = dovecot_pop3(dovecot_maildir, "UIDL\r\nLIST\r\nQUIT\r\n")
    assert (md / "dovecot-uidlist").exists()
    deliver(md, "1700000400.M4P9.host", MSG_A)  # new mail Dovecot hasn't seen
    second = dovecot_pop3(dovecot_maildir, "UIDL\r\nLIST\r\nQUIT\r\n")
    (uidl1, _), (uidl2, list2) = blocks(first), blocks(second)
    dovecot_uidls = [u for _, u in uidl2]
    assert len(dovecot_uidls) == 5
    assert [u for _, u in uidl1] == dovecot_uidls[:4]  # stable across Dovecot sessions
    dovecot_sizes = [int(s) for _, s in list2]

    passwd = tmp_path / "passwd"
    passwd.write_text("someone:{PLAIN}pw\n")
    adapter = MaildirAdapter({"passwd_file": str(passwd), "mail_location": str(md)})
    adapter.start()
    session = adapter.new_session(PEER)
    session.login_succeeded(session.authenticate(Credentials("someone", "pw")), False)
    infos = session.list_messages()
    assert [i.uid for i in infos] == dovecot_uidls
    # Dovecot doesn't count the CRLF it sends after a last line without a newline; pop3sf
    # counts it (docs/protocol.md §9), and so lists 2 more for that message
    ours = [i.size for i in infos]
    assert ours[:2] + ours[3:] == dovecot_sizes[:2] + dovecot_sizes[3:]
    assert ours[2] == dovecot_sizes[2] + 2
    for info in infos:
        with session.open_message(info.uid) as stream:
            assert len(wire_bytes(stream.read())) == info.size


# --- the auxiliary source (pop3sf-admin's backend) ----------------------------------------------

def source_for(env: Env, **options: Any) -> MaildirSource:
    config = {"passwd_file": str(env.passwd), "root": str(env.root), "bcrypt_rounds": 4,
              "mail_location": str(env.root) + "/%d/%n/Maildir"}
    config.update(options)
    return MaildirSource(config)


def test_source_users(env: Env) -> None:
    env.passwd.write_text("# managed by hand and by pop3sf-admin\n"
                          "old@example.org:{PLAIN}x:5000:5000::/home/old::userdb_quota=1G\n")
    env.passwd.chmod(0o640)
    src = open_source("maildir", {"passwd_file": str(env.passwd), "root": str(env.root),
                                  "mail_location": str(env.root) + "/%d/%n/Maildir",
                                  "bcrypt_rounds": 4})
    assert isinstance(src, MaildirSource)
    src.add_user("alice@example.org", "Grüße 1")
    with pytest.raises(UserExists):
        src.add_user("ALICE@example.org", "x")
    with pytest.raises(BadName):
        src.add_user("../evil", "x")
    assert src.list_users() == ["alice@example.org", "old@example.org"]
    text = env.passwd.read_text()
    assert text.startswith("# managed by hand")
    line = text.splitlines()[-1]
    assert line.startswith("alice@example.org:{BLF-CRYPT}$2b$04$")
    assert stat.S_IMODE(env.passwd.stat().st_mode) == 0o640
    adapter = MaildirAdapter({"passwd_file": str(env.passwd), "root": str(env.root),
                              "mail_location": str(env.root) + "/%d/%n/Maildir"})
    assert adapter.new_session(PEER).authenticate(Credentials("alice@example.org", "Grüße 1"))
    if shutil.which("doveadm"):  # Dovecot accepts the hashes pop3sf-admin writes
        subprocess.run(["doveadm", "pw", "-t", line.split(":")[1], "-p", "Grüße 1"], check=True,
                       capture_output=True)

    src.set_password("old@example.org", "new secret")
    old = [ln for ln in env.passwd.read_text().splitlines() if ln.startswith("old@")]
    assert len(old) == 1 and old[0].endswith(":5000:5000::/home/old::userdb_quota=1G")
    with pytest.raises(AuthenticationFailed):
        adapter.new_session(PEER).authenticate(Credentials("old@example.org", "x"))
    assert adapter.new_session(PEER).authenticate(Credentials("old@example.org", "new secret"))
    with pytest.raises(UnknownUser):
        src.set_password("ghost@example.org", "x")


def test_source_delete_user_removes_lines_and_mail(env: Env) -> None:
    md = make_maildir(env.add_user("gone@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_A)
    env.passwd.write_text(env.passwd.read_text() + "gone@example.org:{PLAIN}repeat\n"
                          "keep@example.org:{PLAIN}k\n")
    src = source_for(env)
    src.delete_user("gone@example.org")
    assert env.passwd.read_text() == "keep@example.org:{PLAIN}k\n"  # the repeat went too
    assert not md.exists() and md.parent.exists()
    with pytest.raises(UnknownUser):
        src.delete_user("gone@example.org")


def test_source_concurrent_edits_lose_nothing(env: Env) -> None:
    env.passwd.write_text("")
    src = source_for(env)
    names = [f"u{i}@example.org" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda n: src.add_user(n, "pw"), names))
    assert src.list_users() == sorted(names)


def test_source_add_and_list_messages(env: Env) -> None:
    env.add_user("m@example.org")
    src = source_for(env)
    msg = email.message.EmailMessage()
    msg["Subject"] = "from the library"
    msg.set_content("body\n")
    ids = [src.add_message("m@example.org", MSG_B),
           src.add_message("m@example.org", "Grüße aus der Textdatei\nzweite Zeile\n"),
           src.add_message("m@example.org", msg)]
    md = env.root / "example.org" / "m" / "Maildir"
    assert stat.S_IMODE(md.stat().st_mode) == 0o700
    names = sorted(os.listdir(md / "new"))
    assert len(names) == 3 and os.listdir(md / "tmp") == []
    for name in names:
        data = (md / "new" / name).read_bytes()
        assert b"\r\n" not in data  # stored with Unix line ends
        assert f",S={len(data)},W={len(wire_bytes(data))}" in name
        assert stat.S_IMODE((md / "new" / name).stat().st_mode) == 0o600
    summaries = src.list_messages("m@example.org")
    assert [s.id for s in summaries] == ids
    assert [s.subject for s in summaries] == ["second", "Grüße aus der Textdatei",
                                              "from the library"]
    session, infos = env.login(env.adapter(), "m@example.org")
    assert [i.uid for i in infos] == ids
    assert [i.size for i in infos] == [s.size for s in summaries]
    text = read(session, ids[1])
    assert "Grüße aus der Textdatei\nzweite Zeile\n".encode() in text
    assert b"Content-Type: text/plain; charset=utf-8" in text
    with pytest.raises(UnknownUser):
        src.add_message("ghost@example.org", MSG_A)
    with pytest.raises(BadMessage):
        src.add_message("m@example.org", "  \n")


def test_unique_names() -> None:
    names = {unique_name(1, 2) for _ in range(2000)}
    assert len(names) == 2000
    assert all(is_valid_uidl(n) or len(n) > 70 for n in names)


# --- end to end over POP3 -----------------------------------------------------------------------

class TestMaildirConformance(AdapterConformance):
    adapter_type = "maildir"

    @pytest.fixture(autouse=True)
    def _long_lines(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # The suite's third sample has a 300 kB line; poplib refuses lines over 2048 octets.
        monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        (tmp_path / "vmail").mkdir(exist_ok=True)
        config = {"passwd_file": str(tmp_path / "passwd"), "root": str(tmp_path / "vmail"),
                  "mail_location": str(tmp_path / "vmail") + "/%u/Maildir", "bcrypt_rounds": 4}
        src = MaildirSource(config)
        src.add_user(user, password)
        for message in messages:
            src.add_message(user, message)
        return config


def _pop(srv: Any, user: str, password: str = "pw") -> poplib.POP3:
    pop = srv.pop3()
    pop.user(user)
    pop.pass_(password)
    return pop


def test_e2e_dovecot_uidls_gone_files_and_deletion(env: Env) -> None:
    md = make_maildir(env.add_user("e2e@example.org"))
    deliver(md, "1700000001.M1P1.h,S=40,W=43:2,S", MSG_A, "cur")
    deliver(md, "1700000002.M2P1.h", MSG_B)
    deliver(md, "1700000003.M3P1.h", MSG_C)
    (md / "dovecot-uidlist").write_text("3 V1000 N3\n1 :1700000001.M1P1.h,S=40,W=43\n"
                                        "2 :1700000002.M2P1.h\n")
    config = {"passwd_file": str(env.passwd), "root": str(env.root),
              "mail_location": str(env.root) + "/%d/%n/Maildir"}
    with running_server("maildir", config) as srv:
        pop = _pop(srv, "e2e@example.org")
        uidls = [line.split()[1] for line in pop.uidl()[1]]
        assert uidls == [b"00000001000003e8", b"00000002000003e8", b"1700000003.M3P1.h"]
        # another client marks one read (new -> cur) and removes another
        os.rename(md / "new/1700000002.M2P1.h", md / "cur/1700000002.M2P1.h:2,S")
        (md / "new/1700000003.M3P1.h").unlink()
        _, lines, _ = pop.retr(2)
        assert b"".join(line + b"\r\n" for line in lines) == wire_bytes(MSG_B)
        with pytest.raises(poplib.error_proto, match="no longer exists"):
            pop.retr(3)
        pop.dele(1)
        pop.close()  # dropped: nothing deleted
        assert (md / "cur/1700000001.M1P1.h,S=40,W=43:2,S").exists()

        pop = _pop(srv, "e2e@example.org")
        deliver(md, "1700000009.M9P1.h", MSG_C)  # arrives during the session
        count, _ = pop.stat()
        for n in range(1, count + 1):
            pop.dele(n)
        pop.quit()
        assert os.listdir(md / "cur") == []
        assert os.listdir(md / "new") == ["1700000009.M9P1.h"]


def test_e2e_flag_mode_and_unknown_scheme(env: Env) -> None:
    md = make_maildir(env.add_user("fl@example.org"))
    env.add_user("md4@example.org", "{MD4}abcdef")
    deliver(md, "1700000001.M1P1.h", MSG_A)
    config = {"passwd_file": str(env.passwd), "root": str(env.root), "deleted": "flag",
              "mail_location": str(env.root) + "/%d/%n/Maildir"}
    with running_server("maildir", config) as srv:
        pop = _pop(srv, "fl@example.org")
        pop.dele(1)
        pop.quit()
        assert os.listdir(md / "cur") == ["1700000001.M1P1.h:2,T"]
        pop = _pop(srv, "fl@example.org")
        assert pop.stat() == (0, 0)
        pop.quit()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            _pop(srv, "md4@example.org", "abcdef")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_e2e_curl_reads_a_maildir(env: Env) -> None:
    md = make_maildir(env.add_user("curl@example.org"))
    deliver(md, "1700000001.M1P1.h", MSG_C)
    config = {"passwd_file": str(env.passwd), "root": str(env.root),
              "mail_location": str(env.root) + "/%d/%n/Maildir"}
    with running_server("maildir", config) as srv:
        out = subprocess.run(["curl", "-sS", "--max-time", "20", "-u", "curl@example.org:pw",
                              f"pop3://127.0.0.1:{srv.port}/1"], capture_output=True,
                             timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.replace(b"\r\n", b"\n") == MSG_C


def test_many_renames_between_list_and_retr(env: Env) -> None:
    md = make_maildir(env.add_user("many@example.org"))
    for n in range(40):
        deliver(md, f"17000000{n:02d}.M{n}P1.h", MSG_A + b"%d\n" % n)
    session, infos = env.login(env.adapter(), "many@example.org")
    for name in os.listdir(md / "new"):  # an IMAP client marks everything read
        os.rename(md / "new" / name, md / "cur" / f"{name}:2,S")
    assert [read(session, i.uid) for i in infos] == [MSG_A + b"%d\n" % n for n in range(40)]
    assert session.delete_messages([i.uid for i in infos[::2]]).failed == {}
    assert len(os.listdir(md / "cur")) == 20


def test_admin_command_with_a_maildir_source(env: Env, tmp_path: Path) -> None:
    conf = tmp_path / "pop3sf.conf"
    conf.write_text(f"[listeners]\n[[pop3]]\naddresses = 127.0.0.1:0\n[adapter]\ntype = maildir\n"
                    f"passwd_file = {env.passwd}\nroot = {env.root}\n"
                    f"mail_location = {env.root}/%d/%n/Maildir\nbcrypt_rounds = 4\n")
    admin = [sys.executable, "-m", "pop3sf.auxiliary.admin", "--config", str(conf)]

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(admin + list(args), input=stdin, capture_output=True, text=True,
                              timeout=60)

    assert run("user", "add", "cli@example.org", stdin="pw\n").returncode == 0
    assert run("user", "add", "cli@example.org", stdin="pw\n").returncode == 73
    assert run("user", "add", "bad/name", stdin="pw\n").returncode == 65
    assert run("user", "list").stdout == "cli@example.org\n"
    added = run("message", "add", "cli@example.org", stdin="Hallo Welt\n")
    assert added.returncode == 0
    listed = run("message", "list", "cli@example.org").stdout.split("\t")
    assert listed[0] == added.stdout.strip() and listed[3] == "Hallo Welt\n"
    _, infos = env.login(env.adapter(), "cli@example.org")
    assert [i.uid for i in infos] == [added.stdout.strip()]
    assert run("message", "list", "ghost@example.org").returncode == 67
    assert run("user", "del", "cli@example.org").returncode == 65  # still has mail
    assert run("user", "del", "--force", "cli@example.org").returncode == 0
    assert run("user", "list").stdout == ""


@pytest.mark.skipif(not os.access(DOVECOT_POP3, os.X_OK),
                    reason="Dovecot's POP3 server (dovecot-pop3d) not installed")
def test_dovecot_reads_what_pop3sf_admin_delivers(dovecot_maildir: Path) -> None:
    """Dovecot trusts ,W= for its sizes: the W that MaildirSource writes must be exact."""
    md = dovecot_maildir / "Maildir"
    passwd = dovecot_maildir / "passwd"
    src = MaildirSource({"passwd_file": str(passwd), "mail_location": str(md),
                         "bcrypt_rounds": 4})
    src.add_user("someone", "pw")
    messages = [MSG_A, MSG_B, "Grüße\nzweite Zeile\n"]
    for message in messages:
        src.add_message("someone", message)
    names = sorted(os.listdir(md / "new"), key=delivery_key)
    wire = [len(wire_bytes((md / "new" / name).read_bytes())) for name in names]
    uidl, listing = blocks(dovecot_pop3(dovecot_maildir, "UIDL\r\nLIST\r\nQUIT\r\n"))
    assert [int(size) for _, size in listing] == wire
    assert len(uidl) == 3


def test_retr_reads_the_next_small_messages_ahead_and_top_repeats_from_memory(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RETR reads the small messages after it in the same worker call; fetching them then
    and repeating a TOP read nothing more, and every answer is the message's own."""
    md = make_maildir(env.add_user("ahead@example.org"))
    bodies = [MSG_A, MSG_B, MSG_C, MSG_A]
    for i, body in enumerate(bodies):
        deliver(md, f"17000000{i:02d}.M{i}P1.h", body)
    opened: list[str] = []
    read = MaildirSession.open_message

    def open_message(session: MaildirSession, uid: str) -> Any:
        opened.append(uid)
        return read(session, uid)

    monkeypatch.setattr(MaildirSession, "open_message", open_message)
    with running_server(adapter=env.adapter()) as srv:
        pop = _pop(srv, "ahead@example.org")
        for n, body in enumerate(bodies, 1):
            _, lines, _ = pop.retr(n)
            assert b"".join(line + b"\r\n" for line in lines) == wire_bytes(body)
        assert len(opened) == 4                      # one worker call read all four
        top = [pop.top(1, 0)[1] for _ in range(3)]
        assert top[0] == top[1] == top[2] and len(opened) == 5
        pop.retr(4)                   # a message read ahead is used once; nothing after the last
        assert len(opened) == 6
        pop.quit()


def test_the_lock_file_counts_against_the_connection_cap_only_when_taken(env: Env) -> None:
    """The cap derived from the fd limit counts a session's lock file; without the
    cross-process lock a session holds only its socket, and the cap doubles."""
    env.add_user("cap@example.org")
    assert env.adapter().fds_per_session == 1
    adapter = env.adapter(cross_instance_lock=False)
    assert adapter.fds_per_session == 0
    adapter.reload({"passwd_file": str(env.passwd), "cross_instance_lock": True})
    assert adapter.fds_per_session == 1
