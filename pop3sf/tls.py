"""TLS server contexts (docs/protocol.md §1): TLS 1.2 minimum, no renegotiation, clear errors."""

from __future__ import annotations

import logging
import os
import ssl
import stat

from .config import ConfigError, TLSSection

log = logging.getLogger("pop3sf.tls")

#: TLS 1.2 suites used when ``[tls] ciphers`` is empty: forward secrecy (ECDHE) and AEAD only,
#: Mozilla's "intermediate" list without DHE. OpenSSL's own default would also accept RSA key
#: exchange and CBC-SHA1 suites. TLS 1.3 suites are not affected by this string.
DEFAULT_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))


def make_context(tls: TLSSection, source: str = "config") -> ssl.SSLContext | None:
    """A server context for the configured certificate, or None when none is configured."""
    if not tls.certificate:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ciphers = tls.ciphers or DEFAULT_CIPHERS
    try:
        ctx.set_ciphers(ciphers)
    except ssl.SSLError:
        raise ConfigError(f"{source}: [tls] ciphers: no cipher matches {ciphers!r}") from None
    for key in ("certificate", "private_key"):
        path = getattr(tls, key)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{source}: [tls] {key}: cannot read {path}: "
                              f"{exc.strerror or exc}") from None
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    except ssl.SSLError as exc:
        raise ConfigError(f"{source}: [tls] certificate {tls.certificate} and private_key "
                          f"{tls.private_key} do not load as a matching PEM pair: "
                          f"{exc.reason or exc}") from None
    mode = os.stat(tls.private_key).st_mode
    if mode & stat.S_IROTH:
        log.warning("%s: [tls] private_key %s is readable by everyone; chmod o-r it",
                    source, tls.private_key)
    return ctx
