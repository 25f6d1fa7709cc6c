"""The node's edge: keep ``cove.net.edge.Edge`` bound to what the API says this node serves.

Long-polls ``GET /v1/nodes/{id}/edge`` (answered when the configuration's digest changes),
routes the other nodes' instance subnets via their addresses (``agent.network.apply_routes``:
backends may run on any node), makes the public pools local (an AnyIP ``local`` route on
``lo``, so any pool address can be bound and answered), applies the listeners, and reports
what is bound, what failed and the traffic counters (``PUT /v1/nodes/{id}/edge``): at once
after every change, and every ``REPORT_SECONDS`` while traffic moves.

Draining: before an instance is stopped, ``drain`` waits until this edge no longer routes
new connections to it, then (up to a deadline) for its open connections to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from cove import errors
from cove.agent.network import apply_routes
from cove.client import AsyncClient
from cove.client.http import unless_reconnected
from cove.net.edge import Backend, BindError, Counters, Edge, Listener

T = TypeVar("T")

log = logging.getLogger("cove.agent.edge")

REPORT_SECONDS = 10.0
DRAIN_SECONDS = 10.0  # longest wait for open connections before an instance is stopped
DRAIN_POLL = 0.2  # seconds between looks at the other edges' reports while draining
LEAVING_SECONDS = 60.0  # longest an instance out of rotation is reported as still in use


@dataclass
class Drain:
    """What draining an instance took: connections open through this node's edge, other
    nodes whose edges it waited for, and whether everything ended in time."""

    open_here: int = 0
    waited_for: set[str] = field(default_factory=set)
    drained: bool = True
    problem: str = ""  # why it could not be told whether the other edges are done


def listeners(cfg: dict[str, Any]) -> list[Listener]:
    out = []
    for ep in cfg.get("endpoints") or []:
        for p in ep["ports"]:
            bs = tuple(
                Backend(id=str(b["instance"]), host=str(b["host"]), port=int(b["port"]))
                for b in p["backends"]
                if b.get("host")
            )
            for addr in ep["addresses"]:
                out.append(
                    Listener(
                        endpoint=str(ep["endpoint"]),
                        protocol=ep["protocol"],
                        address=str(addr),
                        port=int(p["port"]),
                        proxy_protocol=ep["proxy_protocol"] == "v2",
                        backends=bs,
                    )
                )
    return out


async def make_local(prefixes: list[str] | set[str], *, remove: bool = False) -> None:
    """An AnyIP route per pool (``ip route replace local PREFIX dev lo``): the kernel then
    takes every address of the pool as its own. 127.0.0.0/8 already is. With ``remove``,
    take those routes away again."""
    from cove.runtime.network import _ipr

    async with _ipr(None) as ipr:
        lo = (await ipr.link_lookup(ifname="lo"))[0]
        if not remove:
            await ipr.link("set", index=lo, state="up")
        for prefix in prefixes:
            net = ipaddress.ip_network(prefix)
            if net.version == 4 and net.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
                continue
            try:
                await ipr.route(
                    "del" if remove else "replace",
                    dst=str(net),
                    type="local",
                    oif=lo,
                    table=255,  # local
                    scope=254,  # host
                    family=10 if net.version == 6 else 2,
                )
            except Exception as exc:  # NetlinkError
                if remove:
                    continue  # already gone
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise errors.Transient(f"can't make {prefix} local: {exc}") from exc


class EdgeLoop:
    """The edge on an event loop of its own, in its own thread: uvloop when it is installed
    (the agent's loop stays the standard one: pyroute2's netlink sockets need it). Every
    call is marshalled onto that loop."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            self.kind = "uvloop"
        except ImportError:
            self.loop = asyncio.new_event_loop()
            self.kind = "asyncio"
        self.thread = threading.Thread(target=self.loop.run_forever, name="cove-edge", daemon=True)
        self.thread.start()
        self.edge = Edge()

    async def _on_loop(self, fn: Callable[[], Awaitable[T]]) -> T:
        fut = asyncio.run_coroutine_threadsafe(_call(fn), self.loop)
        return await asyncio.wrap_future(fut)

    async def apply(self, listeners: list[Listener]) -> list[BindError]:
        return await self._on_loop(lambda: self.edge.apply(listeners))

    async def drain(self, backend_id: str, timeout: float) -> bool:
        return await self._on_loop(lambda: self.edge.drain(backend_id, timeout))

    async def snapshot(self) -> tuple[dict[str, Counters], list[tuple[str, str, int]]]:
        async def snap() -> tuple[dict[str, Counters], list[tuple[str, str, int]]]:
            return self.edge.counters(), self.edge.bound()

        return await self._on_loop(snap)

    async def active(self, backend_id: str) -> int:
        async def count() -> int:
            return self.edge.active(backend_id)

        return await self._on_loop(count)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._on_loop(self.edge.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join, 10)
        if not self.thread.is_alive():
            self.loop.close()


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


class EdgeRunner:
    def __init__(self, client: AsyncClient, node_id: str) -> None:
        self.client = client
        self.node_id = node_id
        self.edge = EdgeLoop()
        log.info("edge: proxying on its own %s loop", self.edge.kind)
        self.applied = asyncio.Condition()
        self._bind_errors: dict[str, list[str]] = {}
        self._sent: Any = None
        self._local: set[str] = set()
        self._endpoints: set[str] = set()
        self._routes: dict[str, str] = {}
        self._owner: dict[tuple[str, str, int], str] = {}
        self._routing: dict[str, set[str]] = {}  # by endpoint: the instances its listeners use
        # by endpoint: instances out of its rotation whose connections through here are still
        # open (reported, so that their node waits for them before it stops the instance)
        self._leaving: dict[str, set[str]] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        # the counters count from 0 in each edge: the server meters egress per epoch
        self.epoch = secrets.token_hex(8)
        self.reconnected = asyncio.Event()  # the agent's heartbeats got through again

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._follow())
                tg.create_task(self._report_loop())
        finally:
            for task in list(self._watchers):
                task.cancel()
            await self.edge.close()
            if self._local:
                with contextlib.suppress(Exception):
                    await make_local(self._local, remove=True)
            if self._routes:
                with contextlib.suppress(Exception):
                    await apply_routes([])

    async def _follow(self) -> None:
        etag = ""
        while True:
            try:
                got = await unless_reconnected(
                    self.client.get(
                        f"/v1/nodes/{self.node_id}/edge", etag=etag, wait=25, timeout=60
                    ),
                    self.reconnected,
                )
            except errors.CoveError as exc:
                log.warning("can't fetch the edge configuration: %s", exc.detail)
                await asyncio.sleep(1.0)
                continue
            if got is None:
                continue
            cfg: dict[str, Any] = got
            try:
                await self.apply(cfg)
            except errors.CoveError as exc:
                log.warning("edge: %s", exc.detail)
                await asyncio.sleep(1.0)
                continue
            except Exception:  # the edge must not take the agent (and its instances) down
                log.exception("edge: applying the configuration failed; retrying")
                await asyncio.sleep(1.0)
                continue
            etag = str(cfg["etag"])
            await self.report()

    async def apply(self, cfg: dict[str, Any]) -> None:
        routes = list(cfg.get("routes") or [])
        if routes or self._routes:  # first: backends on other nodes must be reachable
            self._routes = await apply_routes(routes)
        pools = [p for p in (cfg.get("pools") or {}).values() if p]
        ls = listeners(cfg)
        if ls and set(pools) != self._local:  # a node that serves nothing changes nothing
            await make_local(set(pools) - self._local)
            await make_local(self._local - set(pools), remove=True)
            self._local = set(pools)
        failed = await self.edge.apply(ls)
        errs: dict[str, list[str]] = {}
        for e in failed:
            shown = f"[{e.address}]" if ":" in e.address else e.address
            errs.setdefault(e.endpoint, []).append(f"{e.protocol} {shown}:{e.port}: {e.message}")
        if errs != self._bind_errors:
            for ep, msgs in errs.items():
                log.warning("edge: endpoint %s: %s", ep, "; ".join(msgs))
        self._bind_errors = errs
        before, routing = self._routing, dict[str, set[str]]()
        for ln in ls:
            routing.setdefault(ln.endpoint, set()).update(b.id for b in ln.backends)
        async with self.applied:
            self._routing = routing
            self.applied.notify_all()
        if not ls and self._local:  # nothing left to serve: leave the host as it was
            await make_local(self._local, remove=True)
            self._local = set()
        self._endpoints = {str(ep["endpoint"]) for ep in cfg.get("endpoints") or []}
        self._owner = {(ln.protocol, ln.address, ln.port): ln.endpoint for ln in ls}
        for ep, ids in before.items():
            for iid in ids - self._routing.get(ep, set()):
                if await self.edge.active(iid):
                    self._leaving.setdefault(ep, set()).add(iid)
                    self._watch(iid)
        for ep, ids in list(self._leaving.items()):  # back in rotation: no longer leaving
            ids -= self._routing.get(ep, set())
            if not ids:
                del self._leaving[ep]

    def _routes_to(self, iid: str) -> bool:
        """Whether this edge sends new connections to instance *iid*."""
        return any(iid in ids for ids in self._routing.values())

    def _watch(self, iid: str) -> None:
        """Report once the connections to *iid*, out of rotation, have ended."""

        async def watch() -> None:
            await self.edge.drain(iid, LEAVING_SECONDS)
            for ep in list(self._leaving):
                self._leaving[ep].discard(iid)
                if not self._leaving[ep]:
                    del self._leaving[ep]
            await self.report()

        task = asyncio.ensure_future(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _report_body(self) -> dict[str, Any]:
        counters, listening = await self.edge.snapshot()
        bound: dict[str, list[list[Any]]] = {}
        for proto, addr, port in sorted(listening):
            ep = self._owner.get((proto, addr, port))
            if ep is not None:
                bound.setdefault(ep, []).append([proto, addr, port])
        out: dict[str, Any] = {}
        for ep in sorted(
            self._endpoints | set(bound) | set(self._bind_errors) | set(self._leaving)
        ):
            out[ep] = {
                "bound": bound.get(ep, []),
                # what the endpoint's listeners send new connections to now: the endpoint
                # shows as serving those, not the instances the store calls Ready
                "backends": sorted(self._routing.get(ep, ())),
                "leaving": sorted(self._leaving.get(ep, ())),
                "errors": self._bind_errors.get(ep, []),
                "counters": asdict(counters.get(ep, Counters())),
            }
        return {"epoch": self.epoch, "endpoints": out}

    async def report(self) -> None:
        body = await self._report_body()
        if body == self._sent:
            return
        try:
            await self.client.put(f"/v1/nodes/{self.node_id}/edge", body)
            self._sent = body
        except errors.CoveError as exc:
            log.warning("edge report failed: %s", exc.detail)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            await self.report()

    async def drain(self, instance_id: str, timeout: float = DRAIN_SECONDS) -> Drain:
        """Wait until no new connection goes to the instance, then for its open ones to end:
        through this node's edge, then through the other nodes' edges (by their reports)."""
        deadline = time.monotonic() + timeout
        async with self.applied:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.applied.wait_for(lambda: not self._routes_to(instance_id)),
                    max(0.1, min(5.0, deadline - time.monotonic())),
                )
        out = Drain(open_here=await self.edge.active(instance_id))
        if out.open_here:
            left = max(0.0, deadline - time.monotonic())
            out.drained = await self.edge.drain(instance_id, left)
        await self._drain_elsewhere(instance_id, deadline, out)
        return out

    async def _drain_elsewhere(self, instance_id: str, deadline: float, out: Drain) -> None:
        """Wait until no other node's edge reports routing to the instance or connections
        to it still open (an edge elsewhere can't be asked directly; its reports can)."""
        while True:
            try:
                got = await self.client.get(f"/v1/instances/{instance_id}/edges", timeout=5.0)
            except errors.NotFound:
                return  # gone from the API: no edge is told to route to it
            except errors.CoveError as exc:
                log.warning("drain: can't ask which edges use %s: %s", instance_id, exc.detail)
                out.problem = f"could not ask the API which edges use it ({exc.detail})"
                out.drained = False
                return
            busy = {
                str(n["name"])
                for n in [*got.get("routing", ()), *got.get("leaving", ())]
                if n.get("id") != self.node_id
            }
            out.waited_for.update(busy)
            if not busy:
                return
            if time.monotonic() >= deadline:
                out.drained = False
                return
            await asyncio.sleep(min(DRAIN_POLL, max(0.0, deadline - time.monotonic())))
