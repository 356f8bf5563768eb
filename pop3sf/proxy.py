"""The PROXY protocol header, versions 1 and 2 (haproxy's ``proxy-protocol.txt``), parsed.

A load balancer in front of several instances prepends one header to each connection it relays,
naming the client it relays for; without it every client would look like the balancer, and the
per-address penalty, caps and plaintext policy would lump all clients into one bucket
(docs/deployment.md). This module is pure: :func:`parse` looks at the bytes received so far and
says whether they are the start of a header (:data:`NEED_MORE`), a complete valid header
(:class:`Done`, with how many bytes it took: the rest is the client's), or not a header at all
(:class:`Invalid`, with a reason fit for a log line: it never quotes the bytes).

Strict where the specification is: v1 is one line of at most 107 octets ending in CRLF, with
canonical addresses (no leading zeros) and ports; v2 has the version 2, command LOCAL or PROXY,
a known family and transport, a length covering its address block, well-formed TLVs and, when
present, a matching CRC32c. A LOCAL command (health checks), ``PROXY UNKNOWN``, and families
this server does not serve (UNSPEC, UNIX, datagrams) mean "use the real connection".
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from typing import NamedTuple

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest valid v1 line, CRLF included (spec §2.1)

PP2_TYPE_CRC32C = 0x03
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_CLIENT_SSL = 0x01

#: Which header versions a listener accepts, by its ``proxy_protocol`` value.
VERSIONS = {"v1": (1,), "v2": (2,), "any": (1, 2)}


class Header(NamedTuple):
    """What a valid header says. ``source`` is None when the real connection's endpoints are
    to be used (LOCAL, UNKNOWN, an unsupported family); ``tls`` is whether a v2 SSL TLV says
    the client reached the proxy over TLS (trusted only if the listener says so)."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None
    local: bool = False
    tls: bool = False
    tls_version: str = ""


class Done(NamedTuple):
    header: Header
    consumed: int


class Invalid(NamedTuple):
    reason: str


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()
Result = _NeedMore | Done | Invalid


def parse(buf: bytes | bytearray, versions: tuple[int, ...] = (1, 2)) -> Result:
    """Parse the header at the start of ``buf`` (all bytes received so far)."""
    n = len(buf)
    if 2 in versions and bytes(buf[:12]) == V2_SIGNATURE[:min(n, 12)]:
        return _parse_v2(buf) if n >= 16 else NEED_MORE
    if 1 in versions and bytes(buf[:6]) == V1_PREFIX[:min(n, 6)]:
        return _parse_v1(buf) if n >= 6 else NEED_MORE
    if buf[:1] == b"P" and 1 not in versions:
        return Invalid("a PROXY v1 header on a listener that accepts only v2")
    if buf[:1] == b"\r" and 2 not in versions:
        return Invalid("a PROXY v2 header on a listener that accepts only v1")
    return Invalid("no PROXY protocol header")


# -- version 1 ----------------------------------------------------------------------------------

def _parse_v1(buf: bytes | bytearray) -> Result:
    end = buf.find(b"\n", 0, V1_MAX)
    if end < 0:
        cr = buf.find(b"\r", 0, V1_MAX)
        if 0 <= cr < len(buf) - 1:
            return Invalid("v1 header: a line end other than CRLF")
        return NEED_MORE if len(buf) < V1_MAX else Invalid("v1 header: no CRLF in 107 octets")
    if buf[end - 1:end] != b"\r" or buf.find(b"\r", 0, end - 1) >= 0:
        return Invalid("v1 header: a line end other than CRLF")
    try:
        line = bytes(buf[:end - 1]).decode("ascii")
    except UnicodeDecodeError:
        return Invalid("v1 header: not ASCII")
    parts = line.split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        return Done(Header(1, None, local=True), end + 1)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        return Invalid("v1 header: not PROXY TCP4|TCP6|UNKNOWN with 4 fields")
    family = 4 if parts[1] == "TCP4" else 6
    try:
        src, dst = _v1_address(parts[2], family), _v1_address(parts[3], family)
        sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    except ValueError as exc:
        return Invalid(f"v1 header: {exc}")
    return Done(Header(1, (src, sport), (dst, dport)), end + 1)


def _v1_address(text: str, family: int) -> str:
    """The address in its canonical form. ``inet_pton`` is strict where the specification is
    (no leading zeros, exactly four IPv4 numbers, no IPv6 scope) and ten times faster than
    :mod:`ipaddress`; IPv6 with an embedded dotted IPv4 part is refused as not canonical."""
    if family == 6 and "." in text:
        raise ValueError("IPv6 address not in the canonical hex form")
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    try:
        return socket.inet_ntop(af, socket.inet_pton(af, text))
    except (OSError, ValueError):
        raise ValueError(f"not an IPv{family} address") from None


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or \
            (text.startswith("0") and text != "0") or int(text) > 65535:
        raise ValueError("port not a decimal 0-65535 without leading zeros")
    return int(text)


# -- version 2 ----------------------------------------------------------------------------------

_ADDRESS_SIZES = {1: 12, 2: 36, 3: 216}  # INET, INET6, UNIX


def _parse_v2(buf: bytes | bytearray) -> Result:
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack_from("!H", buf, 14)[0]
    if ver_cmd >> 4 != 2:
        return Invalid("v2 header: version is not 2")
    command = ver_cmd & 0x0F
    if command > 1:
        return Invalid("v2 header: unknown command")
    family, transport = fam >> 4, fam & 0x0F
    if family > 3 or transport > 2:
        return Invalid("v2 header: unknown address family or transport")
    total = 16 + length
    if len(buf) < total:
        return NEED_MORE
    if command == 0:  # LOCAL: a health check by the proxy itself; everything else ignored
        return Done(Header(2, None, local=True), total)
    block = bytes(buf[16:total])
    size = _ADDRESS_SIZES.get(family, 0)
    if len(block) < size:
        return Invalid("v2 header: address block shorter than its family needs")
    tlvs = _tlvs(block[size:]) if family else []
    if tlvs is None:
        return Invalid("v2 header: malformed TLV")
    tls, tls_version = False, ""
    for kind, value, offset in tlvs:
        if kind == PP2_TYPE_CRC32C:
            if len(value) != 4:
                return Invalid("v2 header: CRC32c TLV of the wrong size")
            at = 16 + size + offset
            zeroed = bytes(buf[:at]) + b"\0\0\0\0" + bytes(buf[at + 4:total])
            if crc32c(zeroed) != struct.unpack("!I", value)[0]:
                return Invalid("v2 header: CRC32c mismatch")
        elif kind == PP2_TYPE_SSL:
            if len(value) < 5:
                return Invalid("v2 header: SSL TLV too short")
            subs = _tlvs(value[5:])
            if subs is None:
                return Invalid("v2 header: malformed SSL sub-TLV")
            tls = bool(value[0] & PP2_CLIENT_SSL)
            for sub, text, _ in subs:
                if sub == PP2_SUBTYPE_SSL_VERSION:
                    tls_version = text.decode("ascii", "replace")[:32]
    if family == 3 or transport != 1 or family == 0:  # not TCP over IP: the real endpoints
        return Done(Header(2, None, tls=tls, tls_version=tls_version), total)
    if family == 1:
        src, dst = (socket.inet_ntop(socket.AF_INET, block[i:i + 4]) for i in (0, 4))
        sport, dport = struct.unpack_from("!HH", block, 8)
    else:
        src, dst = (socket.inet_ntop(socket.AF_INET6, block[i:i + 16]) for i in (0, 16))
        sport, dport = struct.unpack_from("!HH", block, 32)
    return Done(Header(2, (src, sport), (dst, dport), tls=tls, tls_version=tls_version), total)


def _tlvs(data: bytes) -> list[tuple[int, bytes, int]] | None:
    """(type, value, offset of the value in ``data``) of each TLV; None if one is cut short."""
    found, pos = [], 0
    while pos < len(data):
        if pos + 3 > len(data):
            return None
        kind, size = data[pos], struct.unpack_from("!H", data, pos + 1)[0]
        if pos + 3 + size > len(data):
            return None
        found.append((kind, data[pos + 3:pos + 3 + size], pos + 3))
        pos += 3 + size
    return found


@functools.cache  # built on first use: most servers never see a CRC TLV
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table



def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli, RFC 4960 appendix B), as the PP2_TYPE_CRC32C TLV carries it."""
    table = _crc32c_table()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- building headers (tests, and tools that speak to a proxy listener) -------------------------

def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode("ascii"))


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None,
              tlvs: bytes = b"", local: bool = False, checksum: bool = False) -> bytes:
    """A v2 header; ``source`` None (or ``local``) makes a LOCAL one."""
    if local or source is None:
        return V2_SIGNATURE + b"\x20\x00" + struct.pack("!H", len(tlvs)) + tlvs
    destination = destination or (("::" if ":" in source[0] else "0.0.0.0"), 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    fam = b"\x11" if src.version == 4 else b"\x21"
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    if checksum:
        block += bytes([PP2_TYPE_CRC32C]) + b"\x00\x04" + b"\0\0\0\0"
    head = V2_SIGNATURE + b"\x21" + fam + struct.pack("!H", len(block)) + block
    if checksum:
        head = head[:-4] + struct.pack("!I", crc32c(head))
    return head


def ssl_tlv(client: int = PP2_CLIENT_SSL, version: str = "TLSv1.3") -> bytes:
    sub = bytes([PP2_SUBTYPE_SSL_VERSION]) + struct.pack("!H", len(version)) + version.encode()
    value = bytes([client]) + b"\0\0\0\0" + sub
    return bytes([PP2_TYPE_SSL]) + struct.pack("!H", len(value)) + value
