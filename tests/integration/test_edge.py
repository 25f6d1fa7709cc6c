"""The edge (cove.net.Edge) with real sockets, inside a network namespace the tests own.

The edge and its listeners run on an event loop inside the namespace (asyncio, and uvloop
for the data-path tests); clients and backends are plain blocking sockets made inside the
same namespace and driven from threads; HAProxy 2.6 is the real PROXY v2 peer. PROXY headers
are parsed with the independent ``proxyprotocol`` package, never with cove's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v2 import ProxyProtocolV2

from cove.net import Backend, BindError, Counters, Edge, Listener
from tests.integration.netns import (
    V4,
    V4_BACKEND,
    V4_CLIENT,
    V6,
    V6_BACKEND,
    V6_CLIENT,
    NetNS,
    NsLoop,
    skip_reason,
)

pytestmark = [
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(40),
]

LOOPS = ["asyncio", "uvloop"]
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_ports = itertools.count(21000)


def port() -> int:
    return next(_ports)


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNS]:
    n = NetNS()
    try:
        n.create()
    except subprocess.CalledProcessError as exc:
        n.delete()
        pytest.skip(f"ip netns is unavailable here: {exc.stderr.decode().strip()}")
    try:
        yield n
    finally:
        n.delete()


@pytest.fixture(params=["asyncio"])
def ev(ns: NetNS, request: pytest.FixtureRequest) -> Iterator[NsLoop]:
    """The event loop inside the namespace (parametrize ``ev`` indirectly for uvloop)."""
    with ns.loop(request.param) as loop:
        yield loop


class Edges:
    """Makes edges on the namespace's loop and closes them after the test."""

    def __init__(self, ev: NsLoop) -> None:
        self.ev = ev
        self.made: list[Edge] = []

    def __call__(self, listeners: list[Listener], **kw: Any) -> Edge:
        edge = Edge(**kw)
        self.made.append(edge)
        errors = self.ev.run(edge.apply(listeners))
        assert errors == []
        return edge

    def apply(self, edge: Edge, listeners: list[Listener]) -> list[BindError]:
        return self.ev.run(edge.apply(listeners))

    def counters(self, edge: Edge, endpoint: str = "ep_1") -> Counters:
        return self.ev.call(edge.counters)[endpoint]

    def active(self, edge: Edge, backend_id: str) -> int:
        return self.ev.call(lambda: edge.active(backend_id))

    def close(self) -> None:
        for edge in self.made:
            self.ev.run(edge.close())


@pytest.fixture
def edges(ev: NsLoop) -> Iterator[Edges]:
    e = Edges(ev)
    try:
        yield e
    finally:
        e.close()


class Server:
    """A blocking TCP server in the namespace: one thread per connection runs *handler*."""

    def __init__(
        self,
        ns: NetNS,
        host: str,
        port: int,
        handler: Callable[[socket.socket], None],
        rcvbuf: int | None = None,
    ) -> None:
        self.sock = ns.socket(family(host))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # inherited by the accepted sockets
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.handler = handler
        self.accepted = 0
        self.peers: list[Any] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.peers.append(peer)
            self._conns.append(conn)
            conn.settimeout(20)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self._conns:
            c.close()


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(
        ns: NetNS, host: str, port: int, handler: Callable[[socket.socket], None], **kw: Any
    ) -> Server:
        s = Server(ns, host, port, handler, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 18):
        conn.sendall(data)


def greeter(name: bytes) -> Callable[[socket.socket], None]:
    """Says its name first (the backend speaks before the client), then echoes."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(name + b"\n")
        echo(conn)

    return handler


def client(ns: NetNS, host: str, port: int, src: str | None = None, **opts: int) -> socket.socket:
    s = ns.socket(family(host))
    s.settimeout(10)
    for opt, value in opts.items():
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, opt), value)
    if src is not None:
        s.bind((src, 0))
    s.connect((host, port))
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_line(s: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_all(s: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := s.recv(1 << 18):
        buf += chunk
    return bytes(buf)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


def tcp(addr: str, p: int, *backends: Backend, proxy: bool = False, ep: str = "ep_1") -> Listener:
    return Listener(ep, "tcp", addr, p, proxy, tuple(backends))


def udp(addr: str, p: int, *backends: Backend, proxy: bool = False, ep: str = "ep_1") -> Listener:
    return Listener(ep, "udp", addr, p, proxy, tuple(backends))


def assert_reset(ns: NetNS, host: str, p: int) -> None:
    """A connection to host:p is reset (RST: not a clean EOF), wherever that shows up."""
    s = ns.socket(family(host))
    s.settimeout(10)
    try:
        with pytest.raises(ConnectionResetError):
            s.connect((host, p))
            s.sendall(b"anyone?")
            s.recv(100)
    finally:
        s.close()


def refused_port(ns: NetNS, host: str) -> int:
    """A port nothing listens on (connections to it are refused)."""
    s = ns.socket(family(host))
    s.bind((host, 0))
    p: int = s.getsockname()[1]
    s.close()
    return p


# -- TCP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_tcp_round_trip_over_ipv6_and_ipv4(ns: NetNS, edges: Edges, servers: Any) -> None:
    b6, b4, p6, p4 = port(), port(), port(), port()
    servers(ns, V6_BACKEND, b6, echo)
    servers(ns, V4_BACKEND, b4, echo)
    edge = edges(
        [
            tcp(V6, p6, Backend("ins_6", V6_BACKEND, b6)),
            tcp(V4, p4, Backend("ins_4", V4_BACKEND, b4)),
        ]
    )
    assert sorted(edge.bound()) == [("tcp", V4, p4), ("tcp", V6, p6)]
    for host, p in ((V6, p6), (V4, p4)):
        with client(ns, host, p) as c:
            c.sendall(b"hello " + host.encode())
            assert recv_exactly(c, 6 + len(host)) == b"hello " + host.encode()


def test_round_robin_over_two_backends(ns: NetNS, edges: Edges, servers: Any) -> None:
    ba, bb, p = port(), port(), port()
    a = servers(ns, V6_BACKEND, ba, greeter(b"a"))
    b = servers(ns, V6_BACKEND, bb, greeter(b"b"))
    edges([tcp(V6, p, Backend("ins_a", V6_BACKEND, ba), Backend("ins_b", V6_BACKEND, bb))])
    names = []
    for _ in range(6):
        with client(ns, V6, p) as c:
            names.append(recv_line(c))
    assert names == [b"a\n", b"b\n"] * 3
    assert (a.accepted, b.accepted) == (3, 3)


def test_removed_backend_gets_no_new_connections_but_its_open_one_keeps_working(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    ba, bb, p = port(), port(), port()
    a = servers(ns, V6_BACKEND, ba, greeter(b"a"))
    servers(ns, V6_BACKEND, bb, greeter(b"b"))
    ins_a, ins_b = Backend("ins_a", V6_BACKEND, ba), Backend("ins_b", V6_BACKEND, bb)
    edge = edges([tcp(V6, p, ins_a, ins_b)])
    old = client(ns, V6, p)
    assert recv_line(old) == b"a\n"
    assert edges.active(edge, "ins_a") == 1

    assert edges.apply(edge, [tcp(V6, p, ins_b)]) == []
    for _ in range(4):
        with client(ns, V6, p) as c:
            assert recv_line(c) == b"b\n"
    assert a.accepted == 1
    old.sendall(b"still there")
    assert recv_exactly(old, 11) == b"still there"
    assert edges.active(edge, "ins_a") == 1
    old.close()
    wait_until(lambda: edges.active(edge, "ins_a") == 0, what="ins_a idle")


def test_connect_retries_the_next_backend_when_one_refuses(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    good, p = port(), port()
    servers(ns, V6_BACKEND, good, greeter(b"good"))
    dead = Backend("ins_dead", V6_BACKEND, refused_port(ns, V6_BACKEND))
    edge = edges([tcp(V6, p, dead, Backend("ins_good", V6_BACKEND, good))])
    for _ in range(4):  # round-robin starts on the dead one every other time
        with client(ns, V6, p) as c:
            assert recv_line(c) == b"good\n"
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
    counters = edges.counters(edge)
    assert counters.connect_failures == 2
    assert counters.connections_total == 4
    assert edges.active(edge, "ins_dead") == 0


def test_all_backends_refusing_resets_the_client(ns: NetNS, edges: Edges) -> None:
    p = port()
    d1 = Backend("ins_1", V6_BACKEND, refused_port(ns, V6_BACKEND))
    d2 = Backend("ins_2", V4_BACKEND, refused_port(ns, V4_BACKEND))
    edge = edges([tcp(V6, p, d1, d2)])
    assert_reset(ns, V6, p)
    counters = edges.counters(edge)
    assert counters.connect_failures == 2
    assert counters.connections_total == 1
    wait_until(lambda: edges.counters(edge).connections_active == 0, what="connection ended")


def test_a_listener_without_backends_resets_and_counts_a_drop(ns: NetNS, edges: Edges) -> None:
    p = port()
    edge = edges([tcp(V4, p)])
    assert_reset(ns, V4, p)
    assert edges.counters(edge).dropped == 1


@contextlib.contextmanager
def unanswered_port(ns: NetNS) -> Iterator[int]:
    """A port whose listener's accept queue is full: the kernel drops further SYNs, so a
    connect to it hangs (no reset) until the connecting side gives up."""
    blocked = ns.socket(socket.AF_INET6)
    blocked.bind((V6_BACKEND, 0))
    blocked.listen(0)
    p: int = blocked.getsockname()[1]
    fillers = []
    for _ in range(3):
        f = ns.socket(socket.AF_INET6)
        f.setblocking(False)
        f.connect_ex((V6_BACKEND, p))
        fillers.append(f)
    time.sleep(0.2)
    try:
        yield p
    finally:
        for f in [*fillers, blocked]:
            f.close()


def test_a_slow_connect_times_out_and_the_next_backend_is_tried(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    good, p = port(), port()
    servers(ns, V6_BACKEND, good, greeter(b"good"))
    with unanswered_port(ns) as full:
        edge = edges(
            [
                tcp(
                    V6,
                    p,
                    Backend("ins_slow", V6_BACKEND, full),
                    Backend("ins_good", V6_BACKEND, good),
                )
            ],
            connect_timeout=0.3,
        )
        t0 = time.monotonic()
        with client(ns, V6, p) as c:
            assert recv_line(c) == b"good\n"
        assert 0.25 < time.monotonic() - t0 < 3
        assert edges.counters(edge).connect_failures == 1
        assert edges.active(edge, "ins_slow") == 0


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_what_the_client_sends_while_the_backend_connects_is_held_not_lost(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    good, p = port(), port()
    servers(ns, V6_BACKEND, good, echo)
    payload = os.urandom(3 << 20)
    with unanswered_port(ns) as full:
        edge = edges(
            [
                tcp(
                    V6,
                    p,
                    Backend("ins_slow", V6_BACKEND, full),
                    Backend("ins_good", V6_BACKEND, good),
                )
            ],
            connect_timeout=0.5,
        )
        with client(ns, V6, p) as c:

            def send() -> None:  # all of it while the edge still waits for ins_slow
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            got = recv_all(c)
            sender.join()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert edges.counters(edge).bytes_in == len(payload)


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_half_close_client_still_reads_the_full_reply(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    def digest_after_eof(conn: socket.socket) -> None:
        data = recv_all(conn)  # until the client's FIN, passed on by the edge
        reply = hashlib.sha256(data).hexdigest().encode() * 2000  # 128 KB
        conn.sendall(reply)

    b, p = port(), port()
    servers(ns, V4_BACKEND, b, digest_after_eof)
    edges([tcp(V6, p, Backend("ins_1", V4_BACKEND, b))])
    payload = os.urandom(300_000)
    with client(ns, V6, p) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        reply = recv_all(c)
    assert reply == hashlib.sha256(payload).hexdigest().encode() * 2000


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_a_large_transfer_both_ways_arrives_intact(ns: NetNS, edges: Edges, servers: Any) -> None:
    size = 64 << 20
    b, p = port(), port()
    servers(ns, V6_BACKEND, b, echo)
    edge = edges([tcp(V4, p, Backend("ins_1", V6_BACKEND, b))])
    data = os.urandom(1 << 20)
    sent = hashlib.sha256()
    got = hashlib.sha256()
    received = 0
    with client(ns, V4, p) as c:

        def send() -> None:
            for i in range(size >> 20):
                chunk = data[i:] + data[:i]
                sent.update(chunk)
                c.sendall(chunk)
            c.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        while chunk := c.recv(1 << 18):
            got.update(chunk)
            received += len(chunk)
        sender.join()
    assert received == size
    assert got.hexdigest() == sent.hexdigest()
    counters = edges.counters(edge)
    assert (counters.bytes_in, counters.bytes_out) == (size, size)


# Bound on what may sit between a stalled reader and a fast writer: the edge's own buffer
# (HIGH_WATER 256 KiB + a read) plus the kernel's socket buffers on the way, which
# autotune up to net.ipv4.tcp_wmem/tcp_rmem max (4 MiB and 6 MiB by default). Without
# backpressure the edge reads at loopback speed: hundreds of MiB in the same time.
IN_FLIGHT_BOUND = 24 << 20


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_a_slow_client_bounds_what_the_edge_reads_from_the_backend(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    pushed = [0]
    chunk = os.urandom(1 << 16)

    def firehose(conn: socket.socket) -> None:
        conn.settimeout(3)
        try:
            while pushed[0] < 1 << 30:
                conn.sendall(chunk)
                pushed[0] += len(chunk)
        except OSError:
            pass

    b, p = port(), port()
    servers(ns, V6_BACKEND, b, firehose)
    edge = edges([tcp(V6, p, Backend("ins_1", V6_BACKEND, b))])
    with client(ns, V6, p, SO_RCVBUF=1 << 16) as c:
        time.sleep(1.5)  # the client reads nothing meanwhile
        stalled = edges.counters(edge).bytes_out
        assert stalled < IN_FLIGHT_BOUND, f"edge read {stalled} bytes from the backend"
        time.sleep(0.5)
        assert edges.counters(edge).bytes_out - stalled < 1 << 20  # it really stalled
        # reading again resumes the flow
        received = len(recv_exactly(c, stalled + (8 << 20)))
    assert received == stalled + (8 << 20)


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_a_slow_backend_bounds_what_the_edge_reads_from_the_client(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    go = threading.Event()
    drained = [0]

    def sleepy(conn: socket.socket) -> None:
        go.wait(10)
        while data := conn.recv(1 << 18):
            drained[0] += len(data)

    b, p = port(), port()
    servers(ns, V4_BACKEND, b, sleepy, rcvbuf=1 << 16)
    edge = edges([tcp(V4, p, Backend("ins_1", V4_BACKEND, b))])
    with client(ns, V4, p) as c:
        c.settimeout(1.5)
        pushed = 0
        chunk = os.urandom(1 << 16)
        with pytest.raises(TimeoutError):
            while True:
                c.send(chunk)  # blocks (and times out) once everything on the way is full
                pushed += len(chunk)
        stalled = edges.counters(edge).bytes_in
        assert stalled < IN_FLIGHT_BOUND, f"edge read {stalled} bytes from the client"
        assert pushed < IN_FLIGHT_BOUND + (8 << 20)
        go.set()
        c.shutdown(socket.SHUT_WR)
    wait_until(lambda: drained[0] == edges.counters(edge).bytes_in, what="backend drained")
    assert drained[0] >= stalled


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_a_reset_on_one_side_resets_the_other(ns: NetNS, edges: Edges, servers: Any) -> None:
    backend_saw: list[str] = []

    def resets_after_hello(conn: socket.socket) -> None:
        data = conn.recv(100)
        if data == b"reset me":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            return  # closed with RST by the Server
        try:
            while conn.recv(100):
                pass
            backend_saw.append("eof")
        except ConnectionResetError:
            backend_saw.append("reset")

    b, p = port(), port()
    servers(ns, V6_BACKEND, b, resets_after_hello)
    edge = edges([tcp(V6, p, Backend("ins_1", V6_BACKEND, b))])
    with client(ns, V6, p) as c:  # the backend resets: so does the client's connection
        c.sendall(b"reset me")
        with pytest.raises(ConnectionResetError):
            c.recv(100)
    c = client(ns, V6, p)  # the client resets: so does the backend's
    c.sendall(b"hello")
    wait_until(lambda: edges.active(edge, "ins_1") == 1, what="connected")
    time.sleep(0.1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    c.close()
    wait_until(lambda: backend_saw == ["reset"], what="backend reset")
    wait_until(lambda: edges.active(edge, "ins_1") == 0, what="both closed")


def test_close_aborts_connections_and_stops_listening(
    ns: NetNS, ev: NsLoop, servers: Any, udp_servers: Any
) -> None:
    b, p, pu = port(), port(), port()
    servers(ns, V6_BACKEND, b, echo)
    udp_servers(ns, V6_BACKEND, b)
    backend = Backend("ins_1", V6_BACKEND, b)
    edge = Edge()
    assert ev.run(edge.apply([tcp(V6, p, backend), udp(V6, pu, backend)])) == []
    c = client(ns, V6, p)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    with udp_client(ns, V6) as u:
        u.sendto(b"x", (V6, pu))
        assert u.recvfrom(10)[0] == b"re:x"
    assert ev.call(lambda: edge.active("ins_1")) == 2
    ev.run(edge.close())
    assert edge.bound() == []
    assert ev.call(lambda: edge.active("ins_1")) == 0
    counters = ev.call(edge.counters)["ep_1"]
    assert (counters.connections_active, counters.udp_flows_active) == (0, 0)
    try:
        assert c.recv(10) == b""
    except ConnectionResetError:
        pass
    c.close()
    with pytest.raises(ConnectionRefusedError):
        client(ns, V6, p)


def test_the_command_line_runner(ns: NetNS, servers: Any) -> None:
    b, p = port(), port()
    servers(ns, V6_BACKEND, b, echo)
    proc = ns.popen(
        [sys.executable, "-m", "cove.net", "--tcp", f"[{V6}]:{p}=[{V6_BACKEND}]:{b}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        with client(ns, V6, p) as c:
            c.sendall(b"hello")
            assert recv_exactly(c, 5) == b"hello"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert '"bytes_in": 5' in err.decode()

    bad = subprocess.run(
        [sys.executable, "-m", "cove.net", "--tcp", "[::1]:80=nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "expected ADDR:PORT" in bad.stderr


def test_counters_are_exact_for_a_known_transfer(ns: NetNS, edges: Edges, servers: Any) -> None:
    def reply_2500(conn: socket.socket) -> None:
        assert len(recv_exactly(conn, 1000)) == 1000
        conn.sendall(b"r" * 2500)

    b, p = port(), port()
    servers(ns, V6_BACKEND, b, reply_2500)
    edge = edges([tcp(V6, p, Backend("ins_1", V6_BACKEND, b))])
    for _ in range(3):
        with client(ns, V6, p) as c:
            c.sendall(b"q" * 1000)
            assert len(recv_all(c)) == 2500
    wait_until(lambda: edges.counters(edge).connections_active == 0, what="connections ended")
    assert edges.counters(edge) == Counters(
        connections_total=3, connections_active=0, bytes_in=3000, bytes_out=7500
    )
    assert edges.active(edge, "ins_1") == 0


def test_drain_waits_for_the_open_connection_and_times_out(
    ns: NetNS, ev: NsLoop, edges: Edges, servers: Any
) -> None:
    b, p = port(), port()
    servers(ns, V6_BACKEND, b, echo)
    edge = edges([tcp(V6, p, Backend("ins_1", V6_BACKEND, b))])
    assert ev.run(edge.drain("ins_1", 0.1)) is True  # nothing open
    c = client(ns, V6, p)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    t0 = time.monotonic()
    assert ev.run(edge.drain("ins_1", 0.3)) is False
    assert time.monotonic() - t0 >= 0.25
    c.sendall(b"y")  # drain closed nothing
    assert recv_exactly(c, 1) == b"y"

    waiting = asyncio.run_coroutine_threadsafe(edge.drain("ins_1", 10), ev.loop)
    time.sleep(0.2)
    assert not waiting.done()
    t0 = time.monotonic()
    c.close()
    assert waiting.result(5) is True
    assert time.monotonic() - t0 < 2


def test_a_removed_listener_stops_accepting_while_its_connection_goes_on(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    b, p = port(), port()
    servers(ns, V6_BACKEND, b, echo)
    listener = tcp(V6, p, Backend("ins_1", V6_BACKEND, b))
    edge = edges([listener])
    old = client(ns, V6, p)
    old.sendall(b"a")
    assert recv_exactly(old, 1) == b"a"

    assert edges.apply(edge, []) == []
    assert edge.bound() == []
    with pytest.raises(ConnectionRefusedError):
        client(ns, V6, p)
    old.sendall(b"b")
    assert recv_exactly(old, 1) == b"b"
    # bound again while the old connection is still open (SO_REUSEADDR)
    assert edges.apply(edge, [listener]) == []
    with client(ns, V6, p) as c:
        c.sendall(b"c")
        assert recv_exactly(c, 1) == b"c"
    old.close()


def test_changed_backends_and_proxy_flag_apply_to_new_connections_without_rebinding(
    ns: NetNS, edges: Edges, servers: Any
) -> None:
    received: dict[int, list[bytes]] = {}

    def capture(conn: socket.socket) -> None:
        mine = received.setdefault(conn.getsockname()[1], [])
        while data := conn.recv(1 << 16):
            mine.append(data)
            conn.sendall(b"ok")

    b1, b2, p = port(), port(), port()
    servers(ns, V6_BACKEND, b1, capture)
    s2 = servers(ns, V6_BACKEND, b2, capture)
    edge = edges([tcp(V6, p, Backend("ins_1", V6_BACKEND, b1))])
    old = client(ns, V6, p)  # connected before the change; stays open across it
    old.sendall(b"before")
    assert recv_exactly(old, 2) == b"ok"
    assert edges.apply(edge, [tcp(V6, p, Backend("ins_2", V6_BACKEND, b2), proxy=True)]) == []
    assert edge.bound() == [("tcp", V6, p)]
    with client(ns, V6, p, src=V6_CLIENT) as c:
        c.sendall(b"hi")
        assert recv_exactly(c, 2) == b"ok"
        me = c.getsockname()
    assert s2.accepted == 1
    wait_until(lambda: len(b"".join(received[b2])) == 16 + 36 + 2, what="all of it at ins_2")
    first = b"".join(received[b2])
    parser = ProxyProtocolV2()
    header = parser.unpack_header(first[:16])
    result = parser.unpack_data(header, first[:16], first[16 : 16 + header.data_len])
    assert isinstance(result, ProxyResultIPv6)
    assert (str(result.source[0]), result.source[1]) == (V6_CLIENT, me[1])
    assert (str(result.dest[0]), result.dest[1]) == (V6, p)
    assert first[16 + header.data_len :] == b"hi"
    old.sendall(b"after")  # the connection from before the change still reaches ins_1
    assert recv_exactly(old, 2) == b"ok"
    assert received[b1] == [b"before", b"after"]  # and without a header
    old.close()


def test_a_bind_error_is_reported_without_affecting_the_other_listener(
    ns: NetNS, ev: NsLoop, edges: Edges, servers: Any
) -> None:
    b, taken, free = port(), port(), port()
    servers(ns, V6_BACKEND, b, echo)
    squatter = ns.socket(socket.AF_INET6)
    squatter.bind((V6, taken))
    squatter.listen(1)
    backend = Backend("ins_1", V6_BACKEND, b)
    want = [tcp(V6, taken, backend, ep="ep_a"), tcp(V6, free, backend, ep="ep_b")]
    edge = Edge()
    try:
        errors = ev.run(edge.apply(want))
        assert [(e.endpoint, e.protocol, e.address, e.port) for e in errors] == [
            ("ep_a", "tcp", V6, taken)
        ]
        assert "in use" in errors[0].message
        assert edge.bound() == [("tcp", V6, free)]
        with client(ns, V6, free) as c:
            c.sendall(b"ok")
            assert recv_exactly(c, 2) == b"ok"
        squatter.close()
        assert ev.run(edge.apply(want)) == []  # retried on the next apply
        assert sorted(edge.bound()) == sorted([("tcp", V6, free), ("tcp", V6, taken)])
    finally:
        squatter.close()
        ev.run(edge.close())


def test_listeners_that_cannot_be_bound_at_all_are_reported(ns: NetNS, ev: NsLoop) -> None:
    b = Backend("ins_1", V6_BACKEND, 9)
    edge = Edge()
    try:
        errors = ev.run(
            edge.apply(
                [
                    tcp("not-an-ip", 80, b),
                    tcp(V6, 0, b),
                    tcp(V6, 70000, b),
                    Listener("ep_1", "sctp", V6, 80, False, (b,)),  # type: ignore[arg-type]
                    tcp(V6, port(), b, ep="ep_dup"),
                ]
            )
        )
        messages = [e.message for e in errors]
        assert "is not an IP address" in messages[0]
        assert "out of range" in messages[1] and "out of range" in messages[2]
        assert "unknown protocol" in messages[3]
        assert len(errors) == 4
        assert len(edge.bound()) == 1
    finally:
        ev.run(edge.close())


def test_a_listener_on_an_address_not_configured_yet_binds(ns: NetNS, edges: Edges) -> None:
    # IP_FREEBIND / IPV6_FREEBIND: the endpoint address may come up after the listener
    edge = edges([tcp("fd5e:c0e:ed9e:1::99", port()), tcp("10.251.78.99", port())])
    assert len(edge.bound()) == 2


# -- PROXY protocol v2 with HAProxy -------------------------------------------------------

HAPROXY_CFG = """\
global
    maxconn 100
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend whoami
    bind [::1]:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "{fmt}"
"""
WHOAMI = "%[src] %[src_port] %[dst] %[dst_port]"


@pytest.fixture
def haproxy(ns: NetNS, tmp_path: Path) -> Iterator[int]:
    """HAProxy (http mode, ``accept-proxy``) inside the namespace; yields its port."""
    exe = shutil.which("haproxy")
    assert exe, "haproxy is not installed (bash scripts/setup.sh installs it)"
    p = port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=p, fmt=WHOAMI))
    proc = ns.popen([exe, "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            s = ns.socket(socket.AF_INET6)
            try:
                return s.connect_ex((V6_BACKEND, p)) == 0
            finally:
                s.close()

        wait_until(up, timeout=10, what="haproxy listening")
        yield p
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_get(s: socket.socket) -> tuple[bytes, bytes]:
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = recv_all(s).partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_proxy_v2_headers_carry_the_exact_client_and_endpoint_to_haproxy(
    ns: NetNS, edges: Edges, haproxy: int
) -> None:
    p6, p4 = port(), port()
    backend = Backend("ins_1", V6_BACKEND, haproxy)
    edges([tcp(V6, p6, backend, proxy=True), tcp(V4, p4, backend, proxy=True)])
    for src, dst, p in ((V6_CLIENT, V6, p6), (V4_CLIENT, V4, p4)):
        with client(ns, dst, p, src=src) as c:
            me = c.getsockname()
            status, body = http_get(c)
        assert status == b"HTTP/1.0 200 OK" or status.endswith(b" 200 OK"), status
        assert body.decode() == f"{src} {me[1]} {dst} {p}"


def test_without_proxy_v2_haproxy_refuses_the_connection(
    ns: NetNS, edges: Edges, haproxy: int
) -> None:
    # the control: HAProxy's accept-proxy really checks the header
    p = port()
    edges([tcp(V6, p, Backend("ins_1", V6_BACKEND, haproxy))])
    with client(ns, V6, p) as c:
        try:
            status, _ = http_get(c)
        except ConnectionResetError:
            status = b""
    assert b"200" not in status


# -- UDP ---------------------------------------------------------------------------------


class UdpServer:
    """A blocking UDP server in the namespace: answers b"re:" + what it got."""

    def __init__(self, ns: NetNS, host: str, port: int) -> None:
        self.sock = ns.socket(family(host), socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.got: list[tuple[bytes, Any]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.got.append((data, peer))
            payload = data
            if data.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):
                header = ProxyProtocolV2().unpack_header(data[:16])
                payload = data[16 + header.data_len :]
            self.sock.sendto(b"re:" + payload, peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp_servers() -> Iterator[Callable[[NetNS, str, int], UdpServer]]:
    made: list[UdpServer] = []

    def make(ns: NetNS, host: str, p: int) -> UdpServer:
        s = UdpServer(ns, host, p)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def udp_client(ns: NetNS, host: str, src: str | None = None) -> socket.socket:
    s = ns.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(5)
    s.bind((src or ("::" if ":" in host else "0.0.0.0"), 0))
    return s


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_udp_round_trip_replies_come_from_the_endpoint_address(
    ns: NetNS, edges: Edges, udp_servers: Any
) -> None:
    b6, b4, p6, p4 = port(), port(), port(), port()
    udp_servers(ns, V6_BACKEND, b6)
    udp_servers(ns, V4_BACKEND, b4)
    edge = edges(
        [
            udp(V6, p6, Backend("ins_6", V6_BACKEND, b6)),
            udp(V4, p4, Backend("ins_4", V4_BACKEND, b4)),
        ]
    )
    for host, p in ((V6, p6), (V4, p4)):
        with udp_client(ns, host) as c:
            for i in range(3):
                c.sendto(b"ping%d" % i, (host, p))
                data, frm = c.recvfrom(100)
                assert data == b"re:ping%d" % i
                assert (frm[0], frm[1]) == (host, p)
    counters = edges.counters(edge)
    assert (counters.packets_in, counters.packets_out) == (6, 6)
    assert (counters.bytes_in, counters.bytes_out) == (30, 48)
    assert (counters.udp_flows_total, counters.udp_flows_active) == (2, 2)


def test_udp_two_clients_get_separate_flows(ns: NetNS, edges: Edges, udp_servers: Any) -> None:
    b, p = port(), port()
    server = udp_servers(ns, V6_BACKEND, b)
    edge = edges([udp(V6, p, Backend("ins_1", V6_BACKEND, b))])
    c1, c2 = udp_client(ns, V6), udp_client(ns, V6)
    for _ in range(2):
        for name, c in ((b"one", c1), (b"two", c2)):
            c.sendto(name, (V6, p))
            assert c.recvfrom(100)[0] == b"re:" + name
    peers = {peer[1] for _, peer in server.got}
    assert len(peers) == 2  # one flow socket per client
    assert edges.active(edge, "ins_1") == 2
    assert edges.counters(edge).udp_flows_total == 2
    c1.close()
    c2.close()


def test_udp_idle_timeout_ends_a_flow(ns: NetNS, edges: Edges, udp_servers: Any) -> None:
    b, p = port(), port()
    udp_servers(ns, V4_BACKEND, b)
    edge = edges([udp(V4, p, Backend("ins_1", V4_BACKEND, b))], udp_idle_timeout=0.4)
    with udp_client(ns, V4) as c:
        for _ in range(4):  # traffic keeps the flow alive past the timeout
            c.sendto(b"x", (V4, p))
            assert c.recvfrom(10)[0] == b"re:x"
            time.sleep(0.15)
        assert edges.counters(edge).udp_flows_active == 1
        wait_until(lambda: edges.active(edge, "ins_1") == 0, timeout=2, what="flow expired")
        counters = edges.counters(edge)
        assert (counters.udp_flows_active, counters.udp_flows_total) == (0, 1)
        c.sendto(b"y", (V4, p))  # the same client again: a new flow
        assert c.recvfrom(10)[0] == b"re:y"
    assert edges.counters(edge).udp_flows_total == 2


@pytest.mark.parametrize("ev", LOOPS, indirect=True)
def test_udp_proxy_v2_prefixes_each_datagram(ns: NetNS, edges: Edges, udp_servers: Any) -> None:
    b, p6, p4 = port(), port(), port()
    server = udp_servers(ns, V6_BACKEND, b)
    backend = Backend("ins_1", V6_BACKEND, b)
    edge = edges([udp(V6, p6, backend, proxy=True), udp(V4, p4, backend, proxy=True)])
    expected: list[tuple[type, str, int, str, int, bytes]] = []
    for src, dst, p, kind in (
        (V6_CLIENT, V6, p6, ProxyResultIPv6),
        (V4_CLIENT, V4, p4, ProxyResultIPv4),
    ):
        with udp_client(ns, dst, src=src) as c:
            me = c.getsockname()
            for payload in (b"first", b"second"):
                c.sendto(payload, (dst, p))
                assert c.recvfrom(100)[0] == b"re:" + payload
                expected.append((kind, src, me[1], dst, p, payload))
    parser = ProxyProtocolV2()
    seen = []
    for data, _ in server.got:
        header = parser.unpack_header(data[:16])
        result = parser.unpack_data(header, data[:16], data[16 : 16 + header.data_len])
        assert isinstance(result, (ProxyResultIPv4, ProxyResultIPv6))
        assert result.protocol == socket.SOCK_DGRAM
        seen.append(
            (
                type(result),
                str(result.source[0]),
                result.source[1],
                str(result.dest[0]),
                result.dest[1],
                data[16 + header.data_len :],
            )
        )
    assert seen == expected
    assert edges.counters(edge).bytes_in == 2 * len(b"firstsecond")  # headers not counted


def test_udp_flow_table_full_drops_new_flows(ns: NetNS, edges: Edges, udp_servers: Any) -> None:
    b, p = port(), port()
    udp_servers(ns, V6_BACKEND, b)
    edge = edges([udp(V6, p, Backend("ins_1", V6_BACKEND, b))], udp_max_flows=1)
    c1, c2 = udp_client(ns, V6), udp_client(ns, V6)
    c1.sendto(b"a", (V6, p))
    assert c1.recvfrom(10)[0] == b"re:a"
    c2.settimeout(0.3)
    c2.sendto(b"b", (V6, p))
    with pytest.raises(TimeoutError):
        c2.recvfrom(10)
    c1.sendto(b"c", (V6, p))  # the existing flow is unaffected
    assert c1.recvfrom(10)[0] == b"re:c"
    counters = edges.counters(edge)
    assert (counters.dropped, counters.udp_flows_total) == (1, 1)
    c1.close()
    c2.close()


def test_udp_flows_on_a_removed_backend_live_until_idle(
    ns: NetNS, edges: Edges, udp_servers: Any
) -> None:
    ba, bb, p = port(), port(), port()
    a = udp_servers(ns, V4_BACKEND, ba)
    b = udp_servers(ns, V4_BACKEND, bb)
    ins_a, ins_b = Backend("ins_a", V4_BACKEND, ba), Backend("ins_b", V4_BACKEND, bb)
    edge = edges([udp(V4, p, ins_a)], udp_idle_timeout=0.5)
    old = udp_client(ns, V4)
    old.sendto(b"1", (V4, p))
    assert old.recvfrom(10)[0] == b"re:1"
    assert edges.apply(edge, [udp(V4, p, ins_b)]) == []
    with udp_client(ns, V4) as new:
        new.sendto(b"2", (V4, p))
        assert new.recvfrom(10)[0] == b"re:2"
    old.sendto(b"3", (V4, p))  # still the old flow, to ins_a
    assert old.recvfrom(10)[0] == b"re:3"
    assert [d for d, _ in a.got] == [b"1", b"3"]
    assert [d for d, _ in b.got] == [b"2"]
    wait_until(lambda: edges.active(edge, "ins_a") == 0, timeout=3, what="old flow idle")
    old.sendto(b"4", (V4, p))  # a new flow now: the current backend set
    assert old.recvfrom(10)[0] == b"re:4"
    assert [d for d, _ in b.got] == [b"2", b"4"]
    old.close()


def test_a_removed_udp_listener_keeps_its_flows_until_idle(
    ns: NetNS, edges: Edges, udp_servers: Any
) -> None:
    b, p = port(), port()
    udp_servers(ns, V6_BACKEND, b)
    listener = udp(V6, p, Backend("ins_1", V6_BACKEND, b))
    edge = edges([listener], udp_idle_timeout=0.5)
    old = udp_client(ns, V6)
    old.sendto(b"1", (V6, p))
    assert old.recvfrom(10)[0] == b"re:1"
    assert edges.apply(edge, []) == []
    assert edge.bound() == []
    old.sendto(b"2", (V6, p))  # its flow goes on
    assert old.recvfrom(10)[0] == b"re:2"
    with udp_client(ns, V6) as new:  # no new flows
        new.settimeout(0.3)
        new.sendto(b"3", (V6, p))
        with pytest.raises(TimeoutError):
            new.recvfrom(10)
    wait_until(lambda: edges.active(edge, "ins_1") == 0, timeout=3, what="flow idle")
    assert edges.apply(edge, [listener]) == []  # the port is free to bind again
    old.sendto(b"4", (V6, p))
    assert old.recvfrom(10)[0] == b"re:4"
    old.close()
