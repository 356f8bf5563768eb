"""The worked example of docs/adapters.md: docs/examples/sqlite_log.py, loaded by its
``module:Class`` path, through the conformance kit and a real POP3 session."""

from __future__ import annotations

import email
import email.policy
import poplib
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pop3sf.adapters import BUNDLED, ConfigError, load_adapter_class, registered

from pop3sf.passwords import hash_bcrypt
from pop3sf.testing import AdapterConformance, running_server

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
TYPE = "sqlite_log:SQLiteLogAdapter"
SCHEMA = ("CREATE TABLE log (id INTEGER PRIMARY KEY, logged_at REAL NOT NULL, "
          "level TEXT NOT NULL, source TEXT NOT NULL, text TEXT NOT NULL)")
T0 = 1_700_000_000.0


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example is not a package: the server finds it as an admin's module would be found,
    on the Python path."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)  # the kit's third sample has long lines
    yield
    sys.modules.pop("sqlite_log", None)


def make_log(path: Path, rows: Sequence[tuple[str, str, str]]) -> Path:
    """A log database holding (level, source, text) rows, a second apart."""
    with sqlite3.connect(path) as db:
        db.execute(SCHEMA)
        db.executemany("INSERT INTO log (logged_at, level, source, text) VALUES (?, ?, ?, ?)",
                       [(T0 + i, *row) for i, row in enumerate(rows)])
    db.close()
    return path


def config(database: Path, password: str = "pw", **extra: Any) -> dict[str, Any]:
    return {"database": str(database), "username": "ops",
            "password_hash": hash_bcrypt(password.encode(), rounds=4), **extra}


class TestSQLiteLogConformance(AdapterConformance):
    adapter_type = TYPE

    def make_source(self, tmp_path: Any, user: str, password: str,
                    messages: Sequence[bytes]) -> dict[str, Any]:
        """Each sample becomes a row whose text is the sample's body; the adapter serves the
        row rendered (its own headers, that body)."""
        from sqlite_log import render

        rows, self.rendered = [], {}
        for i, raw in enumerate(messages, 1):
            body = raw.split(b"\n\n", 1)[-1].split(b"\r\n\r\n", 1)[-1].decode()
            rows.append(("info", "kit", body))
            self.rendered[raw] = render((i, T0 + i - 1, "info", "kit", body),
                                        "pop3sf log <log@localhost>", f"{user}@localhost")
        database = make_log(Path(tmp_path) / "conformance.sqlite3", rows)
        return {**config(database, password), "username": user}

    def expected_message(self, raw: bytes) -> bytes:
        return self.rendered[raw]


def test_loaded_by_module_class_path() -> None:
    cls = load_adapter_class(TYPE)
    assert cls.__name__ == "SQLiteLogAdapter"


def test_the_bundled_table_is_what_the_package_registers() -> None:
    """Start-up resolves bundled adapter names from a table, not from the package metadata;
    both must name the same classes (a third-party package may register more names)."""
    assert {name: registered()[name] for name in BUNDLED} == BUNDLED
    for name in BUNDLED:
        assert load_adapter_class(name).__module__.startswith("pop3sf.adapters.")


def test_a_poplib_session_reads_and_deletes_rows(tmp_path: Path) -> None:
    database = make_log(tmp_path / "log.sqlite3", [
        ("error", "backup", "disk full on /srv\nretrying in 5 minutes"),
        ("info", "cron", "nightly report: 3 jobs, all fine"),
        ("warning", "ünïcode", "naïve café"),
    ])
    with running_server(TYPE, config(database)) as srv:
        pop = srv.pop3()
        pop.user("ops")
        pop.pass_("pw")
        assert pop.stat()[0] == 3
        _, lines, _ = pop.retr(1)
        msg = email.message_from_bytes(b"\r\n".join(lines), policy=email.policy.default)
        assert msg["Subject"] == "[error] backup: disk full on /srv"
        assert msg.get_content().splitlines() == ["disk full on /srv", "retrying in 5 minutes"]
        _, lines, _ = pop.retr(3)
        msg = email.message_from_bytes(b"\r\n".join(lines), policy=email.policy.default)
        assert msg["Subject"] == "[warning] ünïcode: naïve café"
        assert [line.split()[1] for line in pop.uidl()[1]] == [b"1", b"2", b"3"]
        pop.dele(1)
        pop.quit()
    with sqlite3.connect(database) as db:
        assert [r[0] for r in db.execute("SELECT id FROM log ORDER BY id")] == [2, 3]
    db.close()


def test_configuration_errors_name_the_key(tmp_path: Path) -> None:
    cls = load_adapter_class(TYPE)
    database = make_log(tmp_path / "log.sqlite3", [])
    with pytest.raises(ConfigError, match="table"):
        cls(config(database, table="log; DROP TABLE log"))
    with pytest.raises(ConfigError, match="username is missing"):
        cls({"database": str(database), "password_hash": "{PLAIN}x"})
    missing = cls(config(tmp_path / "nope.sqlite3"))
    with pytest.raises(ConfigError, match="no such file"):
        missing.start()  # the base start() runs check()
    adapter = cls(config(database))
    adapter.probe()
    with pytest.raises(ConfigError, match="no such file"):
        adapter.reload(config(tmp_path / "gone.sqlite3"))
    assert adapter.options["database"] == str(database)  # the old configuration kept
