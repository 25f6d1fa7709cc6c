"""Nodes that go away or are drained, with the real controllers and store (both backends):
a lost node's instances leave rotation at once and are replaced elsewhere after the eviction
delay (replacement first, then the old one stops); a volume-bound instance waits for its
node and says so; a drain moves everything that can move and reports what cannot; a node
that comes back finds its replaced instances stopped (no duplicates wanted)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cove.api import create_app
from cove.control.controllers import EVICT_AFTER, NODE_GRACE
from cove.model.resource import get_condition
from cove.store import Store
from tests.integration.helpers import User, create, get, ok, set_join_token, settle, signup

pytestmark = pytest.mark.timeout(120)
SCOPE = {"project": "shop", "app": "web", "env": "prod"}


class World:
    def __init__(self, api: TestClient, store: Store, user: User) -> None:
        self.api, self.store, self.user = api, store, user
        self.token = set_join_token(store)
        self.nodes: dict[str, tuple[str, dict[str, str]]] = {}

    def join(self, name: str) -> None:
        reg = ok(
            self.api.post(
                "/v1/nodes/register",
                json={
                    "name": name,
                    "join_token": self.token,
                    "capacity": {"vcpu": 4, "memory_mb": 8192},
                    "driver": "sandbox",
                },
            ),
            201,
        )
        self.nodes[name] = (reg["node"]["id"], {"Authorization": f"Bearer {reg['token']}"})
        self.beat(name)

    def beat(self, name: str) -> None:
        node_id, hdr = self.nodes[name]
        ok(self.api.post(f"/v1/nodes/{node_id}/heartbeat", json={}, headers=hdr))

    def silence(self, name: str, seconds: float) -> None:
        """The node's last heartbeat was *seconds* ago."""
        node_id, _ = self.nodes[name]
        at = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
        self.store.heartbeat(node_id, at=at)

    def deploy(self, count: int, mounts: list[dict[str, str]] | None = None) -> None:
        env = get(self.api, self.user, "/v1/environments/prod", **SCOPE)
        tmpl: dict[str, Any] = {"count": count, "memory_mb": 256, "cpu_millis": 500}
        if mounts:
            tmpl["mounts"] = mounts
        with self.store.write() as tx:
            rel = tx.create(
                "release",
                f"v{len(tx.children(env['id'], kinds=('release',))) + 1}",
                parent=env["id"],
                spec={
                    "number": 1,
                    "image": "x",
                    "digest": "sha256:" + "0" * 64,
                    "workloads": {"web": tmpl},
                },
            )
            fresh = tx.get(env["id"])
            assert fresh is not None
            tx.update(env["id"], spec=dict(fresh["spec"], release=rel["id"]))

    def instances(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = get(self.api, self.user, "/v1/instances", **SCOPE)["items"]
        return items

    def node_of(self, ins: dict[str, Any]) -> str:
        return next(n for n, (nid, _) in self.nodes.items() if nid == ins["spec"].get("node"))

    def report_ready(self, ins: dict[str, Any], n: int) -> None:
        """What the instance's agent reports once its checks pass."""
        _, hdr = self.nodes[self.node_of(ins)]
        body = {
            "state": "running",
            "health": "passing",
            "ready": True,
            "addresses": {"ipv4": f"10.0.0.{n}", "ipv6": f"fd00::{n}"},
            "driver": "sandbox",
        }
        ok(self.api.put(f"/v1/instances/{ins['id']}/status", json=body, headers=hdr))

    def all_ready(self) -> None:
        for n, ins in enumerate(self.instances(), start=2):
            if ins["spec"]["desired"] == "running" and ins["spec"].get("node"):
                self.report_ready(ins, n)
        settle(self.store)

    def events(self, reason: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = get(self.api, self.user, "/v1/events", limit=1000, **SCOPE)[
            "items"
        ]
        return [e for e in items if e["spec"]["reason"] == reason]


@pytest.fixture
def world(store: Store) -> Iterator[World]:
    with TestClient(create_app(store)) as api:
        u = signup(api, "acme")
        create(api, u, "projects", {"name": "shop"})
        create(api, u, "apps", {"name": "web", "project": "shop"})
        settle(store)
        w = World(api, store, u)
        w.join("n1")
        w.join("n2")
        settle(store)
        yield w


def running(w: World) -> list[dict[str, Any]]:
    return [i for i in w.instances() if i["spec"]["desired"] == "running"]


def test_a_lost_node_is_replaced_after_the_eviction_delay(world: World) -> None:
    w = world
    w.deploy(count=2)
    settle(w.store)
    w.all_ready()
    placed = sorted(w.node_of(i) for i in running(w))
    assert placed == ["n1", "n2"], placed  # spread
    ep = create(w.api, w.user, "endpoints", {"name": "e", **SCOPE, "spec": {"ports": [
        {"port": 80, "workload": "web", "target_port": 8080}]}})  # fmt: skip
    settle(w.store)
    before = get(w.api, w.user, "/v1/endpoints/e", **SCOPE)["status"]["backends"]
    assert len(before) == 2, before
    _ = ep

    # lost, but not for long yet: out of rotation at once, still placed there
    w.silence("n1", NODE_GRACE + 5)
    w.beat("n2")
    settle(w.store)
    n1 = get(w.api, w.user, "/v1/nodes/n1")
    assert get_condition(n1["status"], "Ready")["reason"] == "NodeLost"  # type: ignore[index]
    backends = get(w.api, w.user, "/v1/endpoints/e", **SCOPE)["status"]["backends"]
    assert [b["node"] for b in backends] == [w.nodes["n2"][0]], backends
    assert not w.events("Evicting")
    assert len(running(w)) == 2

    # lost for longer than the eviction delay: a replacement on n2 first
    w.silence("n1", NODE_GRACE + EVICT_AFTER + 5)
    settle(w.store)
    [evicted] = w.events("Evicting")
    assert "has not reported" in evicted["spec"]["message"], evicted
    now = running(w)
    assert len(now) == 3, "the replacement starts before the lost instance is let go"
    old = next(i for i in now if i["spec"].get("evict"))
    assert w.node_of(old) == "n1"
    fresh = [i for i in now if not i["spec"].get("evict")]
    assert sorted(w.node_of(i) for i in fresh) == ["n2", "n2"]

    # the replacement is Ready: the lost instance is no longer wanted
    w.all_ready()
    now = running(w)
    assert len(now) == 2 and {w.node_of(i) for i in now} == {"n2"}
    stopped = [e for e in w.events("Stopping") if "replaced (node n1" in e["spec"]["message"]]
    assert stopped, w.events("Stopping")

    # n1 comes back: it is told to stop the replaced instance, nothing runs twice
    w.beat("n1")
    settle(w.store)
    gone = next(i for i in w.instances() if i["id"] == old["id"])
    assert gone["spec"]["desired"] == "stopped"
    assert len(running(w)) == 2


def test_a_volume_bound_instance_waits_for_its_node(world: World) -> None:
    w = world
    create(w.api, w.user, "volumes", {"name": "data", **SCOPE, "spec": {"size_gb": 1}})
    w.deploy(count=1, mounts=[{"volume": "data", "path": "/data"}])
    settle(w.store)
    w.all_ready()
    [ins] = running(w)
    home = w.node_of(ins)
    w.silence(home, NODE_GRACE + EVICT_AFTER + 5)
    settle(w.store)
    [ins] = running(w)  # no replacement: the data is on the lost node
    assert w.node_of(ins) == home and not ins["spec"].get("evict")
    cond = get_condition(ins["status"], "Evicted")
    assert cond is not None and cond["reason"] == "VolumeBound", ins["status"]
    assert "volume data lives on that node" in cond["message"]
    assert w.events("WaitingForNode")


def test_drain_moves_what_can_move_and_says_what_cannot(world: World) -> None:
    w = world
    w.deploy(count=2)
    settle(w.store)
    w.all_ready()
    ok(
        w.api.patch(
            "/v1/nodes/n1",
            json={"spec": {"cordoned": True, "draining": True}},
            headers=w.user.headers,
        ),
        202,
    )
    settle(w.store)
    n1 = get(w.api, w.user, "/v1/nodes/n1")
    assert n1["status"]["drain"]["left"] == 1
    assert get_condition(n1["status"], "Drained")["reason"] == "Moving"  # type: ignore[index]
    assert len(running(w)) == 3  # the replacement first (on n2: n1 is drained)
    w.all_ready()
    assert {w.node_of(i) for i in running(w)} == {"n2"}
    n1 = get(w.api, w.user, "/v1/nodes/n1")
    drained = get_condition(n1["status"], "Drained")
    assert drained is not None and drained["status"] == "true", n1["status"]
    node_events = get(w.api, w.user, "/v1/nodes/n1/events")["items"]
    assert [e for e in node_events if e["spec"]["reason"] == "Drained"], node_events
    # nothing is placed on a drained node
    w.deploy(count=3)
    settle(w.store)
    assert all(w.node_of(i) == "n2" for i in running(w) if i["spec"].get("node"))
    # uncordon ends the drain
    ok(
        w.api.patch(
            "/v1/nodes/n1",
            json={"spec": {"cordoned": False, "draining": False}},
            headers=w.user.headers,
        ),
        202,
    )
    settle(w.store)
    n1 = get(w.api, w.user, "/v1/nodes/n1")
    assert get_condition(n1["status"], "Drained") is None and "drain" not in n1["status"]


def test_a_nodes_batched_reports_write_its_own_instances_and_nothing_else(world: World) -> None:
    """``PUT /v1/nodes/{id}/reports`` (what the agent sends for the whole node): statuses
    and events of the node's own instances are written in one go; another node's instance,
    an unknown ID and a resource that is not an instance are answered as ``missing`` and
    left as they were; a malformed or oversized batch is refused whole."""
    w = world
    w.deploy(count=4)
    settle(w.store)
    by_node: dict[str, list[dict[str, Any]]] = {}
    for ins in running(w):
        by_node.setdefault(w.node_of(ins), []).append(ins)
    assert set(by_node) == {"n1", "n2"}, by_node
    node_id, hdr = w.nodes["n1"]
    mine, theirs = by_node["n1"], by_node["n2"][0]
    env = get(w.api, w.user, "/v1/environments/prod", **SCOPE)
    before = {i["id"]: i["metadata"]["revision"] for i in w.instances()}
    ready = {"state": "running", "health": "passing", "ready": True, "driver": "sandbox"}
    statuses = {i["id"]: dict(ready, addresses={"ipv4": f"10.0.0.{n}"}) for n, i in enumerate(mine)}
    statuses[theirs["id"]] = ready
    statuses["ins_doesnotexist"] = ready
    statuses[env["id"]] = ready
    events = [
        {"instance": mine[0]["id"], "type": "Normal", "reason": "Started", "message": "up"},
        {"instance": theirs["id"], "type": "Warning", "reason": "Forged", "message": "no"},
    ]
    res = ok(
        w.api.put(
            f"/v1/nodes/{node_id}/reports",
            json={"statuses": statuses, "events": events},
            headers=hdr,
        )
    )
    assert res["statuses"] == len(mine) and res["events"] == 1
    assert res["missing"] == sorted([theirs["id"], "ins_doesnotexist", env["id"]])
    after = {i["id"]: i for i in w.instances()}
    for n, i in enumerate(mine):
        st = after[i["id"]]["status"]
        assert st["state"] == "running" and st["addresses"] == {"ipv4": f"10.0.0.{n}"}
        assert get_condition(st, "Ready")["status"] == "true"  # type: ignore[index]
    assert after[theirs["id"]]["metadata"]["revision"] == before[theirs["id"]]
    assert get(w.api, w.user, "/v1/environments/prod", **SCOPE)["metadata"] == env["metadata"]
    reasons = [e["spec"]["reason"] for e in w.events("Started")]
    assert len(reasons) == 1 and not w.events("Forged")
    # refused whole: a bad state, a batch too large, another node's token; nothing written
    head = w.store.head_revision()
    bad = {mine[0]["id"]: {"state": "exploded"}, mine[1]["id"]: ready}
    too_many = {f"ins_{n:05d}": ready for n in range(501)}
    _, other_hdr = w.nodes["n2"]
    for body, headers, code in (
        ({"statuses": bad}, hdr, 422),
        ({"statuses": too_many}, hdr, 422),
        (
            {"events": [{"instance": mine[0]["id"], "type": "Normal", "reason": "no spaces"}]},
            hdr,
            422,
        ),
        ({"statuses": {"x" * 65: ready}}, hdr, 422),
        ({"statuses": {mine[0]["id"]: ready}}, other_hdr, 403),
        ({"statuses": {mine[0]["id"]: ready}}, w.user.headers, 403),
    ):
        r = w.api.put(f"/v1/nodes/{node_id}/reports", json=body, headers=headers)
        assert r.status_code == code, (body, r.text)
    assert w.store.head_revision() == head
