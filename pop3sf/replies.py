"""The fixed replies, and which reply an adapter's exception earns (docs/protocol.md §5).

Human texts never start with "[" (that is where RESP-CODES go) and never echo client input.
"""

from __future__ import annotations

from pop3sf.adapters import MaildropInUse, MessageGone, PermanentFailure

OK = b"+OK\r\n"
ERR_STATE = b"-ERR Command not valid in this state\r\n"
ERR_UNKNOWN = b"-ERR Unknown command\r\n"
ERR_SYNTAX = b"-ERR Syntax error in arguments\r\n"
ERR_NO_MSG = b"-ERR No such message\r\n"
ERR_DELETED = b"-ERR Message already deleted\r\n"
ERR_GONE = b"-ERR Message no longer exists\r\n"
ERR_AUTH = b"-ERR [AUTH] Authentication failed\r\n"
ERR_PLAINTEXT = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections\r\n"
ERR_TEMP = b"-ERR [SYS/TEMP] Temporary server failure, try again later\r\n"
ERR_PERM = b"-ERR [SYS/PERM] The maildrop cannot be served\r\n"
ERR_IN_USE = b"-ERR [IN-USE] The maildrop is already in use\r\n"
ERR_READ_ONLY = b"-ERR [X-POP3SF-READ-ONLY] The maildrop is read-only in this session\r\n"
ERR_TOO_LONG = b"-ERR Line too long\r\n"
ERR_TOO_MANY_BAD = b"-ERR Too many bad commands, closing connection\r\n"
ERR_NEEDS_UTF8 = b"-ERR [UTF8] This message needs UTF8; enable it with the UTF8 command\r\n"
ERR_SHUTDOWN = b"-ERR [SYS/TEMP] Server shutting down\r\n"
ERR_BUSY = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
MESSAGE_FOLLOWS = b"+OK Message follows\r\n"
END = b".\r\n"


def error_reply(error: BaseException) -> bytes:
    """The -ERR line for an adapter's exception; anything unexpected is temporary."""
    if isinstance(error, MessageGone):
        return ERR_GONE
    if isinstance(error, PermanentFailure):
        return ERR_PERM
    if isinstance(error, MaildropInUse):
        return ERR_IN_USE
    return ERR_TEMP
