"""Heartbeats are liveness, not writes (both backends): a heartbeat lands in the node's
``node_heartbeats`` row without taking a revision (neither the global one nor the node's),
the NodeController still turns a silent node NotReady after the grace and Ready again when
it reports, the API still shows ``status.last_heartbeat``, a changed capacity still reaches
the node's status, and a deleted node leaves no heartbeat behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cove.api import create_app
from cove.control.controllers import NODE_GRACE, NodeController
from cove.model.resource import get_condition
from cove.store import Store
from tests.integration.helpers import User, get, ok, problem, set_join_token, settle, signup

pytestmark = pytest.mark.timeout(60)
CAPACITY = {"vcpu": 4.0, "memory_mb": 8192.0}


class Cluster:
    def __init__(self, api: TestClient, store: Store, user: User) -> None:
        self.api, self.store, self.user = api, store, user
        self.join_token = set_join_token(store)
        self.nodes: dict[str, tuple[str, dict[str, str]]] = {}

    def join(self, name: str) -> str:
        body = {
            "name": name,
            "join_token": self.join_token,
            "capacity": CAPACITY,
            "driver": "sandbox",
        }
        reg = ok(self.api.post("/v1/nodes/register", json=body), 201)
        self.nodes[name] = (reg["node"]["id"], {"Authorization": f"Bearer {reg['token']}"})
        return str(reg["node"]["id"])

    def beat(self, name: str, **body: Any) -> dict[str, Any]:
        node_id, hdr = self.nodes[name]
        out: dict[str, Any] = ok(
            self.api.post(f"/v1/nodes/{node_id}/heartbeat", json=body, headers=hdr)
        )
        return out

    def node(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = get(self.api, self.user, f"/v1/nodes/{name}")
        return out


@pytest.fixture
def cluster(store: Store) -> Iterator[Cluster]:
    with TestClient(create_app(store)) as api:
        c = Cluster(api, store, signup(api, "acme"))
        yield c


def ready(node: dict[str, Any]) -> tuple[str, str]:
    cond = get_condition(node["status"], "Ready")
    assert cond is not None, node["status"]
    return cond["status"], cond["reason"]


def test_a_heartbeat_takes_no_revision(cluster: Cluster) -> None:
    c = cluster
    c.join("n1")
    c.beat("n1")
    settle(c.store)
    node = c.node("n1")
    assert ready(node) == ("true", "HeartbeatsArriving")
    head, rev = c.store.head_revision(), node["metadata"]["revision"]
    first = node["status"]["last_heartbeat"]

    for _ in range(3):
        out = c.beat("n1", capacity=CAPACITY, driver="sandbox")  # what agents send: no change
        assert out == {"node": node["id"], "revision": rev}
    settle(c.store)  # and the controllers find nothing to write either

    assert c.store.head_revision() == head
    again = c.node("n1")
    assert again["metadata"]["revision"] == rev
    assert again["status"]["last_heartbeat"] > first  # ISO 8601 UTC, milliseconds
    assert ready(again) == ("true", "HeartbeatsArriving")


def test_list_and_describe_show_the_last_heartbeat(cluster: Cluster) -> None:
    c = cluster
    c.join("n1")
    c.join("n2")
    assert c.node("n1")["status"]["last_heartbeat"] is None  # never reported
    c.beat("n1")
    beats = c.store.last_heartbeats()
    n1, n2 = c.nodes["n1"][0], c.nodes["n2"][0]
    assert set(beats) == {n1}

    described = c.node("n1")["status"]["last_heartbeat"]
    assert described == beats[n1]
    assert get(c.api, c.user, f"/v1/nodes/{n1}")["status"]["last_heartbeat"] == beats[n1]
    listed = {n["id"]: n for n in get(c.api, c.user, "/v1/nodes")["items"]}
    assert listed[n1]["status"]["last_heartbeat"] == beats[n1]
    assert listed[n2]["status"]["last_heartbeat"] is None
    # the JSON shape is the resource's: the heartbeat is not a field of its own
    assert (
        set(listed[n1])
        == set(listed[n2])
        == {
            "kind",
            "id",
            "name",
            "parent",
            "labels",
            "spec",
            "status",
            "metadata",
        }
    )


def test_a_silent_node_is_lost_and_comes_back_without_heartbeat_writes(cluster: Cluster) -> None:
    c = cluster
    node_id = c.join("n1")
    c.beat("n1")
    offset = [0.0]
    nodes = NodeController(c.store, clock=lambda: datetime.now(UTC) + timedelta(seconds=offset[0]))
    nodes.reconcile(node_id)
    assert ready(c.node("n1")) == ("true", "HeartbeatsArriving")

    offset[0] = NODE_GRACE - 2  # late, but within the grace: nothing is written
    head = c.store.head_revision()
    assert nodes.sweep() == []  # the manager's periodic look finds nothing to do
    assert nodes.reconcile(node_id) is None
    assert c.store.head_revision() == head

    offset[0] = NODE_GRACE + 1  # silent for longer than the grace
    assert nodes.sweep() == [node_id]
    assert nodes.reconcile(node_id) == 5.0  # not steady: it looks again until it is
    assert nodes.sweep() == [node_id]
    status, reason = ready(c.node("n1"))
    assert (status, reason) == ("false", "NodeLost")
    lost = c.node("n1")["metadata"]["revision"]

    c.beat("n1")  # it reports again (the controller's clock is at that moment)
    offset[0] = 0.5
    assert c.node("n1")["metadata"]["revision"] == lost  # the heartbeat itself wrote nothing
    nodes.reconcile(node_id)
    assert ready(c.node("n1")) == ("true", "HeartbeatsArriving")
    reasons = [
        e["spec"]["reason"] for e in get(c.api, c.user, f"/v1/nodes/{node_id}/events")["items"]
    ]
    assert "NodeLost" in reasons and reasons[-1] == "HeartbeatsArriving", reasons


def test_a_capacity_change_still_reaches_the_status(cluster: Cluster) -> None:
    c = cluster
    c.join("n1")
    c.beat("n1")
    before = c.node("n1")
    bigger = {"vcpu": 8.0, "memory_mb": 16384.0}

    out = c.beat("n1", capacity=bigger, allocatable={"vcpu": 7.0}, driver_detail="kvm ok")
    after = c.node("n1")
    assert out["revision"] == after["metadata"]["revision"] > before["metadata"]["revision"]
    assert after["status"]["capacity"] == bigger
    assert after["status"]["allocatable"] == {"vcpu": 7.0}
    assert after["status"]["driver_detail"] == "kvm ok"
    assert after["status"]["driver"] == "sandbox"  # not sent: kept

    head = c.store.head_revision()
    c.beat("n1", capacity=bigger)  # the same again: liveness only
    assert c.store.head_revision() == head


def test_only_the_node_itself_beats_and_nothing_is_recorded_otherwise(cluster: Cluster) -> None:
    c = cluster
    n1 = c.join("n1")
    c.join("n2")
    _, n2_hdr = c.nodes["n2"]
    r = c.api.post(f"/v1/nodes/{n1}/heartbeat", json={}, headers=n2_hdr)
    problem(r, 403)
    r = c.api.post(f"/v1/nodes/{n1}/heartbeat", json={}, headers=c.user.headers)
    problem(r, 403)
    r = c.api.post(f"/v1/nodes/{n1}/heartbeat", json={"capacity": "lots"}, headers=c.nodes["n1"][1])
    problem(r, 422)
    assert c.store.last_heartbeats() == {}


def test_a_deleted_node_leaves_no_heartbeat(cluster: Cluster) -> None:
    c = cluster
    n1, n2 = c.join("n1"), c.join("n2")
    c.beat("n1")
    c.beat("n2")
    assert set(c.store.last_heartbeats()) == {n1, n2}
    with c.store.write() as tx:
        tx.delete(n1)
    assert set(c.store.last_heartbeats()) == {n2}

    # a heartbeat that raced the deletion: the controller drops it when it looks at the node
    c.store.heartbeat(n1)
    NodeController(c.store).reconcile(n1)
    assert set(c.store.last_heartbeats()) == {n2}


def test_a_heartbeat_from_before_the_table_still_counts(cluster: Cluster) -> None:
    """A node whose last report was written into its status (before the upgrade): the
    controller and the API use that until the node's first heartbeat lands in the table."""
    c = cluster
    node_id = c.join("n1")
    legacy = (datetime.now(UTC) - timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    with c.store.write() as tx:
        node = tx.get(node_id)
        assert node is not None
        tx.update(node_id, status=dict(node["status"], last_heartbeat=legacy))
    NodeController(c.store).reconcile(node_id)
    node = c.node("n1")
    assert ready(node) == ("true", "HeartbeatsArriving")
    assert node["status"]["last_heartbeat"] == legacy

    c.beat("n1")  # from now on the table has it
    assert c.node("n1")["status"]["last_heartbeat"] == c.store.last_heartbeats()[node_id] > legacy


def test_concurrent_heartbeats_are_combined_and_none_is_lost(store: Store) -> None:
    """Many threads beating at once (500 nodes): every heartbeat lands, at the time it was
    given, and no revision is taken."""
    from concurrent.futures import ThreadPoolExecutor

    head = store.head_revision()
    ids = [f"node_{i:026d}" for i in range(500)]
    at = {n: f"2026-01-01T00:00:{i % 60:02d}.{i % 1000:03d}Z" for i, n in enumerate(ids)}
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda n: store.heartbeat(n, at=at[n]), ids))
    store.heartbeat(ids[0], at=at[ids[0]])  # whatever a bounded flush left goes with the next
    assert store.last_heartbeats() == at
    assert store.head_revision() == head


def test_a_heartbeat_waiting_for_the_write_lock_already_counts(cluster: Cluster) -> None:
    """On a busy server the flush of a heartbeat can wait for the write lock; the node
    controller counts a heartbeat from when it arrived, not from when it was written."""
    import threading

    c = cluster
    if c.store.dialect != "sqlite":
        pytest.skip("only on SQLite does the flush take the process's write lock")
    node_id = c.join("n1")
    c.beat("n1")
    offset = [0.0]
    nodes = NodeController(c.store, clock=lambda: datetime.now(UTC) + timedelta(seconds=offset[0]))
    nodes.reconcile(node_id)
    assert nodes.sweep() == []
    offset[0] = NODE_GRACE + 5  # the written heartbeat is older than the grace
    assert nodes.sweep() == [node_id]

    at = later(offset[0])
    with c.store._write_lock:  # another writer holds the database
        beating = threading.Thread(target=c.store.heartbeat, args=(node_id, at))
        beating.start()
        beating.join(0.5)
        assert beating.is_alive(), "the flush waits for the write lock"
        assert c.store.last_heartbeats()[node_id] < at  # not written yet
        assert c.store.received_heartbeat(node_id, None) == at
        assert nodes.sweep() == [], "received on time: not late"
    beating.join(5)
    assert c.store.last_heartbeats()[node_id] == at
    assert c.store.received_heartbeat(node_id, None) is None  # nothing held any more
    assert nodes.sweep() == []


def later(seconds: float) -> str:
    at = datetime.now(UTC) + timedelta(seconds=seconds)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_node_token_is_refused_at_once_after_a_rejoin_and_soon_after_any_revocation(
    cluster: Cluster,
) -> None:
    """Node tokens found valid are remembered for a few seconds (``auth.NodeTokens``): a
    rejoin through this server forgets the old one at once; one revoked behind this
    server's back (another replica) stops working within the cache's few seconds."""
    c = cluster
    node_id = c.join("n1")
    _, old = c.nodes["n1"]
    c.beat("n1")  # the token is now remembered
    c.join("n1")  # a rejoin revokes it
    problem(c.api.post(f"/v1/nodes/{node_id}/heartbeat", json={}, headers=old), 401)
    c.beat("n1")  # the new one works
    # revoked in the database directly, as another replica's rejoin would
    import sqlalchemy as sa

    from cove.store import schema as t

    _, new = c.nodes["n1"]
    with c.store.write() as tx:
        tx.conn.execute(
            sa.update(t.tokens).where(t.tokens.c.node_id == node_id).values(revoked_at="x")
        )
    deadline = time.monotonic() + 10
    while c.api.post(f"/v1/nodes/{node_id}/heartbeat", json={}, headers=new).status_code != 401:
        assert time.monotonic() < deadline, "a revoked node token kept working"
        time.sleep(0.2)
