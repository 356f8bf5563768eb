"""A password-guessing storm from several loopback addresses, run as its own process so its
work doesn't share the test process's GIL with the server and the witness.

    storm_client.py PORT SECONDS ADDRESS[,ADDRESS...] CONNECTIONS_PER_ADDRESS

Each connection greets, sends USER/PASS with a fresh wrong password, and then either waits for
the answer or hangs up at a random moment (mid-penalty, mid-verification); then it reconnects.
Prints one JSON line of counts when the time is up. Bounded in time and connections.
"""

from __future__ import annotations

import json
import random
import selectors
import socket
import sys
import time


def main() -> None:
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    addresses, per_address = sys.argv[3].split(","), int(sys.argv[4])
    rng = random.Random(7)
    sel = selectors.DefaultSelector()
    counts = {"connections": 0, "answers": 0, "auth": 0, "temp": 0, "hangups": 0, "errors": 0}
    end = time.monotonic() + seconds
    guess = 0

    def connect(source: str) -> None:
        nonlocal guess
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                            source_address=(source, 0))
        except OSError:
            counts["errors"] += 1
            return
        sock.setblocking(False)
        guess += 1
        hangup = time.monotonic() + rng.uniform(0.05, 3) if rng.random() < 0.5 else None
        state = {"source": source, "buf": b"", "sent": False, "hangup": hangup,
                 "password": b"guess-%d" % guess}
        sel.register(sock, selectors.EVENT_READ, state)
        counts["connections"] += 1

    def finish(key: selectors.SelectorKey, outcome: str) -> None:
        counts[outcome] += 1
        sel.unregister(key.fileobj)
        key.fileobj.close()  # type: ignore[union-attr]
        if time.monotonic() < end:
            connect(key.data["source"])

    for source in addresses:
        for _ in range(per_address):
            connect(source)
    while time.monotonic() < end and sel.get_map():
        for key, _mask in sel.select(0.05):
            state, sock = key.data, key.fileobj
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except OSError:
                finish(key, "errors")
                continue
            if not data:
                finish(key, "errors")
                continue
            state["buf"] += data
            if not state["sent"] and state["buf"].startswith(b"+OK"):
                state["sent"], state["buf"] = True, b""
                sock.sendall(b"USER victim\r\nPASS " + state["password"]  # type: ignore
                             + b"\r\n")
            elif state["sent"] and state["buf"].count(b"\r\n") >= 2:
                answer = state["buf"].split(b"\r\n")[1]
                counts["answers"] += 1
                finish(key, "auth" if answer.startswith(b"-ERR [AUTH]") else "temp")
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            if key.data["hangup"] is not None and now >= key.data["hangup"]:
                finish(key, "hangups")
    for key in list(sel.get_map().values()):
        sel.unregister(key.fileobj)
        key.fileobj.close()  # type: ignore[union-attr]
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
