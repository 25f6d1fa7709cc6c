"""Mutations as the API performs them: each one writes the change, an operation (the
receipt) and an event in one transaction, so a crash leaves either all or nothing."""

from __future__ import annotations

from typing import Any

from cove import errors
from cove.api.auth import Principal
from cove.model.kinds import get_kind
from cove.store import Tx

ENVIRONMENTS = ("prod", "staging", "dev")


def ref(res: dict[str, Any]) -> dict[str, Any]:
    return {"kind": res["kind"], "id": res["id"], "name": res["name"]}


def actor(who: Principal | None, res: dict[str, Any]) -> str:
    """Who to name in events and receipts. Cluster resources (nodes) are seen by every
    user, so there a person is named by role, never by email."""
    if who is None:
        return "cove"
    if who.kind == "node":
        return f"node {who.node_id}"
    if get_kind(res["kind"]).scope == "cluster":
        return "the cluster operator" if who.operator else "a user"
    return who.email or "a user"


def start_operation(
    tx: Tx, action: str, target: dict[str, Any], who: Principal | None
) -> dict[str, Any]:
    requested_by = actor(who, target)
    return tx.create(
        "operation",
        None,
        parent=target["id"],
        spec={
            "action": action,
            "target": ref(target),
            "target_generation": target["metadata"]["generation"],
            "requested_by": requested_by,
        },
        status={"state": "pending", "message": f"{action} {target['kind']} {target['name']}"},
    )


def receipt(op: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    plural = get_kind(target["kind"]).plural
    return {
        "operation": op["id"],
        "action": op["spec"]["action"],
        "state": op["status"]["state"],
        "resource": ref(target),
        "generation": target["metadata"]["generation"],
        "revision": max(target["metadata"]["revision"], op["metadata"]["revision"]),
        "links": {
            "operation": f"/v1/operations/{op['id']}",
            "wait": f"/v1/operations/{op['id']}/wait?for=done",
            "resource": f"/v1/{plural}/{target['id']}",
            "events": f"/v1/{plural}/{target['id']}/events",
        },
    }


def create_resource(
    tx: Tx,
    who: Principal,
    kind: str,
    name: str,
    *,
    parent: str | None,
    spec: dict[str, Any],
    labels: dict[str, str],
) -> dict[str, Any]:
    res = tx.create(kind, name, parent=parent, spec=spec, labels=labels)
    tx.event(res, "Normal", "Created", f"{kind} {name} created by {actor(who, res)}")
    if kind == "app":
        for env in ENVIRONMENTS:
            e = tx.create("environment", env, parent=res["id"], spec={"scale": {}})
            tx.event(e, "Normal", "Created", f"environment {env} created with app {name}")
    op = start_operation(tx, "create", res, who)
    return receipt(op, res)


def update_resource(
    tx: Tx,
    who: Principal,
    res: dict[str, Any],
    *,
    spec: dict[str, Any] | None,
    labels: dict[str, str] | None,
    expected_revision: int | None,
) -> dict[str, Any]:
    if res["metadata"]["deleting"]:
        raise errors.Conflict(
            f"{res['kind']} {res['name']} is being deleted", hint="wait for the deletion to finish"
        )
    new = tx.update(res["id"], spec=spec, labels=labels, expected_revision=expected_revision)
    changed = []
    if new["metadata"]["generation"] != res["metadata"]["generation"]:
        changed.append(f"spec (generation {new['metadata']['generation']})")
    if new["labels"] != res["labels"]:
        changed.append("labels")
    tx.event(
        new,
        "Normal",
        "Updated",
        f"{', '.join(changed) or 'nothing'} changed by {actor(who, new)}",
    )
    op = start_operation(tx, "update", new, who)
    return receipt(op, new)


def _attached_to(tx: Tx, vol: dict[str, Any]) -> list[str]:
    """Instances that want to run with this volume mounted."""
    import sqlalchemy as sa

    from cove.store import schema as t
    from cove.store.db import resource_from_row

    env_id = vol["parent"]["id"] if vol.get("parent") else None
    rows = tx.conn.execute(
        sa.select(t.resources).where(
            t.resources.c.kind == "instance", t.resources.c.env_id == env_id
        )
    ).mappings()
    out = []
    for r in rows:
        ins = resource_from_row(r)
        if ins["status"].get("state") == "destroyed":
            continue
        if any(m.get("volume") == vol["name"] for m in ins["spec"].get("mounts") or []):
            out.append(ins["name"])
    return out


def delete_resource(
    tx: Tx, who: Principal, res: dict[str, Any], *, expected_revision: int | None = None
) -> dict[str, Any]:
    if res["kind"] == "volume":
        users = _attached_to(tx, res)
        if users:
            raise errors.Conflict(
                f"volume {res['name']} is attached to {', '.join(users)}",
                hint="remove the mount from cove.toml and deploy, or scale the workload to 0",
                code="volume_attached",
            )
    new = tx.update(res["id"], deleting=True, expected_revision=expected_revision)
    if not res["metadata"]["deleting"]:
        tx.event(new, "Normal", "Deleting", f"deletion requested by {actor(who, new)}")
    op = start_operation(tx, "delete", new, who)
    return receipt(op, new)
