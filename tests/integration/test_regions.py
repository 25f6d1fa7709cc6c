"""An environment pinned to one region, by explicit choice: placed only on that region's
nodes, refused when no node is there, and told why when it cannot be placed."""

from __future__ import annotations

from typing import Any

from cove.model.resource import get_condition
from cove.store import Store
from tests.integration.helpers import get, ok, problem, settle, snapshot
from tests.integration.test_billing import World, clock, image, world

__all__ = ["clock", "image", "world"]


def _join(w: World, store: Store, name: str, region: str) -> dict[str, str]:
    from tests.integration.helpers import set_join_token

    reg = ok(
        w.api.post(
            "/v1/nodes/register",
            json={
                "name": name,
                "join_token": set_join_token(store),
                "region": region,
                "capacity": {"vcpu": 64, "memory_mb": 262_144},
                "driver": "sandbox",
            },
        ),
        201,
    )
    hdr = {"Authorization": f"Bearer {reg['token']}"}
    ok(w.api.post(f"/v1/nodes/{reg['node']['id']}/heartbeat", json={}, headers=hdr))
    return {"id": reg["node"]["id"], "name": name}


def _nodes(w: World) -> list[str]:
    names = {n["id"]: n["name"] for n in get(w.api, w.user, "/v1/nodes")["items"]}
    return sorted(names[i["spec"]["node"]] for i in w.instances() if i["spec"].get("node"))


def test_a_pinned_environment_is_placed_in_its_region_only(store: Store, world: World) -> None:
    w = world
    _join(w, store, "eu1", "eu")
    settle(store)

    before = snapshot(store)
    doc = problem(w.deploy(count=1, region="mars"), 422, "unknown_region")
    assert "nodes are in: eu, local" in doc["detail"], doc
    assert snapshot(store) == before

    ok(w.deploy(count=2, region="eu"), 202)
    settle(store)
    assert _nodes(w) == ["eu1", "eu1"]  # n1 (region local) has more room, but is not eu
    env = get(w.api, w.user, "/v1/environments/prod", project="shop", app="web")
    assert env["spec"]["region"] == "eu"
    placed: dict[str, Any] = w.instances()[0]["status"]
    assert "pinned to region eu" in placed["placement"], placed

    # the region's only node is cordoned: the third instance waits and says why
    eu1 = get(w.api, w.user, "/v1/nodes/eu1")
    ok(
        w.api.patch(f"/v1/nodes/{eu1['id']}", json={"spec": {"cordoned": True}},
                    headers=w.user.headers),
        202,
    )  # fmt: skip
    settle(store)
    ok(w.scale(3), 202)
    settle(store)
    [waiting] = [i for i in w.instances() if not i["spec"].get("node")]
    cond = get_condition(waiting["status"], "Scheduled")
    assert cond is not None and cond["reason"] == "Unschedulable", waiting["status"]
    assert "node n1 is in region local, not eu" in cond["message"], cond
    assert "node eu1 is cordoned" in cond["message"], cond

    # unpinned (an explicit ''): it may go anywhere again
    ok(w.deploy(count=3, region=""), 202)
    settle(store)
    assert (
        get(w.api, w.user, "/v1/environments/prod", project="shop", app="web")["spec"].get("region")
        is None
    )
    assert all(i["spec"].get("node") for i in w.instances()), w.instances()
