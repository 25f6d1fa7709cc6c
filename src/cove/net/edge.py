"""The edge: an L4 proxy (TCP and UDP) from endpoint addresses to the Ready instances.

``Edge.apply`` reconciles the listeners, keyed by (protocol, address, port): new keys are
bound, removed keys stop accepting (their connections and flows go on until they end), and a
kept key takes its new backends and PROXY flag for the connections that come next.

TCP: one pair of asyncio Protocols per connection (``_Conn`` on the client side,
``_BackendLeg`` on the backend side); each ``data_received`` is handed to the other
transport's ``write`` as it is. Backends are tried round-robin, each at most once per
connection; the client is not read until a backend is connected, so nothing it sent early is
lost. Half-close is passed on (EOF -> ``write_eof``), a reset or error on one side aborts the
other with a reset, and a write buffer over ``HIGH_WATER`` pauses reading on the other side.

UDP: one flow per client (address, port), a connected UDP socket to the backend picked when
the flow starts; replies leave through the listener's socket, so they come from the
endpoint address. A flow ends after ``udp_idle_timeout`` without traffic either way.

With ``proxy_protocol`` a PROXY v2 header (``cove.net.proxyv2``) goes first on each TCP
connection, and before each datagram of a UDP flow.

Choices, measured or forced:

- plain ``Protocol`` (``data_received``), not ``BufferedProtocol``: on loopback with uvloop a
  ``get_buffer`` proxy moved no more (~10 Gbit/s both), and it needs a buffer per direction
  and connection;
- TCP_NODELAY: both asyncio and uvloop set it on every TCP transport they make;
- SO_REUSEADDR on TCP listeners only: on UDP it would let another socket share the port
  without a bind error;
- UDP flows use a connected socket watched with ``loop.add_reader`` (no transport): a flow
  starts synchronously, with the datagram that opened it;
- ``udp_max_flows`` counts the flows of all UDP listeners of the edge (it bounds sockets);
- a removed UDP listener keeps its socket while its flows last (the replies leave through
  it) but takes no new flows; applying the same key again takes it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from cove.net import proxyv2

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78  # linux/in6.h; not exported by the socket module
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
HIGH_WATER = 256 * 1024  # a transport's write buffer above this pauses the other side
EARLY_LIMIT = 64 * 1024  # what a client may send before its backend is connected, unpaused
UDP_BATCH = 64  # datagrams read from a flow's socket per wakeup
UDP_RECV = 65535
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

Key = tuple[str, str, int]  # (protocol, normalised address, port)


@dataclass(frozen=True, slots=True)
class Backend:
    """One Ready instance of an endpoint."""

    id: str  # instance id, e.g. "ins_01..."
    host: str  # IPv4 or IPv6 literal
    port: int


@dataclass(frozen=True, slots=True)
class Listener:
    """One endpoint address and port to listen on, and where its traffic goes."""

    endpoint: str  # endpoint id, e.g. "ep_01..."
    protocol: Literal["tcp", "udp"]
    address: str  # IP literal to bind (v4 or v6)
    port: int
    proxy_protocol: bool  # send a PROXY v2 header to backends
    backends: tuple[Backend, ...]  # the Ready set, in order


@dataclass
class Counters:
    """Traffic of one endpoint, summed over its listeners, since the edge started."""

    connections_total: int = 0  # tcp connections accepted
    connections_active: int = 0
    connect_failures: int = 0  # backend connect attempts that failed
    bytes_in: int = 0  # client -> backend payload (tcp + udp, PROXY headers excluded)
    bytes_out: int = 0  # backend -> client
    udp_flows_total: int = 0
    udp_flows_active: int = 0
    packets_in: int = 0
    packets_out: int = 0
    dropped: int = 0  # connections/packets refused: no backend, flow table full


@dataclass(frozen=True, slots=True)
class BindError:
    """A listener that could not be bound (retried on the next ``apply``)."""

    endpoint: str
    protocol: str
    address: str
    port: int
    message: str


class Edge:
    """The proxy. Create and use it on one running event loop (asyncio or uvloop)."""

    def __init__(
        self,
        *,
        connect_timeout: float = 3.0,
        udp_idle_timeout: float = 60.0,
        udp_max_flows: int = 10_000,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_max_flows = udp_max_flows  # over all UDP listeners of this edge
        self._tcp: dict[Key, _TcpListener] = {}
        self._udp: dict[Key, _UdpListener] = {}
        self._udp_retiring: dict[Key, _UdpListener] = {}  # removed, flows still open
        self._counters: dict[str, Counters] = {}
        self._active: dict[str, int] = {}  # backend id -> open connections + flows
        self._drain_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._conns: set[_Conn] = set()
        self._flows = 0
        self._lock: asyncio.Lock | None = None
        self._closed = False

    # -- the interface ------------------------------------------------------------------

    async def apply(self, listeners: Iterable[Listener]) -> list[BindError]:
        """Converge the bound listeners on *listeners*; return those that could not bind."""
        if self._closed:
            raise RuntimeError("the edge is closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await self._apply(list(listeners))

    def counters(self) -> dict[str, Counters]:
        """A snapshot per endpoint id (endpoints no longer applied keep their totals)."""
        return {ep: dataclasses.replace(c) for ep, c in self._counters.items()}

    def active(self, backend_id: str) -> int:
        """Open TCP connections (and connect attempts) plus UDP flows to *backend_id*."""
        return self._active.get(backend_id, 0)

    async def drain(self, backend_id: str, timeout: float) -> bool:
        """Wait until nothing is open to *backend_id*; False if *timeout* s passed first.

        Only waits: stopping new traffic to the backend is ``apply``'s job."""
        if not self._active.get(backend_id):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._drain_waiters.setdefault(backend_id, [])
        waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            if fut in waiters:  # (still there when it timed out)
                waiters.remove(fut)
                if not waiters and self._drain_waiters.get(backend_id) is waiters:
                    del self._drain_waiters[backend_id]

    def bound(self) -> list[tuple[str, str, int]]:
        """(protocol, address, port) of the applied listeners that are bound, sorted.

        A removed UDP listener keeps its socket (not listed) until its last flow ends."""
        return sorted([*self._tcp, *self._udp])

    async def close(self) -> None:
        """Stop every listener, abort every connection and close every flow."""
        self._closed = True
        for tcp in self._tcp.values():
            tcp.stop()
        self._tcp.clear()
        for udp in [*self._udp.values(), *self._udp_retiring.values()]:
            udp.close()
        self._udp.clear()
        self._udp_retiring.clear()
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        tasks = [c.task for c in conns if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        # connection_lost arrives on a later loop iteration
        for _ in range(100):
            if not self._conns:
                break
            await asyncio.sleep(0.01)
        for waiters in self._drain_waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    # -- reconcile ----------------------------------------------------------------------

    async def _apply(self, listeners: list[Listener]) -> list[BindError]:
        errors: list[BindError] = []
        want: dict[Key, Listener] = {}
        for spec in listeners:
            problem = _invalid(spec)
            if problem is None:
                key = _key(spec)
                if key in want:
                    problem = f"{key[0]} {key[1]} port {key[2]} is listed twice"
                else:
                    want[key] = spec
            if problem is not None:
                errors.append(_bind_error(spec, problem))
        for key in [k for k in self._tcp if k not in want]:
            log.info("stop listening on %s [%s]:%d", *key)
            self._tcp.pop(key).stop()
        for key in [k for k in self._udp if k not in want]:
            log.info("stop listening on %s [%s]:%d", *key)
            udp = self._udp.pop(key)
            if udp.retire():
                self._udp_retiring[key] = udp
        for key, spec in want.items():
            counters = self._counters.setdefault(spec.endpoint, Counters())
            current: _TcpListener | _UdpListener | None
            current = self._tcp.get(key) if key[0] == "tcp" else self._udp.get(key)
            if current is None and key in self._udp_retiring:
                current = self._udp[key] = self._udp_retiring.pop(key)
                current.retiring = False
            if current is not None:
                current.update(spec, counters)
                continue
            try:
                if key[0] == "tcp":
                    self._tcp[key] = await self._bind_tcp(key, spec, counters)
                else:
                    self._udp[key] = await self._bind_udp(key, spec, counters)
            except OSError as exc:
                log.warning("cannot listen on %s [%s]:%d: %s", *key, exc.strerror or exc)
                errors.append(_bind_error(spec, exc.strerror or str(exc)))
                continue
            log.info("listening on %s [%s]:%d for %s", *key, spec.endpoint)
        return errors

    async def _bind_tcp(self, key: Key, spec: Listener, counters: Counters) -> _TcpListener:
        sock = _listen_socket(key, socket.SOCK_STREAM)
        lst = _TcpListener(self, key, spec, counters)
        try:
            lst.server = await lst.loop.create_server(
                functools.partial(_Conn, lst), sock=sock, backlog=BACKLOG
            )
        except BaseException:
            sock.close()
            raise
        return lst

    async def _bind_udp(self, key: Key, spec: Listener, counters: Counters) -> _UdpListener:
        sock = _listen_socket(key, socket.SOCK_DGRAM)
        lst = _UdpListener(self, key, spec, counters)
        try:
            await lst.loop.create_datagram_endpoint(lambda: lst, sock=sock)
        except BaseException:
            sock.close()
            raise
        return lst

    # -- per-backend accounting ---------------------------------------------------------

    def _hold(self, backend_id: str) -> None:
        self._active[backend_id] = self._active.get(backend_id, 0) + 1

    def _release(self, backend_id: str) -> None:
        n = self._active[backend_id] - 1
        if n:
            self._active[backend_id] = n
            return
        del self._active[backend_id]
        for fut in self._drain_waiters.pop(backend_id, ()):
            if not fut.done():
                fut.set_result(None)

    def _retired(self, udp: _UdpListener) -> None:
        if self._udp_retiring.get(udp.key) is udp:
            del self._udp_retiring[udp.key]


def _invalid(spec: Listener) -> str | None:
    if spec.protocol not in ("tcp", "udp"):
        return f"unknown protocol {spec.protocol!r} (tcp or udp)"
    try:
        ipaddress.ip_address(spec.address)
    except ValueError:
        return f"{spec.address!r} is not an IP address"
    if not 1 <= spec.port <= 65535:
        return f"port {spec.port} is out of range (1-65535)"
    return None


def _key(spec: Listener) -> Key:
    return (spec.protocol, ipaddress.ip_address(spec.address).compressed, spec.port)


def _bind_error(spec: Listener, message: str) -> BindError:
    return BindError(spec.endpoint, spec.protocol, spec.address, spec.port, message)


def _listen_socket(key: Key, kind: socket.SocketKind) -> socket.socket:
    """A bound, non-blocking socket for *key* (FREEBIND: the address need not be up yet)."""
    _, address, port = key
    v6 = ":" in address
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        if kind == socket.SOCK_STREAM:
            # (not on UDP: there it would let another socket share the port unnoticed)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.setblocking(False)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _reset(transport: asyncio.Transport) -> None:
    """Close *transport* with a TCP RST."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class _Listening:
    """What a TCP or UDP listener holds of its ``Listener``; updated in place by apply."""

    __slots__ = ("backends", "counters", "edge", "endpoint", "key", "loop", "proxy", "rr")

    def __init__(self, edge: Edge, key: Key, spec: Listener, counters: Counters) -> None:
        self.edge = edge
        self.loop = asyncio.get_running_loop()
        self.key = key
        self.rr = 0
        self.update(spec, counters)

    def update(self, spec: Listener, counters: Counters) -> None:
        self.endpoint = spec.endpoint
        self.counters = counters
        self.backends = spec.backends
        self.proxy = spec.proxy_protocol

    def order(self) -> tuple[Backend, ...]:
        """The backends to try, starting with the next in round-robin order."""
        backends = self.backends
        n = len(backends)
        if n < 2:
            return backends
        i = self.rr % n
        self.rr = i + 1
        return backends[i:] + backends[:i]


# -- TCP ----------------------------------------------------------------------------------


class _TcpListener(_Listening):
    __slots__ = ("server",)

    server: asyncio.AbstractServer | None

    def __init__(self, edge: Edge, key: Key, spec: Listener, counters: Counters) -> None:
        super().__init__(edge, key, spec, counters)
        self.server = None

    def stop(self) -> None:
        """Stop accepting; accepted connections go on."""
        if self.server is not None:
            self.server.close()
            self.server = None


class _Conn(asyncio.Protocol):
    """A proxied TCP connection; the Protocol of its client side.

    The hot paths (``data_received`` on both sides) are one ``write`` and one counter;
    the rest is written for few calls per connection: the connection rate counts."""

    __slots__ = (
        "_backend",
        "_backend_eof",
        "_backend_id",
        "_client",
        "_client_eof",
        "_client_lost",
        "_counters",
        "_edge",
        "_leg",
        "_listener",
        "_pending",
        "_pending_size",
        "_timed_out",
        "task",
    )

    def __init__(self, listener: _TcpListener) -> None:
        self._listener = listener
        self._edge = listener.edge
        self._counters = listener.counters
        self._client: asyncio.Transport | None = None
        self._backend: asyncio.Transport | None = None
        self._leg: _BackendLeg | None = None
        self._backend_id: str | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._client_eof = False
        self._backend_eof = False
        self._client_lost = False
        self._timed_out = False
        self.task: asyncio.Task[None] | None = None

    # client side

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._client = transport
        transport.pause_reading()  # until a backend is connected (see data_received)
        transport.set_write_buffer_limits(HIGH_WATER)
        counters = self._counters
        counters.connections_total += 1
        counters.connections_active += 1
        self._edge._conns.add(self)
        listener = self._listener
        backends = listener.order()
        if not backends:
            counters.dropped += 1
            log.debug("%s: no backend, connection reset", listener.endpoint)
            _reset(transport)
            return
        header = b""
        if listener.proxy:
            peer = transport.get_extra_info("peername")
            local = transport.get_extra_info("sockname")
            if not peer or not local:  # (gone already: uvloop could not read them)
                transport.abort()
                return
            header = proxyv2.header("tcp", (peer[0], peer[1]), (local[0], local[1]))
        self.task = listener.loop.create_task(self._connect(backends, header))

    def data_received(self, data: bytes) -> None:
        backend = self._backend
        if backend is not None:
            backend.write(data)
            self._counters.bytes_in += len(data)
        elif self._client is not None:
            # Before a backend is connected: held (and counted once sent). uvloop starts
            # reading after connection_made even when it was paused there, so pause here
            # once more than EARLY_LIMIT waits (not before: a request's first bytes would
            # cost a pause and a resume, two epoll changes, on nearly every connection).
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > EARLY_LIMIT:
                self._client.pause_reading()

    def eof_received(self) -> bool:
        if not self._client_eof:
            self._client_eof = True
            backend = self._backend
            if backend is not None:
                if self._backend_eof:  # both directions ended: close once flushed
                    backend.close()
                    if self._client is not None:
                        self._client.close()
                else:
                    backend.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_lost = True
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        backend = self._backend
        if backend is not None and not backend.is_closing():
            if exc is None:
                backend.close()
            else:
                _reset(backend)
        leg = self._leg
        if leg is None or leg.lost:
            self._finish()

    def pause_writing(self) -> None:  # the client's buffer is full: stop reading the backend
        if self._backend is not None and not self._backend_eof:
            self._backend.pause_reading()

    def resume_writing(self) -> None:
        if self._backend is not None and not self._backend_eof:
            self._backend.resume_reading()

    # backend side

    async def _connect(self, backends: tuple[Backend, ...], header: bytes) -> None:
        edge = self._edge
        active = edge._active
        loop = self._listener.loop
        factory = functools.partial(_BackendLeg, self)
        for backend in backends:
            if self._client_lost or edge._closed:
                return
            bid = backend.id
            active[bid] = active.get(bid, 0) + 1
            self._timed_out = False
            timer = loop.call_later(edge.connect_timeout, self._connect_timed_out)
            try:
                _, leg = await loop.create_connection(factory, backend.host, backend.port)
            except OSError as exc:
                failure = str(exc)
            except asyncio.CancelledError:
                if not self._timed_out:
                    edge._release(bid)
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                failure = "timed out"
            except BaseException:
                edge._release(bid)
                raise
            else:
                self._attach(leg, bid, header)
                return
            finally:
                timer.cancel()
            edge._release(bid)
            self._counters.connect_failures += 1
            log.debug(
                "%s: cannot connect to %s [%s]:%d: %s",
                self._listener.endpoint,
                bid,
                backend.host,
                backend.port,
                failure,
            )
        log.debug("%s: no backend accepted the connection: reset", self._listener.endpoint)
        if self._client is not None and not self._client_lost:
            _reset(self._client)

    def _connect_timed_out(self) -> None:
        self._timed_out = True
        if self.task is not None:
            self.task.cancel()

    def _attach(self, leg: _BackendLeg, backend_id: str, header: bytes) -> None:
        """Start relaying between the client and the connected backend."""
        backend = leg.transport
        client = self._client
        assert backend is not None and client is not None
        self._backend = backend
        self._backend_id = backend_id
        self._leg = leg
        if header:
            backend.write(header)
        if self._pending:
            for chunk in self._pending:
                backend.write(chunk)
                self._counters.bytes_in += len(chunk)
            self._pending.clear()
        if self._client_eof:
            backend.write_eof()
        else:
            client.resume_reading()
        leg.to_client = client.write
        if leg.pending:  # what the backend sent before this
            for chunk in leg.pending:
                client.write(chunk)
            leg.pending.clear()
        if leg.eof:
            self._on_backend_eof()
        if leg.lost:
            self._on_backend_lost(leg.lost_exc)

    def _on_backend_eof(self) -> None:
        if self._backend_eof:
            return
        self._backend_eof = True
        client = self._client
        assert client is not None
        if self._client_eof:  # both directions ended: close once flushed
            client.close()
            if self._backend is not None:
                self._backend.close()
        elif not client.is_closing():
            client.write_eof()

    def _on_backend_lost(self, exc: Exception | None) -> None:
        self._backend_eof = True
        self._backend = None
        client = self._client
        if client is not None and not client.is_closing():
            if exc is None:
                client.close()
            else:
                _reset(client)
        if self._client_lost:
            self._finish()

    def _finish(self) -> None:
        """Both sides are gone: count it, and drop the references that make cycles."""
        edge = self._edge
        if self not in edge._conns:
            return
        edge._conns.discard(self)
        self._counters.connections_active -= 1
        if self._backend_id is not None:
            edge._release(self._backend_id)
            self._backend_id = None
        self._leg = None
        self.task = None

    def abort(self) -> None:
        """Abort both sides now (edge shutdown)."""
        if self.task is not None:
            self.task.cancel()
        if self._backend is not None:
            self._backend.abort()
        if self._client is not None:
            self._client.abort()


class _BackendLeg(asyncio.Protocol):
    """The Protocol of a connection's backend side.

    Until ``_Conn._attach`` (the connect attempt has returned) what arrives is held."""

    __slots__ = (
        "_conn",
        "_counters",
        "eof",
        "lost",
        "lost_exc",
        "pending",
        "to_client",
        "transport",
    )

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self._counters = conn._counters
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.to_client: Callable[[bytes], object] = self.pending.append
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.to_client(data)
        self._counters.bytes_out += len(data)

    def eof_received(self) -> bool:
        conn = self._conn
        if conn is not None and conn._leg is self:
            conn._on_backend_eof()
        else:
            self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        conn = self._conn
        self._conn = None
        self.to_client = _discard
        if conn is not None and conn._leg is self:
            conn._on_backend_lost(exc)

    def pause_writing(self) -> None:  # the backend's buffer is full: stop reading the client
        conn = self._conn
        if conn is not None and conn._client is not None and not conn._client_eof:
            conn._client.pause_reading()

    def resume_writing(self) -> None:
        conn = self._conn
        if conn is not None and conn._client is not None and not conn._client_eof:
            conn._client.resume_reading()


def _discard(data: bytes) -> None:
    """Where a finished connection's data would go (nothing arrives there)."""


# -- UDP ----------------------------------------------------------------------------------


class _UdpListener(_Listening, asyncio.DatagramProtocol):
    __slots__ = ("_sendto", "flows", "local", "retiring", "transport")

    def __init__(self, edge: Edge, key: Key, spec: Listener, counters: Counters) -> None:
        super().__init__(edge, key, spec, counters)
        self.flows: dict[Any, _Flow] = {}
        self.retiring = False
        self.transport: asyncio.DatagramTransport | None = None
        self.local = (key[1], key[2])

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.transport = transport
        self._sendto = transport.sendto

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self._new_flow(addr)
            if flow is None:
                return
        flow.send(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp [%s]:%d: %s", self.key[1], self.key[2], exc)

    def connection_lost(self, exc: Exception | None) -> None:
        for flow in list(self.flows.values()):
            flow.close()

    def _new_flow(self, addr: Any) -> _Flow | None:
        edge = self.edge
        counters = self.counters
        if self.retiring or not self.backends or edge._flows >= edge.udp_max_flows:
            counters.dropped += 1
            return None
        for backend in self.order():
            try:
                sock = _flow_socket(backend)
            except OSError as exc:
                counters.connect_failures += 1
                log.debug("udp flow to %s [%s]:%d: %s", backend.id, backend.host, backend.port, exc)
                continue
            header = b""
            if self.proxy:
                header = proxyv2.header("udp", (addr[0], addr[1]), self.local)
            flow = _Flow(self, addr, sock, backend.id, header)
            self.flows[addr] = flow
            return flow
        counters.dropped += 1
        return None

    def retire(self) -> bool:
        """Stop taking new flows; close once the open ones end. True while flows remain."""
        if not self.flows:
            self.close()
            return False
        self.retiring = True
        return True

    def flow_ended(self, flow: _Flow) -> None:
        if self.flows.get(flow.addr) is flow:
            del self.flows[flow.addr]
        if self.retiring and not self.flows:
            self.close()
            self.edge._retired(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        for flow in list(self.flows.values()):
            flow.close()


def _flow_socket(backend: Backend) -> socket.socket:
    family = socket.AF_INET6 if ":" in backend.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect((backend.host, backend.port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Flow:
    """One client's UDP flow: a connected socket to its backend."""

    __slots__ = (
        "_counters",
        "_header",
        "_idle",
        "_listener",
        "_loop",
        "_send",
        "_sendto",
        "_timer",
        "addr",
        "backend_id",
        "last",
        "sock",
    )

    def __init__(
        self, listener: _UdpListener, addr: Any, sock: socket.socket, backend_id: str, header: bytes
    ) -> None:
        edge = listener.edge
        loop = self._loop = listener.loop
        self._listener = listener
        self._counters = listener.counters
        self._header = header
        self._idle = edge.udp_idle_timeout
        self._send = sock.send
        self._sendto = listener._sendto
        self.addr = addr
        self.sock = sock
        self.backend_id = backend_id
        self.last = loop.time()
        edge._flows += 1
        edge._hold(backend_id)
        self._counters.udp_flows_total += 1
        self._counters.udp_flows_active += 1
        loop.add_reader(sock.fileno(), self._readable)
        self._timer: asyncio.TimerHandle | None = loop.call_at(self.last + self._idle, self._expire)

    def send(self, data: bytes) -> None:
        """Pass one datagram from the client to the backend."""
        try:
            self._send(self._header + data)
        except (BlockingIOError, InterruptedError):
            self._counters.dropped += 1  # the socket's send buffer is full
            return
        except OSError as exc:  # e.g. refused: an ICMP error from an earlier datagram
            log.debug("udp flow to %s: %s", self.backend_id, exc)
            return
        self.last = self._loop.time()
        counters = self._counters
        counters.packets_in += 1
        counters.bytes_in += len(data)

    def _readable(self) -> None:
        recv = self.sock.recv
        sendto = self._sendto
        addr = self.addr
        counters = self._counters
        for _ in range(UDP_BATCH):
            try:
                data = recv(UDP_RECV)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("udp flow to %s: %s", self.backend_id, exc)
                continue
            sendto(data, addr)
            counters.packets_out += 1
            counters.bytes_out += len(data)
        self.last = self._loop.time()

    def _expire(self) -> None:
        due = self.last + self._idle
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._expire)
            return
        self._timer = None
        self.close()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        listener = self._listener
        edge = listener.edge
        edge._flows -= 1
        self._counters.udp_flows_active -= 1
        edge._release(self.backend_id)
        listener.flow_ended(self)
