"""Every configspec key given a bad value, sections missing, keys unknown, files unusable: the real
``pop3sf --check-config`` and plain start-up name the problem and exit non-zero, and nothing is
left running or listening (adapter keys: docs/adapters.md#options; certificates:
docs/protocol.md §1).

The cases are derived from the configspecs themselves (``pop3sf/configspec.ini`` and every
bundled adapter's ``configspec``), so a key added later is covered without touching this file.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import import_module
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from configobj import ConfigObj
from pop3sf.adapters import registered
from validate import Validator

from pop3sf.cli import main

POP3SF = [sys.executable, "-m", "pop3sf"]
_parse = Validator()._parse_with_caching


@dataclass
class Case:
    name: str
    config: str              # the file's text
    mentions: tuple[str, ...]  # what the error message must name
    group: str = ""            # cases of one group exercise the same code: one runs as a process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spec(text: str) -> ConfigObj:
    return ConfigObj(text.splitlines(), list_values=False, _inspec=True)


BUNDLED = registered()


def _adapter_class(kind: str) -> Any:
    module, _, name = BUNDLED[kind].partition(":")
    return getattr(import_module(module), name)


def bad_values(check: str) -> list[str]:
    """Values the check must reject: wrong types and just out of range."""
    name, args, kwargs, _default = _parse(check)
    low = kwargs.get("min", args[0] if len(args) > 0 else None)
    high = kwargs.get("max", args[1] if len(args) > 1 else None)
    if name in ("integer", "float"):
        values = ["abc", "1,5" if name == "float" else "1.5", "''"]
        caster = int if name == "integer" else float
        if low is not None:
            values.append(str(caster(low) - 1))
        if high is not None:
            values.append(str(caster(high) + 1))
        return values
    if name == "boolean":
        return ["maybe", "2"]
    if name == "option":
        return ["nonsense"]
    if name == "string" and "min" in kwargs:
        return ['""']
    return []  # any string is a string: semantic checks below cover those


# -- the base configurations (each must pass, as a control) ------------------------------------

class Env:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = _free_port()
        (base / "mail").mkdir()
        (base / "maildir-passwd").write_text("alice:{PLAIN}pw::::" + str(base) + "::\n")
        self.adapters: dict[str, dict[str, str]] = {
            "list": {},
            "directory": {"directory": str(base / "mail"), "username": "alice",
                          "password_hash": "{PLAIN}pw"},
            "directory_multi": {"root": str(base / "mail")},
            "maildir": {"passwd_file": str(base / "maildir-passwd")},
            "mysql": {"username": "alice", "password_hash": "{PLAIN}pw"},
            "mysql_multi": {},
            "journal": {"state_directory": str(base / "journal-state")},
        }
        #: Lines after an adapter's keys: the subsections (accounts) it needs.
        self.subsections: dict[str, list[str]] = {
            "journal": ["    [[ops]]", "    password_hash = {PLAIN}pw"],
        }

    def text(self, adapter: str = "list", server: dict[str, dict[str, str]] | None = None,
             adapter_extra: dict[str, str] | None = None, drop: tuple[str, ...] = (),
             extra: str = "") -> str:
        sections: dict[str, dict[str, str]] = {
            "server": {"user": "root", "shutdown_grace": "1"},
            "logging": {"target": "stderr"},
        }
        for section, values in (server or {}).items():
            sections.setdefault(section, {}).update(values)
        out = []
        for section, values in sections.items():
            if section in drop or section.endswith("!"):
                continue
            out.append(f"[{section}]")
            out += [f"{k} = {v}" for k, v in values.items()]
        if "listeners" not in drop:
            listener = (server or {}).get("listeners!", {})
            out += ["[listeners]", "    [[pop3]]",
                    f"    addresses = {listener.get('addresses', f'127.0.0.1:{self.port}')}"]
            out += [f"    {k} = {v}" for k, v in listener.items() if k != "addresses"]
        if "adapter" not in drop:
            out += ["[adapter]", f"type = {adapter}"]
            values = {**self.adapters[adapter], **(adapter_extra or {})}
            out += [f"{k} = {v}" for k, v in values.items()]
            out += self.subsections.get(adapter, [])
        return "\n".join(out) + "\n" + extra


def server_cases(env: Env) -> Iterator[Case]:
    spec = _spec(files("pop3sf").joinpath("configspec.ini").read_text())
    for section in spec:
        if section in ("adapter", "listeners"):
            continue
        for key, check in spec[section].items():
            for value in bad_values(check):
                server = {section: {key: value}}
                yield Case(f"[{section}] {key} = {value}", env.text(server=server),
                           (f"[{section}]", key), f"server {check.split('(')[0]}")
        yield Case(f"[{section}] unknown key", env.text(server={section: {"bogus_key": "1"}}),
                   (f"[{section}]", "bogus_key"), "unknown key")
    listener = spec["listeners"]["__many__"]
    for value in bad_values(listener["tls"]):
        yield Case(f"[listeners] tls = {value}",
                   env.text(server={"listeners!": {"tls": value}}), ("[listeners]", "tls"),
                   "server boolean")
    for value in ("nohost", "127.0.0.1:99999", "example.org:110", "127.0.0.1:", "[::1]:x"):
        yield Case(f"[listeners] addresses = {value}",
                   env.text(server={"listeners!": {"addresses": value}}),
                   ("[listeners]", "addresses"), "addresses")
    yield Case("[listeners] unknown key", env.text(server={"listeners!": {"bogus_key": "1"}}),
               ("[listeners]", "bogus_key"), "unknown key")
    yield Case("unknown section", env.text(extra="[bogus_section]\nx = 1\n"), ("bogus_section",))
    yield Case("no [listeners]", env.text(drop=("listeners",)), ("[listeners]",))
    yield Case("empty [listeners]", env.text(drop=("listeners",), extra="[listeners]\n"),
               ("[listeners]",))
    yield Case("listener without addresses",
               env.text(drop=("listeners",), extra="[listeners]\n  [[pop3]]\n  tls = no\n"),
               ("[listeners]", "addresses"))
    yield Case("no [adapter]", env.text(drop=("adapter",)), ("[adapter]",))
    yield Case("[adapter] without type", env.text(drop=("adapter",), extra="[adapter]\n"),
               ("[adapter]", "type"))
    yield Case("unknown adapter type",
               env.text(drop=("adapter",), extra="[adapter]\ntype = no_such_adapter\n"),
               ("[adapter]", "type"))
    yield Case("plaintext network", env.text(server={"auth": {"plaintext_auth_networks":
                                                             "10.0.0.0/33"}}),
               ("[auth]", "plaintext_auth_networks"))
    yield Case("auth line shorter than command line",
               env.text(server={"protocol": {"max_line_length": "4096",
                                             "max_auth_line_length": "1024"}}),
               ("[protocol]", "max_auth_line_length"))
    yield Case("syntax error", env.text(extra="[unclosed\n"), ("syntax error",))
    yield Case("log file relative", env.text(server={"logging": {"target": "file",
                                                                 "file": "pop3sf.log"}}),
               ("[logging]", "file"))
    yield Case("unknown service group", env.text(server={"server": {"group": "no-such-group"}}),
               ("[server] group", "no-such-group"))


def tls_cases(env: Env, cert: str, key: str) -> Iterator[Case]:
    d = env.base
    other_key = d / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other_key), "2048"], check=True,
                   capture_output=True)
    not_pem = d / "not.pem"
    not_pem.write_text("this is no certificate\n")
    both = {"certificate": cert, "private_key": key}
    implicit = {"listeners!": {"tls": "yes"}}
    yield Case("implicit TLS without certificate", env.text(server=implicit), ("[tls]",))
    yield Case("certificate without key", env.text(server={"tls": {"certificate": cert}}),
               ("[tls]", "private_key"))
    yield Case("key without certificate", env.text(server={"tls": {"private_key": key}}),
               ("[tls]", "certificate"))
    for what, path in (("missing", str(d / "nothing.pem")), ("a directory", str(d))):
        yield Case(f"certificate {what}",
                   env.text(server={"tls": {**both, "certificate": path}}),
                   ("[tls]", "certificate", path))
        yield Case(f"private key {what}",
                   env.text(server={"tls": {**both, "private_key": path}}),
                   ("[tls]", "private_key", path))
    yield Case("certificate not PEM",
               env.text(server={"tls": {**both, "certificate": str(not_pem)}}),
               ("[tls]", "certificate", str(not_pem)))
    yield Case("key of another certificate",
               env.text(server={"tls": {**both, "private_key": str(other_key)}}),
               ("[tls]", "private_key", str(other_key)))
    yield Case("no cipher matches",
               env.text(server={"tls": {**both, "ciphers": "NO-SUCH-CIPHER"}}),
               ("[tls]", "ciphers"))


def adapter_cases(env: Env) -> Iterator[Case]:
    for kind in BUNDLED:
        spec = _spec(_adapter_class(kind).configspec)
        for key, check in spec.items():
            if not isinstance(check, str):  # a subsection's spec ([__many__]: accounts)
                continue
            for value in bad_values(check):
                yield Case(f"{kind}: {key} = {value}",
                           env.text(kind, adapter_extra={key: value}), ("[adapter]", key),
                           f"adapter {check.split('(')[0]}")
        yield Case(f"{kind}: unknown key", env.text(kind, adapter_extra={"bogus_key": "1"}),
                   ("[adapter]", "bogus_key"), "adapter unknown key")
        for key, value in env.adapters[kind].items():  # each required key left out
            if "default" not in spec[key]:
                missing = {k: v for k, v in env.adapters[kind].items() if k != key}
                text = env.text(kind).replace(f"{key} = {value}\n", "")
                assert f"{key} =" not in text.split("[adapter]")[1], missing
                yield Case(f"{kind}: {key} missing", text, ("[adapter]", key),
                           "adapter missing key")
    semantic = [
        ("maildir", {"passwd_file": "relative"}, "passwd_file"),
        ("maildir", {"root": "relative"}, "root"),
        ("maildir", {"pop3_uidl_format": '""'}, "pop3_uidl_format"),
        ("mysql", {"messages_table": "x; DROP TABLE y"}, "messages_table"),
        ("mysql", {"password_hash": "{NOSUCH}x"}, "password_hash"),
        ("mysql_multi", {"users_table": "a b"}, "users_table"),
        ("journal", {"state_directory": "relative"}, "state_directory"),
        ("mysql_multi", {"ssl_ca": "/etc/ssl/ca.pem"}, "ssl_ca"),
        ("mysql_multi", {"password_file": str(env.base / "no-such-password")},
         "password_file"),
        # The list adapter's message names the file, not the key.
        ("list", {"messages": str(env.base / "no-such-message")}, "no-such-message"),
    ]
    for kind, values, key in semantic:
        yield Case(f"{kind}: {values}", env.text(kind, adapter_extra=values), ("[adapter]", key),
                   f"semantic {kind}")


# -- running the real command -----------------------------------------------------------------

def run_cli(path: Path, *args: str, user: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                        "INVOCATION_ID", "JOURNAL_STREAM")}
    return subprocess.run([*POP3SF, *args, "--config", str(path)], capture_output=True,
                          text=True, timeout=timeout, env=env, user=user, cwd="/")


def in_process(path: Path, *args: str) -> tuple[int, str]:
    """``pop3sf.cli.main`` in this process: the same code as the command, a thousand times
    cheaper; the real command runs for one case of each group."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([*args, "--config", str(path)])
        except Exception:
            code, _ = -1, err.write(traceback.format_exc())
    return code, err.getvalue()


def check_all(base: Path, cases: list[Case], *args: str) -> list[str]:
    """Run every case; return the problems found (empty when all behave)."""
    groups: set[str] = set()
    real = []
    for case in cases:
        key = case.group or case.name
        real.append(key not in groups)
        groups.add(key)

    def one(item: tuple[int, Case]) -> str | None:
        i, case = item
        path = base / f"case{i}.conf"
        path.write_text(case.config)
        if real[i]:
            run = run_cli(path, *args)
            code, err = run.returncode, run.stderr
        else:
            code, err = in_process(path, *args)
        if code != 78:                  # EX_CONFIG, what systemd does not restart on
            return f"{case.name}: exit {code}, not 78\n{err}"
        if "Traceback" in err:
            return f"{case.name}: traceback\n{err}"
        first = [line for line in err.splitlines() if "error" in line.lower()]
        if not first:
            return f"{case.name}: no error line\n{err}"
        missing = [m for m in case.mentions if m not in err]
        if missing:
            return f"{case.name}: message does not name {missing}: {err.strip()}"
        return None

    with ThreadPoolExecutor(4) as pool:
        problems = [p for p in pool.map(one, [(i, c) for i, c in enumerate(cases) if real[i]])
                    if p]
    return problems + [p for p in map(one, [(i, c) for i, c in enumerate(cases) if not real[i]])
                       if p]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("cfg"))


def test_base_configs_are_valid(env: Env, tls_files: dict[str, str]) -> None:
    """The control: every base configuration passes, so each failure below is the bad value."""
    for kind in BUNDLED:
        path = env.base / f"ok-{kind}.conf"
        path.write_text(env.text(kind, server={"tls": tls_files}))
        run = run_cli(path, "--check-config", "--no-connect")   # no database here
        assert run.returncode == 0, (kind, run.stderr)
        assert "configuration OK" in run.stdout


def test_every_server_key_and_section(env: Env, tls_files: dict[str, str]) -> None:
    cases = list(server_cases(env))
    cases += tls_cases(env, tls_files["certificate"], tls_files["private_key"])
    assert len(cases) > 80
    problems = check_all(env.base, cases, "--check-config")
    assert not problems, "\n\n".join(problems)


def test_every_adapter_key(env: Env) -> None:
    cases = list(adapter_cases(env))
    assert len(cases) > 60
    problems = check_all(env.base, cases, "--check-config", "--no-connect")
    assert not problems, "\n\n".join(problems)


def test_check_config_catches_what_start_up_would(env: Env) -> None:
    cases = [
        Case("directory relative", env.text("directory", adapter_extra={"directory": "rel/dir"}),
             ("[adapter]", "directory")),
        Case("directory: unknown password scheme",
             env.text("directory", adapter_extra={"password_hash": "{NOSUCH}x"}),
             ("[adapter]", "password_hash")),
        Case("directory_multi root relative",
             env.text("directory_multi", adapter_extra={"root": "relative"}),
             ("[adapter]", "root")),
        Case("directory_multi root missing",
             env.text("directory_multi", adapter_extra={"root": "/nonexistent/pop3sf"}),
             ("[adapter]", "root")),
        Case("directory missing",
             env.text("directory", adapter_extra={"directory": "/nonexistent/pop3sf"}),
             ("[adapter]", "directory")),
        Case("maildir passwd_file missing",
             env.text("maildir", adapter_extra={"passwd_file": "/nonexistent/passwd"}),
             ("[adapter]", "passwd_file")),
    ]
    problems = check_all(env.base, cases, "--check-config")
    assert not problems, "\n\n".join(problems)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_start_up_refuses_and_leaves_nothing_listening(env: Env,
                                                       tls_files: dict[str, str]) -> None:
    """Plain start-up (no --check-config) on one bad value per section, including errors found
    only after the listeners were bound: exit non-zero, quickly, nothing left listening."""
    picked: dict[str, Case] = {}
    for case in [*server_cases(env), *adapter_cases(env),
                 *tls_cases(env, tls_files["certificate"], tls_files["private_key"])]:
        picked.setdefault(case.mentions[0], case)
    assert len(picked) >= 10
    for i, case in enumerate(picked.values()):
        path = env.base / f"start{i}.conf"
        path.write_text(case.config)
        run = run_cli(path, timeout=30)
        assert run.returncode == 78, (case.name, run.stderr)
        assert "Traceback" not in run.stderr, (case.name, run.stderr)
        assert all(m in run.stderr for m in case.mentions), (case.name, run.stderr)
        assert _refused(env.port), case.name


def test_failures_after_binding_leave_nothing_listening(env: Env) -> None:
    """Problems found while binding — a second address already taken — or before (an unknown
    service user) end the start cleanly: a message naming the setting, no traceback,
    and the first listener closed again."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        both = f"127.0.0.1:{env.port}, 127.0.0.1:{taken}"
        cases = [
            Case("address in use", env.text(server={"listeners!": {"addresses": both}}),
                 ("[listeners]", str(taken))),
            Case("unknown service user", env.text(server={"server": {"user": "no-such-user"}}),
                 ("user", "no-such-user")),
        ]
        for i, case in enumerate(cases):
            path = env.base / f"bound{i}.conf"
            path.write_text(case.config)
            run = run_cli(path, timeout=30)
            assert run.returncode == 78, (case.name, run.stderr)
            assert "Traceback" not in run.stderr, (case.name, run.stderr)
            assert all(m in run.stderr for m in case.mentions), (case.name, run.stderr)
            assert _refused(env.port), case.name


def test_unreadable_files_as_the_service_user(tls_files: dict[str, str]) -> None:
    """Root reads everything, so run the command as nobody: an unreadable config file or private
    key is a clear error, not a traceback."""
    base = Path(tempfile.mkdtemp(prefix="pop3sf-cfg-"))
    try:
        base.chmod(0o755)
        key = base / "key.pem"
        shutil.copy(tls_files["private_key"], key)
        key.chmod(0o600)
        cert = base / "cert.pem"
        shutil.copy(tls_files["certificate"], cert)
        cert.chmod(0o644)
        config = base / "pop3sf.conf"
        config.write_text(textwrap.dedent(f"""\
            [server]
            user = nobody
            [listeners]
                [[pop3]]
                addresses = 127.0.0.1:{_free_port()}
            [tls]
            certificate = {cert}
            private_key = {key}
            [adapter]
            type = list
            """))
        config.chmod(0o644)
        run = run_cli(config, "--check-config", user="nobody")
        assert run.returncode == 78, run.stderr                 # EX_CONFIG
        assert "[tls] private_key" in run.stderr and "Permission denied" in run.stderr
        assert "Traceback" not in run.stderr
        config.chmod(0o600)
        run = run_cli(config, "--check-config", user="nobody")
        assert run.returncode == 78, run.stderr
        assert str(config) in run.stderr and "Permission denied" in run.stderr
        assert "Traceback" not in run.stderr
    finally:
        shutil.rmtree(base)
