"""The scheduler places the instances waiting for a node in batches (one view of the
cluster per transaction, kept current as it places): each placement still follows the
rules and says why, exactly as one placement per transaction did. Real controllers and
store, both backends."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from cove.api import create_app
from cove.control.rollout import Scheduler
from cove.model.resource import get_condition
from cove.store import Store
from tests.integration.helpers import create, ok, set_join_token, settle, signup
from tests.integration.test_node_failure import World

pytestmark = pytest.mark.timeout(120)
PLACED = re.compile(
    r"placed on node (\S+): (\d+) other instance\(s\) of this workload there, "
    r"(-?\d+) MiB left after"
)


def join(w: World, name: str, memory_mb: int) -> None:
    reg = ok(
        w.api.post(
            "/v1/nodes/register",
            json={
                "name": name,
                "join_token": w.token,
                "capacity": {"vcpu": 4, "memory_mb": memory_mb},
                "driver": "sim",
            },
        ),
        201,
    )
    w.nodes[name] = (reg["node"]["id"], {"Authorization": f"Bearer {reg['token']}"})
    w.beat(name)


@pytest.fixture
def small_world(store: Store) -> Iterator[World]:
    """Three nodes: two with room for 4 small instances (256 MiB each), one for 2."""
    with TestClient(create_app(store)) as api:
        u = signup(api, "acme")
        create(api, u, "projects", {"name": "shop"})
        create(api, u, "apps", {"name": "web", "project": "shop"})
        settle(store)
        w = World(api, store, u)
        w.token = set_join_token(store)
        join(w, "n1", 1024)
        join(w, "n2", 1024)
        join(w, "n3", 512)
        settle(store)
        yield w


def placements(w: World) -> list[tuple[str, int, int]]:
    out = []
    for ins in w.instances():
        cond = get_condition(ins["status"], "Scheduled")
        if cond and cond["status"] == "true":
            m = PLACED.fullmatch(cond["message"])
            assert m, cond["message"]
            out.append((m.group(1), int(m.group(2)), int(m.group(3))))
    return out


def test_a_batch_spreads_packs_and_explains_each_placement(small_world: World) -> None:
    w = small_world
    w.deploy(count=12)  # one rollout transaction creates all 12; 10 fit
    settle(w.store)
    placed = placements(w)
    assert len(placed) == 10
    per_node = Counter(n for n, _, _ in placed)
    assert per_node == {"n1": 4, "n2": 4, "n3": 2}
    # on each node the explanations count up: the view took every earlier placement of
    # the same transaction into account (spread and memory left)
    for node, total in (("n1", 1024), ("n2", 1024), ("n3", 512)):
        mine = sorted((same, left) for n, same, left in placed if n == node)
        k = per_node[node]
        assert mine == [(i, total - 256 * (i + 1)) for i in range(k)], (node, mine)
    # the two that do not fit say why, for every node
    waiting = [i for i in w.instances() if not i["spec"].get("node")]
    assert len(waiting) == 2
    for ins in waiting:
        cond = get_condition(ins["status"], "Scheduled")
        assert cond is not None and cond["reason"] == "Unschedulable"
        for name in ("n1", "n2", "n3"):
            assert f"node {name} lacks memory (0 MiB free, 256 needed)" in cond["message"]
    warnings = w.events("FailedScheduling")
    assert {e["parent"]["id"] for e in warnings} == {i["id"] for i in waiting}


@pytest.mark.parametrize("batch", [1, 3, 50])
def test_batch_size_changes_nothing_about_where_instances_go(store: Store, batch: int) -> None:
    """Nine small instances (256 MiB) on a (1 GiB) and b (2 GiB): fewest of the workload
    first, then most memory left. One placement at a time gives b a b a b a b a b; a batch
    of any size must give the same placements and explanations."""
    with TestClient(create_app(store)) as api:
        u = signup(api, "acme")
        create(api, u, "projects", {"name": "shop"})
        create(api, u, "apps", {"name": "web", "project": "shop"})
        settle(store)
        w = World(api, store, u)
        w.token = set_join_token(store)
        join(w, "a", 1024)
        join(w, "b", 2048)
        settle(store)
        w.deploy(count=9)
        settle(store)  # creates the instances (and places them with the default batch)
        # place them again from scratch with this batch size
        with store.write() as tx:
            for ins in w.instances():
                spec = dict(ins["spec"], node=None)
                tx.update(ins["id"], spec=spec, status={"state": "pending"})
        scheduler = Scheduler(store, batch=batch)
        for ins in sorted(w.instances(), key=lambda i: i["id"]):
            scheduler.reconcile(ins["id"])
        assert sorted(placements(w)) == [
            ("a", 0, 768),
            ("a", 1, 512),
            ("a", 2, 256),
            ("a", 3, 0),
            ("b", 0, 1792),
            ("b", 1, 1536),
            ("b", 2, 1280),
            ("b", 3, 1024),
            ("b", 4, 768),
        ]
