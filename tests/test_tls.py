"""STLS and implicit TLS with real certificates (RFC 2595, docs/protocol.md §1, §2)."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Raw
from test_protocol import make_adapter

from pop3sf.config import ConfigError, TLSSection
from pop3sf.testing import running_server
from pop3sf.tls import DEFAULT_CIPHERS, make_context


class TLSRaw(Raw):
    def __init__(self, sock: ssl.SSLSocket, buf: bytes = b"") -> None:
        super().__init__(sock)
        self.buf = buf


def stls(port: int, ctx: ssl.SSLContext) -> TLSRaw:
    c = Raw.connect(port)
    assert c.line().startswith(b"+OK")
    assert c.cmd(b"STLS") == b"+OK Begin TLS negotiation"
    return TLSRaw(ctx.wrap_socket(c.sock, server_hostname="localhost"))


def test_stls_offered_and_login(tls_files: dict[str, str],
                                client_context: ssl.SSLContext) -> None:
    with running_server(adapter=make_adapter(), tls=tls_files,
                        auth={"plaintext_auth_networks": ["10.0.0.0/8"]}) as srv:
        c = Raw.connect(srv.port)
        c.line()
        assert c.cmd(b"CAPA").startswith(b"+OK")
        caps = c.multiline()
        assert b"STLS" in caps and b"USER" not in caps  # plaintext auth refused from here
        t = stls(srv.port, client_context)
        assert t.cmd(b"CAPA").startswith(b"+OK")
        caps = t.multiline()
        assert b"STLS" not in caps and b"USER" in caps and b"SASL PLAIN LOGIN" in caps
        assert t.cmd(b"STLS").startswith(b"-ERR")
        t.cmd(b"USER alice")
        assert t.cmd(b"PASS secret").startswith(b"+OK")
        assert t.cmd(b"QUIT").startswith(b"+OK")


def test_stls_discards_pipelined_plaintext(tls_files: dict[str, str],
                                           client_context: ssl.SSLContext) -> None:
    """CVE-2021-38542 class: commands injected behind STLS must not run inside TLS."""
    with running_server(adapter=make_adapter(), tls=tls_files) as srv:
        c = Raw.connect(srv.port)
        c.line()
        c.send(b"XPRO\r\nSTLS\r\nUSER alice\r\n")  # XPRO before STLS is forgotten too
        assert c.line().startswith(b"+OK Read-only")
        assert c.line() == b"+OK Begin TLS negotiation"
        assert c.buf == b""
        t = TLSRaw(client_context.wrap_socket(c.sock, server_hostname="localhost"))
        assert t.cmd(b"PASS secret") == b"-ERR Send USER first"
        t.cmd(b"USER alice")
        assert t.cmd(b"PASS secret").startswith(b"+OK Logged in,")  # not read-only
        assert t.cmd(b"DELE 1").startswith(b"+OK")


def test_stls_without_certificate_refused() -> None:
    with running_server(adapter=make_adapter()) as srv:
        c = Raw.connect(srv.port)
        c.line()
        assert c.cmd(b"STLS").startswith(b"-ERR")
        assert c.cmd(b"NOOP").startswith(b"-ERR")  # still a plain AUTHORIZATION session


def test_implicit_tls_and_pipelining(tls_files: dict[str, str],
                                     client_context: ssl.SSLContext) -> None:
    with running_server(adapter=make_adapter(), tls=tls_files) as srv:
        assert srv.tls_port is not None
        sock = client_context.wrap_socket(
            socket.create_connection(("127.0.0.1", srv.tls_port)), server_hostname="localhost")
        t = TLSRaw(sock)
        assert t.line().startswith(b"+OK")
        batch = b"USER alice\r\nPASS secret\r\n" + b"STAT\r\nLIST 1\r\nNOOP\r\nTOP 3 1\r\n" * 24
        batch += b"CAPA\r\nQUIT\r\n"
        assert batch.count(b"\r\n") == 100
        t.send(batch)
        assert t.line().startswith(b"+OK")
        assert t.line().startswith(b"+OK Logged in")
        for _ in range(24):
            assert t.line().startswith(b"+OK 3 ")
            assert t.line().startswith(b"+OK 1 ")
            assert t.line() == b"+OK"
            assert t.line().startswith(b"+OK")
            assert t.multiline() == [b"Subject: three", b"", b"l1"]
        assert t.line().startswith(b"+OK")
        assert b"STLS" not in t.multiline()
        assert t.line().startswith(b"+OK")
        pop = srv.pop3_ssl(client_context)
        pop.user("alice")
        pop.pass_("secret")
        assert pop.stat()[0] == 3
        pop.quit()


def test_silent_tls_client_delays_no_one(tls_files: dict[str, str],
                                         client_context: ssl.SSLContext) -> None:
    with running_server(adapter=make_adapter(), tls=tls_files,
                        limits={"tls_handshake_timeout": 1}) as srv:
        assert srv.tls_port is not None
        silent = [socket.create_connection(("127.0.0.1", srv.tls_port)) for _ in range(20)]
        start = time.monotonic()
        pop = srv.pop3()
        pop.user("alice")
        pop.pass_("secret")
        pop.quit()
        assert time.monotonic() - start < 1.0
        for s in silent:  # the handshake timer closes them
            s.settimeout(5)
            assert s.recv(10) == b""
            s.close()


def test_tls_garbage_and_old_protocol(tls_files: dict[str, str]) -> None:
    with running_server(adapter=make_adapter(), tls=tls_files) as srv:
        assert srv.tls_port is not None
        s = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        try:
            answer = s.recv(100)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"+OK")  # a TLS alert or a close, never POP3 in clear
        s.close()
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        try:
            old.minimum_version = ssl.TLSVersion.TLSv1
        except ValueError:
            pytest.skip("this OpenSSL cannot even offer TLS 1.1")
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            old.wrap_socket(socket.create_connection(("127.0.0.1", srv.tls_port), timeout=5),
                            server_hostname="localhost").recv(10)
        pop = srv.pop3()  # still serving
        pop.quit()


def test_certificate_errors_are_clear(tmp_path, tls_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        make_context(TLSSection(str(tmp_path / "none.pem"), tls_files["private_key"], ""))
    other_key = tmp_path / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other_key), "2048"], check=True,
                   capture_output=True)
    with pytest.raises(ConfigError, match="matching PEM pair"):
        make_context(TLSSection(tls_files["certificate"], str(other_key), ""))
    ctx = make_context(TLSSection(tls_files["certificate"], tls_files["private_key"], ""))
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_auth_plain_over_tls(tls_files: dict[str, str],
                             client_context: ssl.SSLContext) -> None:
    with running_server(adapter=make_adapter(), tls=tls_files,
                        auth={"plaintext_auth_networks": ["10.0.0.0/8"]}) as srv:
        t = stls(srv.port, client_context)
        reply = t.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret"))
        assert reply.startswith(b"+OK")


def s_client(port: int, *args: str) -> tuple[bool, str]:
    """Handshake with the real ``openssl s_client``; (negotiated, the cipher line it printed)."""
    run = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                          "-servername", "localhost", *args],
                         input=b"", capture_output=True, timeout=20)
    out = run.stdout.decode("latin-1") + run.stderr.decode("latin-1")
    line = next((x.strip() for x in out.splitlines() if ", Cipher is " in x), "")
    return run.returncode == 0 and bool(line) and "(NONE)" not in line, line


def test_default_tls12_ciphers_are_ecdhe_aead_only(tls_files: dict[str, str],
                                                    client_context: ssl.SSLContext) -> None:
    """No RSA key exchange, no CBC: each weak suite is offered alone and must be refused."""
    ctx = make_context(TLSSection(tls_files["certificate"], tls_files["private_key"], ""))
    assert ctx is not None
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12), tls12
    with running_server(adapter=make_adapter(), tls=tls_files) as srv:
        assert srv.tls_port is not None
        for weak in ("AES128-SHA", "AES128-GCM-SHA256", "AES256-SHA256",
                     "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"):
            ok, line = s_client(srv.tls_port, "-tls1_2", "-cipher", weak)
            assert not ok, f"{weak} negotiated: {line}"
        ok, line = s_client(srv.tls_port, "-tls1_2")
        assert ok and "TLSv1.2, Cipher is ECDHE-RSA-" in line, line
        assert "GCM" in line or "CHACHA20" in line, line
        ok, line = s_client(srv.tls_port, "-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305")
        assert ok, line
        ok, line = s_client(srv.tls_port, "-tls1_3")
        assert ok and "TLSv1.3, Cipher is TLS_" in line, line
        ok, line = s_client(srv.tls_port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        assert not ok, line
        pop = srv.pop3_ssl(client_context)  # a default client context still connects
        pop.user("alice")
        pop.pass_("secret")
        assert pop.stat()[0] == 3
        pop.quit()
        c = stls(srv.port, client_context)  # STLS uses the same context
        assert c.sock.version() == "TLSv1.3"
        c.cmd(b"QUIT")
        tls12_only = ssl.create_default_context(cafile=tls_files["certificate"])
        tls12_only.check_hostname = False
        tls12_only.maximum_version = ssl.TLSVersion.TLSv1_2
        pop = srv.pop3_ssl(tls12_only)
        cipher = pop.sock.cipher()  # type: ignore[union-attr]
        assert cipher is not None and cipher[0].startswith("ECDHE-RSA-"), cipher
        pop.quit()


def test_admin_ciphers_override_the_default(tls_files: dict[str, str]) -> None:
    """An explicit ``ciphers`` is used as written, even one the default would refuse."""
    tls = {**tls_files, "ciphers": "AES128-SHA:ECDHE-RSA-AES256-GCM-SHA384"}
    with running_server(adapter=make_adapter(), tls=tls) as srv:
        assert srv.tls_port is not None
        ok, line = s_client(srv.tls_port, "-tls1_2", "-cipher", "AES128-SHA")
        assert ok and "Cipher is AES128-SHA" in line, line
        ok, line = s_client(srv.tls_port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
        assert not ok, line  # narrowed to what the admin listed
    with pytest.raises(ConfigError, match="no cipher matches"):
        make_context(TLSSection(tls_files["certificate"], tls_files["private_key"], "NOPE-X"))


def test_default_ciphers_documented() -> None:
    """The man page and the shipped config name the same default list the code uses."""
    root = Path(__file__).resolve().parent.parent
    man = (root / "man" / "pop3sf.conf.5").read_text().replace("\\-", "-")
    assert DEFAULT_CIPHERS in "".join(man.split())
    conf = (root / "etc" / "pop3sf.conf").read_text()
    assert DEFAULT_CIPHERS in "".join(line.lstrip("# ").strip() for line in conf.splitlines())
