"""Test child: log through pop3sf.systemd.journal_handler() (meant to run under
with-journald.sh). ``--no-python-systemd`` hides python3-systemd: the handler must not
need it. The marker in argv[1] tags every record so the test can find them."""

import logging
import sys

if "--no-python-systemd" in sys.argv:
    sys.modules["systemd"] = None  # type: ignore[assignment]   # import systemd -> ImportError

from pop3sf.systemd import journal_handler


def main() -> int:
    marker = sys.argv[1]
    handler = journal_handler()
    log = logging.getLogger("pop3sf.test")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    print(type(handler).__name__)
    log.info("session %s ended", marker, extra={
        "POP3SF_CLIENT": "192.0.2.7", "POP3SF_USER": "alice", "POP3SF_EVENT": "logout",
        "POP3SF_BYTES": 12345, "POP3SF_MARKER": marker,
        "lowercase_field": "nope", "POP3SF_lower": "nope", "OTHER_FIELD": "nope"})
    log.debug("debug %s", marker, extra={"POP3SF_MARKER": marker})
    log.warning("warning %s", marker, extra={"POP3SF_MARKER": marker})
    log.error("multi\nline %s", marker, extra={"POP3SF_MARKER": marker,
                                              "POP3SF_DETAIL": "a\nb"})
    try:
        raise ValueError("boom " + marker)
    except ValueError:
        log.exception("failed %s", marker, extra={"POP3SF_MARKER": marker})
    return 0


if __name__ == "__main__":
    sys.exit(main())
