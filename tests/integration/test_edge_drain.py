"""The agent's edge and draining (``cove.agent.edge.EdgeRunner``) with the real proxy on
loopback and the API answered in-process: an instance taken out of rotation while a
connection through the edge is open is reported as ``leaving`` until that connection ends;
and an instance's node waits, before stopping it, until no other node's edge reports
routing to it or connections to it still open."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import pytest

from cove.agent.edge import EdgeRunner
from cove.client import AsyncClient

pytestmark = pytest.mark.timeout(60)

EP = "ep_web"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeApi:
    """``PUT /v1/nodes/n1/edge`` kept; ``GET /v1/instances/{id}/edges`` answered from
    ``using`` (a list of answers, the last repeated)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.using: list[dict[str, Any]] = [{"routing": [], "leaving": []}]
        self.asked = 0
        self.down = False  # answer 503 to the question

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and request.url.path == "/v1/nodes/n1/edge":
            self.reports.append(json.loads(request.content))
            return httpx.Response(200, json={})
        if request.method == "GET" and request.url.path == "/v1/instances/ins_a/edges":
            if self.down:
                return httpx.Response(503, json={"status": 503, "detail": "busy, try later"})
            answer = self.using[min(self.asked, len(self.using) - 1)]
            self.asked += 1
            return httpx.Response(200, json={"instance": "ins_a", **answer})
        return httpx.Response(404, json={"status": 404, "detail": "no such route"})


def runner(api: FakeApi) -> EdgeRunner:
    client = AsyncClient("http://cove.test", "tok")
    client._clients = [
        httpx.AsyncClient(base_url="http://cove.test", transport=httpx.MockTransport(api.handle))
    ]
    return EdgeRunner(client, "n1")


def config(port: int, backends: dict[str, int]) -> dict[str, Any]:
    return {
        "etag": str(sorted(backends)),
        "endpoints": [
            {
                "endpoint": EP,
                "name": "web",
                "protocol": "tcp",
                "proxy_protocol": "none",
                "addresses": ["127.0.0.1"],
                "ports": [
                    {
                        "port": port,
                        "workload": "web",
                        "target_port": 0,
                        "backends": [
                            {"instance": i, "host": "127.0.0.1", "port": p}
                            for i, p in sorted(backends.items())
                        ],
                    }
                ],
            }
        ],
        "routes": [],
        "pools": {},
    }


def test_an_instance_out_of_rotation_is_leaving_while_its_connections_are_open() -> None:
    async def run() -> FakeApi:
        api = FakeApi()
        edge = runner(api)
        held: list[asyncio.StreamWriter] = []

        async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held.append(w)
            await r.read()  # until the client hangs up
            w.close()

        srv_a = await asyncio.start_server(backend, "127.0.0.1", 0)
        srv_b = await asyncio.start_server(backend, "127.0.0.1", 0)
        pa = srv_a.sockets[0].getsockname()[1]
        pb = srv_b.sockets[0].getsockname()[1]
        port = free_port()
        try:
            await edge.apply(config(port, {"ins_a": pa}))
            await edge.report()
            assert api.reports[-1]["endpoints"][EP]["backends"] == ["ins_a"]
            # a client connected through the edge, to ins_a
            _, cw = await asyncio.open_connection("127.0.0.1", port)
            cw.write(b"hello")
            await cw.drain()
            deadline = time.monotonic() + 5
            while not held and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert held, "the connection did not reach the backend"
            # ins_a leaves rotation (ins_b takes over): its open connection makes it leaving
            await edge.apply(config(port, {"ins_b": pb}))
            await edge.report()
            rep = api.reports[-1]["endpoints"][EP]
            assert rep["backends"] == ["ins_b"] and rep["leaving"] == ["ins_a"], rep
            # the connection ends: reported at once, no longer leaving
            n = len(api.reports)
            cw.close()
            deadline = time.monotonic() + 5
            while len(api.reports) == n and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert api.reports[-1]["endpoints"][EP]["leaving"] == []
            # without an open connection, leaving rotation is not leaving
            await edge.apply(config(port, {"ins_a": pa}))
            await edge.report()
            assert api.reports[-1]["endpoints"][EP]["leaving"] == []
        finally:
            await edge.apply({"endpoints": [], "routes": [], "pools": {}})
            await edge.edge.close()
            srv_a.close()
            srv_b.close()
        return api

    asyncio.run(run())


def test_the_node_waits_for_the_other_edges_before_stopping() -> None:
    other = {"id": "nod_2", "name": "n2"}
    me = {"id": "n1", "name": "n1"}

    async def run(api: FakeApi, timeout: float) -> tuple[Any, float]:
        edge = runner(api)
        t0 = time.monotonic()
        try:
            d = await edge.drain("ins_a", timeout)
        finally:
            await edge.edge.close()
        return d, time.monotonic() - t0

    # n2's edge still routes to it, then has a connection open, then is done; this node's
    # own edge (already drained locally) is not waited for through the API
    api = FakeApi()
    api.using = [
        {"routing": [other, me], "leaving": []},
        {"routing": [me], "leaving": [other]},
        {"routing": [], "leaving": [other]},
        {"routing": [me], "leaving": []},
    ]
    d, took = asyncio.run(run(api, 10.0))
    assert d.drained and d.waited_for == {"n2"} and d.open_here == 0
    assert api.asked == 4 and took >= 0.5  # three waits between four looks

    # an edge that never lets go: the node stops waiting at the deadline, and says so
    api = FakeApi()
    api.using = [{"routing": [], "leaving": [other]}]
    d, took = asyncio.run(run(api, 1.0))
    assert not d.drained and d.waited_for == {"n2"} and 0.9 <= took < 3.0

    # the API can't answer: the drain is not called done, and says why
    api = FakeApi()
    api.down = True
    d, took = asyncio.run(run(api, 1.0))
    assert not d.drained and not d.waited_for and "busy, try later" in d.problem

    # no edge uses it: nothing to wait for
    api = FakeApi()
    d, took = asyncio.run(run(api, 10.0))
    assert d.drained and not d.waited_for and api.asked == 1 and took < 1.0
