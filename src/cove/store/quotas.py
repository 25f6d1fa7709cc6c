"""Project quotas: what a project asks for, against what it may have.

*Use* is what the project's desired state asks for, not what happens to run this second:
instances, vCPU and memory are each environment's scale x its current release's workload
sizes; volume GB is the provisioned size of its volumes; dedicated IPv4 the addresses it
holds. A change is refused up front (nothing written) when it would take a dimension over
its quota *and* above the use before the change: lowering a quota below the current use
never stops what runs, it stops growth.

The scheduler applies the same quotas to placement (:func:`placement_refusal`): it counts
the instances of each environment's current release that are placed, so a rolling deploy
(new instance first, then the old one stops) can surge past the quota by the instances
it replaces, and a project over its quota (lowered since) gets no new placements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import sqlalchemy as sa

from cove import errors
from cove.model.specs import Quotas
from cove.model.workload import SIZES
from cove.store import schema as t
from cove.store.db import Tx, resource_from_row

DIMENSIONS = tuple(Quotas.model_fields)  # instances, vcpu, memory_mb, volume_gb, dedicated_ipv4
UNITS = {
    "instances": "instance(s)",
    "vcpu": "vCPU",
    "memory_mb": "MiB of memory",
    "volume_gb": "GB of volumes",
    "dedicated_ipv4": "dedicated IPv4 address(es)",
}


@dataclass
class Use:
    instances: int = 0
    cpu_millis: int = 0  # quotas count vCPU; sizes are in millis (a nano is 0.25 vCPU)
    memory_mb: int = 0
    volume_gb: int = 0
    dedicated_ipv4: int = 0

    def get(self, dim: str) -> float:
        return self.cpu_millis / 1000 if dim == "vcpu" else float(getattr(self, dim))

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {k: v for k, v in asdict(self).items() if k != "cpu_millis"}
        out["vcpu"] = self.cpu_millis / 1000
        return {k: out[k] for k in DIMENSIONS}

    def __add__(self, other: Use) -> Use:
        return Use(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def workloads_use(workloads: dict[str, Any], scale: dict[str, int]) -> Use:
    """What an environment's release and scale ask for."""
    use = Use()
    for name, tmpl in workloads.items():
        n = int(scale.get(name, 0))
        cpu, mem = SIZES.get(str(tmpl.get("size", "small")), SIZES["small"])
        use.instances += n
        use.cpu_millis += n * cpu
        use.memory_mb += n * mem
    return use


def _project_rows(tx: Tx, project_id: str, kind: str) -> list[dict[str, Any]]:
    return [res for res, _ in _with_env(tx, project_id, kind)]


def _with_env(tx: Tx, project_id: str, kind: str) -> list[tuple[dict[str, Any], str | None]]:
    r = t.resources
    rows = tx.conn.execute(
        sa.select(r).where(r.c.kind == kind, r.c.project_id == project_id)
    ).mappings()
    return [(resource_from_row(x), x["env_id"]) for x in rows]


def project_use(
    tx: Tx,
    project_id: str,
    *,
    env_override: tuple[str, dict[str, Any], dict[str, int]] | None = None,
    extra_volume_gb: int = 0,
) -> Use:
    """The project's use; ``env_override`` = (env id, workloads, scale) replaces what that
    environment asks for (the change being checked)."""
    use = Use()
    for env in _project_rows(tx, project_id, "environment"):
        if env["metadata"]["deleting"]:
            continue
        if env_override is not None and env["id"] == env_override[0]:
            use = use + workloads_use(env_override[1], env_override[2])
            continue
        rel_id = env["spec"].get("release")
        rel = tx.get(rel_id) if rel_id else None
        if rel is not None:
            use = use + workloads_use(rel["spec"].get("workloads") or {}, env["spec"]["scale"])
    for vol in _project_rows(tx, project_id, "volume"):
        if not vol["metadata"]["deleting"]:
            use.volume_gb += int(vol["spec"].get("size_gb", 0))
    use.volume_gb += extra_volume_gb
    use.dedicated_ipv4 = int(
        tx.conn.execute(
            sa.select(sa.func.count())
            .select_from(t.public_addresses)
            .where(t.public_addresses.c.project_id == project_id, t.public_addresses.c.family == 4)
        ).scalar_one()
    )
    return use


def limits(project: dict[str, Any]) -> dict[str, int]:
    q = Quotas.model_validate((project.get("spec") or {}).get("quotas") or {})
    return q.model_dump()


def check(tx: Tx, project_id: str, before: Use, after: Use, what: str) -> None:
    """Refuse (QuotaExceeded, nothing written) when *after* takes a dimension over the
    project's quota and above *before*."""
    project = tx.get(project_id)
    if project is None:
        return
    quota = limits(project)
    for dim in DIMENSIONS:
        want, had, cap = after.get(dim), before.get(dim), quota[dim]
        if want > cap and want > had:
            raise exceeded(project, dim, cap, had, want, what)


def exceeded(
    project: dict[str, Any],
    dim: str,
    cap: int,
    had: float,
    want: float,
    what: str,
    *,
    instead: str = "ask for less (scale down, a smaller size, or remove what you no longer need)",
) -> errors.CoveError:
    name = project["name"]
    unit = UNITS[dim]
    return errors.UserError(
        f"{what} needs {want:g} {unit} in project {name}; its {dim} quota is {cap:g} "
        f"({had:g} in use before this change)",
        hint=f"{instead}, or have an org owner raise it: cove projects quotas {name} "
        f"--set {dim}={int(want) if want == int(want) else want}",
        code="quota_exceeded",
        extra={"quota": {"dimension": dim, "limit": cap, "in_use": had, "requested": want}},
    )


def placement_refusal(tx: Tx, ins: dict[str, Any], within: set[str] | None = None) -> str | None:
    """Why the scheduler must not place *ins* under its project's quota, or None.
    *within*: the projects already found to desire no more than their quota in this
    transaction (placing changes no one's desire), filled in as they are found."""
    row = tx.row(ins["id"])
    if row is None or row["project_id"] is None:
        return None
    if within is not None and row["project_id"] in within:
        return None
    project = tx.get(row["project_id"])
    if project is None:
        return None
    quota = limits(project)
    placing = ("instances", "vcpu", "memory_mb")
    desired = project_use(tx, row["project_id"])
    if all(desired.get(d) <= quota[d] for d in placing):
        # the placed instances of current releases never exceed what is desired (extra
        # ones are stopped, evicted ones don't count): within the quota, nothing to count
        if within is not None:
            within.add(str(row["project_id"]))
        return None
    current = {
        env["id"]: env["spec"].get("release")
        for env in _project_rows(tx, row["project_id"], "environment")
    }
    placed = Use()
    for other, env_id in _with_env(tx, row["project_id"], "instance"):
        spec = other["spec"]
        if other["id"] == ins["id"] or not spec.get("node") or spec.get("evict"):
            continue
        if spec.get("desired", "running") != "running" or other["metadata"]["deleting"]:
            continue
        if current.get(env_id) != spec.get("release"):
            continue  # being replaced by the current release: does not count
        placed.instances += 1
        placed.cpu_millis += int(spec.get("cpu_millis", 500))
        placed.memory_mb += int(spec.get("memory_mb", 256))
    this = Use(
        instances=1,
        cpu_millis=int(ins["spec"].get("cpu_millis", 500)),
        memory_mb=int(ins["spec"].get("memory_mb", 256)),
    )
    after = placed + this
    for dim in placing:
        if after.get(dim) > quota[dim]:
            return (
                f"project {project['name']} would have {after.get(dim):g} {UNITS[dim]} placed; "
                f"its {dim} quota is {quota[dim]} (an org owner can raise it: cove projects "
                f"quotas {project['name']} --set {dim}=N)"
            )
    return None
