"""A real ``cove up --driver sim`` (server + one agent with the sim runtime driver): a
deployed workload's instances reach ``running`` and Ready through the real API, with
nothing run, pulled or mounted on the node and no root networking."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import Api, Server, quick_user, run_cove, server_log, stop
from tests.fixtures.images import benign_layer, write_oci_layout


@pytest.fixture
def sim_cluster(tmp_path: Path) -> Iterator[Server]:
    home = tmp_path / "home"
    try:
        r = run_cove(["up", "--detach", "--port", "0", "--driver", "sim"], home=home, timeout=60)
        assert r.code == 0, f"{r}\n--- log ---\n{server_log(home)}"
        yield Server(url=r.out.strip(), home=home)
    finally:
        stop(home)


def test_sim_agent_runs_a_deployed_workload(sim_cluster: Server, tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "img", [benign_layer()], tag="v1")
    user = quick_user(sim_cluster, tmp_path / "alice", "alice")
    api = Api(sim_cluster.url, user.token)
    try:
        deadline = time.monotonic() + 15
        while True:
            nodes = api.call("GET", "/v1/nodes")["items"]
            if nodes and any(
                c["type"] == "Schedulable" and c["status"] == "true"
                for c in nodes[0]["status"].get("conditions", [])
            ):
                break
            assert time.monotonic() < deadline, f"no schedulable sim node: {nodes}"
            time.sleep(0.1)
        node = nodes[0]
        assert node["status"]["driver"] == "sim"
        assert "nothing runs" in node["status"]["driver_detail"]
        api.create("apps", "web", org=user.org, project=user.project)
        rec = api.call(
            "POST",
            "/v1/deploys",
            {
                "org": user.org,
                "project": user.project,
                "app": "web",
                "env": "prod",
                "image": f"oci:{image.layout}:v1",
                "workloads": {
                    "web": {
                        "count": 3,
                        "size": "nano",
                        # no process listens: the sim plays a passing check
                        "checks": [
                            {"type": "tcp", "port": 8080, "interval": "1s", "timeout": "1s"}
                        ],
                    }
                },
            },
        )
        op = api.wait_op(rec, timeout="20s")
        assert op["status"]["state"] == "succeeded", op
        items = api.call("GET", "/v1/instances", org=user.org, project=user.project, app="web")[
            "items"
        ]
        live = [i for i in items if i["spec"]["desired"] == "running"]
        assert len(live) == 3
        for ins in live:
            st = ins["status"]
            assert st["state"] == "running" and st["driver"] == "sim", st
            ready = next(c for c in st["conditions"] if c["type"] == "Ready")
            assert ready["status"] == "true", st
            assert st["node"] == node["id"]
        events = api.call("GET", f"/v1/instances/{live[0]['id']}/events")["items"]
        started = [e for e in events if e["spec"]["reason"] == "Started"]
        assert started and "on sim" in started[0]["spec"]["message"]
    finally:
        api.close()
    state = sim_cluster.home / "agent" / "sim" / "instances"
    assert len(list(state.glob("ins_*.json"))) == 3
    assert not (sim_cluster.home / "agent" / "images").exists()  # nothing pulled
