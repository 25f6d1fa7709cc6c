"""Two ``cove server`` replicas on one PostgreSQL: both serve the API, one runs the
controllers; kill the leader mid-rollout and the rollout completes under the other.

The agent and the CLI talk to the replica that survives (agents fail over between replicas
only through an address in front of them; see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.fixtures.images import BuiltImage

from .deploy_support import (  # noqa: F401  (fixtures)
    HTTP_CHECK,
    Cluster,
    agent_state_dir,
    app_image,
    builder,
    destroy_sandboxes,
    is_ready,
    reserve_addresses,
    wait_for,
)
from .edge_support import _start, stop_all
from .helpers import COVE, PASSWORD, Api, run_cove, uniq


def _url_of(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def _cluster_doc(url: str, token: str) -> dict[str, Any] | None:
    api = Api(url, token)
    try:
        doc: dict[str, Any] = api.call("GET", "/v1/cluster")
        return doc
    except Exception:
        return None
    finally:
        api.close()


def start_replicas(
    home: Path,
    procs: dict[str, subprocess.Popen[bytes]],
    env: dict[str, str],
    command: Callable[[str, Path], list[str]],
) -> dict[str, str]:
    """Start replicas a and b (``command(name, url_file)``, logs in ``home/logs``), a first
    and until it holds the controller lease; their URLs by name."""
    urls: dict[str, str] = {}
    for name in ("a", "b"):
        url_file = home / "run" / f"{name}.url"
        procs[name] = _start(
            command(name, url_file), home, home / "logs" / f"server-{name}.log", env
        )
        urls[name] = wait_for(
            partial(_url_of, url_file), timeout=30, what=f"replica {name} to listen"
        )
        if name == "a":
            wait_for(
                lambda: "this replica" in (home / "logs" / "server-a.log").read_text() or None,
                timeout=30,
                what="replica a to take the controller lease",
            )
    return urls


def sign_up_operator(home: Path, url: str) -> tuple[str, str, str]:
    """Sign up an operator (CLI config in *home*) with an org and a project: (org, project,
    token)."""
    email, org, project = f"{uniq('ops')}@example.com", uniq("org"), uniq("prj")
    r = run_cove(
        ["auth", "signup", "--email", email, "--password", PASSWORD, "--org", org],
        home=home,
        env={"COVE_API_URL": url},
    )
    assert r.code == 0, str(r)
    token = json.loads((home / "config.json").read_text())["token"]
    api = Api(url, token)
    try:
        api.create("projects", project, org=org)
    finally:
        api.close()
    return org, project, token


class Replicas(Cluster):
    servers: dict[str, subprocess.Popen[bytes]]
    urls: dict[str, str]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    admin_url = os.environ.get("COVE_TEST_PG_URL")
    if not admin_url:
        pytest.skip("needs COVE_TEST_PG_URL (make test starts a PostgreSQL)")
    if os.geteuid() != 0:
        pytest.skip("the sandbox driver needs root")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    db = f"e2e_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{db}"')
    db_url = admin.url.set(database=db).render_as_string(hide_password=False)
    home = tmp_path_factory.mktemp("cove-replicas")
    scratch = tmp_path_factory.mktemp("cove-replicas-apps")
    (home / "run").mkdir()
    (home / "logs").mkdir()
    state_dir = agent_state_dir(home)
    window = reserve_addresses(state_dir)
    tag = secrets.token_hex(3)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env = {"COVE_DATABASE_URL": db_url, "COVE_LOCAL_IMAGES": "1"}
    try:
        urls = start_replicas(
            home, procs, env, lambda name, url_file: [str(COVE), "server", "--port", "0",
                                                      "--url-file", str(url_file)]
        )  # fmt: skip
        org, project, token = sign_up_operator(home, urls["b"])
        procs["agent"] = _start(
            [
                str(COVE), "agent", "--server", urls["b"], "--name", f"rep-{tag}",
                "--driver", "sandbox", "--state-dir", str(state_dir),
                "--bridge", f"cvr{tag}", "--pool4", "10.97.7.0/24",
                "--pool6", f"fd00:97:{int(tag[:4], 16):x}::/64",
            ],
            home,
            home / "logs" / "agent.log",
            {},
        )  # fmt: skip

        def node_ready() -> bool:
            a = Api(urls["b"], token)
            try:
                return any(is_ready(n) for n in a.call("GET", "/v1/nodes")["items"])
            finally:
                a.close()

        wait_for(lambda: node_ready() or None, timeout=60, what="the agent to join")
        c = Replicas(home, urls["b"], state_dir, org, project, token, scratch, window)
        c.servers, c.urls = procs, urls
        yield c
    finally:
        stop_all(list(procs.values()))
        problems = destroy_sandboxes(state_dir) if state_dir.exists() else []
        subprocess.run(["ip", "link", "del", f"cvr{tag}"], capture_output=True, timeout=10)
        shutil.rmtree(state_dir, ignore_errors=True)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.dispose()
        assert not problems, problems


@pytest.mark.timeout(180)
def test_kill_the_leader_mid_rollout_and_the_other_replica_finishes_it(
    replicas: Replicas,
    app_image: BuiltImage,  # noqa: F811
) -> None:
    c = replicas
    a_doc = wait_for(lambda: _cluster_doc(c.urls["a"], c.token), timeout=10, what="GET /v1/cluster")
    b_doc = wait_for(lambda: _cluster_doc(c.urls["b"], c.token), timeout=10, what="GET /v1/cluster")
    assert a_doc["this_replica"]["leading"] and not b_doc["this_replica"]["leading"], (a_doc, b_doc)
    assert b_doc["leader"]["id"] == a_doc["this_replica"]["id"], b_doc
    assert a_doc["this_replica"]["store"] == "postgresql"

    d = c.deployment()
    d.write_toml(app_image.ref, count=2, checks=[HTTP_CHECK], deadline="60s")
    assert (r := d.deploy()).code == 0, str(r)
    d.wait_converged(2, "v1")

    # a slow rollout: each new instance takes ~3 s to become Ready
    slow_check = dict(HTTP_CHECK, grace="4s")
    d.write_toml(
        app_image.ref, count=2, checks=[slow_check], deadline="60s", env={"START_DELAY": "3"}
    )
    proc = d.popen("deploy", "--timeout", "120s")
    wait_for(
        lambda: [i for i in d.api_instances() if i["spec"]["release_name"] == "v2"] or None,
        timeout=30,
        what="the rollout of v2 to begin",
    )
    c.servers["a"].kill()  # the leader, mid-rollout
    c.servers["a"].wait()
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, f"{out}\n{err}\n--- b ---\n{_log(c, 'b')}"
    d.wait_converged(2, "v2", timeout=30)
    doc = wait_for(lambda: _cluster_doc(c.urls["b"], c.token), timeout=10, what="GET /v1/cluster")
    assert doc["this_replica"]["leading"], doc
    assert doc["leader"]["id"] == doc["this_replica"]["id"], doc
    assert "now runs the controllers" in _log(c, "b")


def _log(c: Replicas, name: str) -> str:
    try:
        return (c.home / "logs" / f"server-{name}.log").read_text()[-4000:]
    except OSError:
        return "(no log)"
