"""Directory adapters on real files (docs/adapters.md#bundled): formats, order, uids, safety."""

from __future__ import annotations

import email
import email.policy
import fcntl
import hashlib
import os
import poplib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from fetchmail import Fetchmail
from pop3sf.adapters.base import (
    AuthenticationFailed,
    AuthResult,
    ConfigurationError,
    Credentials,
    MessageGone,
    Peer,
)
from pop3sf.adapters.directory import (
    LOCK_FILE,
    PASSWORD_FILE,
    DirectoryAdapter,
    DirectorySession,
    MultiUserDirectoryAdapter,
)
from pop3sf.adapters.sizecache import JOURNAL, FileChanged, SizeCache, key_for

from pop3sf.passwords import hash_bcrypt
from pop3sf.testing import AdapterConformance, RunningServer, login_when_free, running_server
from pop3sf.wire import Measure, WireEncoder, wire_bytes

PEER = Peer("127.0.0.1", 40000)
T0 = 1_700_000_000_000_000_000  # ns


def put(directory: Path, name: str, data: bytes, mtime_ns: int | None = None) -> Path:
    path = directory / name
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def original_uid(path: Path) -> str:
    """The original pop3sf's DirectoryAdapterBase.get_message_unique_id, written out again."""
    hashed_string = f"{os.path.abspath(path)}{os.stat(path).st_mtime}".encode()
    return hashlib.sha256(hashed_string).hexdigest()


def make_user(root: Path, name: str, password: str = "secret") -> Path:
    d = root / name
    d.mkdir()
    (d / PASSWORD_FILE).write_text(hash_bcrypt(password.encode(), rounds=4))
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "mail"
    r.mkdir()
    return r


@pytest.fixture
def adapter(root: Path) -> Iterator[MultiUserDirectoryAdapter]:
    a = MultiUserDirectoryAdapter({"root": str(root), "bcrypt_rounds": 4})
    a.start()
    yield a
    a.close()


_OPEN: list[DirectorySession] = []


@pytest.fixture(autouse=True)
def _close_sessions() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().connection_closed()


def login(adapter: MultiUserDirectoryAdapter | DirectoryAdapter, user: str = "alice",
          password: str = "secret", read_only: bool = False) -> DirectorySession:
    """A logged-in session. A test's logins are one client after the other, as a real
    client's are: the previous session ends first (it would hold the maildrop's lock)."""
    while _OPEN:
        _OPEN.pop().connection_closed()
    s = adapter.new_session(PEER)
    _OPEN.append(s)
    account = s.authenticate(Credentials(user, password))
    s.login_succeeded(account, read_only)
    return s


def read(session: DirectorySession, uid: str) -> bytes:
    with session.open_message(uid) as f:
        return f.read()


# --- formats, order, sizes ------------------------------------------------------------------


def test_both_formats_others_ignored(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    eml = b"From: a@example.com\nSubject: hi\n\nbody\n.leading dot\n"
    put(d, "1.eml", eml, T0)
    put(d, "2.txt", "Ahoj světe\n".encode(), T0 + 1)
    put(d, "3.bin", b"ignored", T0)
    put(d, "4.EML.bak", b"ignored", T0)
    put(d, ".hidden.eml", b"Subject: temp\n\nx\n", T0)  # a writer's temporary file
    put(d, "empty.eml", b"", T0)  # incomplete
    (d / "dir.eml").mkdir()
    os.mkfifo(d / "fifo.eml")
    s = login(adapter)
    listing = s.list_messages()
    assert [m.uid for m in listing] == [original_uid(d / "1.eml"), original_uid(d / "2.txt")]
    assert read(s, listing[0].uid) == eml  # served as is
    wrapped = read(s, listing[1].uid)
    msg = email.message_from_bytes(wrapped, policy=email.policy.default)
    assert msg.get_content().replace("\r\n", "\n") == "Ahoj světe\n"
    for m in listing:
        assert m.size == len(wire_bytes(read(s, m.uid)))
    s.connection_closed()


def test_txt_wrapping_uses_mtime_name_and_addresses(root: Path) -> None:
    d = make_user(root, "bob")
    when = 1_709_296_245_500_000_000
    put(d, "Zpráva o stavu.txt", "Všechno běží.\r\nŽádné chyby.".encode(), when)
    a = MultiUserDirectoryAdapter({"root": str(root), "from_address": "Monitor <mon@example.org>",
                                   "to_address": "%u@example.org"})
    s = login(a, "bob")
    (info,) = s.list_messages()
    raw = read(s, info.uid)
    assert info.size == len(raw) == len(wire_bytes(raw))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Date"] == "Fri, 01 Mar 2024 12:30:45 +0000"
    assert str(msg["Subject"]) == "Zpráva o stavu.txt"
    assert str(msg["From"]) == "Monitor <mon@example.org>"
    assert str(msg["To"]) == "bob@example.org"
    assert msg.get_content().replace("\r\n", "\n") == "Všechno běží.\nŽádné chyby.\n"
    assert read(s, info.uid) == raw  # deterministic


def test_order_by_mtime_then_name(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    put(d, "c.eml", b"Subject: c\n\nc\n", T0)
    put(d, "b.eml", b"Subject: b\n\nb\n", T0 + 5)
    put(d, "a.eml", b"Subject: a\n\na\n", T0 + 5)
    put(d, "z.txt", b"z\n", T0 - 1)
    s = login(adapter)
    uids = [m.uid for m in s.list_messages()]
    assert uids == [original_uid(d / n) for n in ("z.txt", "c.eml", "a.eml", "b.eml")]


def test_exact_sizes_with_crlf_and_utf8_header(root: Path,
                                               adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    cases = {
        "lf.eml": b"Subject: x\n\nline\nno final newline",
        "crlf.eml": b"Subject: x\r\n\r\nline\r\n",
        "mixed.eml": b"Subject: x\r\n\nbare\rcr\n",
        "utf8.eml": "Subject: Grüße\nFrom: Jörg <j@example.com>\n\nbody\n".encode(),
    }
    for i, (name, data) in enumerate(cases.items()):
        put(d, name, data, T0 + i)
    s = login(adapter)
    listing = s.list_messages()
    assert len(listing) == 4
    for m, data in zip(listing, cases.values(), strict=True):
        assert m.size == len(wire_bytes(data))
        assert m.size == len(wire_bytes(read(s, m.uid)))
    utf8 = listing[3]
    assert utf8.utf8_header and not listing[0].utf8_header
    enc = WireEncoder(stuff=False, downgrade=True)
    down = enc.feed(cases["utf8.eml"]) + enc.finish()
    assert utf8.downgraded_size == len(down)


def test_large_message_streams(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    line = b"x" * 99 + b"\n"
    with open(d / "big.eml", "wb") as f:
        f.write(b"Subject: big\n\n")
        for _ in range(100):
            f.write(line * 1000)  # 10 MB
    s = login(adapter)
    (info,) = s.list_messages()
    assert info.size == os.path.getsize(d / "big.eml") + 100 * 1000 + 2
    with s.open_message(info.uid) as f:
        assert len(f.read(65536)) == 65536  # a stream, read in pieces


# --- unique ids -----------------------------------------------------------------------------


def test_uids_stable_and_original(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    put(d, "m.eml", b"Subject: x\n\ny\n", 1_700_000_000_123_456_789)
    put(d, "n.txt", b"text\n")
    first = [m.uid for m in login(adapter).list_messages()]
    second = [m.uid for m in login(adapter).list_messages()]
    assert first == second == [original_uid(d / "m.eml"), original_uid(d / "n.txt")]
    os.utime(d / "m.eml", ns=(T0, T0))  # the original's ids change with the mtime
    assert login(adapter).list_messages()[0].uid == original_uid(d / "m.eml") != first[0]


def test_uid_root_keeps_ids_after_a_move(tmp_path: Path, root: Path) -> None:
    d = make_user(root, "alice")
    put(d, "m.eml", b"Subject: x\n\ny\n", T0)
    before = login(MultiUserDirectoryAdapter({"root": str(root)})).list_messages()[0].uid
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    plain = MultiUserDirectoryAdapter({"root": str(moved)})
    assert login(plain).list_messages()[0].uid != before
    kept = MultiUserDirectoryAdapter({"root": str(moved), "uid_root": str(root)})
    assert login(kept).list_messages()[0].uid == before


def test_non_utf8_file_name(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    raw_name = os.fsencode(d) + b"/caf\xe9.eml"
    with open(raw_name, "wb") as f:
        f.write(b"Subject: x\n\ny\n")
    s = login(adapter)
    (info,) = s.list_messages()
    mtime = os.stat(raw_name).st_mtime
    assert info.uid == hashlib.sha256(raw_name + str(mtime).encode()).hexdigest()
    assert read(s, info.uid) == b"Subject: x\n\ny\n"


# --- authentication -------------------------------------------------------------------------


def test_multi_user_authentication(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    make_user(root, "alice")
    make_user(root, "Bob_2-x", "pässword")
    s = adapter.new_session(PEER)
    assert s.authenticate(Credentials("alice", "secret")) == AuthResult("alice")
    assert s.authenticate(Credentials("Bob_2-x", "pässword")) == AuthResult("Bob_2-x")
    for user, password in [("alice", "wrong"), ("nobody", "secret"), ("ALICE", "secret"),
                           ("", "secret"), ("../alice", "secret"), ("alice/", "secret"),
                           ("alice\n", "secret"), ("a" * 65, "secret"), (".", "secret")]:
        with pytest.raises(AuthenticationFailed):
            s.authenticate(Credentials(user, password))


def test_unknown_user_costs_like_wrong_password(root: Path) -> None:
    """Unknown and invalid names, broken accounts and a cheap {PLAIN} hash all cost one check
    at ``bcrypt_rounds`` (CPU time of this thread: other load on the machine barely moves it)."""
    make_user(root, "alice", "x")
    (root / "alice" / PASSWORD_FILE).write_text(hash_bcrypt(b"x", rounds=9))
    make_user(root, "plain")
    (root / "plain" / PASSWORD_FILE).write_text("{PLAIN}x")
    (root / "nopw").mkdir()
    make_user(root, "garbled")
    (root / "garbled" / PASSWORD_FILE).write_bytes(b"\xff\x00garbage\n")
    a = MultiUserDirectoryAdapter({"root": str(root), "bcrypt_rounds": 9})
    s = a.new_session(PEER)

    def cost(user: str) -> float:
        times = []
        for _ in range(3):
            start = time.thread_time()
            with pytest.raises(AuthenticationFailed):
                s.authenticate(Credentials(user, "wrong"))
            times.append(time.thread_time() - start)
        return sorted(times)[1]

    cost("warm-up")  # the dummy hash is made once
    known = cost("alice")
    assert known > 0.005
    others = {user: cost(user) for user in ("bob", "../x", "plain", "nopw", "garbled")}
    assert all(0.6 < c / known < 1.6 for c in others.values()), (known, others)


def test_broken_accounts_fail_like_unknown_ones_and_say_why(
        tmp_path: Path, root: Path, adapter: MultiUserDirectoryAdapter,
        caplog: pytest.LogCaptureFixture) -> None:
    """An account that can't log in answers as a wrong password would (a probe can't tell it
    exists) and the log names it with the cause; a plain unknown name logs nothing."""
    (root / "nopw").mkdir()
    outside = make_user(tmp_path, "outside")
    (root / "linked").symlink_to(outside)
    (root / "pwlink").mkdir()
    (root / "pwlink" / PASSWORD_FILE).symlink_to(outside / PASSWORD_FILE)
    make_user(root, "empty")
    (root / "empty" / PASSWORD_FILE).write_text("\n")
    (root / "pwdir").mkdir()
    (root / "pwdir" / PASSWORD_FILE).mkdir()
    make_user(root, "garbled")
    (root / "garbled" / PASSWORD_FILE).write_bytes(b"\xff\x00secretish\n")
    causes = {"nopw": "no .pop3sf_password_bcrypt", "linked": "symlink",
              "pwlink": "is a symlink", "empty": "is empty", "pwdir": "not a regular file",
              "garbled": "unknown scheme"}
    s = adapter.new_session(PEER)
    with caplog.at_level("WARNING"):
        for user in [*causes, "ghost"]:
            with pytest.raises(AuthenticationFailed):
                s.authenticate(Credentials(user, "secret"))
    for user, cause in causes.items():
        assert any(f"'{user}'" in r.getMessage() and cause in r.getMessage()
                   for r in caplog.records), (user, caplog.text)
    assert "ghost" not in caplog.text and "secretish" not in caplog.text


def test_single_user_adapter(tmp_path: Path) -> None:
    d = tmp_path / "inbox"
    d.mkdir()
    put(d, "a.eml", b"Subject: a\n\na\n", T0)
    a = DirectoryAdapter({"directory": str(d), "username": "reports",
                          "password_hash": hash_bcrypt(b"pw", rounds=4)})
    a.start()
    s = a.new_session(PEER)
    for user, password in [("reports", "nope"), ("other", "pw"), ("Reports", "pw")]:
        with pytest.raises(AuthenticationFailed):
            s.authenticate(Credentials(user, password))
    login = s.authenticate(Credentials("reports", "pw"))
    assert login == AuthResult("reports")
    s.login_succeeded(login, False)  # the very result, as the server hands it back
    (info,) = s.list_messages()
    assert info.uid == original_uid(d / "a.eml")
    assert read(s, info.uid) == b"Subject: a\n\na\n"


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="root"):
        MultiUserDirectoryAdapter({})
    with pytest.raises(ConfigurationError, match="size_cache_entries"):
        MultiUserDirectoryAdapter({"root": str(tmp_path), "size_cache_entries": "lots"})
    with pytest.raises(ConfigurationError, match="not an existing directory"):
        MultiUserDirectoryAdapter({"root": str(tmp_path / "missing")}).start()
    with pytest.raises(ConfigurationError, match="absolute"):
        MultiUserDirectoryAdapter({"root": "relative/path"}).start()
    with pytest.raises(ConfigurationError, match="password_hash"):
        DirectoryAdapter({"directory": str(tmp_path), "username": "u",
                          "password_hash": "{NOPE}x"}).start()


# --- traversal and concurrent changes -------------------------------------------------------


def test_symlinks_out_of_root_not_served(tmp_path: Path, root: Path,
                                         adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    secret = put(tmp_path, "secret.eml", b"Subject: secret\n\nsecret\n")
    (d / "link.eml").symlink_to(secret)
    (d / "up.txt").symlink_to("../../secret.eml")
    put(d, "ok.eml", b"Subject: ok\n\nok\n")
    s = login(adapter)
    listing = s.list_messages()
    assert [m.uid for m in listing] == [original_uid(d / "ok.eml")]
    # Swapped for a symlink between LIST and RETR: not followed.
    (d / "ok.eml").unlink()
    (d / "ok.eml").symlink_to(secret)
    with pytest.raises(MessageGone):
        s.open_message(listing[0].uid)


def test_user_directory_swapped_after_login(tmp_path: Path, root: Path,
                                            adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    put(d, "a.eml", b"Subject: a\n\na\n", T0)
    s = login(adapter)
    listing = s.list_messages()
    evil = tmp_path / "evil"
    evil.mkdir()
    put(evil, "a.eml", b"Subject: evil\n\nevil\n", T0)
    d.rename(tmp_path / "alice-old")
    (root / "alice").symlink_to(evil)
    # The session keeps reading its own directory, not the symlinked replacement.
    assert read(s, listing[0].uid) == b"Subject: a\n\na\n"


def test_file_deleted_mid_session_is_gone(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    put(d, "a.eml", b"Subject: a\n\na\n", T0)
    put(d, "b.eml", b"Subject: b\n\nb\n", T0 + 1)
    s = login(adapter)
    a, b = s.list_messages()
    (d / "a.eml").unlink()
    with pytest.raises(MessageGone):
        s.open_message(a.uid)
    assert read(s, b.uid) == b"Subject: b\n\nb\n"


def test_file_replaced_mid_session_is_gone(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    put(d, "a.eml", b"Subject: a\n\na\n", T0)
    put(d, "b.eml", b"Subject: b\n\nb\n", T0)
    s = login(adapter)
    a, b = s.list_messages()
    put(d, "new.eml", b"Subject: other\n\nsame size\n", T0).rename(d / "a.eml")  # new inode
    with pytest.raises(MessageGone):
        s.open_message(a.uid)
    with open(d / "b.eml", "ab") as f:  # rewritten in place: the listed size is wrong now
        f.write(b"more\n")
    with pytest.raises(MessageGone):
        s.open_message(b.uid)


def test_writer_in_progress_skipped(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    put(d, "done.eml", b"Subject: done\n\n", T0)
    writer = open(d / "writing.eml", "wb")  # noqa: SIM115 - held open across listings
    fcntl.flock(writer, fcntl.LOCK_EX)
    writer.write(b"Subject: half\n\nhalf a mess")
    writer.flush()
    try:
        assert [m.uid for m in login(adapter).list_messages()] == [original_uid(d / "done.eml")]
    finally:
        writer.write(b"age\n")
        writer.close()  # releases the lock
    uids = [m.uid for m in login(adapter).list_messages()]
    assert original_uid(d / "writing.eml") in uids and len(uids) == 2


# --- deletion -------------------------------------------------------------------------------


def test_delete_exactly_the_marked_files(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    for i in range(4):
        put(d, f"{i}.eml", f"Subject: {i}\n\n{i}\n".encode(), T0 + i)
    s = login(adapter)
    listing = s.list_messages()
    put(d, "arrived.eml", b"Subject: new\n\nnew\n", T0 + 1)  # arrived during the session
    result = s.delete_messages([listing[1].uid, listing[3].uid])
    assert result.failed == {}
    assert sorted(p.name for p in d.iterdir()) == [LOCK_FILE, PASSWORD_FILE, "0.eml", "2.eml",
                                                   "arrived.eml"]
    s.connection_closed()


def test_delete_keeps_replaced_and_tolerates_vanished(root: Path,
                                                      adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    put(d, "a.eml", b"Subject: a\n\na\n", T0)
    put(d, "b.eml", b"Subject: b\n\nb\n", T0 + 1)
    s = login(adapter)
    a, b = s.list_messages()
    put(d, "x.eml", b"Subject: replacement\n\n", T0).rename(d / "a.eml")
    (d / "b.eml").unlink()
    result = s.delete_messages([a.uid, b.uid, "not-a-uid"])
    assert set(result.failed) == {a.uid, "not-a-uid"}
    assert (d / "a.eml").read_bytes() == b"Subject: replacement\n\n"  # never deleted
    assert not [p for p in d.iterdir() if p.name.startswith(".pop3sf-deleting")]


def test_read_only_session_deletes_nothing(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    put(d, "a.eml", b"Subject: a\n\na\n")
    s = login(adapter, read_only=True)
    (a,) = s.list_messages()
    assert set(s.delete_messages([a.uid]).failed) == {a.uid}
    assert (d / "a.eml").exists()


# --- size cache -----------------------------------------------------------------------------


def test_sizes_cached_not_remeasured(root: Path, adapter: MultiUserDirectoryAdapter) -> None:
    d = make_user(root, "alice")
    for i in range(3):
        put(d, f"{i}.eml", b"Subject: x\n\ny\n", T0 + i)
    put(d, "t.txt", b"text\n", T0 + 9)
    login(adapter).list_messages()
    cache = adapter.size_cache
    misses = cache.misses
    assert misses == 4
    login(adapter).list_messages()
    assert cache.misses == misses and cache.hits >= 4
    os.utime(d / "0.eml", ns=(T0 + 100, T0 + 100))  # a new version is measured again
    login(adapter).list_messages()
    assert cache.misses == misses + 1


def test_txt_size_follows_addresses(root: Path) -> None:
    d = make_user(root, "alice")
    put(d, "t.txt", b"text\n", T0)
    a = MultiUserDirectoryAdapter({"root": str(root)})
    short = login(a).list_messages()[0].size
    a.reload({"root": str(root), "from_address": "A much longer sender <sender@example.com>"})
    s = login(a)
    (info,) = s.list_messages()
    assert info.size == len(read(s, info.uid)) > short


def test_size_cache_persists(tmp_path: Path) -> None:
    path = put(tmp_path, "m.eml", "Subject: é\n\nbody".encode())
    st = os.stat(path)
    c1 = SizeCache(tmp_path / "cache")
    m = c1.get_or_measure(st, partial(open, path, "rb"))
    assert m == Measure(len(wire_bytes(path.read_bytes())), True, m.downgraded_size)
    c1.close()
    c2 = SizeCache(tmp_path / "cache")

    def fail() -> BinaryIO:
        raise AssertionError("re-measured")

    assert c2.get_or_measure(st, fail) == m
    with open(tmp_path / "cache" / JOURNAL, "ab") as f:
        f.write(b"garbage line\n1 2 3\n")
    assert SizeCache(tmp_path / "cache").get(key_for(st)) == m


def test_size_cache_bounded_and_threadsafe(tmp_path: Path) -> None:
    cache = SizeCache(max_entries=50)
    files = [put(tmp_path, f"{i}.eml", b"S: x\n\n" + b"y\n" * i) for i in range(100)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for p in files:
                m = cache.get_or_measure(os.stat(p), partial(open, p, "rb"))
                assert m.size == len(wire_bytes(p.read_bytes()))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) == 50


def test_size_cache_detects_change_while_measured(tmp_path: Path) -> None:
    path = put(tmp_path, "m.eml", b"Subject: x\n\n")
    st = os.stat(path)
    with open(path, "ab") as f:
        f.write(b"appended by a writer without a lock\n")
    cache = SizeCache()
    with pytest.raises(FileChanged):
        cache.get_or_measure(st, partial(open, path, "rb"))
    assert len(cache) == 0


def test_size_cache_directory_unusable_falls_back(tmp_path: Path) -> None:
    blocker = put(tmp_path, "file", b"")
    path = put(tmp_path, "m.eml", b"Subject: x\n\n")
    cache = SizeCache(blocker / "cache")  # can't be created: memory only, still works
    assert cache.get_or_measure(os.stat(path), partial(open, path, "rb")).size == 14


# --- end to end: the real server over loopback ------------------------------------------------


def pop_login(srv: RunningServer, user: str = "alice", password: str = "secret") -> poplib.POP3:
    return login_when_free(srv, user, password)


@pytest.fixture
def long_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """poplib refuses lines over 2048 octets; the conformance sample has a 300 kB one."""
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)


class _Conformance(AdapterConformance):
    def _login(self, srv: RunningServer) -> poplib.POP3:
        # The suite logs in again right after dropping a connection; wait for the release.
        return pop_login(srv, self.user, self.password)


@pytest.mark.usefixtures("long_lines")
class TestMultiUserConformance(_Conformance):
    adapter_type = "directory_multi"

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        root = Path(tmp_path) / "conformance-root"
        root.mkdir()
        d = make_user(root, user, password)
        for i, raw in enumerate(messages):
            put(d, f"{i}.eml", raw, T0 + i)
        return {"root": str(root), "bcrypt_rounds": 4}


@pytest.mark.usefixtures("long_lines")
class TestSingleUserConformance(_Conformance):
    adapter_type = "directory"

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        d = Path(tmp_path) / "single"
        d.mkdir()
        for i, raw in enumerate(messages):
            put(d, f"m{i:03}.eml", raw, T0 + i)
        return {"directory": str(d), "username": user,
                "password_hash": hash_bcrypt(password.encode(), rounds=4)}


def uidls(pop: poplib.POP3) -> list[str]:
    return [line.split()[1].decode() for line in pop.uidl()[1]]


def test_e2e_formats_and_uids(root: Path) -> None:
    d = make_user(root, "alice")
    put(d, "a.eml", b"Subject: a\n\n.dot line\n", T0)
    put(d, "Poznámka.txt", "Dobrý den, světe!\n".encode(), T0 + 1)
    with running_server("directory_multi", {"root": str(root), "bcrypt_rounds": 4}) as srv:
        pop = pop_login(srv)
        assert uidls(pop) == [original_uid(d / "a.eml"), original_uid(d / "Poznámka.txt")]
        _, lines, _ = pop.retr(1)
        assert lines == [b"Subject: a", b"", b".dot line"]
        _, lines, _ = pop.retr(2)
        msg = email.message_from_bytes(b"\r\n".join(lines), policy=email.policy.default)
        assert str(msg["Subject"]) == "Poznámka.txt"
        assert msg.get_content().strip() == "Dobrý den, světe!"
        pop.quit()


def test_e2e_dele_quit_deletes_exactly_marked(root: Path) -> None:
    d = make_user(root, "alice")
    for i in range(4):
        put(d, f"{i}.eml", f"Subject: {i}\n\n{i}\n".encode(), T0 + i)
    with running_server("directory_multi", {"root": str(root), "bcrypt_rounds": 4}) as srv:
        pop = pop_login(srv)
        pop.dele(2)
        pop.dele(4)
        put(d, "new.eml", b"Subject: new\n\nnew\n", T0)  # arrives during the session
        pop.quit()
        assert sorted(p.name for p in d.iterdir()) == [LOCK_FILE, PASSWORD_FILE, "0.eml", "2.eml",
                                                        "new.eml"]


def test_e2e_dropped_connection_deletes_nothing(root: Path) -> None:
    d = make_user(root, "alice")
    for i in range(3):
        put(d, f"{i}.eml", f"Subject: {i}\n\n{i}\n".encode(), T0 + i)
    with running_server("directory_multi", {"root": str(root), "bcrypt_rounds": 4}) as srv:
        pop = pop_login(srv)
        pop.dele(1)
        pop.dele(2)
        pop.close()  # dropped, no QUIT
        pop = pop_login(srv)  # the lock is released and all messages are still there
        assert len(uidls(pop)) == 3
        pop.quit()
    assert len(list(d.glob("*.eml"))) == 3


def test_e2e_message_deleted_by_someone_else(root: Path) -> None:
    d = make_user(root, "alice")
    put(d, "a.eml", b"Subject: a\n\na\n", T0)
    put(d, "b.eml", b"Subject: b\n\nb\n", T0 + 1)
    with running_server("directory_multi", {"root": str(root), "bcrypt_rounds": 4}) as srv:
        pop = pop_login(srv)
        (d / "a.eml").unlink()
        with pytest.raises(poplib.error_proto) as err:
            pop.retr(1)
        assert b"no longer exists" in err.value.args[0]
        assert b"[SYS/TEMP]" not in err.value.args[0]
        assert pop.retr(2)[1][-1] == b"b"
        pop.quit()


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail not installed")
def test_e2e_fetchmail_reads_and_deletes(tmp_path: Path, root: Path) -> None:
    d = make_user(root, "alice", "fetch pw")
    put(d, "1.eml", b"From: a@example.org\nSubject: first\n\nhello\n", T0)
    put(d, "2.txt", "Grüße vom Server\n".encode(), T0 + 1)
    with running_server("directory_multi", {"root": str(root), "bcrypt_rounds": 4}) as srv:
        fetchmail = Fetchmail(tmp_path, srv.port, "alice", "fetch pw")
        proc = fetchmail.run()
        assert proc.returncode == 0, proc.stdout + proc.stderr
    delivered = fetchmail.delivered()
    assert b"Subject: first" in delivered and b"hello" in delivered
    assert "Grüße vom Server".encode() in delivered
    assert sorted(p.name for p in d.iterdir()) == [LOCK_FILE, PASSWORD_FILE]  # fetched, deleted


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_e2e_curl_list_retr_dele(root: Path) -> None:
    d = make_user(root, "alice")
    put(d, "1.eml", b"Subject: one\n\nfirst\n", T0)
    put(d, "2.eml", b"Subject: two\n\nsecond\n", T0 + 1)
    with running_server("directory_multi", {"root": str(root), "bcrypt_rounds": 4}) as srv:
        base = f"pop3://127.0.0.1:{srv.port}"

        def curl(*args: str) -> bytes:
            proc = subprocess.run(["curl", "-sS", "--max-time", "20", "-u", "alice:secret",
                                   *args], capture_output=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        listing = curl(f"{base}/").decode().split()
        assert listing == ["1", str(len(wire_bytes(b"Subject: one\n\nfirst\n"))),
                           "2", str(len(wire_bytes(b"Subject: two\n\nsecond\n")))]
        assert curl(f"{base}/2") == b"Subject: two\r\n\r\nsecond\r\n"
        curl("-X", "DELE", "-I", f"{base}/1")
    assert sorted(p.name for p in d.glob("*.eml")) == ["2.eml"]


def test_listing_finishes_deletions_a_crash_interrupted(root: Path,
                                                        adapter: MultiUserDirectoryAdapter,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file set aside by a QUIT's deletion is removed by a later listing, not kept forever."""
    import pop3sf.adapters.directory as directory

    d = make_user(root, "alice")
    put(d, "0.eml", b"Subject: kept\n\nx\n", T0)
    aside = d / ".pop3sf-deleting-0123abcd"
    aside.write_bytes(b"Subject: deleted at QUIT\n\ny\n")
    s = login(adapter)
    assert len(s.list_messages()) == 1
    assert aside.exists()  # recent: a commit may still be running
    s.connection_closed()
    monkeypatch.setattr(directory, "ASIDE_GRACE", -1.0)
    s = login(adapter)
    assert len(s.list_messages()) == 1
    assert not aside.exists() and (d / "0.eml").exists()
    s.connection_closed()
