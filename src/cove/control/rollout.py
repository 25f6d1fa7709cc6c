"""Deploys: the rollout controller, the scheduler and instance clean-up.

Rollout (per environment, level-triggered): make the environment's workloads and
instances match its desired release and scale. Deterministic rolling replace: start all new
instances, and stop one old instance for each new one that becomes Ready; a workload that
mounts a volume stops its old instance first, then starts the new one. If the new
instances are not all Ready by the release's deadline, the rollout halts: the new instances
are stopped, the old ones keep serving, and the environment carries ``Failed`` (reason
RolloutHalted) until the next change.

Scheduler (per instance): filter nodes (Ready, schedulable, a runtime driver, memory and
CPU capacity), then score (spread a workload's instances, then most free memory). The
decision and its reasons are written to the instance.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from cove.model.resource import get_condition, now_iso, set_condition
from cove.model.workload import SIZES, seconds
from cove.store import Store, Tx, quotas
from cove.store import schema as t
from cove.store.db import resource_from_row

CPU_OVERCOMMIT = 4  # CPU is shared; memory is not overcommitted
SCHEDULE_BATCH = 50  # instances placed at most in one scheduling transaction


def _ready(res: dict[str, Any]) -> bool:
    c = get_condition(res["status"], "Ready")
    return bool(c and c["status"] == "true")


def _age(ts: str | None, now: datetime) -> float:
    if not ts:
        return 0.0
    return (now - datetime.fromisoformat(ts.replace("Z", "+00:00"))).total_seconds()


def _stop(tx: Tx, ins: dict[str, Any], why: str) -> None:
    if ins["spec"].get("desired") == "stopped":
        return
    new = tx.update(ins["id"], spec=dict(ins["spec"], desired="stopped"))
    tx.event(new, "Normal", "Stopping", why)


class RolloutController:
    name = "rollout"
    kinds = ("environment", "workload")

    def __init__(self, store: Store, *, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))

    # an instance on its way up (created, placed, preparing, starting) is not Ready and
    # was not: its reports move no count the rollout keeps, so they do not wake it (the
    # rollout reads every instance of the environment). A Ready instance that restarts is
    # counted out at its next report that does wake it ("running", not yet Ready), and a
    # rollout in progress looks again every second anyway.
    _STARTING = frozenset(("pending", "placed", "preparing", "starting"))

    @classmethod
    def wants_child(cls, change: dict[str, Any]) -> bool:
        if change["kind"] != "instance":
            return True
        return bool(
            change.get("deleting")
            or (change.get("desired") or "running") != "running"
            or change.get("state") not in cls._STARTING
        )

    def reconcile(self, key: str) -> float | None:
        with self.store.write() as tx:
            res = tx.get(key, for_update=True)
            if res is None:
                return None
            if res["kind"] == "workload":
                env = tx.get(res["parent"]["id"], for_update=True) if res["parent"] else None
            else:
                env = res
            if env is None or env["metadata"]["deleting"]:
                return None
            return self._env(tx, env)

    def _env(self, tx: Tx, env: dict[str, Any]) -> float | None:
        now = self.clock()
        st = dict(env["status"])
        before = get_condition(st, "Ready")
        gen = env["metadata"]["generation"]
        rel_id = env["spec"].get("release")
        workloads = {w["name"]: w for w in tx.children(env["id"], kinds=("workload",))}
        if not rel_id:
            set_condition(st, "Ready", "true", "NothingDeployed", "no release deployed yet")
            st.setdefault("release", None)
            st["observed_generation"] = gen
            self._write(tx, env, st, before)
            return None
        rel = tx.get(rel_id)
        if rel is None:
            set_condition(st, "Failed", "true", "ReleaseMissing", f"release {rel_id} is gone")
            st["observed_generation"] = gen
            self._write(tx, env, st, before)
            return None
        rollout = dict(st.get("rollout") or {})
        if rollout.get("generation") != gen:
            rollout = {
                "generation": gen,
                "release": rel_id,
                "release_name": rel["name"],
                "started_at": now_iso(),
                "state": "progressing",
            }
            st["conditions"] = [c for c in st.get("conditions", []) if c["type"] != "Failed"]
            if rel["status"].get("state") == "pending":
                tx.update(rel["id"], status=dict(rel["status"], state="rolling"))
        templates: dict[str, dict[str, Any]] = rel["spec"]["workloads"]
        scale = env["spec"].get("scale") or {}
        halted = rollout["state"] == "halted"
        done = True
        summary: list[str] = []
        broken: list[str] = []  # new instances that failed for good: no point waiting
        # workloads the release no longer has: stop their instances, then remove them
        for name, wl in workloads.items():
            if name in templates or wl["metadata"]["deleting"]:
                continue
            live = [i for i in tx.children(wl["id"], kinds=("instance",))]
            for ins in live:
                _stop(tx, ins, f"workload {name} is not in {rel['name']}")
            if not live:
                tx.delete(wl["id"])
            else:
                done = False
        for name, tmpl in sorted(templates.items()):
            count = int(scale.get(name, tmpl.get("count", 1)))
            found = workloads.get(name)
            wspec = {"release": rel_id, "count": count, "template": tmpl}
            if found is None:
                wl = tx.create("workload", name, parent=env["id"], spec=wspec)
            elif found["spec"] != wspec and not halted:
                wl = tx.update(found["id"], spec=wspec)
            else:
                wl = found
            instances = tx.children(wl["id"], kinds=("instance",))
            active = [i for i in instances if i["spec"].get("desired") == "running"]
            # an instance evicted from its node (drained, lost) is replaced like an old one:
            # a new instance first, then it stops once the new one is Ready
            new = [
                i for i in active if i["spec"]["release"] == rel_id and not i["spec"].get("evict")
            ]
            old = [i for i in active if i["spec"]["release"] != rel_id or i["spec"].get("evict")]
            ready_new = [i for i in new if _ready(i)]
            if not halted:
                lingering = [i for i in instances if i["spec"].get("desired") != "running"]
                if tmpl.get("mounts") and (old or lingering):
                    for ins in old:  # one instance per volume: stop, wait until gone, start
                        _stop(tx, ins, f"replaced by {rel['name']} (volume-bound: stop first)")
                    done = False
                else:
                    for _ in range(count - len(new)):
                        self._new_instance(tx, wl, rel, tmpl)
                        done = False
                    # stop one old instance for each new one that is Ready
                    surplus = len(old) - max(0, count - len(ready_new))
                    for ins in sorted(old, key=lambda i: i["id"])[: max(0, surplus)]:
                        why = ins["spec"].get("evict")
                        _stop(tx, ins, f"replaced ({why})" if why else f"replaced by {rel['name']}")
                    extra = len(new) - count
                    if extra > 0:  # scale down: not-ready first, then newest
                        newest_first = sorted(new, key=lambda i: i["id"], reverse=True)
                        order = sorted(newest_first, key=_ready)  # stable: not-ready first
                        for ins in order[:extra]:
                            _stop(tx, ins, f"scaled {name} down to {count}")
            if len(ready_new) < count or old or len(new) > count:
                done = False
            for ins in new:
                failed = get_condition(ins["status"], "Failed")
                if failed and failed["status"] == "true":
                    broken.append(f"{ins['name']}: {failed.get('message', '')}")
            ready_all = sum(1 for i in active if _ready(i))
            wst = dict(
                wl["status"],
                desired=count,
                ready=len(ready_new),
                running=len(active),
                ready_all=ready_all,
                release=rel_id,
                observed_generation=wl["metadata"]["generation"],
            )
            if wst != wl["status"]:
                tx.update(wl["id"], status=wst)
            summary.append(f"{name} {len(ready_new)}/{count}")
        deadline = max(
            (seconds(t_.get("deadline", "120s")) for t_ in templates.values()), default=120
        )
        if done and not halted:
            if rollout["state"] != "complete":
                rollout["state"] = "complete"
                rollout["finished_at"] = now_iso()
                tx.event(env, "Normal", "RolledOut", f"{rel['name']} is live: {', '.join(summary)}")
                for other in tx.children(env["id"], kinds=("release",)):
                    if other["id"] != rel_id and other["status"].get("state") in ("active",):
                        tx.update(other["id"], status=dict(other["status"], state="superseded"))
                fresh = tx.get(rel_id)
                assert fresh is not None
                tx.update(rel_id, status=dict(fresh["status"], state="active", ever_active=True))
            st["release"] = rel_id
            st["release_name"] = rel["name"]
            set_condition(
                st, "Ready", "true", "RolloutComplete", f"{rel['name']}: {', '.join(summary)}"
            )
            st["observed_generation"] = gen
            st["rollout"] = rollout
            self._write(tx, env, st, before)
            return None
        # only a rollout in progress halts: once complete, an instance that later crashes or
        # fails its checks is restarted by its agent, and the release stays (degraded)
        progressing = rollout["state"] == "progressing"
        if progressing and (broken or _age(rollout["started_at"], now) > deadline):
            if broken:
                why = (
                    f"new instances of {rel['name']} failed ({'; '.join(broken)[:500]}); "
                    "the previous instances keep serving"
                )
            else:
                why = (
                    f"new instances of {rel['name']} did not all become healthy within "
                    f"{deadline:g}s ({', '.join(summary)}); the previous instances keep serving"
                )
            for name in templates:
                w = tx.find("workload", env["id"], name)
                if w is None:
                    continue
                for ins in tx.children(w["id"], kinds=("instance",)):
                    if ins["spec"]["release"] == rel_id and not _ready(ins):
                        _stop(tx, ins, f"rollout of {rel['name']} halted")
            rollout["state"] = "halted"
            rollout["finished_at"] = now_iso()
            set_condition(st, "Failed", "true", "RolloutHalted", why)
            set_condition(st, "Ready", "false", "RolloutHalted", why)
            fresh = tx.get(rel_id)
            assert fresh is not None
            tx.update(rel_id, status=dict(fresh["status"], state="failed", message=why))
            tx.event(env, "Warning", "RolloutHalted", why)
            st["observed_generation"] = gen
            st["rollout"] = rollout
            self._write(tx, env, st, before)
            return 2.0
        if not halted:
            set_condition(
                st,
                "Ready",
                "false",
                "RollingOut" if progressing else "Degraded",
                f"{rel['name']}: {', '.join(summary)} ready",
            )
        st["rollout"] = rollout
        self._write(tx, env, st, before)
        return 1.0

    def _new_instance(
        self, tx: Tx, wl: dict[str, Any], rel: dict[str, Any], tmpl: dict[str, Any]
    ) -> None:
        name = f"{wl['name']}-{secrets.token_hex(2)}"
        while tx.find("instance", wl["id"], name) is not None:
            name = f"{wl['name']}-{secrets.token_hex(3)}"
        cpu, mem = SIZES[tmpl.get("size", "small")]
        ins = tx.create(
            "instance",
            name,
            parent=wl["id"],
            spec={
                "release": rel["id"],
                "release_name": rel["name"],
                "desired": "running",
                "node": None,
                "size": tmpl.get("size", "small"),
                "cpu_millis": cpu,
                "memory_mb": mem,
                "mounts": list(tmpl.get("mounts") or []),
            },
            status={"state": "pending", "health": "unknown", "restart_count": 0},
        )
        tx.event(ins, "Normal", "Created", f"instance for {rel['name']} ({tmpl.get('size')})")

    @staticmethod
    def _write(
        tx: Tx, env: dict[str, Any], st: dict[str, Any], before: dict[str, Any] | None
    ) -> None:
        if st == env["status"]:
            return
        new = tx.update(env["id"], status=st)
        after = get_condition(st, "Ready")
        if (
            after
            and (before or {}).get("reason") != after["reason"]
            and after["reason"] in ("NothingDeployed",)
        ):
            tx.event(new, "Normal", after["reason"], after["message"])


class Scheduler:
    name = "scheduler"
    kinds = ("instance",)

    def __init__(self, store: Store, *, batch: int = SCHEDULE_BATCH) -> None:
        self.store = store
        self.batch = batch

    @staticmethod
    def wants(change: dict[str, Any]) -> bool:
        """Only an instance without a node, or one no longer wanted and gone from its node:
        the same test as the read in ``reconcile``, on the change itself."""
        if not change.get("node"):
            return True
        return (change.get("desired") or "running") != "running" and change.get(
            "state"
        ) == "destroyed"

    def reconcile(self, key: str) -> float | None:
        # read first: most wake-ups are status reports of placed instances, which need
        # nothing from the scheduler and should not take the write lock
        row = self.store.get_row(key)
        if row is None or row["deleting"]:
            return None
        seen = row["spec"] or {}
        if seen.get("node") and (
            seen.get("desired", "running") == "running"
            or (row["status"] or {}).get("state") != "destroyed"
        ):
            return None
        with self.store.write() as tx:
            ins = tx.get(key, for_update=True)
            if ins is None or ins["metadata"]["deleting"]:
                return None
            spec = ins["spec"]
            if spec.get("desired", "running") != "running":
                # never placed and no longer wanted: nothing on any node to clean up
                if not spec.get("node"):
                    tx.event(ins, "Normal", "Removed", "stopped before it was placed")
                    tx.delete(ins["id"])
                elif ins["status"].get("state") == "destroyed":
                    tx.delete(ins["id"])
                return None
            if spec.get("node"):
                return None
            view = _ClusterView(tx)
            after = self._place(tx, ins, view)
            if after is None:
                # placed: place the next instances waiting for a node in the same transaction,
                # with the same view of the cluster (kept current as they are placed), so the
                # nodes and their use are read once per batch, not once per instance
                for other in _waiting(tx, exclude=key, limit=self.batch):
                    if self._place(tx, other, view) is not None:
                        break  # the cluster is full for it; its own reconcile says why
            return after

    def _place(self, tx: Tx, ins: dict[str, Any], view: _ClusterView) -> float | None:
        nodes = view.nodes
        # volume locality: an instance goes where its volumes' data lives
        volumes: list[dict[str, Any]] = []
        env_id = tx.row(ins["id"])["env_id"]  # type: ignore[index]
        for m in ins["spec"].get("mounts") or []:
            vol = tx.find("volume", env_id, m["volume"])
            if vol is None or vol["metadata"]["deleting"]:
                st0 = dict(ins["status"])
                msg = f"volume {m['volume']} does not exist in this environment"
                if set_condition(st0, "Scheduled", "false", "VolumeMissing", msg):
                    tx.update(ins["id"], status=st0)
                    tx.event(ins, "Warning", "FailedScheduling", msg)
                return 5.0
            volumes.append(vol)
        refusal = quotas.placement_refusal(tx, ins, view.within_quota)
        if refusal is not None:
            st0 = dict(ins["status"])
            if set_condition(st0, "Scheduled", "false", "QuotaExceeded", refusal):
                tx.update(ins["id"], status=st0)
                tx.event(ins, "Warning", "FailedScheduling", refusal)
            return 10.0
        env = tx.get(env_id) if env_id else None
        region = (env or {}).get("spec", {}).get("region") or None
        pinned = {v["spec"].get("node") for v in volumes if v["spec"].get("node")}
        if len(pinned) > 1:
            nodes = []
        elif pinned:
            home = next(iter(pinned))
            by_id = {n["id"]: n for n in nodes}
            nodes = [by_id[home]] if home in by_id else []
        want_mem = int(ins["spec"].get("memory_mb", 256))
        want_cpu = int(ins["spec"].get("cpu_millis", 500))
        wl_id = ins["parent"]["id"]
        # the common case first, cheaply: what does not change within the scheduling
        # transaction (region, Ready, cordon, Schedulable, totals) is looked at once per node
        # and batch, and the reasons a node was passed over are spelled out only when no
        # node can take the instance
        best: tuple[tuple[int, int], dict[str, Any]] | None = None
        for n in nodes:
            fit = view.fit(n, region)
            if fit is None:
                continue
            mem_total, cpu_total = fit
            mem_used, cpu_used = view.used.get(n["id"], (0, 0))
            if mem_used + want_mem > mem_total or cpu_used + want_cpu > cpu_total:
                continue
            score = (view.same(wl_id, n["id"]), -(mem_total - mem_used - want_mem))
            if best is None or score < best[0]:  # the first best in node ID order
                best = (score, n)
        st = dict(ins["status"])
        if best is None:
            reasons = [
                r
                for r in (_passed_over(n, view, region, want_mem, want_cpu) for n in nodes)
                if r is not None
            ]
            msg = "no node can take it: " + ("; ".join(reasons) if reasons else "no nodes joined")
            if pinned:
                names = [v["name"] for v in volumes]
                msg = f"volume data ({', '.join(names)}) lives on a node that can't take it: " + (
                    "; ".join(reasons) if reasons else "the node is gone"
                )
            changed = set_condition(st, "Scheduled", "false", "Unschedulable", msg)
            if changed:
                tx.update(ins["id"], status=st)
                tx.event(ins, "Warning", "FailedScheduling", msg)
            return 5.0
        (same, neg_free), node = best
        why = f"{same} other instance(s) of this workload there, {-neg_free} MiB left after"
        if region:
            why += f"; the environment is pinned to region {region}"
        for vol in volumes:
            if not vol["spec"].get("node"):
                tx.update(vol["id"], spec=dict(vol["spec"], node=node["id"]))
                tx.event(vol, "Normal", "Placed", f"data lives on node {node['name']} from now on")
        if volumes:
            why += "; volume data lives there"
        msg = f"placed on node {node['name']}: {why}"
        set_condition(st, "Scheduled", "true", "Placed", msg)
        st.update(state="placed", placement=msg, node=node["id"], node_name=node["name"])
        new = tx.update(ins["id"], spec=dict(ins["spec"], node=node["id"]), status=st)
        tx.event(new, "Normal", "Scheduled", msg)
        view.placed(new, node["id"])
        return None


def _static_refusal(n: dict[str, Any], region: str | None) -> str | None:
    """Why node *n* can take no instance at all now (region, Ready, cordon, Schedulable)."""
    label = f"node {n['name']}"
    in_region = n["spec"].get("region") or "local"
    if region and in_region != region:
        return f"{label} is in region {in_region}, not {region}"
    if not _ready(n):
        return f"{label} is not Ready"
    if n["spec"].get("cordoned") or n["spec"].get("draining"):
        return f"{label} is {'drained' if n['spec'].get('draining') else 'cordoned'}"
    sched = get_condition(n["status"], "Schedulable")
    if sched is None or sched["status"] != "true":
        why = sched["message"] if sched else "not schedulable"
        return f"{label}: {why}"
    return None


def _totals(n: dict[str, Any]) -> tuple[int, int]:
    """A node's memory (MiB) and CPU (millicores, overcommitted) for instances."""
    alloc = n["status"].get("allocatable") or n["status"].get("capacity") or {}
    return int(alloc.get("memory_mb", 0)), int(float(alloc.get("vcpu", 0)) * 1000 * CPU_OVERCOMMIT)


def _passed_over(
    n: dict[str, Any], view: _ClusterView, region: str | None, want_mem: int, want_cpu: int
) -> str | None:
    """Why node *n* cannot take an instance of that size (None: it can)."""
    refusal = _static_refusal(n, region)
    if refusal is not None:
        return refusal
    mem_total, cpu_total = _totals(n)
    mem_used, cpu_used = view.used.get(n["id"], (0, 0))
    if mem_used + want_mem > mem_total:
        return f"node {n['name']} lacks memory ({mem_total - mem_used} MiB free, {want_mem} needed)"
    if cpu_used + want_cpu > cpu_total:
        return f"node {n['name']} lacks CPU"
    return None


class _ClusterView:
    """What placement reads about the cluster, once per scheduling transaction, and kept
    current as that transaction places instances: the nodes in ID order; the memory and
    CPU taken on each node by the instances placed there that should run; and, per
    workload, how many of its instances each node runs. The sums are made by the database
    (one grouped query, and one per workload on the parent index), not by loading every
    instance."""

    def __init__(self, tx: Tx) -> None:
        c = t.resources.c
        self.tx = tx
        self.nodes = [
            resource_from_row(r)
            for r in tx.conn.execute(
                sa.select(t.resources).where(c.kind == "node").order_by(c.id)
            ).mappings()
        ]
        node = c.spec["node"].as_string()
        q = (
            sa.select(
                node,
                sa.func.sum(sa.func.coalesce(c.spec["memory_mb"].as_integer(), 256)),
                sa.func.sum(sa.func.coalesce(c.spec["cpu_millis"].as_integer(), 500)),
            )
            .where(_placed_running())
            .group_by(node)
        )
        self.used: dict[str, tuple[int, int]] = {
            str(n): (int(m), int(cpu)) for n, m, cpu in tx.conn.execute(q)
        }
        self._same: dict[str, dict[str, int]] = {}
        self.within_quota: set[str] = set()  # projects found within quota (placement_refusal)
        self._fit: dict[tuple[str, str | None], tuple[int, int] | None] = {}

    def fit(self, n: dict[str, Any], region: str | None) -> tuple[int, int] | None:
        """The node's totals (memory, CPU) if it takes instances at all in *region*, else
        None; worked out once per node and region for the transaction."""
        key = (str(n["id"]), region)
        if key not in self._fit:
            self._fit[key] = _totals(n) if _static_refusal(n, region) is None else None
        return self._fit[key]

    def same(self, workload_id: str, node_id: str) -> int:
        """Instances of the workload placed on the node that should run."""
        if workload_id not in self._same:
            c = t.resources.c
            node = c.spec["node"].as_string()
            q = (
                sa.select(node, sa.func.count())
                .where(_placed_running(), c.parent_id == workload_id)
                .group_by(node)
            )
            self._same[workload_id] = {str(n): int(k) for n, k in self.tx.conn.execute(q)}
        return self._same[workload_id].get(node_id, 0)

    def placed(self, ins: dict[str, Any], node_id: str) -> None:
        mem, cpu = self.used.get(node_id, (0, 0))
        self.used[node_id] = (
            mem + int(ins["spec"].get("memory_mb", 256)),
            cpu + int(ins["spec"].get("cpu_millis", 500)),
        )
        wl = ins["parent"]["id"] if ins["parent"] else None
        if wl is not None and wl in self._same:
            self._same[wl][node_id] = self._same[wl].get(node_id, 0) + 1


def _placed_running() -> sa.ColumnElement[bool]:
    """Instances on a node that should run there (as the scheduler counts capacity)."""
    c = t.resources.c
    return sa.and_(
        c.kind == "instance",
        c.spec["node"].as_string().is_not(None),
        c.spec["desired"].as_string() == "running",
    )


def _waiting(tx: Tx, *, exclude: str, limit: int) -> list[dict[str, Any]]:
    """Up to *limit* instances that should run and wait for a node, oldest first, locked
    for this transaction on PostgreSQL (rows another transaction holds are skipped: their
    own reconcile places them)."""
    if limit <= 0:
        return []
    c = t.resources.c
    q = (
        sa.select(t.resources)
        .where(
            c.kind == "instance",
            c.id != exclude,
            c.deleting.is_(False),
            c.spec["node"].as_string().is_(None),
            c.spec["desired"].as_string() == "running",
        )
        .order_by(c.id)
        .limit(limit)
    )
    if tx.conn.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    return [resource_from_row(r) for r in tx.conn.execute(q).mappings()]
