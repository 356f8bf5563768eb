"""``[metrics] listen``: Prometheus / OpenMetrics text for a fleet (pop3sf.conf(5) [metrics]).

Counting costs the loop next to nothing: the server keeps plain integers (``Server.stats``,
``Server.commands``, each pool's :class:`~pop3sf.workers.Latency`) and :func:`snapshot` turns
them into a small dict once per scrape or per second. With ``processes = N`` every child sends
its snapshot to the parent with its heartbeat; the parent sums them (keeping what children that
died had counted), adds its own gate and penalty figures and serves the sum, so a scrape never
waits for a child. The exposition format is python3-prometheus-client's (custom collector,
``generate_latest``); only the tiny HTTP/1.0 responder is ours, on the event loop, non-blocking,
every connection bounded in size and time.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .loop import EventLoop
from .throttle import Penalties, VerificationGate
from .workers import LATENCY_BUCKETS, WorkerPool

Snapshot = dict[str, Any]
log = logging.getLogger("pop3sf.metrics")

MAX_REQUEST = 8192
MAX_CLIENTS = 16
CLIENT_TIMEOUT = 5.0

#: Counters by (metric, help) from Server.stats keys; "login MECH" / "login_failed MECH" are
#: split into a label.
COUNTERS = {
    "connections": ("pop3sf_connections", "Connections admitted."),
    "refused": ("pop3sf_connections_refused", "Connections refused (caps, server full)."),
    "shed": ("pop3sf_connections_shed", "Unauthenticated connections shed to admit new ones."),
    "bytes_out": ("pop3sf_sent_bytes", "Bytes sent to clients by connections that ended."),
    "adapter_calls": ("pop3sf_adapter_calls", "Adapter calls submitted."),
}


def snapshot(stats: dict[str, int], commands: dict[bytes, int], connections: int,
             bytes_live: int, pools: dict[str, WorkerPool],
             gate: VerificationGate | None = None,
             penalties: Penalties | None = None) -> Snapshot:
    """One process's figures as JSON-able data (on the loop: O(pools + gate queues))."""
    snap: Snapshot = {
        "stats": dict(stats),
        "commands": {verb.decode("ascii", "replace"): n for verb, n in commands.items()},
        "connections": connections,
        "bytes_live": bytes_live,
        "pools": {name: {"in_flight": len(p.in_flight), "stuck": p.stuck,
                         "buckets": list(p.latency.buckets), "sum": p.latency.total,
                         "count": p.latency.count} for name, p in pools.items()},
    }
    if gate is not None:
        snap["gate"] = {"running": gate.total,
                        "waiting": sum(len(q) for q in gate.waiting.values())}
    if penalties is not None:
        snap["penalties"] = {"entries": len(penalties._table), "failures": penalties.recorded}
    return snap


def of_server(server: Any, shared: bool = False) -> Snapshot:
    """:func:`snapshot` of a :class:`~pop3sf.server.Server`; with *shared*, the gate and the
    penalties are the parent's and left out."""
    return snapshot(server.stats, server.commands, len(server.connections),
                    sum(conn.bytes_out for conn in server.connections), server.pools,
                    None if shared else server.verifications,
                    None if shared else server.penalties)


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """Sum snapshots: counters, gauges and histogram buckets alike."""
    out: Snapshot = {}
    for snap in snapshots:
        _add(out, snap)
    return out


def _add(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        elif isinstance(value, list):
            mine = into.setdefault(key, [0] * len(value))
            into[key] = [a + b for a, b in zip(mine, value, strict=False)]
        else:
            into[key] = into.get(key, 0) + value


def counters_only(snap: Snapshot) -> Snapshot:
    """What a dead child contributes forever: its counters and histograms, not its gauges."""
    pools = {name: {k: v for k, v in p.items() if k not in ("in_flight", "stuck")}
             for name, p in snap.get("pools", {}).items()}
    return {"stats": snap.get("stats", {}), "commands": snap.get("commands", {}),
            "pools": pools, "bytes_live": 0}


class _Collector(Collector):
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        stats: dict[str, int] = dict(snap.get("stats", {}))
        stats["bytes_out"] = stats.get("bytes_out", 0) + snap.get("bytes_live", 0)
        yield GaugeMetricFamily("pop3sf_connections_open", "Connections open now.",
                                value=snap.get("connections", 0))
        for key, (name, text) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        for kind, name, text in (("login", "pop3sf_logins", "Successful logins."),
                                 ("login_failed", "pop3sf_login_failures",
                                  "Logins refused for wrong credentials.")):
            family = CounterMetricFamily(name, text, labels=["mechanism"])
            for key, n in sorted(stats.items()):
                word, _, mechanism = key.partition(" ")
                if word == kind and mechanism:
                    family.add_metric([mechanism], n)
            yield family
        family = CounterMetricFamily("pop3sf_commands", "POP3 commands received, by verb "
                                     "('(pipelined)': answered from the pipelining cache).",
                                     labels=["command"])
        for verb, n in sorted(snap.get("commands", {}).items()):
            family.add_metric([verb], n)
        yield family
        pools = snap.get("pools", {})
        latency = HistogramMetricFamily("pop3sf_adapter_call_seconds", "Adapter call duration "
                                        "from when a worker picked it up.", labels=["pool"])
        in_flight = GaugeMetricFamily("pop3sf_adapter_calls_in_flight",
                                      "Adapter calls submitted and not answered yet.",
                                      labels=["pool"])
        stuck = GaugeMetricFamily("pop3sf_adapter_calls_stuck",
                                  "Adapter calls past call_timeout whose thread has not "
                                  "returned.", labels=["pool"])
        for name, pool in sorted(pools.items()):
            running, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), pool.get("buckets", []),
                                strict=False):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric([name], buckets, pool.get("sum", 0.0))
            in_flight.add_metric([name], pool.get("in_flight", 0))
            stuck.add_metric([name], pool.get("stuck", 0))
        yield from (latency, in_flight, stuck)
        gate = snap.get("gate", {})
        yield GaugeMetricFamily("pop3sf_verifications_running",
                                "Password verifications running.", value=gate.get("running", 0))
        yield GaugeMetricFamily("pop3sf_verifications_waiting", "Password verifications waiting "
                                "for their address group's penalty or turn.",
                                value=gate.get("waiting", 0))
        penalties = snap.get("penalties", {})
        yield GaugeMetricFamily("pop3sf_penalty_table_entries",
                                "Address groups in the failed-login penalty table.",
                                value=penalties.get("entries", 0))
        yield CounterMetricFamily("pop3sf_penalty_failures", "Failed logins recorded in the "
                                  "penalty table (a repeated guess counts once).",
                                  value=penalties.get("failures", 0))
        if "processes" in snap:
            yield GaugeMetricFamily("pop3sf_processes", "Serving processes alive.",
                                    value=snap["processes"])
            yield CounterMetricFamily("pop3sf_process_restarts", "Serving processes restarted "
                                      "after they died.", value=snap.get("restarts", 0))


def render(snap: Snapshot, openmetrics: bool) -> tuple[bytes, str]:
    """(body, content type) in the text format the scraper asked for."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snap))
    if openmetrics:
        from prometheus_client.openmetrics import exposition as om
        return om.generate_latest(registry), om.CONTENT_TYPE_LATEST
    from prometheus_client import exposition
    return exposition.generate_latest(registry), exposition.CONTENT_TYPE_LATEST


class _Client:
    __slots__ = ("sock", "data", "out", "deadline")

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.data, self.out = sock, b"", b""
        self.deadline = time.monotonic() + CLIENT_TIMEOUT


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on the loop: non-blocking, one request per connection,
    at most MAX_CLIENTS at a time, each closed after CLIENT_TIMEOUT (checked by
    :meth:`expire`, which the owner's one-second tick calls, so it arms no timer)."""

    def __init__(self, loop: EventLoop, address: tuple[str, int],
                 source: Callable[[], Snapshot]) -> None:
        from .listeners import bind_address

        self.loop = loop
        self.source = source
        self.sock = bind_address(*address)
        self.clients: dict[socket.socket, _Client] = {}
        loop.selector.register(self.sock, selectors.EVENT_READ, self._accept)
        host, port = self.address
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def _accept(self, _mask: int) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self.clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            client = self.clients[sock] = _Client(sock)
            self.loop.selector.register(sock, selectors.EVENT_READ,
                                        lambda mask, c=client: self._ready(c, mask))

    def _ready(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_READ and not client.out:
            try:
                data = client.sock.recv(MAX_REQUEST)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(client)
                return
            client.data += data
            if b"\r\n\r\n" in client.data or b"\n\n" in client.data:
                client.out = self._respond(client.data)
                self.loop.selector.modify(client.sock, selectors.EVENT_WRITE,
                                          lambda m, c=client: self._ready(c, m))
            elif len(client.data) > MAX_REQUEST:
                self._drop(client)
                return
        if mask & selectors.EVENT_WRITE and client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(client)
                return
            client.out = client.out[sent:]
            if not client.out:
                self._drop(client)

    def _respond(self, request: bytes) -> bytes:
        head = request.split(b"\n", 1)[0].split()
        if len(head) < 2 or head[0] not in (b"GET", b"HEAD"):
            return _response(405, b"only GET\n", "text/plain")
        if head[1].split(b"?")[0] not in (b"/metrics", b"/"):
            return _response(404, b"try /metrics\n", "text/plain")
        wants_om = b"application/openmetrics-text" in request.lower()
        body, ctype = render(self.source(), wants_om)
        return _response(200, b"" if head[0] == b"HEAD" else body, ctype)

    def expire(self) -> None:
        now = time.monotonic()
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        if self.clients.pop(client.sock, None) is None:
            return
        try:
            self.loop.selector.unregister(client.sock)
        except (KeyError, ValueError, OSError):
            pass
        client.sock.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        try:
            self.loop.selector.unregister(self.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()


def _response(status: int, body: bytes, ctype: str) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    return (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def endpoint(loop: EventLoop, address: tuple[str, int],
             source: Callable[[], Snapshot]) -> MetricsServer | None:
    """The endpoint, or None with the reason logged when the address can't be bound (the
    server serves mail without it)."""
    try:
        return MetricsServer(loop, address, source)
    except OSError as exc:
        log.error("[metrics] listen: cannot listen on %s:%d: %s; serving without metrics",
                  address[0], address[1], exc.strerror or exc)
        return None


def serve_for(server: Any, address: tuple[str, int]) -> MetricsServer | None:
    """``[metrics] listen`` with one process: served on the server's own loop (expired by its
    tick)."""
    exporter = endpoint(server.loop, address, lambda: of_server(server))
    if exporter is not None:
        server.on_tick.append(exporter.expire)
    return exporter
