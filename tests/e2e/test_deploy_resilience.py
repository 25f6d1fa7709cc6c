"""Crashes of cove itself: the agent killed with SIGKILL (instances run on under their
supervisors and are adopted, not restarted) and the server killed in the middle of a
rollout (it converges after `cove up` again: no instance lost or duplicated). One
``cove up`` for the module; the tests run in order and share one app."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sqlite3
import time
from decimal import Decimal
from typing import Any

import pytest

from tests.fixtures.images import BuiltImage

from .deploy_support import (  # noqa: F401  (fixtures)
    HTTP_CHECK,
    Cluster,
    Deployment,
    app_image,
    builder,
    cluster,
    cove_pids,
    is_ready,
    one_pid,
    process_alive,
    runtime_status,
    sandbox_ids,
    ts,
    wait_for,
)


@pytest.fixture(scope="module")
def web(cluster: Cluster, app_image: BuiltImage) -> Deployment:  # noqa: F811
    """Two healthy instances of v1."""
    d = cluster.deployment()
    d.write_toml(app_image.ref, count=2, checks=[HTTP_CHECK], deadline="30s")
    r = d.deploy()
    assert r.code == 0, f"{r}\n--- log ---\n{cluster.log()}"
    return d


@pytest.mark.timeout(90)
def test_agent_killed_instances_run_on_and_are_adopted(
    cluster: Cluster,  # noqa: F811
    web: Deployment,
) -> None:
    before = {i["id"]: i for i in web.instances()}
    assert len(before) == 2 and all(is_ready(i) for i in before.values())
    sandboxes = {iid: runtime_status(cluster.state_dir, iid) for iid in before}
    log_mark = len(cluster.log())

    agent = one_pid(cluster.home, "agent")
    os.kill(agent, signal.SIGKILL)
    killed_at = time.time()
    # `cove up` notices and starts another agent, which adopts what runs
    successor = wait_for(
        lambda: [p for p in cove_pids(cluster.home, "agent") if p != agent],
        timeout=30,
        what="cove up to restart the agent",
    )
    assert len(successor) == 1
    wait_for(
        lambda: "adopted 2 running instance(s)" in cluster.log()[log_mark:],
        timeout=30,
        what="the new agent to adopt both instances",
    )
    print(f"\nagent SIGKILL -> successor adopted both instances: {time.time() - killed_at:.2f}s")

    # once the new agent has reported on both, look at what the API says
    wait_for(
        lambda: all(ts(i["status"]["reported_at"]) > killed_at for i in web.api_instances()),
        timeout=30,
        what="the new agent to report on both instances",
    )
    after = {i["id"]: i for i in web.instances()}
    assert set(after) == set(before), "instances were replaced"
    for iid, ins in after.items():
        assert is_ready(ins), ins["status"]
        assert ins["status"]["addresses"] == before[iid]["status"]["addresses"]
        assert ins["status"]["restart_count"] == 0, ins["status"]
        assert ins["status"]["started_at"] == before[iid]["status"]["started_at"]
        now = runtime_status(cluster.state_dir, iid)
        # the same supervisor and the same sandbox process ran on throughout
        assert now["state"] == "running"
        assert now["supervisor_pid"] == sandboxes[iid]["supervisor_pid"]
        assert now["pid"] == sandboxes[iid]["pid"]
        assert now["started_at"] == sandboxes[iid]["started_at"]
        assert process_alive(now["supervisor_pid"]) and process_alive(now["pid"])

    # the new agent really watches the adopted instances: kill one's sandbox, it restarts
    victim = sorted(after)[0]
    os.kill(sandboxes[victim]["pid"], signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        ins = next((i for i in web.api_instances() if i["id"] == victim), None)
        return ins if ins and ins["status"]["restart_count"] == 1 and is_ready(ins) else None

    ins = wait_for(
        restarted,
        timeout=30,
        what="the adopted instance to be restarted once and Ready",
        explain=lambda: [(i["name"], i["status"]) for i in web.api_instances()],
    )
    assert ins["status"]["last_termination_reason"] in ("signal", "killed"), ins["status"]
    other = next(i for i in web.api_instances() if i["id"] != victim)
    assert other["status"]["restart_count"] == 0 and is_ready(other)


@pytest.mark.timeout(150)
def test_server_killed_mid_rollout_converges(
    cluster: Cluster,  # noqa: F811
    web: Deployment,
    app_image: BuiltImage,  # noqa: F811
) -> None:
    # v2 takes a while to become Ready (grace), so the server dies in the middle of it
    slow = dict(HTTP_CHECK, grace="3s")
    web.write_toml(app_image.ref, count=2, env={"V": "2"}, checks=[slow], deadline="60s")
    r = web.cove("deploy", "--detach")
    assert r.code == 0, str(r)
    wait_for(
        lambda: [i for i in web.running("v2") if i["status"].get("state") == "running"],
        timeout=30,
        what="a v2 instance to be started",
    )
    assert not all(is_ready(i) for i in web.running("v2")), "too late: v2 is already Ready"

    server = one_pid(cluster.home, "server")
    up = one_pid(cluster.home, "up")
    os.kill(server, signal.SIGKILL)
    # `cove up` exits when its server dies (stopping its agent); nothing of it is left
    wait_for(lambda: not cove_pids(cluster.home), timeout=30, what="cove up to exit")
    # an exiting process loses its command line a moment before it is gone
    wait_for(lambda: not process_alive(up), timeout=10, what="the cove up process to be gone")

    restarted_at = time.monotonic()
    cluster.up()  # the same COVE_HOME, so the same database and agent state
    final = web.wait_converged(2, "v2", timeout=90)
    print(
        f"\nserver SIGKILL mid-rollout: `cove up -d` again -> v2 converged in "
        f"{time.monotonic() - restarted_at:.2f}s"
    )
    assert len({i["name"] for i in final}) == 2
    listed = web.instances()
    assert sorted(i["id"] for i in listed) == sorted(i["id"] for i in final)
    assert all(is_ready(i) and i["spec"]["release_name"] == "v2" for i in listed)

    # on the node: exactly those sandboxes (old ones torn down, none twice, none orphaned)
    wait_for(
        lambda: set(sandbox_ids(cluster.state_dir)) == {i["id"] for i in final},
        timeout=30,
        what=f"the node to run exactly {[i['id'] for i in final]}",
    )
    st = web.status()
    assert st["ready"]["status"] == "true" and st["ready"]["reason"] == "RolloutComplete", st
    assert st["current"]["workloads"]["web"] == {"desired": 2, "running": 2, "ready": 2}, st
    v1, v2 = web.releases()
    assert v2["status"]["state"] == "active" and v1["status"]["state"] == "superseded"
    api = cluster.api()
    nodes = api.call("GET", "/v1/nodes")["items"]
    api.close()
    assert len(nodes) == 1 and is_ready(nodes[0]), "the agent came back as the same node"


def _spans(cluster: Cluster) -> list[dict[str, Any]]:  # noqa: F811
    """The metered spans, read from the server's SQLite file (read-only)."""
    db = cluster.home / "data" / "cove.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT subject_id, subject_name, started_ms, ended_ms, open FROM meter_intervals "
            "WHERE meter = 'instance' ORDER BY started_ms"
        ).fetchall()
    return [dict(r) for r in rows]


def test_usage_is_neither_lost_nor_repeated_by_the_crashes(
    cluster: Cluster,  # noqa: F811
    web: Deployment,
) -> None:
    """After an agent SIGKILL (instances adopted) and a server SIGKILL mid-rollout: each
    instance's billed time is one span per run, none overlapping, the v1 instance that
    ran throughout billed from its start to its stop in one piece, and the invoice's lines
    add up."""
    spans = _spans(cluster)
    by: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by.setdefault(s["subject_id"], []).append(s)
    for sid, runs in by.items():
        assert sum(1 for r in runs if r["open"] == 1) <= 1, runs
        for a, b in itertools.pairwise(runs):
            assert a["ended_ms"] is not None and a["ended_ms"] <= b["started_ms"], (sid, runs)
    final = {i["id"]: i for i in web.instances()}
    for iid, ins in final.items():
        [run] = by[iid]  # v2 ran through the server's crash: one open span
        assert run["open"] == 1, run
        started = ts(ins["status"]["started_at"]) * 1000
        assert abs(run["started_ms"] - started) < 3000, (run, ins["status"])
    # the v1 instance that was never killed: one span from its start to its rollout stop,
    # across the agent's SIGKILL and the server's
    v1 = {sid: runs for sid, runs in by.items() if sid not in final}
    single = [runs[0] for runs in v1.values() if len(runs) == 1]
    assert single, v1
    assert all(r["open"] is None and r["ended_ms"] > r["started_ms"] for r in single), single

    inv = web.json("billing", "invoice")
    total = sum(Decimal(ln["amount"]) for ln in inv["lines"])
    assert Decimal(inv["total"]) == total, inv
    billed_ms = sum((r["ended_ms"] or int(time.time() * 1000)) - r["started_ms"] for r in spans)
    seconds = sum(Decimal(ln["quantity"]) for ln in inv["lines"] if ln["unit"] == "second")
    # the invoice counts this cluster's other apps too (same org): at least these spans
    assert seconds * 1000 >= billed_ms - 5000, (seconds, billed_ms)
