"""PROXY protocol v1/v2 (pop3sf/proxy.py, docs/deployment.md): the parser against the spec and
hypothesis, and a real server on loopback whose proxy listener is fed real headers."""

from __future__ import annotations

import logging
import poplib
import socket
import ssl
import struct
import time
from typing import Any

import pytest
from conftest import Raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol import make_adapter

from pop3sf import proxy
from pop3sf.config import ConfigError, settings_from_dict
from pop3sf.control import session_info
from pop3sf.proxy import NEED_MORE, Done, Invalid, parse, ssl_tlv, v1_header, v2_header
from pop3sf.testing import RunningServer, running_server, server_config

SRC, DST = ("203.0.113.7", 40000), ("198.51.100.1", 110)


# -- the parser ---------------------------------------------------------------------------------

@pytest.mark.parametrize("line, source", [
    (b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 110\r\n", ("203.0.113.7", 40000)),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", ("255.255.255.255", 65535)),
    (b"PROXY TCP6 2001:DB8::1 2001:db8::2 0 110\r\n", ("2001:db8::1", 0)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n", None),
])
def test_v1_valid(line: bytes, source: tuple[str, int] | None) -> None:
    result = parse(line + b"USER x\r\n")
    assert isinstance(result, Done) and result.consumed == len(line)
    assert result.header.version == 1 and result.header.source == source
    for cut in range(len(line)):
        assert parse(line[:cut]) is NEED_MORE, cut


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 203.0.113.07 198.51.100.1 40000 110\r\n",   # leading zero
    b"PROXY TCP4 203.0.113.7 198.51.100.1 040000 110\r\n",
    b"PROXY TCP4 203.0.113.7 198.51.100.1 65536 110\r\n",
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 110\r\n",         # family mismatch
    b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 110\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 110\r\n",
    b"PROXY TCP4  203.0.113.7 198.51.100.1 1 110\r\n",       # two spaces
    b"PROXY TCP4 203.0.113.7 198.51.100.1 1 110\n",          # bare LF
    b"PROXY TCP4 203.0.113.7\r198.51.100.1 1 110\r\n",
    b"PROXY UDP4 203.0.113.7 198.51.100.1 1 110\r\n",
    b"PROXY TCP4 203.0.113.7 198.51.100.1 \xd9\xa1 110\r\n",  # non-ASCII digit
    b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",                 # longer than 107
    b"USER alice\r\n",
    b"\x16\x03\x01\x02\x00",                                  # a TLS ClientHello
])
def test_v1_invalid(line: bytes) -> None:
    assert isinstance(parse(line), Invalid)


def test_v2_inet_inet6_and_tlvs() -> None:
    head = v2_header(SRC, DST)
    result = parse(head + b"rest")
    assert isinstance(result, Done) and result.consumed == len(head)
    assert result.header.source == SRC and result.header.destination == DST
    assert not result.header.tls
    head6 = v2_header(("2001:db8::7", 1), ("2001:db8::1", 995), tlvs=ssl_tlv())
    result = parse(head6)
    assert isinstance(result, Done)
    assert result.header.source == ("2001:db8::7", 1)
    assert result.header.tls and result.header.tls_version == "TLSv1.3"
    # The SSL TLV without PP2_CLIENT_SSL: the client did not use TLS.
    result = parse(v2_header(SRC, DST, tlvs=ssl_tlv(client=0)))
    assert isinstance(result, Done) and not result.header.tls


def test_v2_local_unspec_unix_fall_back_to_the_real_endpoints() -> None:
    local = parse(v2_header(None))
    assert isinstance(local, Done) and local.header.local and local.header.source is None
    # LOCAL must skip whatever length it announces, address or not.
    padded = proxy.V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert parse(padded) == Done(proxy.Header(2, None, local=True), 28)
    unix = proxy.V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + bytes(216)
    result = parse(unix)
    assert isinstance(result, Done) and result.header.source is None
    unspec = proxy.V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert isinstance(parse(unspec), Done)
    udp = proxy.V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12)
    result = parse(udp)
    assert isinstance(result, Done) and result.header.source is None


def test_v2_crc32c() -> None:
    assert proxy.crc32c(b"123456789") == 0xE3069283  # the standard check value
    good = v2_header(SRC, DST, checksum=True)
    assert isinstance(parse(good), Done)
    bad = bytearray(good)
    bad[20] ^= 1  # a bit of the source address
    assert parse(bad) == Invalid("v2 header: CRC32c mismatch")


@pytest.mark.parametrize("data, reason", [
    (proxy.V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version"),
    (proxy.V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "command"),
    (proxy.V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "family"),
    (proxy.V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "family"),
    (proxy.V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "shorter"),
    (proxy.V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x04\x00", "TLV"),
    (proxy.V2_SIGNATURE + b"\x21\x11\x00\x0f" + bytes(12) + b"\x04\x00\x05", "TLV"),
    (proxy.V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x20\x00\x01\x01", "SSL"),
    (proxy.V2_SIGNATURE + b"\x21\x11\x00\x12" + bytes(12) + b"\x03\x00\x03abc", "CRC32c"),
])
def test_v2_invalid(data: bytes, reason: str) -> None:
    result = parse(data)
    assert isinstance(result, Invalid) and reason in result.reason, result


def test_versions_per_listener() -> None:
    assert "only v2" in getattr(parse(v1_header(SRC, DST), (2,)), "reason", "")
    assert "only v1" in getattr(parse(v2_header(SRC, DST), (1,)), "reason", "")
    assert isinstance(parse(v1_header(SRC, DST), (1,)), Done)
    assert isinstance(parse(v2_header(SRC, DST), (2,)), Done)
    assert parse(b"", (1,)) is NEED_MORE and parse(b"\r\n\r", (2,)) is NEED_MORE


# -- hypothesis: the same properties the atheris harness (fuzz/fuzz_proxy.py) checks -------------

def check_result(data: bytes, versions: tuple[int, ...]) -> None:
    """Any bytes: one of the three answers, a consumed count inside the buffer, and the same
    answer however the bytes arrive (need-more on every prefix of a header)."""
    result = parse(data, versions)
    assert result is NEED_MORE or isinstance(result, Done | Invalid)
    if isinstance(result, Done):
        assert 0 < result.consumed <= len(data)
        assert parse(data[:result.consumed], versions) == result
        assert parse(bytearray(data[:result.consumed]) + b"x" * 3, versions) == result
        for cut in range(result.consumed):
            assert parse(data[:cut], versions) is NEED_MORE
        source = result.header.source
        if source is not None:
            assert 0 <= source[1] <= 65535
            socket.inet_pton(socket.AF_INET6 if ":" in source[0] else socket.AF_INET, source[0])
    if isinstance(result, Invalid):
        assert result.reason.isascii() and len(result.reason) < 80
    for cut in range(len(data)):  # once decided, more bytes never change the answer
        early = parse(data[:cut], versions)
        assert early is NEED_MORE or early == result, (cut, early, result)


addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
headers = st.one_of(
    st.builds(lambda s, sp, d, dp: v1_header((s, sp), (d if (":" in d) == (":" in s) else s, dp)),
              addresses, st.integers(0, 65535), addresses, st.integers(0, 65535)),
    st.builds(lambda s, sp, t, c: v2_header((s, sp), tlvs=t, checksum=c),
              addresses, st.integers(0, 65535),
              st.sampled_from([b"", ssl_tlv(), b"\x04\x00\x02ab", ssl_tlv(client=6)]),
              st.booleans()),
    st.just(v2_header(None)), st.just(b"PROXY UNKNOWN\r\n"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=headers, rest=st.binary(max_size=40), versions=st.sampled_from([(1,), (2,), (1, 2)]))
def test_hypothesis_headers(head: bytes, rest: bytes, versions: tuple[int, ...]) -> None:
    check_result(head + rest, versions)
    v2 = head.startswith(proxy.V2_SIGNATURE)
    result = parse(head + rest, versions)
    if (2 if v2 else 1) in versions:
        assert isinstance(result, Done) and result.consumed == len(head)


@settings(max_examples=500, deadline=None)
@given(prefix=st.sampled_from([b"", b"PROXY ", proxy.V2_SIGNATURE, proxy.V2_SIGNATURE + b"\x21"]),
       data=st.binary(max_size=300), versions=st.sampled_from([(1,), (2,), (1, 2)]))
def test_hypothesis_any_bytes(prefix: bytes, data: bytes, versions: tuple[int, ...]) -> None:
    check_result(prefix + data, versions)


# -- a real server behind a pretend proxy --------------------------------------------------------

def proxy_listener(mode: str = "any", trusted: Any = "127.0.0.1", **extra: Any) -> dict[str, Any]:
    return {"pop3": {"addresses": ["127.0.0.1:0"], "proxy_protocol": mode,
                     "trusted_proxies": trusted, **extra}}


def addresses_seen(srv: RunningServer) -> list[str]:
    return sorted(c.address for c in srv.server.connections)


class ProxiedPOP3(poplib.POP3):
    """poplib, with a PROXY header sent before anything else (what HAProxy does)."""

    def __init__(self, port: int, header: bytes) -> None:
        self.header = header
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        sock.sendall(self.header)
        return sock


def test_client_address_from_the_header_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running_server(adapter=make_adapter(), listeners=proxy_listener()) as srv:
        pop = ProxiedPOP3(srv.port, v2_header(SRC, DST))
        assert pop.getwelcome().startswith(b"+OK")
        assert srv.call(lambda: addresses_seen(srv)) == ["203.0.113.7"]
        who = srv.call(lambda: [session_info(s) for s in srv.server.connections.values()])
        assert [(w["address"], w["port"], w["proxy"], w["tls"]) for w in who] == \
            [("203.0.113.7", 40000, "127.0.0.1", False)]  # pop3sf-admin who
        # 203.0.113.7 is no plaintext network: the policy is the client's, not the proxy's.
        with pytest.raises(poplib.error_proto, match="Plaintext"):
            pop.user("alice")
        pop.quit()
        pop = ProxiedPOP3(srv.port, v1_header(("127.0.0.5", 1234), DST))
        pop.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop.pass_("wrong")
        pop.quit()
        penalties = srv.server.penalties
        assert srv.call(lambda: penalties.delay("127.0.0.5")) > 0
        assert srv.call(lambda: penalties.delay("127.0.0.1")) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "connect 203.0.113.7:40000 on pop3 via 127.0.0.1" in messages
    assert any(m.startswith("127.0.0.5: login failed") for m in messages), messages


def test_local_health_check_and_trusted_tls() -> None:
    listeners = proxy_listener("v2", ["192.0.2.0/24", "127.0.0.1"], proxy_tls_trusted=True)
    with running_server(adapter=make_adapter(), listeners=listeners) as srv:
        pop = ProxiedPOP3(srv.port, v2_header(None))  # LOCAL: a plain connection from 127.0.0.1
        assert srv.call(lambda: addresses_seen(srv)) == ["127.0.0.1"]
        pop.user("alice")
        pop.pass_("secret")
        pop.quit()
        pop = ProxiedPOP3(srv.port, v2_header(SRC, DST, tlvs=ssl_tlv()))
        assert "STLS" not in pop.capa()
        pop.user("alice")  # TLS at a trusted proxy: plaintext authentication allowed
        pop.pass_("secret")
        pop.quit()
    with running_server(adapter=make_adapter(), listeners=proxy_listener("v2")) as srv:
        pop = ProxiedPOP3(srv.port, v2_header(SRC, DST, tlvs=ssl_tlv()))
        with pytest.raises(poplib.error_proto, match="Plaintext"):
            pop.user("alice")  # proxy_tls_trusted = no: the TLV is not believed
        pop.quit()


def closed_silently(c: Raw) -> bool:
    """The server closed the connection without sending a byte (a reset counts: the client's
    unread header makes the kernel answer with RST)."""
    try:
        return c.read_to_end() == b""
    except ConnectionResetError:
        return c.buf == b""


def test_untrusted_bad_slow_and_early_data(raw_clients: list[Raw]) -> None:
    limits = {"proxy_header_timeout": 0.5}
    with running_server(adapter=make_adapter(), listeners=proxy_listener("v1", "192.0.2.1"),
                        limits=limits) as srv:
        untrusted = Raw.connect(srv.port)
        raw_clients.append(untrusted)
        untrusted.sock.sendall(v1_header(SRC, DST))
        assert closed_silently(untrusted)  # no greeting for whoever it is
    with running_server(adapter=make_adapter(), listeners=proxy_listener("v1"),
                        limits=limits) as srv:
        for data in (b"USER alice\r\n", v2_header(SRC, DST), b"PROXY TCP4 1.2.3.4\r\n"):
            c = Raw.connect(srv.port)
            raw_clients.append(c)
            c.send(data)
            assert closed_silently(c), data
        slow = Raw.connect(srv.port)
        raw_clients.append(slow)
        slow.send(b"PROXY TCP4 ")
        started = time.monotonic()
        assert closed_silently(slow)
        assert 0.3 < time.monotonic() - started < 5
        # The header in pieces, then the client's first command in the same segment.
        c = Raw.connect(srv.port)
        raw_clients.append(c)
        head = v1_header(("127.0.0.9", 5), DST)
        c.send(head[:9])
        time.sleep(0.05)
        c.send(head[9:] + b"CAPA\r\n")
        assert c.line().startswith(b"+OK pop3sf ready")
        assert c.line().startswith(b"+OK")
        assert b"USER" in b" ".join(c.multiline())
        assert srv.call(lambda: addresses_seen(srv)) == ["127.0.0.9"]


def test_per_address_cap_applies_to_the_client(raw_clients: list[Raw]) -> None:
    with running_server(adapter=make_adapter(), listeners=proxy_listener(),
                        limits={"max_connections_per_address": 1}) as srv:
        def client(source: str) -> Raw:
            c = Raw.connect(srv.port)
            raw_clients.append(c)
            c.send(v2_header((source, 1000), DST))
            return c
        first, second = client("203.0.113.7"), client("203.0.113.8")
        assert first.line().startswith(b"+OK") and second.line().startswith(b"+OK")
        again = client("203.0.113.7")
        assert again.line().startswith(b"-ERR [SYS/TEMP] Too many connections")
        assert again.closed()
        assert srv.call(lambda: addresses_seen(srv)) == ["203.0.113.7", "203.0.113.8"]


def test_implicit_tls_after_the_header(tls_files: dict[str, str],
                                       client_context: ssl.SSLContext) -> None:
    listeners = {"pop3": {"addresses": ["127.0.0.1:0"]},
                 "pop3s": {"addresses": ["127.0.0.1:0"], "tls": True, "proxy_protocol": "v2",
                           "trusted_proxies": "127.0.0.0/8"}}
    with running_server(adapter=make_adapter(), tls=tls_files, listeners=listeners) as srv:
        assert srv.tls_port is not None
        sock = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
        sock.sendall(v2_header(SRC, DST))
        tls = client_context.wrap_socket(sock, server_hostname="localhost")
        tls.settimeout(10)
        assert tls.recv(100).startswith(b"+OK pop3sf ready")
        tls.sendall(b"CAPA\r\n")
        time.sleep(0.1)
        assert srv.call(lambda: addresses_seen(srv)) == ["203.0.113.7"]
        tls.close()


def test_configuration_errors() -> None:
    def load(listener: dict[str, Any]) -> Any:
        return settings_from_dict(server_config("list", {}, None,
                                                listeners={"pop3": listener}))
    base = {"addresses": ["127.0.0.1:0"]}
    with pytest.raises(ConfigError, match="needs trusted_proxies"):
        load({**base, "proxy_protocol": "v2"})
    with pytest.raises(ConfigError, match="trusted_proxies: 'nope' is not an address"):
        load({**base, "proxy_protocol": "v2", "trusted_proxies": ["10.0.0.1", "nope"]})
    with pytest.raises(ConfigError, match="proxy_protocol"):
        load({**base, "proxy_protocol": "v3", "trusted_proxies": "10.0.0.1"})
    listener = load({**base, "proxy_protocol": "any", "trusted_proxies": "10.0.0.0/8"}
                    ).listeners[0]
    assert listener.proxy_protocol == "any" and str(listener.trusted_proxies[0]) == "10.0.0.0/8"


def test_shutdown_closes_a_connection_still_awaiting_its_header(raw_clients: list[Raw]) -> None:
    with running_server(adapter=make_adapter(), listeners=proxy_listener()) as srv:
        waiting = Raw.connect(srv.port)
        raw_clients.append(waiting)
        waiting.send(b"PROXY TCP4 ")
        greeted = ProxiedPOP3(srv.port, v2_header(SRC, DST))
        srv.server.request_stop()
        assert greeted.sock.recv(100).startswith(b"-ERR [SYS/TEMP] Server shutting down")
        assert closed_silently(waiting)  # nothing before a greeting, not even a goodbye
        greeted.close()
