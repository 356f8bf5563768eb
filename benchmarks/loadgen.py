"""Load generator: asyncio POP3 clients in several worker processes, loopback only.

The harness starts each worker as ``python loadgen.py worker``, writes it one JSON line (the
spec), and drives it through stdin lines: the worker logs in what it must beforehand, prints
``ready``, starts on ``go``, prints ``loaded`` once a background load is in place (held or silent
connections), and ends on ``stop`` or when its work or its deadline is done, printing a
``result`` with its counts, latencies and the CPU it used itself. Every loop is bounded by a count
and a deadline; connections only go to 127.0.0.1 (the spec can't name another host).

A client reads responses into one buffer and counts bytes without unstuffing, so the client side
stays cheaper than the server it measures (the harness reports both).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
READ_SIZE = 256 * 1024
TERM = b"\r\n.\r\n"


class ProtocolError(Exception):
    pass


def client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Conn:
    """One POP3 client connection with its own read buffer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.buf = bytearray()
        self.count = 0  # messages in the maildrop, when the task asked STAT

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> Conn:
        reader, writer = await asyncio.open_connection(HOST, port, ssl=tls, limit=READ_SIZE)
        return cls(reader, writer)

    async def _more(self) -> None:
        data = await self.r.read(READ_SIZE)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    async def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return out
            await self._more()

    async def ok(self) -> bytes:
        status = await self.line()
        if not status.startswith(b"+OK"):
            raise ProtocolError(status.decode("ascii", "replace")[:120])
        return status

    async def body(self) -> int:
        """Skip a multi-line body up to its terminating dot line; return its size on the wire.

        Large bodies are scanned chunk by chunk as they arrive, keeping only a 4-byte tail for
        a terminator split between chunks, so the client copies as little as it can.
        """
        buf = self.buf
        while len(buf) < 3:  # a body is at least its terminator
            await self._more()
        if buf[:3] == b".\r\n":
            del buf[:3]
            return 0
        i = buf.find(TERM)
        if i >= 0:
            del buf[:i + 5]
            return i + 2
        tail = bytes(buf[-4:])
        n = len(buf) - len(tail)
        buf.clear()
        while True:
            data = await self.r.read(READ_SIZE)
            if not data:
                raise ConnectionError("server closed the connection")
            j = (tail + data[:4]).find(TERM)
            if 0 <= j < len(tail):  # the terminator starts in the tail
                buf += data[j + 5 - len(tail):]
                return n + j + 2
            i = data.find(TERM)
            if i >= 0:
                buf += data[i + 5:]
                return n + len(tail) + i + 2
            joined = tail + data if len(data) < 4 else data
            n += len(tail) + len(data) - min(4, len(joined))
            tail = joined[-4:]

    async def oks(self, n: int) -> None:
        """``n`` single-line answers (pipelined commands), checked in one pass over the buffer."""
        # Scan only what hasn't been scanned: the buffer may already hold many answers that
        # follow (pipe-mixed), and counting them all again per call would cost the client more
        # than the server.
        end = found = 0
        while found < n:
            i = self.buf.find(b"\r\n", end)
            if i < 0:
                await self._more()
                continue
            end = i + 2
            found += 1
        got = self.buf[:end]
        del self.buf[:end]
        if not got.startswith(b"+OK") or b"\r\n-ERR" in got:
            raise ProtocolError("-ERR among pipelined answers: "
                                + got.decode("ascii", "replace")[:120])

    async def multi(self) -> int:
        await self.ok()
        return await self.body()

    def send(self, data: bytes) -> None:
        self.w.write(data)

    async def cmd(self, line: str) -> bytes:
        self.w.write(line.encode() + b"\r\n")
        return await self.ok()

    async def login(self, user: str, password: str) -> None:
        await self.ok()  # greeting
        await self.cmd(f"USER {user}")
        await self.cmd(f"PASS {password}")

    def close(self) -> None:
        try:
            self.w.close()
        except Exception:
            pass


class BlockingConn:
    """A blocking client for bulk RETR: ``recv_into`` one reusable buffer (on TLS straight from
    the socket, without asyncio's memory-BIO copies), so the client stays cheaper than the
    server even when the server streams at memory speed."""

    BUF = 1024 * 1024

    def __init__(self, port: int, tls: ssl.SSLContext | None) -> None:
        import socket
        sock = socket.create_connection((HOST, port), timeout=120)
        self.sock: Any = tls.wrap_socket(sock) if tls is not None else sock
        self.buf = bytearray(self.BUF)
        self.view = memoryview(self.buf)
        self.rest = b""  # bytes read beyond the last answer

    def _recv(self) -> int:
        n = int(self.sock.recv_into(self.view))
        if not n:
            raise ConnectionError("server closed the connection")
        return n

    def line(self) -> bytes:
        data = self.rest
        while b"\r\n" not in data:
            n = self._recv()
            data += bytes(self.view[:n])
        out, _, self.rest = data.partition(b"\r\n")
        return out

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        status = self.line()
        if not status.startswith(b"+OK"):
            raise ProtocolError(status.decode("ascii", "replace")[:120])
        return status

    def login(self, user: str, pw: str) -> None:
        if not self.line().startswith(b"+OK"):
            raise ProtocolError("no greeting")
        self.cmd(f"USER {user}")
        self.cmd(f"PASS {pw}")

    def retr(self, msg: int) -> int:
        """RETR ``msg``; the body's size on the wire (up to its terminating dot line)."""
        self.cmd(f"RETR {msg}")
        # Scan as if the status line's CRLF were still there: an empty body is then found too.
        data = b"\r\n" + self.rest
        i = data.find(TERM)
        if i >= 0:
            self.rest = data[i + 5:]
            return i
        tail = data[-4:]
        pos = len(data) - len(tail)
        while True:
            k = self._recv()
            j = (tail + bytes(self.view[:min(4, k)])).find(TERM)
            if 0 <= j < len(tail):  # the terminator starts in the tail
                self.rest = bytes(self.view[j + 5 - len(tail):k])
                return pos + j
            i = self.buf.find(TERM, 0, k)
            if i >= 0:
                self.rest = bytes(self.view[i + 5:k])
                return pos + len(tail) + i
            joined = tail + bytes(self.view[:k]) if k < 4 else bytes(self.view[k - 4:k])
            pos += len(tail) + k - min(4, len(joined))
            tail = joined[-4:]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def password(user: str) -> str:
    return f"pw-{user}"


@dataclass
class Tally:
    ops: int = 0
    bytes: int = 0
    errors: int = 0
    err: list[str] = field(default_factory=list)
    lat: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.err) < 5:
            self.err.append(f"{type(exc).__name__}: {exc}"[:200])


class Worker:
    """Runs one spec's task in this process (see the module docstring for the protocol)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.port: int = spec["port"]
        self.tls = client_tls() if spec.get("tls") else None
        self.clients: list[list[str]] = spec.get("clients", [])
        self.per_client: int = spec.get("per_client", 1)
        self.deadline = 0.0
        self.tally = Tally()
        self.go = asyncio.Event()
        self.stopped = asyncio.Event()
        self.prepared: list[Conn] = []
        self.blocking: list[BlockingConn] = []

    # --- control channel ------------------------------------------------------------------
    def emit(self, event: str, **kw: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **kw}) + "\n")
        sys.stdout.flush()

    def _stdin_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            for line in sys.stdin:
                word = line.strip()
                if word == "go":
                    loop.call_soon_threadsafe(self.go.set)
                elif word == "stop":
                    loop.call_soon_threadsafe(self.stopped.set)
            loop.call_soon_threadsafe(self.stopped.set)  # the harness went away
        except (RuntimeError, ValueError, OSError):
            pass  # the loop closed first: the worker is exiting anyway

    def left(self) -> bool:
        return not self.stopped.is_set() and time.monotonic() < self.deadline

    # --- tasks ------------------------------------------------------------------------------
    async def connect(self) -> Conn:
        return await Conn.open(self.port, self.tls)

    async def session_client(self, users: list[str]) -> None:
        """login, STAT, UIDL, LIST, RETR every message, QUIT; again with the next user."""
        t = self.tally
        for k in range(self.per_client):
            if not self.left():
                return
            user = users[k % len(users)]
            t0 = time.perf_counter()
            c = None
            try:
                c = await self.connect()
                await c.login(user, password(user))
                n = int((await c.cmd("STAT")).split()[1])
                for listing in (b"UIDL\r\n", b"LIST\r\n"):
                    c.send(listing)
                    t.bytes += await c.multi()
                for i in range(1, n + 1 if self.spec.get("retr", True) else 1):
                    c.send(b"RETR %d\r\n" % i)
                    t.bytes += await c.multi()
                await c.cmd("QUIT")
                t.ops += 1
                t.lat.append(time.perf_counter() - t0)
            except (OSError, ProtocolError, ValueError, IndexError) as exc:
                t.error(exc)
            finally:
                if c is not None:
                    c.close()

    async def retr_client(self, users: list[str]) -> None:
        """One session RETRieving message ``msg`` ``repeat`` times (ops = RETRs), on a blocking
        socket in a thread of its own."""
        await asyncio.to_thread(self._retr_blocking, users[0], self.blocking.pop())

    def _retr_blocking(self, user: str, c: BlockingConn) -> None:
        t = self.tally
        repeat = self.spec.get("repeat", 1)
        msg = self.spec.get("msg", 1)
        try:
            for _ in range(repeat):
                if not self.left():
                    break
                t0 = time.perf_counter()
                t.bytes += c.retr(msg)
                t.ops += 1
                t.lat.append(time.perf_counter() - t0)
            c.cmd("QUIT")
        except (OSError, ProtocolError, ValueError) as exc:
            t.error(exc)
            t.extra.setdefault("failed_users", []).append(user)
        finally:
            c.close()

    async def login_client(self, users: list[str]) -> None:
        """connect, USER, PASS, QUIT in a loop; latency is connect to PASS's +OK."""
        t = self.tally
        for k in range(self.per_client):
            if not self.left():
                return
            user = users[k % len(users)]
            t0 = time.perf_counter()
            c = None
            try:
                c = await self.connect()
                await c.login(user, password(user))
                t.lat.append(time.perf_counter() - t0)
                await c.cmd("QUIT")
                t.ops += 1
            except (OSError, ProtocolError, ValueError) as exc:
                t.error(exc)
            finally:
                if c is not None:
                    c.close()

    async def pipeline_client(self, users: list[str]) -> None:
        """``batches`` times (``batch`` pipelined commands in one write, then their answers).
        ``command`` is one template (``"LIST {n}"``, ``"TOP {n} 0"``) or a list of them used in
        rotation (pipe-mixed); ``{n}`` runs over the maildrop's messages."""
        t = self.tally
        command = self.spec["command"]
        templates: list[str] = [command] if isinstance(command, str) else list(command)
        batch = self.spec.get("batch", 100)
        c = self.prepared.pop()
        try:
            count = c.count
            k = 0
            for _ in range(self.spec.get("batches", 10)):
                if not self.left():
                    break
                cmds = []
                for _ in range(batch):
                    cmds.append(templates[k % len(templates)].format(n=k % count + 1))
                    k += 1
                # answers in order: runs of single-line answers checked together
                runs: list[int] = []  # > 0: that many single lines; 0: one multi-line answer
                for cmd in cmds:
                    if cmd.startswith(("TOP", "RETR")):
                        runs.append(0)
                    elif runs and runs[-1] > 0:
                        runs[-1] += 1
                    else:
                        runs.append(1)
                t0 = time.perf_counter()
                c.send(("\r\n".join(cmds) + "\r\n").encode())
                for run in runs:
                    if run:
                        await c.oks(run)
                    else:
                        t.bytes += await c.multi()
                t.ops += batch
                t.lat.append(time.perf_counter() - t0)
            await c.cmd("QUIT")
        except (OSError, ProtocolError, ValueError) as exc:
            t.error(exc)
        finally:
            c.close()

    async def _hold_one(self, user: str, sem: asyncio.Semaphore, held: list[Conn]) -> None:
        async with sem:
            if not self.left():
                return
            c = None
            try:
                c = await self.connect()
                await c.login(user, password(user))
                held.append(c)
                self.tally.ops += 1
            except (OSError, ProtocolError) as exc:
                self.tally.error(exc)
                if c is not None:
                    c.close()

    async def hold(self) -> None:
        """Open and log in one connection per user, report, keep them until ``stop``."""
        users = [u for group in self.clients for u in group]
        sem = asyncio.Semaphore(self.spec.get("parallel", 64))
        held: list[Conn] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(self._hold_one(u, sem, held) for u in users))
        self.tally.extra["open_s"] = time.perf_counter() - t0
        self.emit("loaded", held=len(held), open_s=self.tally.extra["open_s"],
                  errors=self.tally.errors)
        await self._until_stop()
        for c in held:
            try:
                c.send(b"QUIT\r\n")
            except Exception:
                pass
            c.close()
        await asyncio.sleep(0.1)

    async def _silent_one(self, sem: asyncio.Semaphore,
                          socks: list[asyncio.StreamWriter]) -> None:
        async with sem:
            if not self.left():
                return
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 5.0)
                socks.append(w)
            except (OSError, TimeoutError) as exc:
                self.tally.error(exc)

    async def silent(self) -> None:
        """Open plain TCP connections (to a TLS port: the server waits for a ClientHello) and
        say nothing until ``stop``. A server that stops accepting leaves them in the listen
        queue; connects that get no answer in 5 s count as errors."""
        n = self.spec.get("connections", 1000)
        socks: list[asyncio.StreamWriter] = []
        sem = asyncio.Semaphore(self.spec.get("parallel", 100))
        await asyncio.gather(*(self._silent_one(sem, socks) for _ in range(n)))
        self.tally.ops = len(socks)
        self.emit("loaded", held=len(socks), errors=self.tally.errors)
        await self._until_stop()
        for w in socks:
            w.close()
        await asyncio.sleep(0.1)

    async def noop_client(self) -> None:
        """NOOP round trips, one at a time, on a session logged in before ``go``."""
        c = self.prepared.pop()
        t = self.tally
        gap = self.spec.get("gap", 0.0)
        try:
            for _ in range(self.spec.get("count", 1000)):
                if not self.left():
                    break
                t0 = time.perf_counter()
                await c.cmd("NOOP")
                t.lat.append(time.perf_counter() - t0)
                t.ops += 1
                if gap:
                    await asyncio.sleep(gap)
            await c.cmd("QUIT")
        except (OSError, ProtocolError) as exc:
            t.error(exc)
        finally:
            c.close()

    async def _until_stop(self) -> None:
        try:
            await asyncio.wait_for(self.stopped.wait(), max(0.0, self.deadline
                                                            - time.monotonic()))
        except TimeoutError:
            self.tally.extra["deadline_hit"] = True

    async def prepare(self) -> None:
        """Log in the sessions that must exist before the measured part starts."""
        kind = self.spec["task"]
        if kind == "retr":
            for users in self.clients:
                bc = BlockingConn(self.port, self.tls)
                bc.login(users[0], password(users[0]))
                self.blocking.append(bc)
        if kind in ("pipeline", "noop"):
            for users in self.clients:
                c = await self.connect()
                await c.login(users[0], password(users[0]))
                if kind == "pipeline":
                    c.count = int((await c.cmd("STAT")).split()[1])
                self.prepared.append(c)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._stdin_thread, args=(loop,), daemon=True).start()
        self.deadline = time.monotonic() + self.spec.get("deadline", 60.0) + 60.0
        await self.prepare()
        self.emit("ready")
        await self.go.wait()
        self.deadline = time.monotonic() + self.spec.get("deadline", 60.0)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        kind = self.spec["task"]
        if kind == "hold":
            await self.hold()
        elif kind == "silent":
            await self.silent()
        elif kind == "noop":
            await self.noop_client()
        else:
            fn = {"session": self.session_client, "retr": self.retr_client,
                  "login": self.login_client, "pipeline": self.pipeline_client}[kind]
            await asyncio.gather(*(fn(users) for users in self.clients))
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        t = self.tally
        self.emit("result", ops=t.ops, bytes=t.bytes, errors=t.errors, err=t.err, lat=t.lat,
                  extra=t.extra, cpu=cpu, wall=wall)


def worker_main() -> int:
    spec = json.loads(sys.stdin.readline())
    if spec.get("host", HOST) != HOST:
        raise SystemExit("loadgen only talks to 127.0.0.1")
    if spec.get("nofile"):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop  # optional
        uvloop.install()
    except ImportError:
        pass
    w = Worker(spec)
    try:
        asyncio.run(w.main())
    except Exception as exc:
        w.emit("error", error=f"{type(exc).__name__}: {exc}"[:500])
        return 1
    return 0


# --- the harness side -------------------------------------------------------------------------

class WorkerProc:
    """A worker process as the harness sees it: send control words, wait for events."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""
        self.send(json.dumps(spec))

    def send(self, word: str) -> None:
        assert self.p.stdin is not None
        try:
            self.p.stdin.write(word.encode() + b"\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        end = time.monotonic() + timeout
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line, self._buf = self._buf[:i], self._buf[i + 1:]
                msg: dict[str, Any] = json.loads(line)
                if msg["event"] == event:
                    return msg
                if msg["event"] == "error":
                    raise RuntimeError(f"load worker failed: {msg['error']}")
                continue
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"load worker: no {event!r} within {timeout} s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"load worker exited before {event!r}")
                self._buf += chunk

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                assert self.p.stdin is not None
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Fleet:
    """Several worker processes driven together."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self.workers = [WorkerProc(s) for s in specs]

    def ready(self, timeout: float = 120.0) -> None:
        for w in self.workers:
            w.expect("ready", timeout)

    def go(self) -> None:
        for w in self.workers:
            w.send("go")

    def loaded(self, timeout: float) -> list[dict[str, Any]]:
        return [w.expect("loaded", timeout) for w in self.workers]

    def stop(self) -> None:
        for w in self.workers:
            w.send("stop")

    def results(self, timeout: float) -> list[dict[str, Any]]:
        return [w.expect("result", timeout) for w in self.workers]

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result for several workers: counts and CPU added, latencies pooled, wall = longest."""
    out: dict[str, Any] = {"ops": 0, "bytes": 0, "errors": 0, "err": [], "lat": [], "cpu": 0.0,
                           "wall": 0.0, "extra": {}}
    for r in results:
        for k in ("ops", "bytes", "errors", "cpu"):
            out[k] += r[k]
        out["err"] += r["err"]
        out["lat"] += r["lat"]
        out["wall"] = max(out["wall"], r["wall"])
        out["extra"].update(r.get("extra", {}))
    return out


def split(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` dealt round-robin into ``n`` lists (clients get disjoint users)."""
    return [items[i::n] for i in range(n)]


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main())
    print(__doc__)
