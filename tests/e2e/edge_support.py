"""Support for the endpoint end-to-end suite (tests/e2e/test_endpoints_*.py): real processes.

The rule on this machine: network tests send traffic only to loopback or to addresses the
test created inside network namespaces it made. So here:

- ``edge_cluster`` (module scope): a network namespace ``cove-e2e-<hex>``; a ``cove server``
  on the host (SQLite under a fresh COVE_HOME) that also serves its API on a unix socket,
  with public pools from the documentation ranges (``2001:db8:…::/64`` and
  ``192.0.2.0/28``); and a ``cove agent`` started *inside the namespace* (``nsenter
  --net``; ``ip netns exec`` would remount /sys and hide the cgroups) that reaches the
  server through that socket. The agent's bridge, its instances, its edge and the AnyIP
  routes of the pools all live in the namespace, and every client
  connection of the tests is made from inside it (``in_netns``). Teardown stops the agent,
  destroys its sandboxes, stops the server and deletes the namespace (and with it every
  address and route).
- ``build_edge_image``: a busybox image whose ``/app/run.sh`` serves http on 8080 (``ok VERSION
  INSTANCE``), echoes TCP on 8081 (so a PROXY v2 header comes back to the client exactly as
  the app received it) and answers UDP on 5353 (``udpecho``, a small static C program
  built here), and fails its exec check while ``/tmp/sick`` exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.fixtures.images import BuiltImage, FileSpec, ImageBuilder, require_tools
from tests.integration.netns import enter

from .deploy_support import (
    Cluster,
    Deployment,
    agent_state_dir,
    destroy_sandboxes,
    is_ready,
    wait_for,
)
from .helpers import COVE, PASSWORD, Api, cove_env, run_cove, uniq

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]

EDGE_APP = r"""#!/bin/sh
echo "start instance=$COVE_INSTANCE version=$(cat /app/VERSION)"
mkdir -p /www && echo "ok $(cat /app/VERSION) $COVE_INSTANCE" > /www/index.html
nc -ll -p 8081 -e cat &
/app/udpecho 5353 &
exec httpd -f -p 8080 -h /www
"""

CHECKS = [
    {"type": "http", "port": 8080, "path": "/", "interval": "0.5s", "timeout": "0.5s"},
    {
        "type": "exec",
        "command": ["sh", "-c", "test ! -e /tmp/sick"],
        "interval": "1s",
        "timeout": "1s",
        "unhealthy_threshold": 100,
    },
]


# ----------------------------------------------------------------------------- namespaces


def in_netns(netns: str, fn: Callable[[], T], timeout: float = 120) -> T:
    """Run *fn* on a thread that has entered the named network namespace: every socket it
    opens lives there. (Namespace membership is per thread; the thread ends with *fn*.)"""
    result: list[Any] = []

    def run() -> None:
        try:
            enter(netns)
            result.append(("ok", fn()))
        except BaseException as exc:
            result.append(("err", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise TimeoutError(f"{fn} did not finish within {timeout}s in {netns}")
    status, value = result[0]
    if status == "err":
        raise value
    return value  # type: ignore[no-any-return]


def tcp_request(host: str, port: int, payload: bytes, *, timeout: float = 5.0) -> bytes:
    """Connect, send, half-close, read to EOF (call inside ``in_netns``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)


def http_get(host: str, port: int = 8080) -> str:
    return tcp_request(host, port, b"GET / HTTP/1.0\r\n\r\n").decode(errors="replace")


def body(response: str) -> str:
    return response.split("\r\n\r\n", 1)[-1].strip()


# ----------------------------------------------------------------------------- the image


def build_edge_image(builder: ImageBuilder, version: str, scratch: Path) -> BuiltImage:
    exe = scratch / "udpecho"
    if not exe.exists():
        src = ROOT / "tests" / "fixtures" / "udpecho.c"
        subprocess.run(
            ["gcc", "-static", "-O2", "-o", str(exe), str(src)], check=True, capture_output=True
        )
    return builder.build(
        f"edge-{version}",
        cmd=["/app/run.sh"],
        files={
            "/app/run.sh": FileSpec(EDGE_APP, mode=0o755),
            "/app/VERSION": version + "\n",
            "/app/udpecho": FileSpec(exe.read_bytes(), mode=0o755),
        },
    )


# ----------------------------------------------------------------------------- the cluster


class EdgeCluster(Cluster):
    netns: str = ""
    agent: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[bytes] | None = None

    def wait_endpoint(
        self,
        d: Deployment,
        name: str,
        ok: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Poll the endpoint (over the API) until *ok* holds; return it."""

        last: list[dict[str, Any]] = [{}]

        def probe() -> dict[str, Any] | None:
            ep: dict[str, Any] = d._get(f"/v1/endpoints/{name}")
            last[0] = ep
            return ep if ok(ep) else None

        def explain() -> str:
            st = dict(last[0].get("status") or {})
            return json.dumps(st, indent=1) + "\n" + agent_log(self)[-3000:]

        return wait_for(probe, timeout=timeout, what=what, explain=explain)


def _start(cmd: list[str], home: Path, log: Path, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = cove_env(home, dict(extra))
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd,
            env={k: v for k, v in env.items() if v is not None},
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=f,
            start_new_session=True,
        )


def stop_all(procs: list[subprocess.Popen[bytes] | None]) -> None:
    """SIGTERM each process group started by ``_start``, SIGKILL after 15 s."""
    for p in procs:
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def edge_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EdgeCluster]:
    driver = str(getattr(request, "param", "sandbox"))
    require_tools("bwrap", "skopeo", "umoci", "ip", "nsenter", "gcc")
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("the runtime drivers need root and the cgroup v1 memory controller")
    if driver == "microvm":
        require_tools("qemu-system-x86_64", "qemu-img")
    tag = secrets.token_hex(3)
    netns = f"cove-e2e-{tag}"
    home = tmp_path_factory.mktemp("cove-edge-home")
    scratch = tmp_path_factory.mktemp("cove-edge-apps")
    state_dir = agent_state_dir(home)  # sandboxes must be able to reach it
    (home / "run").mkdir(parents=True)
    (home / "logs").mkdir(parents=True)
    sock = home / "run" / "api.sock"
    log = home / "logs" / "cove.log"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    server = agent = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        sub = int(tag[:4], 16)
        server = _start(
            [
                str(COVE),
                "server",
                "--port",
                "0",
                "--url-file",
                str(home / "run" / "api.url"),
                "--unix-socket",
                str(sock),
                "--public-ipv6",
                f"2001:db8:{sub:x}::/64",
                "--public-ipv4",
                "192.0.2.0/28",
            ],
            home,
            log,
            {"COVE_LOCAL_IMAGES": "1"},
        )
        url = wait_for(
            lambda: (
                (home / "run" / "api.url").read_text().strip()
                if (home / "run" / "api.url").exists()
                else None
            ),
            timeout=30,
            what="the server to listen",
        )
        email, org, project = f"{uniq('ops')}@example.com", uniq("org"), uniq("prj")
        r = run_cove(
            ["auth", "signup", "--email", email, "--password", PASSWORD, "--org", org], home=home
        )
        assert r.code == 0, str(r)
        token = json.loads((home / "config.json").read_text())["token"]
        api = Api(url, token)
        # every test's endpoint may take the IPv4 add-on
        api.create("projects", project, org=org, spec={"quotas": {"dedicated_ipv4": 10}})
        api.close()
        agent = _start(
            [
                # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroups
                "nsenter",
                f"--net=/run/netns/{netns}",
                str(COVE),
                "agent",
                "--server",
                f"unix:{sock}",
                "--name",
                f"edge-{tag}",
                "--driver",
                driver,
                "--state-dir",
                str(state_dir),
                "--bridge",
                f"cve{tag}",
                "--pool4",
                "10.99.7.0/24",
                "--pool6",
                f"fd00:99:{sub:x}::/64",
            ],
            home,
            log,
            {},
        )

        def node_ready() -> bool:
            a = Api(url, token)
            try:
                return any(is_ready(n) for n in a.call("GET", "/v1/nodes")["items"])
            finally:
                a.close()

        wait_for(node_ready, timeout=30, what="the agent in the namespace to join")
        c = EdgeCluster(home, url, state_dir, org, project, token, scratch, [])
        c.netns, c.agent, c.server = netns, agent, server
        yield c
    finally:
        stop_all([agent, server])
        problems = destroy_sandboxes(state_dir) if state_dir.exists() else []
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        from cove.runtime import rootfs

        if not problems and state_dir.exists() and not rootfs.mounts_under(state_dir):
            shutil.rmtree(state_dir, ignore_errors=True)
        assert not problems, f"leftover sandboxes could not be removed: {problems}"


def agent_log(c: EdgeCluster) -> str:
    try:
        return (c.home / "logs" / "cove.log").read_text()[-6000:]
    except OSError:
        return "(no log)"


def wait_until(probe: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    """Seconds until *probe* is true (fails the test at *timeout*)."""
    t0 = time.monotonic()
    wait_for(lambda: True if probe() else None, timeout=timeout, what=what, every=every)
    return time.monotonic() - t0
