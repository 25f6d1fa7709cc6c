"""Endpoints: public addresses, the edge node that serves them, and their backends.

- Addresses are allocated in the transaction that creates (or changes) the endpoint, from
  the server's pools (``cove.net.pools``): one IPv6 always, one IPv4 only with the paid
  add-on and only within the project's ``dedicated_ipv4`` quota. The ``public_addresses``
  primary key makes an address belong to one endpoint; they go back to the pool when the
  endpoint is deleted.
- ``EndpointController`` picks the node whose edge serves the endpoint (sticky while that
  node is Ready), and keeps status in step: addresses, backends (Ready instances of the
  endpoint's workloads), what the edge reports (bound, errors, traffic counters) and the
  Ready condition.
- ``edge_config`` is what a node's edge binds: its endpoints, each port with the Ready
  instances behind it. Computed from the instances directly, so a failing instance leaves
  rotation as soon as its agent reports it. It also carries the node's routes to the other
  nodes' instance subnets (``cove.net.subnets``), so backends on any node are reachable.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

import cove.net.subnets as subnets
from cove import errors
from cove.model.resource import get_condition, now_iso, set_condition
from cove.net.pools import Pools, pick
from cove.store import Store, Tx, meter, quotas
from cove.store import schema as t
from cove.store.db import resource_from_row

IPV4_BILLING_NOTE = "dedicated IPv4 address: a paid add-on, billed while the endpoint exists"


# -- validation and addresses -----------------------------------------------------------------


def release_templates(tx: Tx, env_id: str) -> dict[str, Any] | None:
    """The workload templates of the environment's current release (None: nothing deployed)."""
    env = tx.get(env_id)
    rel_id = env["spec"].get("release") if env else None
    rel = tx.get(rel_id) if rel_id else None
    return dict(rel["spec"]["workloads"]) if rel else None


def check_workloads(spec: dict[str, Any], templates: dict[str, Any] | None) -> None:
    """Every port names a workload of the release (when one is deployed)."""
    if templates is None:
        return
    for p in spec["ports"]:
        if p["workload"] not in templates:
            known = ", ".join(sorted(templates)) or "none"
            raise errors.UserError(
                f"port {p['port']}: no workload {p['workload']!r} in the deployed release "
                f"(workloads: {known})",
                hint="name a workload from cove.toml, e.g. --port 443:web:8080",
                code="unknown_workload",
            )


def addresses_of(conn: Connection, endpoint_id: str) -> dict[str, str | None]:
    rows = conn.execute(
        sa.select(t.public_addresses.c.address, t.public_addresses.c.family).where(
            t.public_addresses.c.endpoint_id == endpoint_id
        )
    ).all()
    have = {int(fam): str(addr) for addr, fam in rows}
    return {"ipv6": have.get(6), "ipv4": have.get(4)}


def _taken(conn: Connection, address: str) -> bool:
    q = sa.select(sa.literal(1)).where(t.public_addresses.c.address == address)
    return conn.execute(q).first() is not None


def sync_addresses(tx: Tx, pools: Pools, endpoint: dict[str, Any]) -> dict[str, str | None]:
    """Make the endpoint's allocations match its spec (IPv6 always; IPv4 iff asked).
    Raises (and so writes nothing) when a pool is exhausted or the IPv4 quota is used up."""
    row = tx.row(endpoint["id"])
    assert row is not None
    org_id, project_id = str(row["org_id"]), str(row["project_id"])
    have = addresses_of(tx.conn, endpoint["id"])

    def insert(address: str, family: int) -> None:
        tx.conn.execute(
            sa.insert(t.public_addresses).values(
                address=address,
                family=family,
                endpoint_id=endpoint["id"],
                org_id=org_id,
                project_id=project_id,
                allocated_at=now_iso(),
            )
        )

    if have["ipv6"] is None:
        addr = pick(pools.ipv6, lambda a: _taken(tx.conn, a))
        if addr is None:
            raise errors.Transient(
                f"the public IPv6 pool {pools.ipv6} is exhausted",
                hint="the cluster operator can configure a larger prefix (--public-ipv6)",
                code="pool_exhausted",
            )
        insert(addr, 6)
        have["ipv6"] = addr
    if endpoint["spec"].get("ipv4") and have["ipv4"] is None:
        project = tx.get(project_id)
        quota = int(((project or {}).get("spec") or {}).get("quotas", {}).get("dedicated_ipv4", 0))
        used = tx.conn.execute(
            sa.select(sa.func.count())
            .select_from(t.public_addresses)
            .where(
                t.public_addresses.c.project_id == project_id,
                t.public_addresses.c.family == 4,
            )
        ).scalar_one()
        if used >= quota and project is not None:
            raise quotas.exceeded(
                project,
                "dedicated_ipv4",
                quota,
                used,
                used + 1,
                f"endpoint {endpoint['name']} with a dedicated IPv4",
                instead="every endpoint has its own IPv6 address without --ipv4; or destroy "
                "an IPv4 endpoint you no longer need",
            )
        taken = {
            str(a)
            for (a,) in tx.conn.execute(
                sa.select(t.public_addresses.c.address).where(t.public_addresses.c.family == 4)
            )
        }
        addr = pick(pools.ipv4, taken.__contains__)
        if addr is None:
            raise errors.Transient(
                f"the public IPv4 pool {pools.ipv4} is exhausted",
                hint="use the endpoint's IPv6 address, or ask the cluster operator for a "
                "larger IPv4 pool (--public-ipv4)",
                code="pool_exhausted",
            )
        insert(addr, 4)
        have["ipv4"] = addr
        meter.open_span(
            tx, "ipv4", f"{endpoint['id']}:{addr}", f"{endpoint['name']} {addr}", dict(row)
        )
    elif not endpoint["spec"].get("ipv4") and have["ipv4"] is not None:
        tx.conn.execute(
            sa.delete(t.public_addresses).where(t.public_addresses.c.address == have["ipv4"])
        )
        meter.close_span(tx, f"{endpoint['id']}:{have['ipv4']}")
        have["ipv4"] = None
    return have


def release_addresses(tx: Tx, endpoint_id: str) -> list[str]:
    addrs = [a for a in addresses_of(tx.conn, endpoint_id).values() if a]
    for a in addrs:
        meter.close_span(tx, f"{endpoint_id}:{a}")  # only IPv4 spans exist: the rest no-ops
    tx.conn.execute(
        sa.delete(t.public_addresses).where(t.public_addresses.c.endpoint_id == endpoint_id)
    )
    return addrs


def on_write(
    tx: Tx, pools: Pools, endpoint: dict[str, Any], templates: dict[str, Any] | None
) -> dict[str, Any]:
    """After an endpoint is created or its spec changed (same transaction): check its
    workloads, allocate its addresses and show them in status at once."""
    check_workloads(endpoint["spec"], templates)
    addrs = sync_addresses(tx, pools, endpoint)
    status = dict(endpoint["status"], addresses=addrs, billable=_billable(endpoint["spec"]))
    return tx.update(endpoint["id"], status=status)


def _billable(spec: dict[str, Any]) -> list[str]:
    return [IPV4_BILLING_NOTE] if spec.get("ipv4") else []


# -- backends and the edge's configuration ----------------------------------------------------


def _env_instances(conn: Connection, env_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(t.resources).where(
            t.resources.c.kind == "instance", t.resources.c.env_id == env_id
        )
    ).mappings()
    return [resource_from_row(r) for r in rows]


def in_rotation(ins: dict[str, Any]) -> bool:
    """An instance takes new connections only while it is wanted, running and Ready."""
    st = ins["status"]
    ready = get_condition(st, "Ready")
    return (
        ins["spec"].get("desired", "running") == "running"
        and not ins["metadata"].get("deleting")
        and st.get("state") == "running"
        and bool(ready and ready["status"] == "true")
        and bool((st.get("addresses") or {}).get("ipv4"))
    )


def _nodes(conn: Any) -> list[dict[str, Any]]:
    rows = conn.execute(sa.select(t.resources).where(t.resources.c.kind == "node")).mappings()
    return [resource_from_row(r) for r in rows]


def down_nodes(conn: Any, nodes: list[dict[str, Any]] | None = None) -> set[str]:
    """Nodes that are not Ready: what their instances last reported can no longer be
    trusted (a lost node's instances leave rotation at once)."""
    return {str(n["id"]) for n in (_nodes(conn) if nodes is None else nodes) if not _node_ready(n)}


def edges_using(conn: Any, instance_id: str) -> dict[str, list[dict[str, str]]]:
    """The Ready nodes whose edge, by its last report, still sends new connections to the
    instance (``routing``) or still has connections to it open (``leaving``); what the
    instance's node waits for before it stops it."""
    out: dict[str, list[dict[str, str]]] = {"routing": [], "leaving": []}
    for n in sorted(_nodes(conn), key=lambda n: str(n["name"])):
        if not _node_ready(n):
            continue  # a lost node's report can't be trusted, nor waited for
        reports = (n["status"].get("edge") or {}).values()
        for key, field in (("routing", "backends"), ("leaving", "leaving")):
            if any(instance_id in (r.get(field) or ()) for r in reports):
                out[key].append({"id": str(n["id"]), "name": str(n["name"])})
    return out


def node_networks(
    conn: Any, *, exclude: str | None = None
) -> list[tuple[str, subnets.NodeNetwork]]:
    """(name, instance subnets) of every node that reported them, but *exclude* (a name)."""
    out = []
    for n in _nodes(conn):
        net = n["status"].get("network") or {}
        if n["name"] == exclude or n["metadata"]["deleting"] or not net.get("ipv4"):
            continue
        out.append((str(n["name"]), subnets.parse(net["ipv4"], net["ipv6"])))
    return out


def routes(node_id: str, nodes: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The routes *node_id* needs to reach the other nodes' instances: each IPv4 subnet via
    that node's address (none for a node that reported no address of its own, e.g. one
    host; and only via IPv4 addresses: an IPv4 route needs an IPv4 next hop)."""
    mine = next((n for n in nodes if n["id"] == node_id), None)
    if mine is None or not (mine["status"].get("network") or {}).get("address"):
        return []
    out = []
    for n in nodes:
        net = n["status"].get("network") or {}
        via = str(net.get("address") or "")
        if n["id"] == node_id or n["metadata"]["deleting"] or not via or ":" in via:
            continue
        out.append({"node": str(n["name"]), "subnet": net["ipv4"], "via": net["address"]})
    return sorted(out, key=lambda r: r["subnet"])


def backends(
    instances: list[dict[str, Any]], workloads: set[str], down: set[str] | None = None
) -> list[dict[str, Any]]:
    out = []
    for ins in sorted(instances, key=lambda i: str(i["name"])):
        wl = (ins.get("parent") or {}).get("name")
        if down and ins["spec"].get("node") in down:
            continue
        if wl in workloads and in_rotation(ins):
            addrs = ins["status"].get("addresses") or {}
            out.append(
                {
                    "instance": ins["id"],
                    "name": ins["name"],
                    "workload": wl,
                    "node": ins["spec"].get("node"),
                    "ipv4": addrs.get("ipv4"),
                    "ipv6": addrs.get("ipv6") or None,
                }
            )
    return out


def _edge_endpoints(
    conn: Any, nodes: list[dict[str, Any]], only: str | None
) -> dict[str, list[dict[str, Any]]]:
    """By node: the endpoints its edge serves (for the node *only*, or for every node), each
    port with the Ready instances behind it; each environment's instances read once."""
    rows = conn.execute(
        sa.select(t.resources).where(
            t.resources.c.kind == "endpoint", t.resources.c.deleting.is_(False)
        )
    ).mappings()
    down = down_nodes(conn, nodes)
    in_env: dict[str, list[dict[str, Any]]] = {}
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        ep = resource_from_row(row)
        edge = (ep["status"].get("edge_node") or {}).get("id")
        if not edge or (only is not None and edge != only):
            continue
        env_id = str(row["env_id"])
        if env_id not in in_env:
            in_env[env_id] = _env_instances(conn, env_id)
        addrs = addresses_of(conn, ep["id"])
        spec = ep["spec"]
        ports = [
            {
                "port": p["port"],
                "workload": p["workload"],
                "target_port": p["target_port"],
                "backends": [
                    {"instance": b["instance"], "host": b["ipv4"], "port": p["target_port"]}
                    for b in backends(in_env[env_id], {p["workload"]}, down)
                ],
            }
            for p in spec["ports"]
        ]
        out.setdefault(str(edge), []).append(
            {
                "endpoint": ep["id"],
                "name": ep["name"],
                "protocol": spec["protocol"],
                "proxy_protocol": spec["proxy_protocol"],
                "addresses": [a for a in (addrs["ipv6"], addrs["ipv4"]) if a],
                "ports": ports,
            }
        )
    for eps in out.values():
        eps.sort(key=lambda e: str(e["endpoint"]))
    return out


def _networks_digest(nodes: list[dict[str, Any]]) -> str:
    """A digest of what ``routes`` reads of every node: a node's routes change only when
    this does (so the etag need not carry every node's routes)."""
    seen = sorted(
        (
            str(n["id"]),
            str(n["name"]),
            bool(n["metadata"]["deleting"]),
            str((n["status"].get("network") or {}).get("ipv4") or ""),
            str((n["status"].get("network") or {}).get("address") or ""),
        )
        for n in nodes
    )
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()


def _etag(node_id: str, eps: list[dict[str, Any]], networks: str) -> str:
    doc = {"node": node_id, "endpoints": eps, "networks": networks}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def edge_config(store: Store, node_id: str) -> dict[str, Any]:
    """What the edge on ``node_id`` serves, with a digest of it (``etag``): the node long-polls
    until the digest changes."""
    with store.read() as conn:
        nodes = _nodes(conn)
        eps = _edge_endpoints(conn, nodes, node_id).get(node_id, [])
    return {
        "etag": _etag(node_id, eps, _networks_digest(nodes)),
        "endpoints": eps,
        "routes": routes(node_id, nodes),
    }


def edge_etags(store: Store) -> dict[str, str]:
    """Every node's ``edge_config`` etag, from one read of the endpoints and the nodes (what
    the edge long-polls of all the nodes wait on together: ``cove.api.views``)."""
    with store.read() as conn:
        nodes = _nodes(conn)
        eps = _edge_endpoints(conn, nodes, None)
    networks = _networks_digest(nodes)
    return {str(n["id"]): _etag(str(n["id"]), eps.get(str(n["id"]), []), networks) for n in nodes}


# -- the controller -----------------------------------------------------------------------------


def _node_ready(node: dict[str, Any]) -> bool:
    ready = get_condition(node["status"], "Ready")
    return bool(ready and ready["status"] == "true") and not node["metadata"].get("deleting")


class EndpointController:
    """Endpoint status: edge node, addresses, backends, edge report, Ready. Instance and
    node changes requeue here too (``reconcile`` maps them to their endpoints)."""

    name = "endpoints"
    kinds = ("endpoint", "instance", "node")

    def __init__(self, store: Store) -> None:
        self.store = store

    def _endpoints_for(self, key: str) -> list[str]:
        with self.store.read() as conn:
            if key.startswith("ins_"):
                env = conn.execute(
                    sa.select(t.resources.c.env_id).where(t.resources.c.id == key)
                ).scalar()
                q = sa.select(t.resources.c.id).where(t.resources.c.kind == "endpoint")
                if env is not None:  # (an instance already gone: its env is unknown, look at all)
                    q = q.where(t.resources.c.env_id == env)
            else:  # a node: every endpoint (the edge node of any of them may change)
                q = sa.select(t.resources.c.id).where(t.resources.c.kind == "endpoint")
            return [str(r) for (r,) in conn.execute(q)]

    def reconcile(self, key: str) -> float | None:
        if not key.startswith("ep_"):
            for ep in self._endpoints_for(key):
                self._reconcile(ep)
            return None
        return self._reconcile(key)

    def _reconcile(self, key: str) -> float | None:
        # read first: most wake-ups (heartbeats, unrelated instances) change nothing
        with self.store.read() as conn:
            ep = Tx(conn).get(key)
            if ep is None or ep["metadata"]["deleting"]:
                return None
            status = self._status(Tx(conn), ep)
        if status == ep["status"]:
            return None
        with self.store.write() as tx:
            new = tx.update(key, status=status, expected_revision=ep["metadata"]["revision"])
            before = get_condition(ep["status"], "Ready")
            after = get_condition(new["status"], "Ready")
            if after and (before or {}).get("reason") != after["reason"]:
                bad = after["reason"] in ("BindFailed", "UnknownWorkload")
                tx.event(new, "Warning" if bad else "Normal", after["reason"], after["message"])
        return None

    def _status(self, tx: Tx, ep: dict[str, Any]) -> dict[str, Any]:
        key = ep["id"]
        row = tx.row(key)
        assert row is not None
        env_id = str(row["env_id"])
        status = dict(ep["status"])
        spec = ep["spec"]
        status["addresses"] = addresses_of(tx.conn, key)
        status["billable"] = _billable(spec)
        templates = release_templates(tx, env_id)
        node = self._edge_node(tx, status.get("edge_node"), ep)
        status["edge_node"] = {"id": node["id"], "name": node["name"]} if node else None
        wls = {p["workload"] for p in spec["ports"]}
        bs = backends(_env_instances(tx.conn, env_id), wls, down_nodes(tx.conn))
        status["backends"] = bs
        report = ((node or {}).get("status", {}).get("edge") or {}).get(key) or {}
        status["edge"] = {
            "bound": [list(b) for b in report.get("bound") or []],
            # what the edge applied: the instances it sends new connections to (it hears
            # of a change to `backends` a moment after the store has it)
            "backends": sorted(str(i) for i in report.get("backends") or []),
            "errors": list(report.get("errors") or []),
        }
        applied = set(status["edge"]["backends"])
        routed = [b for b in bs if b["instance"] in applied]
        if report.get("counters"):
            status["traffic"] = dict(report["counters"])
        missing = sorted(wls - set(templates or {})) if templates is not None else []
        want = _listens(spec, status["addresses"])
        bound = {(str(b[0]), str(b[1]), int(b[2])) for b in status["edge"]["bound"]}
        shown = _shown(status["addresses"])
        if node is None:
            cond = ("false", "WaitingForNode", "no Ready node runs an edge; addresses reserved")
        elif status["edge"]["errors"]:
            cond = ("false", "BindFailed", "; ".join(status["edge"]["errors"]))
        elif not want <= bound:
            cond = ("false", "Binding", f"the edge on {node['name']} is binding {shown}")
        elif missing:
            cond = (
                "false",
                "UnknownWorkload",
                f"the deployed release has no workload {', '.join(missing)}",
            )
        elif not bs:
            what = "nothing is deployed yet" if templates is None else "no instance is Ready"
            cond = ("false", "NoReadyInstances", f"listening on {shown}; {what}")
        elif not routed:
            cond = ("false", "Routing", f"the edge on {node['name']} is taking the instances in")
        else:
            n = f"{len(routed)}" if len(routed) == len(bs) else f"{len(routed)} of {len(bs)}"
            cond = ("true", "Serving", f"{n} instance(s) behind {shown}")
        set_condition(status, "Ready", cond[0], cond[1], cond[2])  # type: ignore[arg-type]
        if cond[1] == "BindFailed":
            set_condition(status, "Failed", "true", "BindFailed", cond[2])
        elif get_condition(status, "Failed") is not None:
            set_condition(status, "Failed", "false", "Bound", "the edge is listening")
        status["observed_generation"] = ep["metadata"]["generation"]
        return status

    def _edge_node(
        self, tx: Tx, current: dict[str, Any] | None, ep: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Sticky: the node already serving keeps the endpoint while it is Ready. Otherwise
        the Ready node running most instances of the endpoint's workloads, then by name."""
        if current:
            node = tx.get(str(current.get("id")))
            if node is not None and _node_ready(node):
                return node
        nodes = [
            resource_from_row(r)
            for r in tx.conn.execute(
                sa.select(t.resources).where(t.resources.c.kind == "node")
            ).mappings()
        ]
        nodes = [n for n in nodes if _node_ready(n)]
        if not nodes:
            return None
        row = tx.row(ep["id"])
        assert row is not None
        wls = {p["workload"] for p in ep["spec"]["ports"]}
        here: dict[str, int] = {}
        for ins in _env_instances(tx.conn, str(row["env_id"])):
            if (ins.get("parent") or {}).get("name") in wls:
                n = str(ins["spec"].get("node") or "")
                here[n] = here.get(n, 0) + 1
        return min(nodes, key=lambda n: (-here.get(n["id"], 0), str(n["name"])))


def _listens(spec: dict[str, Any], addrs: dict[str, str | None]) -> set[tuple[str, str, int]]:
    return {
        (str(spec["protocol"]), a, int(p["port"]))
        for a in (addrs.get("ipv6"), addrs.get("ipv4"))
        if a
        for p in spec["ports"]
    }


def _shown(addrs: dict[str, str | None]) -> str:
    out = []
    if addrs.get("ipv6"):
        out.append(f"[{addrs['ipv6']}]")
    if addrs.get("ipv4"):
        out.append(str(addrs["ipv4"]))
    return " and ".join(out) or "no address"
