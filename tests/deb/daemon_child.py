"""Test child: daemonize with pop3sf.daemon the way the CLI does, then serve one-line replies.

    daemon_child.py PIDFILE [--journal] [--user NAME]

Binds 127.0.0.1:0 and prints the port (before forking, while stdout is still the caller's),
daemonizes, sets up logging only then (journald with --journal), and answers every connection
with one line describing the daemon: pid, SIGHUP count, umask, cwd and open fds.
With --user (as root) it drops privileges to NAME after daemonizing, as the CLI does.
SIGTERM ends it (the pidfile is removed).
"""

import logging
import os
import socket
import sys

from pop3sf.daemon import daemonize, drop_privileges
from pop3sf.systemd import journal_handler


def main() -> int:
    pidfile = sys.argv[1]
    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], flush=True)
    state = {"hups": 0, "stop": False}

    def on_hup(signum, frame):
        state["hups"] += 1

    def on_term(signum, frame):
        state["stop"] = True

    user = sys.argv[sys.argv.index("--user") + 1] if "--user" in sys.argv else None
    context = daemonize(pidfile, [lsock.fileno()], on_hup, on_term, pidfile_owner=user)
    log = logging.getLogger("pop3sf")
    if "--journal" in sys.argv:
        log.addHandler(journal_handler())
        log.setLevel(logging.INFO)
    if user:
        drop_privileges(user)
    lsock.settimeout(0.2)
    with context:
        while not state["stop"]:
            try:
                conn, peer = lsock.accept()
            except (TimeoutError, InterruptedError):
                continue
            with conn:
                # logged while the client's fd is open: must reach the journal, not the client
                log.info("client connected", extra={"POP3SF_CLIENT": peer[0],
                                                    "POP3SF_EVENT": "connect"})
                mask = os.umask(0)
                os.umask(mask)
                fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
                conn.sendall(f"+OK pid={os.getpid()} hups={state['hups']} umask={mask:o} "
                             f"cwd={os.getcwd()} sid={os.getsid(0)} fds={fds}\r\n".encode())
                log.info("client served", extra={"POP3SF_CLIENT": peer[0],
                                                 "POP3SF_EVENT": "served"})
        log.info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
