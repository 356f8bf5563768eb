"""``type = journal``: entries written into a private, real journald (tests/journald), read
through the adapter, fetched with poplib and fetchmail; digests, hiding, restarts, the kit."""

from __future__ import annotations

import email
import email.policy
import os
import poplib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fetchmail import Fetchmail
from journald import available, write_entries
from pop3sf.adapters import ConfigError, load_adapter_class
from pop3sf.adapters.hidden import HiddenStore
from pop3sf.adapters.journal import JournalAdapter
from pop3sf.adapters.journal_render import render_entry
from pop3sf.adapters.journal_view import CLOSE_GRACE, period_of
from pop3sf.auxiliary import admin
from systemd import journal

from pop3sf.testing import AdapterConformance, login_when_free, running_server
from pop3sf.wire import measure

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

HOST = "logs.example"


def config(directory: Path, state: Path, **mailboxes: dict[str, Any]) -> dict[str, Any]:
    return {"directory": str(directory), "state_directory": str(state), "hostname": HOST,
            **{name: {"password_hash": "{PLAIN}pw", **keys} for name, keys in mailboxes.items()}}


def entry(ident: str, message: str | bytes, priority: int = 6,
          **extra: str | bytes) -> dict[str, Any]:
    return {"MESSAGE": message, "SYSLOG_IDENTIFIER": ident, "PRIORITY": str(priority), **extra}


def login(srv: Any, user: str, password: str = "pw") -> poplib.POP3:
    return login_when_free(srv, user, password)


def parsed(pop: poplib.POP3, n: int) -> email.message.EmailMessage:
    lines = pop.retr(n)[1]
    msg = email.message_from_bytes(b"\r\n".join(lines), policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def content(msg: email.message.EmailMessage) -> str:
    text = msg.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def uidls(pop: poplib.POP3) -> list[bytes]:
    return [line.split()[1] for line in pop.uidl()[1]]


def journal_count(directory: Path) -> int:
    reader = journal.Reader(path=str(directory))
    try:
        return sum(1 for _ in iter(reader._next, False))
    finally:
        reader.close()


class TestJournalConformance(AdapterConformance):
    adapter_type = "journal"

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        """Each sample's body becomes one entry's MESSAGE; the adapter serves it rendered."""
        self.directory = Path(tmp_path) / "journal"
        self.user_ = user
        bodies = [raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1] for raw in messages]
        write_entries(self.directory, [entry("kit", body) for body in bodies])
        self.bodies = dict(zip(messages, bodies, strict=True))
        return {**config(self.directory, Path(tmp_path) / "state"),
                user: {"password_hash": "{PLAIN}" + password, "matches": "SYSLOG_IDENTIFIER=kit"}}

    def expected_message(self, raw: bytes) -> bytes:
        reader = journal.Reader(path=str(self.directory))
        reader.data_threshold = 0
        reader.add_match(MESSAGE=self.bodies[raw])
        try:
            assert reader._next()
            return render_entry(reader._get_all(), reader._get_realtime(), reader._get_cursor(),
                                host=HOST, recipient=f"{self.user_}@{HOST}")
        finally:
            reader.close()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """A journal of two services at several priorities, one entry not UTF-8."""
    directory = tmp_path / "journal"
    write_entries(directory, [
        entry("backup", "backup started", 6),
        entry("backup", "disk full on /srv\nretrying in 5 minutes", 3),
        entry("cron", b"caf\xe9 \x00 binary", 4, X_RAW=b"\xff\xfe"),
        entry("cron", "naïve report: all fine", 6),
        entry("backup", "backup done", 5),
    ])
    return directory


def test_accounts_filter_and_render(logs: Path, tmp_path: Path) -> None:
    cfg = config(logs, tmp_path / "state", alerts={"priority": "err"},
                 backup={"matches": "SYSLOG_IDENTIFIER=backup"},
                 native={"matches": ["_TRANSPORT=journal", "SYSLOG_IDENTIFIER=cron"],
                         "priority": "warning"})
    with running_server("journal", cfg) as srv:
        pop = login(srv, "alerts")
        assert pop.stat()[0] == 1
        msg = parsed(pop, 1)
        assert msg["Subject"] == "[backup] err: disk full on /srv retrying in 5 minutes"
        assert msg["From"].addresses[0].domain == os.uname().nodename or msg["From"]
        assert msg["To"] == f"alerts@{HOST}"
        assert msg["Message-ID"].endswith(f".entry@{msg['From'].addresses[0].domain}>")
        body = content(msg)
        assert body.startswith("disk full on /srv\nretrying in 5 minutes\n\n-- \n")
        assert "SYSLOG_IDENTIFIER=backup" in body
        pop.quit()

        pop = login(srv, "backup")
        assert pop.stat()[0] == 3
        subjects = [parsed(pop, i)["Subject"] for i in (1, 2, 3)]
        assert subjects == ["[backup] info: backup started",
                            "[backup] err: disk full on /srv retrying in 5 minutes",
                            "[backup] notice: backup done"]
        sizes = [int(line.split()[1]) for line in pop.list()[1]]
        for i, size in enumerate(sizes, 1):
            raw = b"".join(line + b"\r\n" for line in pop.retr(i)[1])
            assert len(raw) == size == measure(__import__("io").BytesIO(raw)).size
        pop.quit()

        pop = login(srv, "native")  # a trusted _FIELD and a plain one, and the priority cap
        assert pop.stat()[0] == 1
        msg = parsed(pop, 1)
        assert msg["Subject"] == "[cron] warning: caf\\xe9 \\x00 binary"
        text = content(msg)
        assert "caf\\xe9 \\x00 binary" in text and "X_RAW=\\xff\\xfe" in text
        assert msg["Date"].datetime.timestamp() == pytest.approx(time.time(), abs=600)
        pop.quit()


def test_dele_hides_survives_a_restart_and_never_writes_the_journal(logs: Path,
                                                                     tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = config(logs, state, backup={"matches": "SYSLOG_IDENTIFIER=backup"})
    before = journal_count(logs)
    files = sorted((p.name, p.stat().st_mtime_ns) for p in logs.rglob("*.journal"))
    with running_server("journal", cfg) as srv:
        pop = login(srv, "backup")
        listed = uidls(pop)
        assert all(len(uid) <= 70 for uid in listed)
        pop.dele(1)
        pop.dele(3)
        pop.quit()
        pop = login(srv, "backup")
        assert uidls(pop) == [listed[1]]
        pop.quit()
    assert HiddenStore(str(state), "hidden").hidden("backup") == \
        {uid.decode() for uid in (listed[0], listed[2])}
    with running_server("journal", cfg) as srv:  # a new server process's worth of state
        pop = login(srv, "backup")
        assert uidls(pop) == [listed[1]]
        pop.quit()
    assert journal_count(logs) == before
    assert sorted((p.name, p.stat().st_mtime_ns) for p in logs.rglob("*.journal")) == files


def test_digests_are_offered_once_their_period_closed(logs: Path, tmp_path: Path) -> None:
    written = time.time()
    reader = journal.Reader(path=str(logs))
    reader._next()
    first = reader._get_realtime() / 1e6
    reader.close()
    if period_of(first, "unit-hour") != period_of(written, "unit-hour"):
        pytest.skip("the entries were written across an hour boundary")
    cfg = config(logs, tmp_path / "state", hourly={"group": "unit-hour", "priority": "notice",
                                                   "matches": "_TRANSPORT=journal"})
    adapter = JournalAdapter(cfg)
    adapter.clock = lambda: written
    with running_server("journal", cfg, adapter=adapter) as srv:
        pop = login(srv, "hourly")
        assert pop.stat() == (0, 0)  # the hour is still open: nothing yet
        pop.quit()
        adapter.clock = lambda: written + 3600 + CLOSE_GRACE
        pop = login(srv, "hourly")
        assert pop.stat()[0] == 2  # backup and cron, one digest each
        backup, cron = parsed(pop, 1), parsed(pop, 2)
        assert backup["Subject"].startswith("[backup] err: 2 entries, ")
        assert backup["Subject"].endswith(": disk full on /srv retrying in 5 minutes")
        text = content(backup)
        assert "err     disk full on /srv\n    retrying in 5 minutes" in text
        assert "notice  backup done" in text and "backup started" not in text
        assert "caf\\xe9" in content(cron)
        sizes = [int(line.split()[1]) for line in pop.list()[1]]
        assert [len(b"".join(line + b"\r\n" for line in pop.retr(i)[1])) for i in (1, 2)] \
            == sizes
        listed = uidls(pop)
        pop.dele(2)
        pop.quit()
        adapter.clock = lambda: written + 7200  # later still: the same digest, same octets
        pop = login(srv, "hourly")
        assert uidls(pop) == listed[:1]
        assert [int(line.split()[1]) for line in pop.list()[1]] == sizes[:1]
        pop.quit()


def test_window_and_cap(logs: Path, tmp_path: Path) -> None:
    cfg = config(logs, tmp_path / "state", recent={"max_messages": 2},
                 later={"since": "1h"})
    adapter = JournalAdapter(cfg)
    with running_server("journal", cfg, adapter=adapter) as srv:
        pop = login(srv, "recent")
        assert [parsed(pop, i)["Subject"] for i in (1, 2)][-1].endswith("Journal stopped")
        pop.quit()
        adapter.clock = lambda: time.time() + 2 * 3600  # everything is older than 1h then
        pop = login(srv, "later")
        assert pop.stat() == (0, 0)
        pop.quit()


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail not installed")
def test_fetchmail_fetches_then_finds_nothing_new(logs: Path, tmp_path: Path) -> None:
    cfg = config(logs, tmp_path / "state", backup={"matches": "SYSLOG_IDENTIFIER=backup"})
    with running_server("journal", cfg) as srv:
        fetchmail = Fetchmail(tmp_path, srv.port, "backup", "pw")
        proc = fetchmail.run()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        again = fetchmail.run()
        assert again.returncode == 1, again.stdout + again.stderr  # 1: no mail
    delivered = fetchmail.delivered()
    assert delivered.count(b"\nSubject: [backup] ") + delivered.startswith(b"Subject") == 3
    assert b"disk full on /srv" in delivered


def test_admin_preview(logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "pop3sf.conf"
    conf.write_text(
        "[listeners]\n[[pop3]]\naddresses = 127.0.0.1:0\n"
        f"[adapter]\ntype = journal\ndirectory = {logs}\nstate_directory = {tmp_path}/st\n"
        "hostname = logs.example\n[[alerts]]\npassword_hash = {PLAIN}pw\npriority = err\n")
    assert admin.main(["--config", str(conf), "preview", "alerts"]) == 0
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and "[backup] err: disk full" in out.out
    assert "alerts: 1 message(s)" in out.err
    assert admin.main(["--config", str(conf), "preview", "alerts", "--message", "1"]) == 0
    assert capsys.readouterr().out.startswith("From: journal on ")
    assert admin.main(["--config", str(conf), "preview", "nobody"]) == admin.EX_NOUSER
    assert "no account 'nobody'" in capsys.readouterr().err
    assert admin.main(["--config", str(conf), "message", "list", "alerts"]) == 0
    assert "[backup] err: disk full" in capsys.readouterr().out
    listing = tmp_path / "list.conf"  # an adapter without the hook
    listing.write_text("[listeners]\n[[pop3]]\naddresses = 127.0.0.1:0\n"
                       "[adapter]\ntype = list\nusers = a:{PLAIN}x\n")
    assert admin.main(["--config", str(listing), "preview", "a"]) == admin.EX_UNAVAILABLE
    assert "can't preview" in capsys.readouterr().err


@pytest.mark.parametrize(("keys", "error"), [
    ({"alerts": {"password_hash": "{PLAIN}x", "priority": "loud"}}, "'loud': one of emerg"),
    ({"alerts": {"password_hash": "{PLAIN}x", "since": "soon"}}, "'soon': a positive number"),
    ({"alerts": {"password_hash": "{PLAIN}x", "matches": "unit=x"}}, "not FIELD=value"),
    ({"alerts": {"password_hash": "{PLAIN}x", "group": "week"}}, "group = 'week'"),
    ({"alerts": {"password_hash": "{NOPE}x"}}, "unknown scheme"),
    ({".bad": {"password_hash": "{PLAIN}x"}}, "account name"),
    ({}, "no account"),
    ({"directory": "journal", "a": {"password_hash": "{PLAIN}x"}}, "absolute path"),
])
def test_configuration_errors_name_the_key(keys: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_adapter_class("journal")({"state_directory": "/var/lib/pop3sf/journal", **keys})


def test_probe_says_when_the_service_user_cannot_read(logs: Path, tmp_path: Path) -> None:
    """As an unprivileged user (``nobody``), the journal files of root (mode 0640) can't be
    read: probe (run by --check-config as the service user) names the group to add."""
    shared = Path(tempfile.mkdtemp(prefix="pop3sf-journal-probe-"))
    shared.chmod(0o755)
    logs = Path(shutil.copytree(logs, shared / "journal"))
    for path in logs.rglob("*"):
        path.chmod(0o640 if path.is_file() else 0o755)
    code = ("from pop3sf.adapters.journal import JournalAdapter as A\n"
            f"A({{'directory': {str(logs)!r}, 'state_directory': '/tmp',"
            " 'a': {'password_hash': '{PLAIN}x'}}).probe()\n")
    proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)
    shutil.rmtree(shared)
    assert proc.returncode != 0
    assert "SupplementaryGroups=systemd-journal" in proc.stderr, proc.stderr
    assert f"cannot read {logs}/" in proc.stderr


def test_long_lines_travel_quoted_printable(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    line = "é" * 700  # 1400 octets: longer than RFC 5322's 998
    write_entries(directory, [entry("json", f"{line}\nshort")])
    cfg = config(directory, tmp_path / "state", a={"matches": "SYSLOG_IDENTIFIER=json"})
    with running_server("journal", cfg) as srv:
        pop = login(srv, "a")
        raw = pop.retr(1)[1]
        assert max(len(x) for x in raw) <= 998
        msg = email.message_from_bytes(b"\r\n".join(raw), policy=email.policy.default)
        assert msg["Content-Transfer-Encoding"] == "quoted-printable"
        assert content(msg).startswith(f"{line}\nshort\n\n-- \n")
        assert len(b"".join(x + b"\r\n" for x in raw)) == pop.stat()[1]
        pop.quit()


def test_the_readme_config_is_valid(tmp_path: Path) -> None:
    """The complete config of README.md's journal section loads as the server loads it."""
    from pop3sf.config import load_config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("    [adapter]\n    type = journal\n", 1)[1].split("\n\n*", 1)[0]
    text = "[adapter]\ntype = journal\n" + "\n".join(line[4:] for line in block.splitlines())
    text = text.replace("$2b$12$...", "{PLAIN}pw")
    conf = tmp_path / "pop3sf.conf"
    conf.write_text("[listeners]\n[[pop3]]\naddresses = 127.0.0.1:0\n" + text)
    settings = load_config(str(conf))
    adapter = JournalAdapter(settings.adapter_config)
    assert sorted(adapter.mailboxes) == ["alerts", "backup", "web"]
    web = adapter.mailboxes["web"]
    assert web.terms == (("_SYSTEMD_UNIT=nginx.service", "_SYSTEMD_UNIT=php8.2-fpm.service"),
                         ("SYSLOG_IDENTIFIER=certbot",))
    assert (web.priority, web.group) == (4, "unit-hour")
    assert adapter.mailboxes["backup"].since == 30 * 86400


def test_vacuumed_entries_are_gone_not_wrong(logs: Path, tmp_path: Path) -> None:
    """Journal files rotated away between LIST and RETR: -ERR, never other octets."""
    cfg = config(logs, tmp_path / "state", each={"matches": "SYSLOG_IDENTIFIER=backup"},
                 daily={"matches": "SYSLOG_IDENTIFIER=backup", "group": "unit-day"})
    adapter = JournalAdapter(cfg)
    adapter.clock = lambda: time.time() + 2 * 86400
    with running_server("journal", cfg, adapter=adapter) as srv:
        each, daily = login(srv, "each"), login(srv, "daily")
        assert each.stat()[0] == 3 and daily.stat()[0] == 1
        shutil.rmtree(logs)
        logs.mkdir()
        for pop in (each, daily):
            with pytest.raises(poplib.error_proto, match="no longer exists"):
                pop.retr(1)
            pop.quit()
