"""Two pop3sf instances behind Debian's HAProxy (TCP mode, ``send-proxy-v2``, health checks),
on one shared source: a private MariaDB, or one Maildir tree (docs/deployment.md).

Real parts only: the ``pop3sf`` command twice, ``haproxy`` with a generated configuration on
loopback ports picked by binding port 0, poplib clients bound to 127.0.0.2 and 127.0.0.3. Proves
that each instance sees each client's own address (logs, penalties), that a penalty on one
address does not slow the other, that an account held on one instance is [IN-USE] on the other,
and that SIGKILLing an instance mid-session loses no message while new sessions go to the other.
"""

from __future__ import annotations

import poplib
import shutil
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mariadb import MariaDBServer, mariadb  # noqa: F401  (the session-scoped fixture)
from test_crash_safety import CliServer, free_port
from test_mysql import bcrypt4

HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin")
USERS = ("alice", "bob", "carol")
MESSAGES = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(3)]
PENALTY = 4.0


class HAProxy:
    """``haproxy -db`` (foreground) with a generated TCP-mode configuration: round robin over
    the instances, PROXY v2 to each, a POP3 health check (which sends a v2 LOCAL header)."""

    def __init__(self, base: Path, backends: dict[str, int]) -> None:
        self.port = free_port()
        self.stats = base / "haproxy.sock"
        self.config = base / "haproxy.cfg"
        servers = "".join(
            f"    server {name} 127.0.0.1:{port} send-proxy-v2 check inter 300ms fall 1 rise 1\n"
            for name, port in backends.items())
        self.config.write_text(textwrap.dedent(f"""\
            global
                stats socket {self.stats} mode 600 level admin
            defaults
                mode tcp
                timeout connect 2s
                timeout client 60s
                timeout server 60s
                timeout check 2s
                retries 3
                option redispatch
            frontend pop3
                bind 127.0.0.1:{self.port}
                default_backend pop3sf
            backend pop3sf
                balance roundrobin
                option tcp-check
                tcp-check expect string +OK
                tcp-check send QUIT\\r\\n
            """) + servers)
        self.proc = subprocess.Popen([str(HAPROXY), "-db", "-f", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def status(self) -> dict[str, str]:
        """Each backend server's state from the stats socket (``show stat``)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(head, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "pop3sf"
                and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_for(self, want: dict[str, str], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                now = self.status()
            except OSError:
                now = {}
            if all(now.get(k, "").startswith(v) for k, v in want.items()):
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"haproxy servers {now}, wanted {want}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client(poplib.POP3):
    """poplib from a chosen loopback source address (127.0.0.2, 127.0.0.3)."""

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=20)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))

    @property
    def tag(self) -> str:
        """How the instances log this client's connect: its own address and port."""
        return f"connect {self.source}:{self.sock.getsockname()[1]} on pop3 via 127.0.0.1"


@dataclass
class Source:
    """The shared data source: the adapter section both instances use, and a way to count
    each user's messages behind the servers' backs."""

    adapter: str
    count: Callable[[str], int]


@pytest.fixture(params=["mariadb", "maildir"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Source]:
    if request.param == "maildir":
        root, passwd = tmp_path / "vmail", tmp_path / "passwd"
        lines = []
        for user in USERS:
            for sub in ("new", "cur", "tmp"):
                (root / user / "Maildir" / sub).mkdir(parents=True)
            for i, message in enumerate(MESSAGES):
                (root / user / "Maildir" / "new" / f"170000000{i}.M{i}P1.host").write_bytes(
                    message)
            lines.append(f"{user}:{{PLAIN}}pw-{user}:5000:5000::{root / user}::")
        passwd.write_text("\n".join(lines) + "\n")
        yield Source(f"type = maildir\npasswd_file = {passwd}\nroot = {root}\n",
                     lambda user: len(list((root / user / "Maildir" / "new").iterdir())) +
                     len(list((root / user / "Maildir" / "cur").iterdir())))
        return
    server: MariaDBServer = request.getfixturevalue("mariadb")
    database = server.new_database()
    config = server.adapter_config(database)
    from pop3sf.adapters.mysql import MultiUserMySQLAdapter

    setup = MultiUserMySQLAdapter(config)
    setup.start()  # creates the tables
    setup.close()
    for user in USERS:
        server.execute("INSERT INTO pop3sf_multiuser_users (username, password_bcrypt) "
                       "VALUES (%s, %s)", (user, bcrypt4(f"pw-{user}")), database=database)
        for message in MESSAGES:
            server.execute("INSERT INTO pop3sf_multiuser_messages (user_id, message, "
                           "is_plaintext) SELECT id, %s, 0 FROM pop3sf_multiuser_users "
                           "WHERE username = %s", (message, user), database=database)

    def count(user: str) -> int:
        return int(server.execute(
            "SELECT COUNT(*) FROM pop3sf_multiuser_messages m JOIN pop3sf_multiuser_users u "
            "ON u.id = m.user_id WHERE u.username = %s", (user,), database=database)[0][0])

    yield Source("type = mysql_multi\n" + "".join(f"{k} = {v}\n" for k, v in config.items()),
                 count)


def instance(base: Path, name: str, adapter: str) -> CliServer:
    (base / name).mkdir()
    srv = CliServer(base / name, adapter,
                    extra=f"[auth]\npenalty_initial = {PENALTY}\npenalty_max = {PENALTY}\n")
    text = srv.config.read_text().replace(
        f"addresses = 127.0.0.1:{srv.port}\n",
        f"addresses = 127.0.0.1:{srv.port}\n    proxy_protocol = v2\n"
        "    trusted_proxies = 127.0.0.1\n")
    srv.config.write_text(text)
    return srv


def served_by(client: Client, instances: dict[str, CliServer], timeout: float = 5) -> str:
    """Which instance logged this client's connect, with its own address and port."""
    deadline = time.monotonic() + timeout
    while True:
        found = [name for name, srv in instances.items() if client.tag in srv.text()]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, (client.tag, found)
            return found[0]
        time.sleep(0.05)


def wait_for_log(srv: CliServer, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in srv.text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{srv.text()[-3000:]}"
        time.sleep(0.05)


def login(source: str, port: int, user: str) -> Client:
    c = Client(source, port)
    c.user(user)
    c.pass_(f"pw-{user}")
    return c


@pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (apt-get install haproxy)")
def test_two_instances_behind_haproxy(tmp_path: Path, source: Source) -> None:
    instances = {name: instance(tmp_path, name, source.adapter) for name in ("a", "b")}
    proxy: HAProxy | None = None
    try:
        for srv in instances.values():
            srv.start()
        proxy = HAProxy(tmp_path, {name: srv.port for name, srv in instances.items()})
        proxy.wait_for({"a": "UP", "b": "UP"})
        # The health checks are v2 LOCAL connections: answered as plain ones from the proxy.
        for srv in instances.values():
            wait_for_log(srv, "on pop3 via 127.0.0.1 (LOCAL)")
        port = proxy.port

        # Each client's own address, in each instance's logs.
        alice = login("127.0.0.2", port, "alice")
        bob = login("127.0.0.3", port, "bob")
        at = {"alice": served_by(alice, instances), "bob": served_by(bob, instances)}
        wait_for_log(instances[at["alice"]], "login 127.0.0.2 alice")
        wait_for_log(instances[at["bob"]], "login 127.0.0.3 bob")
        bob.quit()

        # alice is held on one instance: a login on the other one is [IN-USE].
        other = "b" if at["alice"] == "a" else "a"
        tries = 0
        while True:
            tries += 1
            c = Client("127.0.0.3", port)
            c.user("alice")
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                c.pass_("pw-alice")
            landed = served_by(c, instances)
            c.close()
            if landed == other:
                break
            assert tries < 6, "round robin never reached the other instance"
        wait_for_log(instances[other], "127.0.0.3 alice: login: MaildropInUse")

        # A penalty on 127.0.0.2 (on both instances: penalties are per process) does not slow
        # 127.0.0.3. The failure that completes the pair is the last: both are fresh.
        hit: set[str] = set()
        while len(hit) < len(instances):
            c = Client("127.0.0.2", port)
            c.user("carol")
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                c.pass_(f"wrong {len(hit)} {time.monotonic()}")  # each one counts
            failed_at = time.monotonic()
            hit.add(served_by(c, instances))
            c.close()
        for srv in instances.values():
            wait_for_log(srv, "127.0.0.2: login failed for carol")
        # Both log in at once: 127.0.0.3 is served at load speed, 127.0.0.2 only once the
        # penalty since its last failure has passed (robust to a slow machine: bounds, not
        # durations).
        done: dict[str, float] = {}

        def timed(user: str, address: str) -> None:
            login(address, port, user).quit()
            done[user] = time.monotonic()

        started = time.monotonic()
        threads = [threading.Thread(target=timed, args=args)
                   for args in (("bob", "127.0.0.3"), ("carol", "127.0.0.2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert done["carol"] >= failed_at + PENALTY - 0.3, (done, failed_at)
        assert done["bob"] < done["carol"] and done["bob"] - started < PENALTY - 1.5, \
            (done, started)

        # Kill alice's instance mid-session, after a RETR and a DELE without QUIT.
        assert alice.retr(1)[1] == MESSAGES[0].rstrip(b"\r\n").split(b"\r\n")
        alice.dele(1)
        victim, survivor = instances[at["alice"]], instances[other]
        victim.kill()
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            alice.stat()
        alice.close()
        assert source.count("alice") == len(MESSAGES)  # nothing lost
        for user, address in (("alice", "127.0.0.2"), ("bob", "127.0.0.3"),
                              ("alice", "127.0.0.3")):
            c = login(address, port, user)  # the dead instance's locks went with it
            assert served_by(c, instances) == other
            assert c.stat()[0] == len(MESSAGES)
            assert c.retr(1)[1] == MESSAGES[0].rstrip(b"\r\n").split(b"\r\n")
            c.quit()
        proxy.wait_for({at["alice"]: "DOWN", other: "UP"})
        c = login("127.0.0.2", port, "alice")
        c.dele(1)
        c.quit()
        assert source.count("alice") == len(MESSAGES) - 1
        assert survivor.stop() == 0
    finally:
        if proxy is not None:
            proxy.stop()
        for srv in instances.values():
            srv.kill()
