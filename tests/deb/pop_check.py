#!/usr/bin/python3
"""pop_check.py MODE HOST PORT [USER PASSWORD]  - one POP3 session, reported as JSON.

MODE: ``stls`` (plain connection, STLS, then login), ``tls`` (implicit TLS, then login) or
``capa`` (plain, CAPA only). With a user, logs in and retrieves every message. The server
certificate is verified against the snakeoil certificate (by IP, so without a host name check).
Retries the connection for up to 10 s: socket activation starts the service on the first one.
Runs under Debian's /usr/bin/python3 inside a box or overlay, with the standard library only.
"""

import json
import poplib
import ssl
import sys
import time

CAFILE = "/etc/ssl/certs/ssl-cert-snakeoil.pem"


def context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=CAFILE)
    ctx.check_hostname = False
    return ctx


def connect(mode: str, host: str, port: int) -> poplib.POP3:
    deadline = time.monotonic() + 10
    while True:
        try:
            if mode == "tls":
                return poplib.POP3_SSL(host, port, timeout=15, context=context())
            return poplib.POP3(host, port, timeout=15)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    user, password = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else (None, None)
    report: dict = {"mode": mode}
    pop = connect(mode, host, port)
    report["greeting"] = pop.getwelcome().decode()
    report["capa_before"] = sorted(" ".join([k, *v]) for k, v in pop.capa().items())
    if mode == "stls":
        pop.stls(context())
        report["capa_after_stls"] = sorted(" ".join([k, *v]) for k, v in pop.capa().items())
    if mode in ("stls", "tls"):
        sock = pop.sock
        report["tls_version"] = sock.version() if isinstance(sock, ssl.SSLSocket) else None
    if user:
        pop.user(user)
        pop.pass_(password)
        count, size = pop.stat()
        report["stat"] = [count, size]
        report["messages"] = [b"\n".join(pop.retr(i)[1]).decode("utf-8", "replace")
                              for i in range(1, count + 1)]
    report["quit"] = pop.quit().decode()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
