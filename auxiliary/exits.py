"""``pop3sf-admin``'s exit statuses (sysexits.h) and the error that carries one."""

PROG = "pop3sf-admin"

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65  # bad user name, bad message, passwords differ
EX_NOINPUT = 66  # an input file can't be read
EX_NOUSER = 67  # unknown user
EX_UNAVAILABLE = 69  # the source can't do that (users of a single-user source)
EX_SOFTWARE = 70
EX_CANTCREAT = 73  # user already exists
EX_IOERR = 74
EX_TEMPFAIL = 75  # who/kick: the server is busy or does not answer
EX_NOPERM = 77
EX_CONFIG = 78


class Failure(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
