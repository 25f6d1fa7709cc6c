"""The foundation's controllers.

- ``StatusController``: org, project, app, endpoint, volume, secret: converge status
  to the spec (``observed_generation``, the Ready condition) and, for apps, make sure the
  environments prod, staging and dev exist.
- ``GarbageCollector``: resources marked deleting: delete children first, then the row.
- ``OperationController``: settle receipts: succeeded when the target caught up and is
  Ready (or is gone, for deletes), failed when it failed for good or ran out of time.
- ``NodeController``: a node whose heartbeats stop is marked NotReady; a drained or lost node's
  movable instances are replaced elsewhere.
- Endpoints have their own controller: ``cove.control.endpoints``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cove.model.kinds import get_kind
from cove.model.resource import get_condition, now_iso, set_condition
from cove.store import Store, Tx

ENVIRONMENTS = ("prod", "staging", "dev")
EDGE_RELEASE_WAIT = 60.0  # how long a deleted endpoint waits for its edge to let go


def _age(ts: str | None, now: datetime) -> float | None:
    if not ts:
        return None
    return (now - datetime.fromisoformat(ts.replace("Z", "+00:00"))).total_seconds()


def _ready_event(tx: Tx, res: dict[str, Any], before: dict[str, Any] | None) -> None:
    """An event whenever Ready changes (status or reason)."""
    after = get_condition(res["status"], "Ready")
    if after is None:
        return
    if before is not None and (before.get("status"), before.get("reason")) == (
        after.get("status"),
        after.get("reason"),
    ):
        return
    etype = "Normal" if after["status"] == "true" else "Warning"
    if after["status"] != "true" and after["reason"] in ("WaitingForNode", "NothingDeployed"):
        etype = "Normal"
    tx.event(res, etype, after["reason"], after.get("message") or f"Ready={after['status']}")


class StatusController:
    name = "status"
    kinds = ("org", "project", "app", "volume", "secret")

    def __init__(self, store: Store) -> None:
        self.store = store

    def reconcile(self, key: str) -> float | None:
        with self.store.write() as tx:
            res = tx.get(key, for_update=True)
            if res is None or res["metadata"]["deleting"]:
                return None
            status = dict(res["status"])
            before = get_condition(status, "Ready")
            kind = res["kind"]
            if kind == "app":
                have = {e["name"] for e in tx.children(key, kinds=("environment",))}
                for env in ENVIRONMENTS:
                    if env not in have:
                        e = tx.create("environment", env, parent=key, spec={"scale": {}})
                        tx.event(e, "Normal", "Created", f"environment {env} restored")
                set_condition(
                    status, "Ready", "true", "EnvironmentsReady", "prod, staging and dev exist"
                )
            elif kind == "volume" and res["spec"].get("node"):
                set_condition(
                    status, "Ready", "true", "Placed", f"data lives on node {res['spec']['node']}"
                )
            elif kind == "volume":
                msg = "accepted; it is placed on a node with the first instance that mounts it"
                set_condition(status, "Ready", "false", "WaitingForNode", msg)
            elif kind == "secret":
                n = len(res["spec"].get("keys") or [])
                v = res["spec"].get("version", 0)
                set_condition(status, "Ready", "true", "Stored", f"version {v}, {n} key(s)")
            else:
                set_condition(status, "Ready", "true", "Reconciled", f"{kind} is in place")
            status["observed_generation"] = res["metadata"]["generation"]
            if status != res["status"]:
                new = tx.update(key, status=status, expected_revision=res["metadata"]["revision"])
                _ready_event(tx, new, before)
        return None


class GarbageCollector:
    name = "gc"
    kinds = (
        "org",
        "project",
        "app",
        "environment",
        "endpoint",
        "volume",
        "release",
        "workload",
        "instance",
        "secret",
    )

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def wants(change: dict[str, Any]) -> bool:
        return bool(change["deleting"])

    @staticmethod
    def wants_child(change: dict[str, Any]) -> bool:
        return False  # a resource being deleted is polled while it has children

    def reconcile(self, key: str) -> float | None:
        row = self.store.get_row(key)  # read first: only resources being deleted need a write
        if row is None or not row["deleting"]:
            return None
        with self.store.write() as tx:
            res = tx.get(key, for_update=True)
            if res is None or not res["metadata"]["deleting"]:
                return None
            children = [c for c in tx.children(key) if c["kind"] not in ("operation", "event")]
            if children:
                for c in children:
                    if not c["metadata"]["deleting"]:
                        tx.update(c["id"], deleting=True)
                        tx.event(
                            c, "Normal", "Deleting", f"{res['kind']} {res['name']} is being deleted"
                        )
                return 0.5
            if (
                res["kind"] == "volume"
                and res["spec"].get("node")
                and not res["status"].get("released")
            ):
                return 1.0  # the node deletes the data first, then reports it released
            if res["kind"] == "endpoint":
                waited = _age(res["metadata"]["updated_at"], datetime.now(UTC)) or 0.0
                if _edge_still_serves(tx, res):
                    if waited < EDGE_RELEASE_WAIT:
                        return 0.5  # the edge closes its listeners first, then the addresses go
                    tx.event(
                        res,
                        "Warning",
                        "EdgeNotConfirmed",
                        f"the edge has not confirmed it stopped listening after {waited:.0f}s; "
                        "releasing the addresses anyway",
                    )
                from cove.control.endpoints import release_addresses

                freed = release_addresses(tx, key)
                if freed:
                    tx.event(res, "Normal", "AddressesReleased", ", ".join(freed))
            tx.event(res, "Normal", "Deleted", f"{res['kind']} {res['name']} deleted")
            if res["kind"] == "org":
                import sqlalchemy as sa

                from cove.store import schema as t

                tx.conn.execute(sa.delete(t.memberships).where(t.memberships.c.org_id == key))
                tx.conn.execute(
                    sa.update(t.tokens)
                    .where(t.tokens.c.org_id == key, t.tokens.c.revoked_at.is_(None))
                    .values(revoked_at=now_iso())
                )
            tx.delete(key)
        return None


def _edge_still_serves(tx: Tx, ep: dict[str, Any]) -> bool:
    """The endpoint's edge node is up and still reports listening for it."""
    node_id = (ep["status"].get("edge_node") or {}).get("id")
    node = tx.get(str(node_id)) if node_id else None
    if node is None:
        return False
    ready = get_condition(node["status"], "Ready")
    if not ready or ready["status"] != "true":
        return False  # a lost node serves nothing
    return bool(((node["status"].get("edge") or {}).get(ep["id"]) or {}).get("bound"))


class OperationController:
    name = "operations"
    kinds = ("operation",)

    def __init__(
        self,
        store: Store,
        *,
        deadline: float = 600.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.deadline = deadline
        self.clock = clock

    # a pending operation looks again every 0.5 s by itself; settled ones never change
    periodic_resync = False

    def reconcile(self, key: str) -> float | None:
        row = self.store.get_row(key)  # read first: settled receipts take no write lock
        if row is None or (row["status"] or {}).get("state") in ("succeeded", "failed"):
            return None
        with self.store.write() as tx:
            op = tx.get(key, for_update=True)
            if op is None or op["status"].get("state") in ("succeeded", "failed"):
                return None
            spec = op["spec"]
            target = tx.get(spec["target"]["id"])
            action = spec["action"]
            state, message = "running", op["status"].get("message", "")
            if action == "delete":
                if target is None:
                    state, message = (
                        "succeeded",
                        f"{spec['target']['kind']} {spec['target']['name']} deleted",
                    )
            elif target is None:
                state, message = "failed", "the resource was deleted before it settled"
            else:
                failed = get_condition(target["status"], "Failed")
                ready = get_condition(target["status"], "Ready")
                observed = target["status"].get("observed_generation") or 0
                if observed < spec["target_generation"]:
                    message = "waiting for the change to be taken up"  # status is older
                elif failed and failed["status"] == "true":
                    state, message = "failed", f"{failed['reason']}: {failed.get('message', '')}"
                elif ready and ready["status"] == "true":
                    state, message = "succeeded", ready.get("message") or "ready"
                elif ready and ready.get("reason") in ("WaitingForNode", "NoReadyInstances"):
                    # accepted and recorded; the rest is up to nodes or deploys that come later
                    state, message = "succeeded", f"accepted: {ready.get('message', '')}"
                else:
                    message = ready.get("message", "") if ready else "waiting for status"
            age = _age(op["metadata"]["created_at"], self.clock()) or 0.0
            if state == "running" and age > self.deadline:
                state, message = "failed", f"did not settle within {self.deadline:g}s: {message}"
            st = dict(op["status"], state=state, message=message)
            if state in ("succeeded", "failed"):
                st["finished_at"] = now_iso()
                set_condition(
                    st,
                    "Ready",
                    "true" if state == "succeeded" else "false",
                    state.capitalize(),
                    message,
                )
                if state == "failed":
                    set_condition(st, "Failed", "true", "OperationFailed", message)
            st["observed_generation"] = op["metadata"]["generation"]
            if st != op["status"]:
                new = tx.update(key, status=st)
                if state in ("succeeded", "failed"):
                    tx.event(
                        new,
                        "Normal" if state == "succeeded" else "Warning",
                        state.capitalize(),
                        f"{action} {spec['target']['kind']} {spec['target']['name']}: {message}",
                    )
        return None if state in ("succeeded", "failed") else 0.5


NODE_GRACE = 15.0  # seconds without a heartbeat before a node is NotReady (NodeLost)
EVICT_AFTER = 30.0  # then this long before its movable instances are replaced elsewhere


def instances_on(tx: Tx, node_id: str) -> list[dict[str, Any]]:
    """The instances placed on a node that are still wanted there."""
    import sqlalchemy as sa

    from cove.store import schema as t
    from cove.store.db import resource_from_row

    c = t.resources.c
    rows = tx.conn.execute(  # filtered in SQL: a node's instances, not every instance
        sa.select(t.resources).where(c.kind == "instance", c.spec["node"].as_string() == node_id)
    ).mappings()
    out = []
    for r in rows:
        ins = resource_from_row(r)
        spec = ins["spec"]
        wanted = spec.get("desired", "running") == "running" and not ins["metadata"]["deleting"]
        if spec.get("node") == node_id and wanted:
            out.append(ins)
    return out


def _unreachable(tx: Tx, node_id: str, since: str | None) -> None:
    """Mark (or unmark) the instances on a node that stopped reporting: their last known
    state is kept, but they are billed only until the node's last heartbeat (metering
    closes their spans there) and again from when it reports."""
    import sqlalchemy as sa

    from cove.store import schema as t
    from cove.store.db import resource_from_row

    c = t.resources.c
    rows = tx.conn.execute(
        sa.select(t.resources).where(c.kind == "instance", c.spec["node"].as_string() == node_id)
    ).mappings()
    for r in rows:
        ins = resource_from_row(r)
        st = dict(ins["status"])
        if since is None and "unreachable_since" in st:
            st.pop("unreachable_since")
        elif since is not None and st.get("unreachable_since") is None:
            st["unreachable_since"] = since
        else:
            continue
        tx.update(ins["id"], status=st)


class NodeController:
    """Ready from the heartbeats; Schedulable from cordon and the runtime driver; and moving
    instances off a node that is drained (``spec.draining``) or lost for ``evict_after``
    seconds: a movable instance is marked ``spec.evict`` (the rollout controller starts a
    replacement elsewhere and stops this one once the replacement is Ready); an instance
    bound to a volume on this node cannot move and waits for the node (its ``Evicted``
    condition says why)."""

    name = "nodes"
    kinds = ("node",)

    def __init__(
        self,
        store: Store,
        *,
        grace: float = NODE_GRACE,
        evict_after: float = EVICT_AFTER,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.grace = grace
        self.evict_after = evict_after
        self.clock = clock

    # the manager calls ``sweep`` this often and wakes the nodes it names
    sweep_every = 2.0

    def sweep(self) -> list[str]:
        """The nodes that need a look: every node and every heartbeat read in two queries,
        so 500 steady nodes cost two queries every ``sweep_every`` seconds, not a reconcile
        each every few seconds. A node that is not steady (late, lost, draining, changed)
        is reconciled, and polls itself every 5 s until it is steady again."""
        import sqlalchemy as sa

        from cove.store import schema as t
        from cove.store.db import last_heartbeats

        with self.store.read() as conn:
            rows = list(
                conn.execute(sa.select(t.resources).where(t.resources.c.kind == "node")).mappings()
            )
            beats = last_heartbeats(conn)
        now = self.clock()
        return [
            str(r["id"])
            for r in rows
            if not self._steady_row(
                r,
                self.store.received_heartbeat(
                    str(r["id"]),
                    beats.get(str(r["id"])) or (r["status"] or {}).get("last_heartbeat"),
                ),
                now,
            )
        ]

    def _steady(self, key: str) -> bool:
        """The common case, from a read: heartbeats on time, the node Ready and Schedulable
        as it should be, not draining - the write below would change nothing, so it does
        not take the write lock."""
        import sqlalchemy as sa

        from cove.store import schema as t
        from cove.store.db import last_heartbeat

        with self.store.read() as conn:
            row = (
                conn.execute(sa.select(t.resources).where(t.resources.c.id == key))
                .mappings()
                .first()
            )
            if row is None:
                return False
            beat = self.store.received_heartbeat(key, last_heartbeat(conn, row))
        return self._steady_row(row, beat, self.clock())

    def _steady_row(self, row: Any, beat: str | None, now: datetime) -> bool:
        st, spec = row["status"] or {}, row["spec"] or {}
        age = _age(beat, now)
        if age is None or age > self.grace or spec.get("draining") or "drain" in st:
            return False
        if spec.get("cordoned"):
            sched = ("false", "Cordoned", "cordoned by an operator")
        elif st.get("driver") in (None, "none"):
            return False
        else:
            sched = ("true", "Ready", "accepts instances")

        def has(ctype: str, want: tuple[str, str, str]) -> bool:
            c = get_condition(st, ctype)
            return c is not None and (c["status"], c["reason"], c.get("message")) == want

        return (
            has("Ready", ("true", "HeartbeatsArriving", "the agent reports on time"))
            and has("Schedulable", sched)
            and get_condition(st, "Drained") is None
            and st.get("observed_generation") == row["generation"]
        )

    def reconcile(self, key: str) -> float | None:
        if self._steady(key):
            return None  # the sweep looks at it again
        from cove.store.db import forget_heartbeat, last_heartbeat

        with self.store.write() as tx:
            node = tx.get(key, for_update=True)
            if node is None:
                forget_heartbeat(tx.conn, key)  # one that raced the node's deletion
                return None
            status = dict(node["status"])
            before = get_condition(status, "Ready")
            # its own table (heartbeats are not writes), or received and not written yet
            beat = self.store.received_heartbeat(key, last_heartbeat(tx.conn, node))
            age = _age(beat, self.clock())
            if age is None:
                set_condition(
                    status, "Ready", "unknown", "NoHeartbeat", "the agent has not reported yet"
                )
            elif age > self.grace:
                set_condition(status, "Ready", "false", "NodeLost", f"no heartbeat for {int(age)}s")
            else:
                set_condition(
                    status, "Ready", "true", "HeartbeatsArriving", "the agent reports on time"
                )
            now_ready = (get_condition(status, "Ready") or {}).get("status")
            if (before or {}).get("status") == "true" and now_ready == "false":
                _unreachable(tx, key, beat or now_iso())
            elif (before or {}).get("status") == "false" and now_ready == "true":
                _unreachable(tx, key, None)
            if node["spec"].get("cordoned"):
                set_condition(status, "Schedulable", "false", "Cordoned", "cordoned by an operator")
            elif status.get("driver") in (None, "none"):
                set_condition(
                    status,
                    "Schedulable",
                    "false",
                    "NoRuntime",
                    "the agent has no runtime driver yet, so nothing is placed here",
                )
            else:
                set_condition(status, "Schedulable", "true", "Ready", "accepts instances")
            draining = bool(node["spec"].get("draining"))
            lost = age is not None and age > self.grace + self.evict_after
            if draining or lost:
                why = (
                    f"node {node['name']} is being drained"
                    if draining
                    else f"node {node['name']} has not reported for {int(age or 0)}s"
                )
                left, blocked = self._evict(tx, node, why)
            else:
                left, blocked = 0, []  # (only a drain reports what is left)
            if draining:
                status["drain"] = {"left": left, "blocked": blocked}
                if left == 0:
                    set_condition(status, "Drained", "true", "Empty", "no instances left")
                elif blocked and left == len(blocked):
                    set_condition(
                        status,
                        "Drained",
                        "false",
                        "VolumeBound",
                        f"{', '.join(blocked)} cannot move: their volume data lives here",
                    )
                else:
                    set_condition(
                        status, "Drained", "false", "Moving", f"{left} instance(s) still here"
                    )
            else:
                status.pop("drain", None)
                status["conditions"] = [
                    c for c in status.get("conditions", []) if c["type"] != "Drained"
                ]
            status["observed_generation"] = node["metadata"]["generation"]
            if status != node["status"]:
                new = tx.update(key, status=status)
                _ready_event(tx, new, before)
                d0, d1 = get_condition(node["status"], "Drained"), get_condition(status, "Drained")
                if d1 and d1["status"] == "true" and (d0 is None or d0["status"] != "true"):
                    tx.event(new, "Normal", "Drained", f"node {node['name']} has no instances left")
        return 5.0

    def _evict(self, tx: Tx, node: dict[str, Any], why: str) -> tuple[int, list[str]]:
        """Mark the node's movable instances for replacement; returns (instances still on
        the node, names of those that cannot move)."""
        here = instances_on(tx, node["id"])
        blocked: list[str] = []
        for ins in here:
            if ins["spec"].get("mounts"):
                blocked.append(str(ins["name"]))
                st = dict(ins["status"])
                msg = (
                    f"{why}; this instance's volume data lives on that node, so it waits for "
                    "the node to come back"
                )
                if set_condition(st, "Evicted", "false", "VolumeBound", msg):
                    new = tx.update(ins["id"], status=st)
                    tx.event(new, "Warning", "WaitingForNode", msg)
            elif not ins["spec"].get("evict"):
                new = tx.update(ins["id"], spec=dict(ins["spec"], evict=why))
                tx.event(
                    new,
                    "Normal",
                    "Evicting",
                    f"{why}: a replacement starts on another node, then this instance stops",
                )
        return len(here), blocked


def foundation_controllers(
    store: Store, node_timing: tuple[float, float] | None = None
) -> list[Any]:
    """Every controller; *node_timing* is (grace, evict_after) of the NodeController."""
    from cove.control.endpoints import EndpointController
    from cove.control.rollout import RolloutController, Scheduler

    _ = get_kind
    grace, evict_after = node_timing or (NODE_GRACE, EVICT_AFTER)
    return [
        StatusController(store),
        GarbageCollector(store),
        OperationController(store),
        NodeController(store, grace=grace, evict_after=evict_after),
        RolloutController(store),
        Scheduler(store),
        EndpointController(store),
    ]
