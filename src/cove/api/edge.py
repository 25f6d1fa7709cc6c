"""The node edge's routes: what to bind (long-poll) and what it bound (report).

``GET /v1/nodes/{id}/edge?etag=&wait=`` answers the node's edge configuration once its
digest differs from ``etag`` (or at ``wait``). ``PUT /v1/nodes/{id}/edge`` records, in the
node's status, what the edge has bound, what failed and its traffic counters; the endpoint
controller shows them on each endpoint.
"""

import time
from typing import Annotated, Any

from anyio import CapacityLimiter
from fastapi import Depends, FastAPI, Header, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

import cove.control.endpoints as endpoints
from cove import errors
from cove.api import auth
from cove.api.deploys import own_instance_of
from cove.api.views import NodeView
from cove.net.pools import Pools
from cove.store import meter

COUNTERS = (
    "connections_total",
    "connections_active",
    "connect_failures",
    "bytes_in",
    "bytes_out",
    "udp_flows_total",
    "udp_flows_active",
    "packets_in",
    "packets_out",
    "dropped",
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointReport(_Body):
    bound: list[tuple[str, str, int]] = Field(default_factory=list, max_length=256)
    # the instances the endpoint's listeners route new connections to
    backends: list[Annotated[str, Field(max_length=40)]] = Field(
        default_factory=list, max_length=10_000
    )
    # instances out of its rotation with connections through this edge still open
    leaving: list[Annotated[str, Field(max_length=40)]] = Field(
        default_factory=list, max_length=10_000
    )
    errors: list[Annotated[str, Field(max_length=500)]] = Field(default_factory=list, max_length=64)
    counters: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)


class EdgeReport(_Body):
    etag: str = Field(default="", max_length=64)
    # a fresh ID each time the node's edge starts (its counters start from 0 again)
    epoch: str = Field(default="", max_length=40, pattern=r"^[A-Za-z0-9_-]*$")
    endpoints: dict[Annotated[str, Field(max_length=40)], EndpointReport] = Field(
        default_factory=dict, max_length=10_000
    )


def register(app: FastAPI, api: Any, pools: Pools) -> None:
    store = api.store

    async def principal(authorization: Annotated[str | None, Header()] = None) -> auth.Principal:
        p: auth.Principal = await run_in_threadpool(api.principal, authorization)
        return p

    Who = Annotated[auth.Principal, Depends(principal)]

    @app.get("/v1/nodes/{node_id}/edge", tags=["nodes"], summary="What this node's edge serves")
    async def edge_config(
        node_id: str,
        who: Who,
        etag: Annotated[str, Query(max_length=64)] = "",
        wait: Annotated[float, Query(ge=0, le=60)] = 0,
    ) -> dict[str, Any]:
        """The endpoints whose edge runs on this node, each port with the Ready instances
        behind it, and the public pools (the node makes them local). Long-polls up to
        ``wait`` seconds while the configuration's digest is still ``etag``."""
        who.require_node(node_id)
        deadline = time.monotonic() + wait
        # every node's etag comes from one shared view, read again when the store moves;
        # a long-poll wakes when its node's etag there changes, not on every write
        have = hash(etag)
        while True:
            seen = None
            if etag and deadline > time.monotonic():
                seen = etags.fingerprint(node_id, await etags.now())
                if seen == have:
                    await etags.changed(node_id, have, deadline - time.monotonic())
                    continue
            cfg: dict[str, Any] = await run_in_threadpool(endpoints.edge_config, store, node_id)
            if cfg["etag"] != etag or time.monotonic() >= deadline or seen is None:
                break
            # the view is behind this node's configuration (or has not seen the node yet):
            # wait for it to move on
            await etags.changed(node_id, seen, deadline - time.monotonic())
        cfg["pools"] = pools.as_dict()
        return cfg

    etags = NodeView(
        api.notifier, lambda: endpoints.edge_etags(store), CapacityLimiter(4), every=0.25
    )

    @app.get(
        "/v1/instances/{ins_id}/edges", tags=["nodes"], summary="The edges that use an instance"
    )
    async def edges_using(ins_id: str, who: Who) -> dict[str, Any]:
        """For the instance's node, before it stops the instance: the Ready nodes whose edge
        still routes new connections to it (``routing``) or has some open (``leaving``)."""

        def run() -> dict[str, Any]:
            own_instance_of(store, who, ins_id)
            with store.read() as conn:
                return {"instance": ins_id, **endpoints.edges_using(conn, ins_id)}

        return await run_in_threadpool(run)

    @app.put("/v1/nodes/{node_id}/edge", tags=["nodes"], summary="Report what the edge bound")
    async def edge_report(node_id: str, body: EdgeReport, who: Who) -> dict[str, Any]:
        who.require_node(node_id)
        report = {
            ep: {
                "bound": [list(b) for b in r.bound],
                "backends": sorted(set(r.backends)),
                "leaving": sorted(set(r.leaving)),
                "errors": r.errors,
                "counters": {k: v for k, v in r.counters.items() if k in COUNTERS},
            }
            for ep, r in body.endpoints.items()
        }

        def run() -> dict[str, Any]:
            with store.write() as tx:
                node = tx.get(node_id)
                if node is None:
                    raise errors.NotFound(f"no node {node_id}")
                for ep_id, r in body.endpoints.items():
                    sent = r.counters.get("bytes_out")
                    ep = tx.row(ep_id) if sent is not None else None
                    if ep is not None and ep["kind"] == "endpoint" and sent is not None:
                        meter.record_egress(tx, node_id, ep_id, body.epoch, sent)
                if node["status"].get("edge") == report:
                    return {"node": node_id, "revision": node["metadata"]["revision"]}
                node = tx.update(node_id, status=dict(node["status"], edge=report))
            return {"node": node_id, "revision": node["metadata"]["revision"]}

        return await run_in_threadpool(run)
