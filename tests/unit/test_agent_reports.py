"""The agent's reporter (``cove.agent.reports``): an instance's newer status replaces the
one not yet sent, a node's reports go in one request per interval (in batches of 500),
what could not be sent goes with the next request, and the API's ``missing`` and a
``destroyed`` instance are forgotten."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from cove.agent.reports import BATCH, Reporter
from cove.client import AsyncClient


class FakeApi:
    """Answers ``PUT /v1/nodes/n1/reports`` like the API; ``down`` makes it unreachable."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.down = False
        self.missing: set[str] = set()
        self.answer = 200  # a problem status to answer with instead

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("refused", request=request)
        assert request.method == "PUT" and request.url.path == "/v1/nodes/n1/reports"
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.answer != 200:
            problem = {"status": self.answer, "detail": "refused", "code": "bad"}
            return httpx.Response(self.answer, json=problem)
        missing = sorted(i for i in body["statuses"] if i in self.missing)
        return httpx.Response(200, json={"missing": missing})


def reporter(api: FakeApi) -> Reporter:
    client = AsyncClient("http://cove.test", "tok")
    client._clients = [
        httpx.AsyncClient(base_url="http://cove.test", transport=httpx.MockTransport(api.handle))
    ]
    return Reporter(client, "n1", every=0.02)


def st(state: str, **more: Any) -> dict[str, Any]:
    return {"state": state, **more}


def test_newer_statuses_replace_unsent_ones_and_a_node_sends_one_request() -> None:
    async def run() -> FakeApi:
        api = FakeApi()
        r = reporter(api)
        task = asyncio.create_task(r.run())
        for i in range(50):
            r.status(f"ins_{i}", st("preparing"))
            r.status(f"ins_{i}", st("starting"))
            r.status(f"ins_{i}", st("running", ready=True))
        r.event("ins_0", "Normal", "Started", "up")
        assert await r.flushed(2.0)
        # the same status again is not sent; a change is
        r.status("ins_0", st("running", ready=True))
        r.status("ins_1", st("stopping"))
        assert await r.flushed(2.0)
        task.cancel()
        return api

    api = asyncio.run(run())
    assert len(api.bodies) == 2, api.bodies
    first = api.bodies[0]
    assert len(first["statuses"]) == 50
    assert all(s == st("running", ready=True) for s in first["statuses"].values())
    assert first["events"] == [
        {"instance": "ins_0", "type": "Normal", "reason": "Started", "message": "up"}
    ]
    assert api.bodies[1] == {"statuses": {"ins_1": st("stopping")}, "events": []}


def test_what_could_not_be_sent_goes_later_and_gone_instances_are_forgotten() -> None:
    async def run() -> tuple[FakeApi, Reporter, list[bool]]:
        api = FakeApi()
        r = reporter(api)
        task = asyncio.create_task(r.run())
        api.down = True
        r.status("ins_a", st("starting"))
        r.event("ins_a", "Normal", "Pulled", "x")
        flushed = [await r.flushed(0.3)]  # the API is away: nothing is lost meanwhile
        r.status("ins_a", st("running"))
        api.down = False
        flushed.append(await r.flushed(3.0))
        api.missing = {"ins_b"}
        r.status("ins_b", st("running"))  # no longer this node's
        r.status("ins_a", st("destroyed"))
        flushed.append(await r.flushed(2.0))
        task.cancel()
        return api, r, flushed

    api, r, flushed = asyncio.run(run())
    assert flushed == [False, True, True]
    assert api.bodies[0] == {
        "statuses": {"ins_a": st("running")},
        "events": [{"instance": "ins_a", "type": "Normal", "reason": "Pulled", "message": "x"}],
    }
    assert r.sent == {}  # destroyed and missing: nothing kept


def test_more_than_a_batch_goes_in_several_requests() -> None:
    async def run() -> FakeApi:
        api = FakeApi()
        r = reporter(api)
        for i in range(BATCH * 2 + 10):
            r.status(f"ins_{i:05d}", st("running"))
        await r.send()
        return api

    api = asyncio.run(run())
    assert [len(b["statuses"]) for b in api.bodies] == [BATCH, BATCH, 10]


def test_a_batch_the_api_refuses_is_dropped_and_what_follows_goes_through() -> None:
    """A 422 for a batch would come again for the same batch: resending it forever would
    hold up every later report of the node. A 503 is only the API away: kept."""

    async def run() -> tuple[FakeApi, list[bool]]:
        api = FakeApi()
        r = reporter(api)
        task = asyncio.create_task(r.run())
        api.answer = 503
        r.status("ins_a", st("starting"))
        flushed = [await r.flushed(0.3)]
        api.answer = 422
        flushed.append(await r.flushed(2.0))
        api.answer = 200
        r.status("ins_b", st("running"))
        flushed.append(await r.flushed(2.0))
        task.cancel()
        return api, flushed

    api, flushed = asyncio.run(run())
    assert flushed == [False, True, True]
    refused = [b for b in api.bodies if "ins_a" in b["statuses"]]
    assert len(refused) >= 2  # resent while the API was away, then refused once and dropped
    assert api.bodies[-1] == {"statuses": {"ins_b": st("running")}, "events": []}
