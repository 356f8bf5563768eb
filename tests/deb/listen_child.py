"""Test child: report what pop3sf.systemd.listen_fds() finds, as JSON.

Started with sockets at fd 3.. and LISTEN_* set (by systemd-socket-activate, or by a test).
``--serve``: accept one connection on the first socket that gets one and send the report there
(systemd-socket-activate execs us only when a client connects); otherwise print it.
"""

import fcntl
import json
import os
import select
import socket
import sys

from pop3sf.systemd import listen_fds, under_systemd


def describe(sock: socket.socket) -> dict:
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFD)
    return {
        "fd": sock.fileno(),
        "family": sock.family.name,
        "type": sock.type.name,
        "addr": sock.getsockname(),
        "blocking": sock.getblocking(),
        "cloexec": bool(flags & fcntl.FD_CLOEXEC),
    }


def main() -> int:
    unset = "--keep-env" not in sys.argv
    found = listen_fds(unset_env=unset)
    report = {
        "sockets": {name: [describe(s) for s in socks] for name, socks in found.items()},
        "env_after": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
        "under_systemd": under_systemd(),
        "pid": os.getpid(),
    }
    data = json.dumps(report).encode()
    if "--serve" in sys.argv:
        all_socks = [s for socks in found.values() for s in socks]
        ready, _, _ = select.select(all_socks, [], [], 10)
        conn, _ = ready[0].accept()
        conn.setblocking(True)
        conn.sendall(data)
        conn.close()
    else:
        sys.stdout.write(data.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
