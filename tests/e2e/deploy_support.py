"""Support for the deploy end-to-end suite (tests/e2e/test_deploy_*.py): real processes only.

- ``cluster`` (module scope): one ``cove up --detach --port 0`` with a fresh COVE_HOME under
  tmp and an operator account with a project. Teardown runs ``cove down`` whatever happened,
  kills any process still carrying that COVE_HOME, destroys every sandbox the agent left
  behind (instances outlive the agent by design) and removes the agent's state directory.
- ``registry`` / ``builder`` (session scope): a docker-registry on 127.0.0.1 and an
  ``ImageBuilder`` (tests/fixtures/images.py), reused.
- ``app_image``: one busybox image whose ``/app/run.sh`` does what its environment asks
  (serve http on 8080, crash, stop serving, tick) and prints its secrets file *base64
  encoded* (so the values never reach cove's log store in clear; the tests decode them).
- ``Deployment``: one app's ``prod`` environment, seen through a COVE_HOME of its own whose
  saved context points at it and whose directory holds its ``cove.toml`` (the CLI runs with
  that directory as cwd). Asserted outcomes go through the ``cove`` CLI; polling goes
  straight to the HTTP API (each CLI run costs a Python start-up, the suite has 2 cores).

Import the fixtures into a test module with ``from .deploy_support import cluster, ...``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.fixtures.images import (
    BuiltImage,
    ImageBuilder,
    RegistryServer,
    require_tools,
    start_registry,
)

from .helpers import COVE, PASSWORD, Api, Result, cove_env, run_cove, server_log, stop, uniq

T = TypeVar("T")

APP_SCRIPT = r"""#!/bin/sh
# what the deploy suite runs: behaviour from the environment (MODE, START_DELAY, SERVE_FOR,
# TICK, ...)
echo "start instance=$COVE_INSTANCE release=$COVE_RELEASE version=$(cat /app/VERSION)"
if [ -e /run/cove/secrets.json ]; then
  echo "secrets-stat $(stat -c '%a %U' /run/cove/secrets.json)"
  echo "secrets-b64 $(base64 -w 0 /run/cove/secrets.json)"
else
  echo "secrets-none"
fi
if [ "$MODE" = crash ]; then
  sleep "${CRASH_AFTER:-0.3}"
  echo "crashing" >&2
  exit 1
fi
[ -n "$START_DELAY" ] && sleep "$START_DELAY"
mkdir -p /www && echo "ok $(cat /app/VERSION)" > /www/index.html
if [ -n "$TICK" ]; then
  ( i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 1; done ) &
fi
if [ -n "$SERVE_FOR" ]; then
  httpd -f -p 8080 -h /www &
  web=$!
  sleep "$SERVE_FOR"
  kill "$web"
  echo "stopped serving, still alive"
  exec sleep 100000
fi
exec httpd -f -p 8080 -h /www
"""

HTTP_CHECK = {"type": "http", "port": 8080, "path": "/", "interval": "0.5s", "timeout": "0.5s"}


# ----------------------------------------------------------------------------- small tools


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    every: float = 0.25,
    explain: Callable[[], Any] | None = None,
) -> T:
    """Poll *probe* until it returns something truthy; fail with *what* after *timeout*
    (and what *explain* returns then, to show the state reached)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    state = f"\n{explain()}" if explain else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r}){state}")


def is_ready(res: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "true"
        for c in res.get("status", {}).get("conditions", [])
    )


def condition(res: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in res.get("status", {}).get("conditions", []):
        if c["type"] == ctype:
            return dict(c)
    return None


def ts(value: str) -> float:
    """An API timestamp (RFC 3339, 'Z') as epoch seconds."""
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {v!r}")


def cove_toml(image: str | None, workloads: dict[str, dict[str, Any]], **top: Any) -> str:
    lines = [f"image = {toml_value(image)}"] if image else []
    lines += [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, spec in workloads.items():
        lines.append(f"\n[workloads.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in spec.items()]
    return "\n".join(lines) + "\n"


def decode_secrets(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The secrets documents the app printed (``secrets-b64 ...`` lines), oldest first."""
    out = []
    for ln in lines:
        if ln["line"].startswith("secrets-b64 "):
            out.append(json.loads(base64.b64decode(ln["line"].split(" ", 1)[1])))
    return out


# ----------------------------------------------------------------------------- processes


def _environ(pid: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _cmdline(pid: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def process_alive(pid: int) -> bool:
    """Running (not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cove_pids(home: Path, role: str | None = None) -> list[int]:
    """Live ``python -m cove.cli ROLE`` processes whose COVE_HOME is *home* (a /proc scan)."""
    want = f"COVE_HOME={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(entry)
        if b"cove.cli" not in argv or want not in _environ(entry):
            continue
        i = argv.index(b"cove.cli")
        if role is not None and (len(argv) <= i + 1 or argv[i + 1] != role.encode()):
            continue
        if process_alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def one_pid(home: Path, role: str) -> int:
    pids = wait_for(lambda: cove_pids(home, role), timeout=30, what=f"a cove {role} process")
    assert len(pids) == 1, f"expected one cove {role} for {home}, found {pids}"
    return pids[0]


# ----------------------------------------------------------------------------- the agent's state


def agent_state_dir(home: Path) -> Path:
    from cove.agent.main import default_state_dir

    return default_state_dir(home)


PLACEHOLDER = "reserved-by-e2e-"


def reserve_addresses(state_dir: Path, window: int = 24) -> list[int]:
    """Leave this agent a window of free addresses in its pool, away from other agents'.

    Every agent on a host attaches its instances to the same bridge (cove0) and allocates
    from the same 10.213.0.0/24, each with its own allocation file: two ``cove up`` on one
    host (a colleague's suite, a demo) hand out the same addresses, and health checks then
    reach whichever instance answers ARP first. Until the agent coordinates that (reported),
    the suite pre-fills this agent's allocation file with placeholders outside a window the
    known agents don't use."""
    used: set[int] = set()
    patterns = (
        "/var/lib/cove/*/net/addresses.json",
        "/tmp/*/agent/net/addresses.json",
        "/tmp/*/*/agent/net/addresses.json",
    )
    for pattern in patterns:
        for path in glob.glob(pattern):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                doc = json.loads(Path(path).read_text())
                held = {int(v) for k, v in doc.items() if k.startswith(PLACEHOLDER)}
                if held:  # another run of this suite: its window is what it uses
                    used |= set(range(2, 254)) - held
                used |= {int(v) for k, v in doc.items() if not k.startswith(("_", PLACEHOLDER))}
    starts = [s for s in range(64, 254 - window) if not used & set(range(s, s + window))]
    start = random.choice(starts) if starts else random.randrange(64, 254 - window)
    keep = set(range(start, start + window))
    net = state_dir / "net"
    net.mkdir(parents=True, exist_ok=True)
    doc = {f"{PLACEHOLDER}{i}": i for i in range(2, 254) if i not in keep}
    (net / "addresses.json").write_text(json.dumps(doc, sort_keys=True))
    return sorted(keep)


def runtime_dir(state_dir: Path) -> Path:
    """The agent's driver state: ``runtime`` (sandbox) or ``microvm``."""
    vm = state_dir / "microvm"
    return vm if (vm / "instances").is_dir() else state_dir / "runtime"


def runtime_status(state_dir: Path, instance_id: str) -> dict[str, Any]:
    """The driver's own record of an instance (pid, supervisor pid, started_at)."""
    path = runtime_dir(state_dir) / "instances" / instance_id / "status.json"
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def sandbox_ids(state_dir: Path) -> list[str]:
    d = runtime_dir(state_dir) / "instances"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def destroy_sandboxes(state_dir: Path) -> list[str]:
    """Destroy every instance under the agent's driver dirs (supervisor, QEMU, veth/tap,
    mounts, cgroups, id block, files); returns the errors."""
    from cove.runtime import SandboxDriver
    from cove.runtime.microvm.driver import MicroVMDriver
    from cove.runtime.supervised import SupervisedDriver

    async def run() -> list[str]:
        problems = []
        for sub, make in (("runtime", SandboxDriver), ("microvm", MicroVMDriver)):
            if not (state_dir / sub / "instances").is_dir():
                continue
            driver: SupervisedDriver = make(state_dir / sub)
            for d in sorted((state_dir / sub / "instances").iterdir()):
                try:
                    await driver.destroy(d.name)
                except Exception as exc:
                    problems.append(f"{d.name}: {exc}")
        return problems

    return asyncio.run(run())


# ----------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """One ``cove up`` and its operator (whose CLI config lives in the server's COVE_HOME)."""

    home: Path
    url: str
    state_dir: Path
    org: str
    project: str
    token: str
    scratch: Path
    addresses: list[int] = field(default_factory=list)
    driver: str = "sandbox"

    def cove(self, *args: str, timeout: float = 90) -> Result:
        return run_cove(list(args), home=self.home, timeout=timeout)

    def api(self) -> Api:
        return Api(self.url, self.token)

    def log(self) -> str:
        return server_log(self.home)

    def up(self) -> None:
        """``cove up --detach`` (again) on the same COVE_HOME; the URL may change."""
        r = run_cove(
            ["up", "--detach", "--port", "0", "--driver", self.driver], home=self.home, timeout=90
        )
        assert r.code == 0, f"cove up failed\n{r}\n--- log ---\n{self.log()}"
        self.url = r.out.strip()

    def deployment(self, name: str | None = None) -> Deployment:
        """A fresh app (its environments created) and a COVE_HOME looking at its prod."""
        app = name or uniq("app")
        api = self.api()
        try:
            api.create("apps", app, org=self.org, project=self.project)
        finally:
            api.close()
        home = self.scratch / app
        home.mkdir(parents=True)
        cfg = json.loads((self.home / "config.json").read_text())
        cfg.update(api_url=self.url, org=self.org, project=self.project, app=app, env="prod")
        (home / "config.json").write_text(json.dumps(cfg))
        return Deployment(self, app, home)


@dataclass
class Deployment:
    cluster: Cluster
    app: str
    home: Path

    # -- the CLI, as a user of this app's prod environment ------------------------------------

    def cove(self, *args: str, timeout: float = 90) -> Result:
        # the server's URL can change (a restarted `cove up`): pass the current one
        return run_cove(
            list(args), home=self.home, env={"COVE_API_URL": self.cluster.url}, timeout=timeout
        )

    def sibling(self, tag: str) -> Deployment:
        """The same app seen from another directory (for another cove.toml)."""
        home = self.home.parent / f"{self.home.name}-{tag}"
        home.mkdir()
        shutil.copy2(self.home / "config.json", home / "config.json")
        return Deployment(self.cluster, self.app, home)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(COVE), *args],
            env=cove_env(self.home, {"COVE_API_URL": self.cluster.url}),
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def write_toml(self, image: str | None, **workload: Any) -> None:
        self.write_toml_text(cove_toml(image, {"web": workload}))

    def write_toml_text(self, text: str) -> None:
        (self.home / "cove.toml").write_text(text)

    def deploy(self, *args: str, timeout: str = "60s") -> Result:
        return self.cove("deploy", "--timeout", timeout, *args, timeout=150)

    def json(self, *args: str) -> Any:
        r = self.cove(*args, "-o", "json")
        assert r.code == 0, str(r)
        return r.json()

    def releases(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("releases", "list")
        return sorted(items, key=lambda r: int(r["spec"]["number"]))

    def instances(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("instances", "list")
        return items

    def status(self) -> dict[str, Any]:
        """This app's prod entry of ``cove status -o json``."""
        doc = self.json("status")
        for a in doc["apps"]:
            if a["app"]["name"] == self.app:
                for e in a["environments"]:
                    if e["environment"]["name"] == "prod":
                        return dict(e)
        raise AssertionError(f"no {self.app}/prod in cove status: {doc}")

    def events(self) -> list[dict[str, Any]]:
        # `cove events` narrows to the saved org only (and `--app` alone is refused without
        # `--project`): name them all
        items: list[dict[str, Any]] = self.json(
            "events", "--project", self.cluster.project, "--app", self.app, "--env", "prod"
        )
        return items

    def logs(self, *args: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("logs", "--tail", "1000", *args)
        return items

    # -- the HTTP API, for polling ---------------------------------------------------------

    def _get(self, path: str, **params: Any) -> Any:
        api = self.cluster.api()
        try:
            return api.call(
                "GET",
                path,
                org=self.cluster.org,
                project=self.cluster.project,
                app=self.app,
                env="prod",
                **params,
            )
        finally:
            api.close()

    def api_instances(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._get("/v1/instances", limit=1000)["items"]
        return items

    def api_environment(self) -> dict[str, Any]:
        env: dict[str, Any] = self._get("/v1/environments/prod")
        return env

    def api_events(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._get("/v1/events", limit=1000)["items"]
        return items

    def api_logs(self, **params: Any) -> list[dict[str, Any]]:
        api = self.cluster.api()
        try:
            resp = api.http.get(
                "/v1/logs",
                params=dict(
                    org=self.cluster.org,
                    project=self.cluster.project,
                    app=self.app,
                    env="prod",
                    tail=1000,
                    **params,
                ),
            )
            assert resp.status_code == 200, resp.text
            return [json.loads(x) for x in resp.text.splitlines() if x.strip()]
        finally:
            api.close()

    def running(self, release: str | None = None) -> list[dict[str, Any]]:
        """Instances the API wants running (of *release*, a name like v2, if given)."""
        return [
            i
            for i in self.api_instances()
            if i["spec"].get("desired") == "running"
            and (release is None or i["spec"]["release_name"] == release)
        ]

    def wait_converged(self, count: int, release: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Exactly *count* instances, all of *release*, all Ready, none stopping."""

        def probe() -> list[dict[str, Any]] | None:
            items = self.api_instances()
            ok = (
                len(items) == count
                and all(i["spec"]["release_name"] == release for i in items)
                and all(i["spec"].get("desired") == "running" and is_ready(i) for i in items)
            )
            return items if ok else None

        return wait_for(probe, timeout=timeout, what=f"{count} Ready instance(s) of {release}")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def builder(tmp_path_factory: pytest.TempPathFactory) -> ImageBuilder:
    require_tools("umoci", "skopeo", "bwrap")
    return ImageBuilder(tmp_path_factory.mktemp("deploy-images"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    require_tools("skopeo")
    with start_registry(tmp_path_factory.mktemp("deploy-registry")) as server:
        yield server


def build_app_image(builder: ImageBuilder, version: str) -> BuiltImage:
    """The suite's app, with /app/VERSION holding *version* (so each version has its own
    digest) and ``/app/run.sh`` as its command."""
    return builder.build(
        f"app-{version}",
        cmd=["/app/run.sh"],
        files={
            "/app/run.sh": _script_file(),
            "/app/VERSION": version + "\n",
        },
    )


def _script_file() -> Any:
    from tests.fixtures.images import FileSpec

    return FileSpec(APP_SCRIPT, mode=0o755)


@pytest.fixture(scope="session")
def app_image(builder: ImageBuilder) -> BuiltImage:
    return build_app_image(builder, "a")


BOTH_DRIVERS = pytest.mark.both_drivers
"""A test marked with this runs against a cluster of each runtime driver (conftest's
pytest_generate_tests); the others against the sandbox one. The microvm cluster runs under
TCG here (seconds per boot), so the marked tests are those that cover a capability."""


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    driver = str(getattr(request, "param", "sandbox"))
    require_tools("bwrap", "skopeo", "umoci")
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("the runtime drivers need root and the cgroup v1 memory controller")
    if driver == "microvm":
        require_tools("qemu-system-x86_64", "qemu-img")
    home = tmp_path_factory.mktemp(f"cove-deploy-home-{driver}")
    scratch = tmp_path_factory.mktemp("cove-deploy-apps")
    state_dir = agent_state_dir(home)
    if state_dir.exists():  # a stale state dir from an earlier run with this path
        destroy_sandboxes(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
    window = reserve_addresses(state_dir)
    try:
        r = run_cove(["up", "--detach", "--port", "0", "--driver", driver], home=home, timeout=90)
        assert r.code == 0, f"cove up failed\n{r}\n--- log ---\n{server_log(home)}"
        url = r.out.strip()
        email, org, project = f"{uniq('ops')}@example.com", uniq("org"), uniq("prj")
        r = run_cove(
            ["auth", "signup", "--email", email, "--password", PASSWORD, "--org", org],
            home=home,
        )
        assert r.code == 0, str(r)
        token = json.loads((home / "config.json").read_text())["token"]
        api = Api(url, token)
        api.create("projects", project, org=org)
        api.close()
        # the node must have joined before anything can be placed
        node = wait_for(
            lambda: _node_ready(url, token), timeout=60, what="the local node to be Ready"
        )
        assert node["status"]["driver"] == driver, node["status"]
        if driver == "microvm":  # the node says whether its microVMs run under KVM or TCG
            assert node["status"]["accel"] in ("kvm", "tcg"), node["status"]
            assert node["status"]["accel"].upper() in node["status"]["driver_detail"]
        yield Cluster(home, url, state_dir, org, project, token, scratch, window, driver)
    finally:
        teardown(home, state_dir)


def _node_ready(url: str, token: str) -> dict[str, Any] | None:
    api = Api(url, token)
    try:
        nodes = api.call("GET", "/v1/nodes")["items"]
    except Exception:
        return None
    finally:
        api.close()
    return next((n for n in nodes if is_ready(n)), None)


def teardown(home: Path, state_dir: Path) -> None:
    """``cove down``, then kill whatever still carries this COVE_HOME, then destroy the
    sandboxes the agent left (they outlive it by design) and the agent's state."""
    stop(home)
    for _ in range(50):
        left = cove_pids(home)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    problems = destroy_sandboxes(state_dir)
    with contextlib.suppress(OSError, ValueError, KeyError):  # the agent's bridge goes too
        bridge = json.loads((state_dir / "net" / "network.json").read_text())["bridge"]
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=10)
    from cove.runtime import rootfs

    if not problems and not rootfs.mounts_under(state_dir):
        shutil.rmtree(state_dir, ignore_errors=True)
    assert not problems, f"leftover sandboxes could not be removed: {problems}"


# ----------------------------------------------------------------------------- events


def instance_events(
    events: list[dict[str, Any]], instance_name: str, reason: str | None = None
) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["parent"]
        and e["parent"]["kind"] == "instance"
        and e["parent"]["name"] == instance_name
        and (reason is None or e["spec"]["reason"] == reason)
    ]


BACKOFF_RE = re.compile(r"restarting in ([0-9.]+)s")


def backoff_delays(events: list[dict[str, Any]]) -> list[float]:
    delays = []
    for e in sorted(events, key=lambda e: e["status"]["first_seen"]):
        m = BACKOFF_RE.search(e["spec"]["message"])
        if e["spec"]["reason"] == "BackOff" and m:
            # a repeated event is counted (status.count) rather than stored twice
            delays += [float(m.group(1))] * int(e["status"].get("count", 1))
    return delays
