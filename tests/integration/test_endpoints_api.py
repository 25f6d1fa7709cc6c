"""Endpoints through the API against the real store (SQLite and PostgreSQL): addresses from
the pools, the IPv4 add-on and its quota, workloads checked against the deployed release,
what the edge of a node is told to serve, the report it sends back, and addresses freed on
delete. Every refused request writes nothing (no address either)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import cove.control.endpoints as endpoints
from cove.api import create_app
from cove.model.resource import get_condition
from cove.net.pools import Pools
from cove.store import Store
from cove.store import schema as t
from tests.integration.helpers import (
    User,
    create,
    get,
    ok,
    problem,
    set_join_token,
    settle,
    signup,
    snapshot,
)
from tests.integration.test_billing import World, clock, image, world

__all__ = ["clock", "image", "world"]

pytestmark = pytest.mark.timeout(60)

SCOPE = {"project": "shop", "app": "web", "env": "prod"}
POOLS = Pools(
    ipv6=ipaddress.IPv6Network("2001:db8:77::/64"),
    ipv4=ipaddress.IPv4Network("192.0.2.0/29"),  # six usable: .1 - .6
)


@pytest.fixture
def api(store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(store, pools=POOLS)) as c:
        yield c


@pytest.fixture
def user(api: TestClient, store: Store) -> User:
    u = signup(api, "acme")
    create(api, u, "projects", {"name": "shop", "spec": {"quotas": {"dedicated_ipv4": 2}}})
    create(api, u, "apps", {"name": "web", "project": "shop"})
    settle(store)
    return u


def endpoint(name: str, *ports: tuple[int, str, int], **spec: Any) -> dict[str, Any]:
    return {
        "name": name,
        **SCOPE,
        "spec": {
            "ports": [{"port": p, "workload": w, "target_port": tp} for p, w, tp in ports],
            **spec,
        },
    }


def addresses(store: Store) -> list[tuple[str, int, str]]:
    with store.read() as conn:
        rows = conn.execute(
            sa.select(
                t.public_addresses.c.address,
                t.public_addresses.c.family,
                t.public_addresses.c.endpoint_id,
            )
        ).all()
    return sorted((str(a), int(f), str(e)) for a, f, e in rows)


def deploy_release(store: Store, env_id: str, workloads: list[str]) -> None:
    """A release as a deploy writes it (no image resolution needed for these tests)."""
    with store.write() as tx:
        rel = tx.create(
            "release",
            "v1",
            parent=env_id,
            spec={
                "number": 1,
                "image": "x",
                "digest": "sha256:" + "0" * 64,
                "workloads": {w: {"count": 1} for w in workloads},
            },
        )
        env = tx.get(env_id)
        assert env is not None
        tx.update(env_id, spec=dict(env["spec"], release=rel["id"]))


def refused(
    api: TestClient, store: Store, user: User, method: str, path: str, body: Any, status: int
) -> dict[str, Any]:
    before = snapshot(store)
    r = api.request(method, path, json=body, headers=user.headers)
    doc = problem(r, status)
    assert snapshot(store) == before, f"{method} {path} wrote something"
    return doc


def test_an_endpoint_gets_an_ipv6_address_and_ipv4_only_as_the_add_on(
    api: TestClient, store: Store, user: User
) -> None:
    create(api, user, "endpoints", endpoint("plain", (80, "web", 8080)))
    create(api, user, "endpoints", endpoint("both", (443, "web", 8443), ipv4=True))
    plain = get(api, user, "/v1/endpoints/plain", **SCOPE)
    both = get(api, user, "/v1/endpoints/both", **SCOPE)
    # shown at once, in the receipt's transaction
    assert ipaddress.IPv6Address(plain["status"]["addresses"]["ipv6"]) in POOLS.ipv6
    assert plain["status"]["addresses"]["ipv4"] is None
    assert plain["status"]["billable"] == []
    assert ipaddress.IPv6Address(both["status"]["addresses"]["ipv6"]) in POOLS.ipv6
    assert both["status"]["addresses"]["ipv4"] == "192.0.2.1"  # lowest free first
    assert "paid add-on" in both["status"]["billable"][0]
    assert plain["status"]["addresses"]["ipv6"] != both["status"]["addresses"]["ipv6"]
    rows = addresses(store)
    assert len(rows) == 3 and len({a for a, _, _ in rows}) == 3
    # no node: accepted, waiting for one
    settle(store)
    plain = get(api, user, "/v1/endpoints/plain", **SCOPE)
    ready = get_condition(plain["status"], "Ready")
    assert ready is not None and ready["reason"] == "WaitingForNode"


def test_the_ipv4_quota_is_enforced_and_a_refusal_allocates_nothing(
    api: TestClient, store: Store, user: User
) -> None:
    create(api, user, "endpoints", endpoint("a", (80, "web", 80), ipv4=True))
    create(api, user, "endpoints", endpoint("b", (80, "web", 80), ipv4=True))
    doc = refused(
        api,
        store,
        user,
        "POST",
        "/v1/endpoints",
        endpoint("c", (80, "web", 80), ipv4=True),
        422,
    )
    assert doc["code"] == "quota_exceeded" and "quota is 2" in doc["detail"], doc
    assert "IPv6" in doc["hint"]
    # without the add-on it is fine
    create(api, user, "endpoints", endpoint("c", (80, "web", 80)))
    # turning it on later is checked the same way
    ep = get(api, user, "/v1/endpoints/c", **SCOPE)
    doc = refused(
        api, store, user, "PATCH", f"/v1/endpoints/{ep['id']}", {"spec": {"ipv4": True}}, 422
    )
    assert doc["code"] == "quota_exceeded"
    # giving one back frees it for another endpoint
    a = get(api, user, "/v1/endpoints/a", **SCOPE)
    r = api.patch(f"/v1/endpoints/{a['id']}", json={"spec": {"ipv4": False}}, headers=user.headers)
    ok(r, 202)
    assert get(api, user, "/v1/endpoints/a", **SCOPE)["status"]["addresses"]["ipv4"] is None
    r = api.patch(f"/v1/endpoints/{ep['id']}", json={"spec": {"ipv4": True}}, headers=user.headers)
    ok(r, 202)
    assert get(api, user, "/v1/endpoints/c", **SCOPE)["status"]["addresses"]["ipv4"] == "192.0.2.1"


def test_a_full_ipv4_pool_is_a_clear_error(store: Store) -> None:
    tiny = Pools(ipv6=POOLS.ipv6, ipv4=ipaddress.IPv4Network("192.0.2.0/30"))  # .1 and .2
    with TestClient(create_app(store, pools=tiny)) as api:
        u = signup(api, "big")
        create(api, u, "projects", {"name": "shop", "spec": {"quotas": {"dedicated_ipv4": 9}}})
        create(api, u, "apps", {"name": "web", "project": "shop"})
        for n in ("a", "b"):
            create(api, u, "endpoints", endpoint(n, (80, "web", 80), ipv4=True))
        doc = refused(
            api, store, u, "POST", "/v1/endpoints", endpoint("c", (80, "web", 80), ipv4=True), 503
        )
        assert doc["code"] == "pool_exhausted" and "192.0.2.0/30" in doc["detail"]


def test_ports_must_name_a_workload_of_the_deployed_release(
    api: TestClient, store: Store, user: User
) -> None:
    env = get(api, user, "/v1/environments/prod", project="shop", app="web")
    # nothing deployed yet: any workload name is taken (cove.toml may bring it)
    create(api, user, "endpoints", endpoint("early", (80, "worker", 80)))
    deploy_release(store, env["id"], ["web", "api"])
    doc = refused(api, store, user, "POST", "/v1/endpoints", endpoint("e", (80, "wbe", 8080)), 422)
    assert doc["code"] == "unknown_workload"
    assert "'wbe'" in doc["detail"] and "api, web" in doc["detail"]
    create(api, user, "endpoints", endpoint("e", (80, "web", 8080), (81, "api", 9090)))
    # the early one names a workload the release lacks: it says so
    settle(store)
    early = get(api, user, "/v1/endpoints/early", **SCOPE)
    assert early["status"]["addresses"]["ipv6"]  # it keeps its address meanwhile


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"ports": []}, "spec.ports"),
        ({"ports": [{"port": 0, "workload": "web", "target_port": 80}]}, "spec.ports.0.port"),
        ({"ports": [{"port": 80, "workload": "web", "target_port": 65536}]}, "target_port"),
        ({"ports": [{"port": 80, "workload": "Web!", "target_port": 80}]}, "workload"),
        ({"ports": [{"port": 80, "workload": "web", "target_port": 80}] * 2}, "twice"),
        ({"protocol": "sctp", "ports": [{"port": 1, "workload": "w", "target_port": 1}]}, "proto"),
        ({"proxy_protocol": "v1", "ports": [{"port": 1, "workload": "w", "target_port": 1}]}, "v2"),
        ({"ipv4": "please", "ports": [{"port": 1, "workload": "w", "target_port": 1}]}, "ipv4"),
        ({"ports": "80:web:80"}, "ports"),
    ],
)
def test_bad_specs_are_refused_and_allocate_nothing(
    api: TestClient, store: Store, user: User, spec: dict[str, Any], field: str
) -> None:
    doc = refused(
        api, store, user, "POST", "/v1/endpoints", {"name": "e", **SCOPE, "spec": spec}, 422
    )
    assert doc["code"] == "invalid"
    assert addresses(store) == []


@pytest.mark.parametrize("field", ["hostname", "tls", "shared", "http", "anycast"])
def test_l7_fields_answer_not_in_v1(api: TestClient, store: Store, user: User, field: str) -> None:
    body = endpoint("e", (443, "web", 8443))
    body["spec"][field] = "x"
    doc = refused(api, store, user, "POST", "/v1/endpoints", body, 400)
    assert doc["code"] == "not_in_v1" and doc.get("instead")


def test_a_node_is_told_what_to_serve_and_its_report_reaches_the_endpoint(
    api: TestClient, store: Store, user: User
) -> None:
    token = set_join_token(store)
    reg = ok(
        api.post(
            "/v1/nodes/register",
            json={"name": "n1", "join_token": token, "capacity": {"cpu": 2, "memory_mb": 4096}},
        ),
        201,
    )
    node = {"Authorization": f"Bearer {reg['token']}"}
    node_id = reg["node"]["id"]
    ok(api.post(f"/v1/nodes/{node_id}/heartbeat", json={}, headers=node))
    create(
        api, user, "endpoints", endpoint("web", (80, "web", 8080), ipv4=True, proxy_protocol="v2")
    )
    settle(store)
    ep = get(api, user, "/v1/endpoints/web", **SCOPE)
    assert ep["status"]["edge_node"]["id"] == node_id
    assert get_condition(ep["status"], "Ready")["reason"] == "Binding"  # type: ignore[index]

    cfg = ok(api.get(f"/v1/nodes/{node_id}/edge", headers=node))
    assert cfg["pools"] == {"ipv6": str(POOLS.ipv6), "ipv4": str(POOLS.ipv4)}
    (served,) = cfg["endpoints"]
    assert served["endpoint"] == ep["id"] and served["proxy_protocol"] == "v2"
    assert served["addresses"] == [ep["status"]["addresses"]["ipv6"], "192.0.2.1"]
    assert served["ports"][0]["backends"] == []  # nothing deployed
    # the same configuration again: a long-poll with its etag waits and answers the same
    again = ok(
        api.get(
            f"/v1/nodes/{node_id}/edge", params={"etag": cfg["etag"], "wait": 0.3}, headers=node
        )
    )
    assert again["etag"] == cfg["etag"]
    # the shared view every node's long-poll waits on computes the same etag, from one read
    # of all the nodes (another node, serving nothing, gets one of its own)
    other = ok(
        api.post("/v1/nodes/register", json={"name": "n2", "join_token": token, "capacity": {}}),
        201,
    )["node"]["id"]
    etags = endpoints.edge_etags(store)
    assert etags[node_id] == endpoints.edge_config(store, node_id)["etag"]
    assert etags[other] == endpoints.edge_config(store, other)["etag"] != etags[node_id]
    # users can't read it, another node neither
    problem(api.get(f"/v1/nodes/{node_id}/edge", headers=user.headers), 403)

    bound = [["tcp", a, 80] for a in served["addresses"]]
    counters = {"connections_total": 3, "bytes_in": 10, "bytes_out": 20}
    ok(
        api.put(
            f"/v1/nodes/{node_id}/edge",
            json={"endpoints": {ep["id"]: {"bound": bound, "counters": counters}}},
            headers=node,
        )
    )
    settle(store)
    ep = get(api, user, "/v1/endpoints/web", **SCOPE)
    ready = get_condition(ep["status"], "Ready")
    assert ready is not None and ready["reason"] == "NoReadyInstances", ready
    assert ep["status"]["traffic"]["connections_total"] == 3
    assert sorted(map(tuple, ep["status"]["edge"]["bound"])) == sorted(map(tuple, bound))

    # a bind error is a failure the user sees
    ok(
        api.put(
            f"/v1/nodes/{node_id}/edge",
            json={"endpoints": {ep["id"]: {"bound": [], "errors": ["tcp 192.0.2.1:80: in use"]}}},
            headers=node,
        )
    )
    settle(store)
    ep = get(api, user, "/v1/endpoints/web", **SCOPE)
    assert get_condition(ep["status"], "Failed")["status"] == "true"  # type: ignore[index]

    # bad reports are refused
    bad = {"endpoints": {ep["id"]: {"bound": [["tcp", "x"]]}}}
    problem(api.put(f"/v1/nodes/{node_id}/edge", json=bad, headers=node), 422)


def test_delete_waits_for_the_edge_then_frees_the_addresses(
    api: TestClient, store: Store, user: User
) -> None:
    create(api, user, "endpoints", endpoint("gone", (80, "web", 8080), ipv4=True))
    ep = get(api, user, "/v1/endpoints/gone", **SCOPE)
    assert len(addresses(store)) == 2
    ok(api.delete(f"/v1/endpoints/{ep['id']}", headers=user.headers), 202)
    settle(store)  # no node serves it: nothing to wait for
    assert addresses(store) == []
    problem(api.get(f"/v1/endpoints/{ep['id']}", headers=user.headers), 404)
    # and the IPv4 goes to the next endpoint that asks
    create(api, user, "endpoints", endpoint("next", (80, "web", 8080), ipv4=True))
    assert (
        get(api, user, "/v1/endpoints/next", **SCOPE)["status"]["addresses"]["ipv4"]
        == ep["status"]["addresses"]["ipv4"]
    )


def test_a_bad_patch_changes_nothing(api: TestClient, store: Store, user: User) -> None:
    create(api, user, "endpoints", endpoint("p", (80, "web", 8080)))
    ep = get(api, user, "/v1/endpoints/p", **SCOPE)
    path = f"/v1/endpoints/{ep['id']}"
    dup = {"spec": {"ports": [{"port": 80, "workload": "web", "target_port": 1}] * 2}}
    doc = refused(api, store, user, "PATCH", path, dup, 422)
    assert doc["code"] == "invalid" and "twice" in doc["detail"]
    doc = refused(api, store, user, "PATCH", path, {"spec": {"protocol": "quic"}}, 422)
    assert "spec.protocol" in doc["detail"]
    doc = refused(api, store, user, "PATCH", path, {"spec": {"hostname": "a.example"}}, 400)
    assert doc["code"] == "not_in_v1"
    # a good one: ports change, the address stays
    r = api.patch(
        path,
        json={"spec": {"ports": [{"port": 8443, "workload": "web", "target_port": 8443}]}},
        headers=user.headers,
    )
    ok(r, 202)
    again = get(api, user, "/v1/endpoints/p", **SCOPE)
    assert again["status"]["addresses"] == ep["status"]["addresses"]
    assert again["spec"]["ports"][0]["port"] == 8443


def test_a_deleted_endpoint_waits_for_its_edge_but_not_forever(
    api: TestClient, store: Store, user: User
) -> None:
    token = set_join_token(store)
    reg = ok(api.post("/v1/nodes/register", json={"name": "n2", "join_token": token}), 201)
    node = {"Authorization": f"Bearer {reg['token']}"}
    node_id = reg["node"]["id"]
    ok(api.post(f"/v1/nodes/{node_id}/heartbeat", json={}, headers=node))
    create(api, user, "endpoints", endpoint("held", (80, "web", 8080)))
    settle(store)
    ep = get(api, user, "/v1/endpoints/held", **SCOPE)
    bound = [["tcp", ep["status"]["addresses"]["ipv6"], 80]]
    body = {"endpoints": {ep["id"]: {"bound": bound}}}
    ok(api.put(f"/v1/nodes/{node_id}/edge", json=body, headers=node))
    ok(api.delete(f"/v1/endpoints/{ep['id']}", headers=user.headers), 202)
    settle(store, rounds=3)
    # the edge still listens: the address stays reserved
    assert [a for a, _, _ in addresses(store)] == [ep["status"]["addresses"]["ipv6"]]
    # the edge never confirms (a broken agent): after a minute the address goes anyway
    with store.write() as tx:
        tx.conn.execute(
            sa.update(t.resources)
            .where(t.resources.c.id == ep["id"])
            .values(updated_at="2020-01-01T00:00:00.000Z")
        )
    settle(store)
    assert addresses(store) == []
    reasons = [
        e["spec"]["reason"]
        for e in ok(api.get("/v1/events", params={"limit": 1000}, headers=user.headers))["items"]
    ]
    assert "EdgeNotConfirmed" in reasons and "AddressesReleased" in reasons


def test_serving_waits_for_the_edge_and_a_node_asks_which_edges_use_its_instance(
    store: Store, world: World
) -> None:
    """`backends` is the rotation the store wants; `edge.backends` what the edge applied.
    Ready instances the edge does not route to yet serve nothing: the endpoint is `Serving`
    only once the edge says it sends connections to one of them. An instance's node asks
    which edges still route to it or hold connections to it (`leaving`) before stopping it."""
    w = world
    ok(w.deploy(count=2), 202)
    settle(store)
    for n, ins in enumerate(w.instances(), start=2):  # what the agent says once checks pass
        body = {"state": "running", "health": "passing", "ready": True, "driver": "sandbox",
                "addresses": {"ipv4": f"10.0.0.{n}", "ipv6": f"fd00::{n}"}}  # fmt: skip
        ok(w.api.put(f"/v1/instances/{ins['id']}/status", json=body, headers=w.node))
    create(w.api, w.user, "endpoints", endpoint("web", (80, "web", 8080)))
    settle(store)
    ep = get(w.api, w.user, "/v1/endpoints/web", **SCOPE)
    served = ok(w.api.get(f"/v1/nodes/{w.node_id}/edge", headers=w.node))["endpoints"][0]
    bound = [["tcp", a, 80] for a in served["addresses"]]
    ids = sorted(b["instance"] for b in served["ports"][0]["backends"])
    assert len(ids) == 2

    def report_body(routed: list[str]) -> dict[str, Any]:
        return {"endpoints": {ep["id"]: {"bound": bound, "backends": routed}}}

    def report(routed: list[str]) -> dict[str, Any]:
        ok(w.api.put(f"/v1/nodes/{w.node_id}/edge", json=report_body(routed), headers=w.node))
        settle(store)
        doc: dict[str, Any] = get(w.api, w.user, "/v1/endpoints/web", **SCOPE)
        return doc

    # listening, but on the configuration from before the instances were Ready
    doc = report([])
    ready = get_condition(doc["status"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("false", "Routing")
    assert len(doc["status"]["backends"]) == 2 and doc["status"]["edge"]["backends"] == []
    # one of the two: serving, and it says how many
    doc = report([ids[0]])
    ready = get_condition(doc["status"], "Ready")
    assert ready is not None and ready["reason"] == "Serving" and "1 of 2" in ready["message"]
    doc = report(ids)
    ready = get_condition(doc["status"], "Ready")
    assert ready is not None and ready["message"].startswith("2 instance(s)"), ready
    assert doc["status"]["edge"]["backends"] == ids
    events = get(w.api, w.user, "/v1/events", limit=1000, **SCOPE)["items"]
    reasons = [e["spec"]["reason"] for e in events]
    assert "Routing" in reasons and "Serving" in reasons

    # what an instance's node asks before it stops the instance: which edges still use it
    def using(iid: str) -> dict[str, Any]:
        doc: dict[str, Any] = ok(w.api.get(f"/v1/instances/{iid}/edges", headers=w.node))
        return doc

    me = {"id": w.node_id, "name": "n1"}
    assert using(ids[0]) == {"instance": ids[0], "routing": [me], "leaving": []}
    body = {"endpoints": {ep["id"]: {"bound": bound, "backends": [ids[1]], "leaving": [ids[0]]}}}
    ok(w.api.put(f"/v1/nodes/{w.node_id}/edge", json=body, headers=w.node))
    assert using(ids[0]) == {"instance": ids[0], "routing": [], "leaving": [me]}
    problem(w.api.get("/v1/instances/ins_nope/edges", headers=w.node), 404)
    ok(w.api.put(f"/v1/nodes/{w.node_id}/edge", json=report_body(ids), headers=w.node))
    settle(store)
    doc = get(w.api, w.user, "/v1/endpoints/web", **SCOPE)

    # a report naming something else is refused, and the status stays
    for field in ("backends", "leaving"):
        for bad in ([1], ["x" * 41], "ins_a", None):
            body = {"endpoints": {ep["id"]: {"bound": bound, field: bad}}}
            problem(w.api.put(f"/v1/nodes/{w.node_id}/edge", json=body, headers=w.node), 422)
    assert get(w.api, w.user, "/v1/endpoints/web", **SCOPE)["status"] == doc["status"]
