"""A cluster of several hosts, built on this one: PostgreSQL, two ``cove server`` replicas and
two node agents, each in a network namespace of its own with its own addresses.

    netns ctl:  bridge br0 10.77.0.1/24 ── servers a, b (TCP on 10.77.0.1, unix sockets)
                  │ veth                  │ veth
    netns n1:   eth0 10.77.0.11      netns n2: eth0 10.77.0.12
                agent 1 (bridge, instances, edge)   agent 2 (...)

The agents reach the replicas over the link (both URLs: they fail over); PostgreSQL through
its unix socket; the test and its CLI through the replicas' unix sockets. Every address is
in a namespace the test made, and deleting the namespaces at teardown removes them.

Instances spread across the nodes; an endpoint on one node's edge reaches the instance on
the other (the nodes route each other's instance subnets, host-gw); a node cut off (its
veth down) is replaced elsewhere, and when the link comes back its stale instance stops (no
duplicate serves); draining a node moves its instance with no request lost through the
endpoint; a killed agent's instance is replaced within the node timing, and stops when the
agent returns; the agents carry on through the other replica when the leader dies.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.fixtures.images import BuiltImage, ImageBuilder, require_tools

from .deploy_support import (
    Cluster,
    Deployment,
    builder,
    destroy_sandboxes,
    is_ready,
    sandbox_ids,
    wait_for,
)
from .edge_support import _start, body, build_edge_image, http_get, in_netns, stop_all
from .helpers import COVE, Api
from .test_endpoints_e2e import app_toml, endpoint_toml, serving
from .test_replicas import sign_up_operator, start_replicas

__all__ = ["builder"]

pytestmark = pytest.mark.timeout(300)

UNDERLAY = "10.77.0"  # the link between the hosts: .1 the servers, .11/.12 the nodes
# the servers' node timing (`cove server --node-grace --evict-after`; defaults 15 s + 30 s)
GRACE, EVICT_AFTER = 10, 5


@dataclass
class Node:
    name: str
    netns: str
    veth: str  # its end of the link, in the ctl namespace
    state_dir: Path
    address: str
    server: str = ""  # what its agent gets as --server
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class MultiNode(Cluster):
    ctl: str = ""
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sockets: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def node(self, name_or_id: str) -> Node:
        api = self.api()
        try:
            n = api.call("GET", f"/v1/nodes/{name_or_id}")
        finally:
            api.close()
        return next(x for x in self.nodes if x.name == n["name"])

    def logs(self) -> str:
        out = []
        for f in sorted((self.home / "logs").glob("*.log")):
            out.append(f"--- {f.name} ---\n{f.read_text()[-2500:]}")
        return "\n".join(out)


def start_agent(home: Path, n: Node) -> None:
    n.proc = _start(
        [
            "nsenter", f"--net=/run/netns/{n.netns}",
            str(COVE), "agent", "--server", n.server,
            "--name", n.name, "--driver", "sandbox", "--state-dir", str(n.state_dir),
        ],
        home,
        home / "logs" / f"agent-{n.name}.log",
        {},
    )  # fmt: skip


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _socket_url(admin: sa.Engine, db: str) -> str:
    """The database's URL through PostgreSQL's unix socket (the servers run in a namespace
    without the host's loopback)."""
    with admin.connect() as conn:
        sockdir = str(conn.exec_driver_sql("SHOW unix_socket_directories").scalar()).split(",")[0]
    u = admin.url
    url = sa.engine.URL.create(
        u.drivername,
        username=u.username,
        password=u.password,
        database=db,
        query={"host": sockdir.strip(), "port": str(u.port)},
    )
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def multinode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    admin_url = os.environ.get("COVE_TEST_PG_URL")
    if not admin_url:
        pytest.skip("needs COVE_TEST_PG_URL (make test starts a PostgreSQL)")
    require_tools("bwrap", "skopeo", "umoci", "ip", "nsenter", "gcc")
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("the sandbox driver needs root and the cgroup v1 memory controller")
    from cove.agent.main import default_state_dir

    tag = secrets.token_hex(3)
    home = tmp_path_factory.mktemp("cove-multinode")
    scratch = tmp_path_factory.mktemp("cove-multinode-apps")
    for sub in ("run", "logs"):
        (home / sub).mkdir()
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    db = f"e2e_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{db}"')
    ctl = f"cove-mn-{tag}"
    nodes = [
        Node(
            name=f"mn-{tag}-{i}",
            netns=f"cove-mn-{tag}-{i}",
            veth=f"vmn{tag}{i}",
            state_dir=default_state_dir(home / f"node{i}"),
            address=f"{UNDERLAY}.1{i}",
        )
        for i in (1, 2)
    ]
    made: list[str] = []
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for ns in [ctl, *(n.netns for n in nodes)]:
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        _ip("-n", ctl, "addr", "add", f"{UNDERLAY}.1/24", "dev", "br0")
        _ip("-n", ctl, "link", "set", "br0", "up")
        for n in nodes:
            _ip("-n", ctl, "link", "add", n.veth, "type", "veth", "peer", "eth0", "netns", n.netns)
            _ip("-n", ctl, "link", "set", n.veth, "master", "br0", "up")
            _ip("-n", n.netns, "addr", "add", f"{n.address}/24", "dev", "eth0")
            _ip("-n", n.netns, "link", "set", "eth0", "up")

        env = {"COVE_DATABASE_URL": _socket_url(admin, db), "COVE_LOCAL_IMAGES": "1"}
        sub = int(tag[:4], 16)
        sockets = {name: f"unix:{home / 'run' / f'{name}.sock'}" for name in ("a", "b")}
        urls = start_replicas(
            home, procs, env, lambda name, url_file: [
                # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroups
                "nsenter", f"--net=/run/netns/{ctl}",
                str(COVE), "server", "--host", f"{UNDERLAY}.1", "--port", "0",
                "--url-file", str(url_file), "--unix-socket", sockets[name][5:],
                "--public-ipv6", f"2001:db8:{sub:x}::/64", "--public-ipv4", "192.0.2.0/28",
                "--node-grace", f"{GRACE}s", "--evict-after", f"{EVICT_AFTER}s",
            ],
        )  # fmt: skip
        org, project, token = sign_up_operator(home, sockets["b"])
        for n in nodes:
            n.state_dir.parent.mkdir(parents=True, exist_ok=True)
            n.server = f"{urls['a']},{urls['b']}"
            start_agent(home, n)

        def all_ready() -> bool:
            a = Api(sockets["b"], token)
            try:
                mine = [
                    x for x in a.call("GET", "/v1/nodes")["items"] if x["name"].startswith("mn-")
                ]
                return len(mine) == len(nodes) and all(is_ready(x) for x in mine)
            finally:
                a.close()

        wait_for(lambda: all_ready() or None, timeout=60, what="both agents to join")
        c = MultiNode(home, sockets["b"], nodes[0].state_dir, org, project, token, scratch)
        c.ctl, c.servers, c.sockets, c.nodes = ctl, procs, sockets, nodes
        yield c
    finally:
        stop_all([n.proc for n in nodes] + list(procs.values()))
        problems = []
        for n in nodes:
            if n.state_dir.exists():
                problems += destroy_sandboxes(n.state_dir)
                shutil.rmtree(n.state_dir, ignore_errors=True)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.dispose()
        assert not problems, problems


@pytest.fixture(scope="module")
def image(builder: ImageBuilder, multinode: MultiNode) -> BuiltImage:
    return build_edge_image(builder, "a", multinode.scratch)


def _routes(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", netns, "-4", "route", "show", "proto", "163"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return sorted(line.split()[0] + " via " + line.split()[2] for line in out.splitlines())


def _names_through(c: MultiNode, edge: Node, address: str, tries: int = 8) -> set[str]:
    return {
        body(in_netns(edge.netns, lambda: http_get(address, 80))).split()[-1] for _ in range(tries)
    }


def _deployed(c: MultiNode, image: BuiltImage) -> tuple[Deployment, dict[str, Any]]:
    d = c.deployment("spread")
    d.write_toml_text(app_toml(image.ref, count=2, web=endpoint_toml("web", ["80:web:8080"])))
    r = d.deploy()
    assert r.code == 0, f"{r}\n{c.logs()}"

    def ready() -> dict[str, Any] | None:
        e: dict[str, Any] = d._get("/v1/endpoints/web")
        return e if serving(e, 2) else None

    ep = wait_for(
        ready,
        timeout=60,
        what="endpoint web serving 2 instances",
        explain=c.logs,
    )
    return d, ep


_STATE: dict[str, Any] = {}


def _spread_deployment(c: MultiNode) -> tuple[Deployment, Node, Node, str]:
    """The first test's deployment: (it, the edge's node, the other node, the IPv6 address)."""
    if "d" not in _STATE:
        pytest.skip("needs the deployment of the spread test")
    edge = _STATE["edge"]
    return _STATE["d"], edge, next(n for n in c.nodes if n is not edge), _STATE["v6"]


def test_instances_spread_and_an_endpoint_reaches_the_other_node(
    multinode: MultiNode, image: BuiltImage
) -> None:
    c = multinode
    api = c.api()
    try:
        nodes = {n["name"]: n for n in api.call("GET", "/v1/nodes")["items"]}
    finally:
        api.close()
    # each node reported its own instance subnet and the address the others reach it at
    nets = {name: nodes[name]["status"]["network"] for name in (n.name for n in c.nodes)}
    assert {nets[n.name]["address"] for n in c.nodes} == {n.address for n in c.nodes}, nets
    assert nets[c.nodes[0].name]["ipv4"] != nets[c.nodes[1].name]["ipv4"], nets
    # ... and routes the other's subnet via it
    for me, other in (c.nodes, c.nodes[::-1]):
        want = [f"{nets[other.name]['ipv4']} via {other.address}"]
        wait_for(lambda me=me, want=want: _routes(me.netns) == want or None, timeout=30,  # type: ignore[misc]
                 what=f"{me.name} to route {want}")  # fmt: skip

    d, ep = _deployed(c, image)
    placed = {i["name"]: i["spec"]["node"] for i in d.api_instances()}
    assert len(set(placed.values())) == 2, f"spread over both nodes: {placed}"
    edge = c.node(ep["status"]["edge_node"]["id"])
    v6 = ep["status"]["addresses"]["ipv6"]
    # one instance runs on the edge's node, the other behind the link
    assert _names_through(c, edge, v6) == set(placed), (placed, c.logs())
    _STATE.update(d=d, edge=edge, v6=v6)


def test_a_partitioned_node_is_replaced_and_its_instance_stops_when_it_heals(
    multinode: MultiNode,
) -> None:
    c = multinode
    d, edge, cut, v6 = _spread_deployment(c)
    [stale] = [i for i in d.api_instances() if c.node(i["spec"]["node"]) is cut]
    assert stale["id"] in sandbox_ids(cut.state_dir)

    _ip("-n", c.ctl, "link", "set", cut.veth, "down")  # the partition
    try:

        def replaced() -> list[dict[str, Any]] | None:
            running = [
                i
                for i in d.api_instances()
                if i["spec"].get("desired") == "running" and i["id"] != stale["id"] and is_ready(i)
            ]
            return running if len(running) == 2 else None

        now = wait_for(replaced, timeout=60, what="the cut-off node's instance to be replaced",
                       explain=c.logs)  # fmt: skip
        assert {c.node(i["spec"]["node"]).name for i in now} == {edge.name}, now
        # cut off, the node still runs its instance: nobody told it otherwise
        assert stale["id"] in sandbox_ids(cut.state_dir)
        # ... but it gets no traffic: the endpoint serves the replacements only
        wait_for(lambda: serving(d._get("/v1/endpoints/web"), 2) or None, timeout=30,
                 what="the endpoint to serve the replacements")  # fmt: skip
        assert _names_through(c, edge, v6) == {i["name"] for i in now}
    finally:
        _ip("-n", c.ctl, "link", "set", cut.veth, "up")  # heal

    wait_for(
        lambda: stale["id"] not in sandbox_ids(cut.state_dir) or None,
        timeout=60,
        what="the healed node to stop the replaced instance",
        explain=c.logs,
    )
    api = c.api()
    try:
        node = api.call("GET", f"/v1/nodes/{cut.name}")
        wait_for(lambda: is_ready(api.call("GET", f"/v1/nodes/{cut.name}")) or None, timeout=30,
                 what="the healed node to be Ready again")  # fmt: skip
    finally:
        api.close()
    # no duplicates: what runs on the nodes is exactly what the API wants running
    wanted = {i["id"] for i in d.api_instances() if i["spec"].get("desired") == "running"}
    running = set(sandbox_ids(c.nodes[0].state_dir)) | set(sandbox_ids(c.nodes[1].state_dir))
    assert running == wanted, (running, wanted, node)
    assert _names_through(c, edge, v6) == {
        i["name"] for i in d.api_instances() if i["id"] in wanted
    }


def test_draining_a_node_moves_its_instance_with_no_request_lost(multinode: MultiNode) -> None:
    c = multinode
    d, edge, other, v6 = _spread_deployment(c)
    r = d.cove("scale", "web=3", "--wait", "--timeout", "60s")
    assert r.code == 0, f"{r}\n{c.logs()}"
    [moving] = [i for i in d.api_instances() if c.node(i["spec"]["node"]) is other]  # spread

    stop = threading.Event()
    answered: list[str] = []
    failures: list[str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                answered.append(body(http_get(v6, 80)).split()[-1])
            except OSError as exc:
                failures.append(f"{time.monotonic():.3f} {exc!r}")

    worker = threading.Thread(target=in_netns, args=(edge.netns, load, 300), daemon=True)
    worker.start()
    try:
        time.sleep(1.0)
        r = c.cove("nodes", "drain", other.name, "--wait", "--timeout", "90s", timeout=120)
        assert r.code == 0, f"{r}\n{c.logs()}"
        wait_for(
            lambda: moving["id"] not in sandbox_ids(other.state_dir) or None,
            timeout=30,
            what="the drained instance to be stopped and removed",
        )
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(30)
        assert c.cove("nodes", "uncordon", other.name).code == 0
    print(f"drain under load: {len(answered)} requests, {len(failures)} failed")
    # the instance's node waited for the edge on the other node, not for a timeout
    events = d._get("/v1/events", parent=moving["id"], limit=1000)["items"]
    drains = [f"{e['spec']['reason']}: {e['spec']['message']}" for e in events
              if e["spec"]["reason"] in ("Drained", "DrainTimeout")]  # fmt: skip
    print("drain events:", drains)
    assert not [m for m in drains if m.startswith("DrainTimeout")], drains
    assert not failures, f"{len(failures)} of {len(answered) + len(failures)}: {failures[:5]}"
    assert moving["name"] in answered and len(answered) > 50, len(answered)
    now = [i for i in d.api_instances() if i["spec"].get("desired") == "running"]
    assert len(now) == 3 and {c.node(i["spec"]["node"]).name for i in now} == {edge.name}, now
    assert answered[-1] in {i["name"] for i in now}


def test_a_killed_agent_is_replaced_in_time_and_its_instance_stops_when_it_returns(
    multinode: MultiNode,
) -> None:
    c = multinode
    d, _, victim, _ = _spread_deployment(c)
    r = d.cove("scale", "web=4", "--wait", "--timeout", "60s")
    assert r.code == 0, f"{r}\n{c.logs()}"
    [stale] = [i for i in d.api_instances() if c.node(i["spec"]["node"]) is victim]  # spread
    assert victim.proc is not None
    victim.proc.kill()  # SIGKILL: no goodbye; its instance runs on under its supervisor
    victim.proc.wait()
    t0 = time.monotonic()

    def replaced() -> list[dict[str, Any]] | None:
        others = [
            i
            for i in d.api_instances()
            if i["spec"].get("desired") == "running" and i["id"] != stale["id"] and is_ready(i)
        ]
        return others if len(others) == 4 else None

    wait_for(replaced, timeout=60, what="the instance of the dead agent to be replaced",
             explain=c.logs)  # fmt: skip
    took = time.monotonic() - t0
    print(f"killed agent: replaced after {took:.1f}s (grace {GRACE}s + evict {EVICT_AFTER}s)")
    # the documented time: the grace, the eviction delay, then a start elsewhere
    assert took < GRACE + EVICT_AFTER + 20, took
    assert stale["id"] in sandbox_ids(victim.state_dir)

    start_agent(c.home, victim)  # it adopts its instance, learns it was replaced, stops it
    wait_for(
        lambda: stale["id"] not in sandbox_ids(victim.state_dir) or None,
        timeout=60,
        what="the returning agent to stop the replaced instance",
        explain=c.logs,
    )
    wanted = {i["id"] for i in d.api_instances() if i["spec"].get("desired") == "running"}
    running = set(sandbox_ids(c.nodes[0].state_dir)) | set(sandbox_ids(c.nodes[1].state_dir))
    assert running == wanted, (running, wanted)


def test_the_agents_carry_on_through_the_other_replica_when_the_leader_dies(
    multinode: MultiNode,
) -> None:
    c = multinode
    c.servers["a"].kill()  # the leader; the agents were talking to it first
    c.servers["a"].wait()
    api = c.api()  # replica b
    try:
        wait_for(
            lambda: api.call("GET", "/v1/cluster")["this_replica"]["leading"] or None,
            timeout=30,
            what="replica b to take the lease",
        )
        seen = api.call("GET", "/v1/nodes")["items"]
        before = {n["name"]: n["status"]["last_heartbeat"] for n in seen}

        def beating() -> bool:
            now = {n["name"]: n for n in api.call("GET", "/v1/nodes")["items"]}
            return all(
                now[n.name]["status"]["last_heartbeat"] != before[n.name] and is_ready(now[n.name])
                for n in c.nodes
            )

        wait_for(lambda: beating() or None, timeout=30, what="heartbeats through replica b",
                 explain=c.logs)  # fmt: skip
    finally:
        api.close()
    if "d" in _STATE:  # and the cluster still deploys: scale up through b, placed by b
        d: Deployment = _STATE["d"]
        r = d.cove("scale", "web=5", "--wait", "--timeout", "60s")
        assert r.code == 0, f"{r}\n{c.logs()}"
        assert len([i for i in d.api_instances() if is_ready(i)]) == 5
