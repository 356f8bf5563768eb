"""Twisted's POP3 server (``twisted.mail.pop3``) as the second reference (benchmarks/README.md).

Runs under the benchmark-only venv that servers.py builds (``TwistedVenv``), never the project's:

    twisted-venv/bin/python twisted_pop3.py --port N --passwd FILE [--user nobody] [--log FILE]

Serves the same passwd-file and Maildirs as pop3sf and Dovecot: a cred ``Portal`` whose checker
reads the passwd-file once at start (``{PLAIN}``, and ``{SHA512-CRYPT}``/``{BLF-CRYPT}`` and other
crypt(3) hashes through libcrypt, checked synchronously in the reactor thread as a plain Twisted
checker does), a realm giving Twisted's own ``maildir.MaildirMailbox`` for ``HOME/Maildir``
(sizes from ``stat``, UIDL = MD5 of the file name, both Twisted's), and two local fixes without
which it can't serve these clients properly:

- ``getMessage`` opens messages in binary mode (Twisted's opens them in text mode: str chunks
  that its byte transport and ``transformChunk`` reject on Python 3; RETR/TOP fail without it);
- TCP_NODELAY on every accepted socket (Twisted leaves Nagle on: a reply written in pieces,
  such as a multi-line answer's status, body and terminator, waits for the delayed ACK, 40 ms).

Plain POP3 on one port only: no STLS/POP3S here (the TLS scenarios are n/a for Twisted).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hmac
import os
import pwd
import sys

from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer, protocol, reactor
from twisted.mail import maildir, pop3
from twisted.python import log
from zope.interface import implementer

_libcrypt = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
_libcrypt.crypt.restype = ctypes.c_char_p
_libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


def crypt(password: bytes, stored: bytes) -> bytes | None:
    """crypt(3) (not reentrant; fine: the reactor thread is the only caller)."""
    if b"\0" in password:
        return None
    return _libcrypt.crypt(password, stored)


#: Dovecot scheme prefixes this checker verifies with crypt(3).
CRYPT_SCHEMES = (b"{SHA512-CRYPT}", b"{SHA256-CRYPT}", b"{MD5-CRYPT}", b"{BLF-CRYPT}",
                 b"{CRYPT}")


def read_passwd(path: str) -> dict[bytes, tuple[bytes, bytes]]:
    """user -> (stored secret, home) from a Dovecot passwd-file (user:secret:uid:gid:gecos:home)."""
    users = {}
    with open(path, "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b":")
            if len(fields) >= 6 and fields[0]:
                users[fields[0]] = (fields[1], fields[5])
    return users


@implementer(checkers.ICredentialsChecker)
class PasswdFileChecker:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, users: dict[bytes, tuple[bytes, bytes]]) -> None:
        self.users = users

    def requestAvatarId(self, creds):  # type: ignore[no-untyped-def]
        entry = self.users.get(creds.username)
        if entry is not None and self.verify(entry[0], creds.password):
            return defer.succeed(creds.username)
        return defer.fail(error.UnauthorizedLogin())

    @staticmethod
    def verify(stored: bytes, password: bytes) -> bool:
        if stored.startswith(b"{PLAIN}"):
            return hmac.compare_digest(stored[7:], password)
        for prefix in CRYPT_SCHEMES:
            if stored.startswith(prefix):
                hashed = stored[len(prefix):]
                out = crypt(password, hashed)
                return out is not None and hmac.compare_digest(out, hashed)
        return False


class BinaryMaildirMailbox(maildir.MaildirMailbox):
    """Twisted's Maildir mailbox, with messages opened in binary mode (fix 1)."""

    def getMessage(self, i):  # type: ignore[no-untyped-def]
        return open(self.list[i], "rb")


@implementer(portal.IRealm)
class MaildirRealm:
    def __init__(self, users: dict[bytes, tuple[bytes, bytes]]) -> None:
        self.users = users

    def requestAvatar(self, avatarId, mind, *interfaces):  # type: ignore[no-untyped-def]
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError("IMailbox only")
        home = self.users[avatarId][1]
        return pop3.IMailbox, BinaryMaildirMailbox(os.path.join(home, b"Maildir")), lambda: None


class NoDelayPOP3(pop3.POP3):
    """Twisted's POP3 protocol with TCP_NODELAY on the accepted socket (fix 2)."""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


class POP3Factory(protocol.ServerFactory):
    protocol = NoDelayPOP3

    def __init__(self, p: portal.Portal) -> None:
        self.portal = p

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        proto = super().buildProtocol(addr)
        proto.portal = self.portal
        return proto


def drop_privileges(user: str) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--passwd", required=True)
    ap.add_argument("--user", help="drop to this user after listening (when started as root)")
    ap.add_argument("--backlog", type=int, default=1024)
    args = ap.parse_args()
    log.startLogging(sys.stderr, setStdout=False)  # connections logged, as twistd would
    users = read_passwd(args.passwd)
    p = portal.Portal(MaildirRealm(users), [PasswdFileChecker(users)])
    reactor.listenTCP(args.port, POP3Factory(p), backlog=args.backlog,  # type: ignore[attr-defined]
                      interface=args.host)
    if args.user:
        drop_privileges(args.user)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
