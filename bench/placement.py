#!/usr/bin/env python3
"""Placement at scale: how fast the control plane places and converges instances over many
simulated nodes, and what that does to the API's latency.

For each backend (SQLite, the default store; PostgreSQL on a throwaway server from
``scripts/pg.sh``) it starts a real ``cove server`` subprocess, then ``--nodes`` simulated
agents (500) as asyncio tasks in one child process. They speak the agent's HTTP API with the
agent's own client (``cove.client.AsyncClient``): register with the join token (driver
``sim``), heartbeat every 5 s, long-poll ``GET /v1/nodes/{id}/assignments`` and, for each
instance placed on them, report it the way ``cove.agent.instance`` does with the sim driver
(fetch its secrets; ``preparing``, ``starting``, ``running``, event ``Started``, then
``running`` + Ready), through the agent's own ``cove.agent.reports.Reporter`` (one request
per node every 0.1 s, an instance's newer status replacing the one not yet sent). Then it
deploys ``--instances`` instances (10,000): apps of one workload each, ``count`` up to 100
(the most one workload takes), size nano, an ``oci:`` image resolved by the server at deploy
time (nothing is pulled by a sim node).

It measures:

- placements per second: from the instances' own records (``Scheduled`` condition time
  minus the first deploy), overall and the best 1-second window;
- time to converge: from the first deploy until every instance is ``running`` and Ready;
- API latency p50/p99 of ``GET /v1/apps`` (one keep-alive client, a call every 50 ms):
  on the idle server, with the agents joined but nothing deployed, and during convergence;

and prints them beside the anchors: Nomad's C1M (1,000,000 containers on 5,000 hosts in
under 5 minutes, ~3,750 placements/s) and Kubernetes' scheduler throughput gates (100 pods/s
in its load test, 400 pods/s in its scheduler benchmark). A benchmark: it exits 0 whether
or not a figure meets an anchor, and always stops what it started (server, agents,
PostgreSQL, temporary directories), also on an error, Ctrl-C or SIGTERM.

    .venv/bin/python bench/placement.py [--nodes 500] [--instances 10000]
                                        [--backends sqlite,postgres]
    .venv/bin/python bench/placement.py --nodes 50 --instances 500 --backends sqlite  # quick

Progress goes to stderr; the table and a final ``RESULT {json}`` line go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from _common import loadavg, note, stop_on_signals
from api_latency import BenchError, Server, percentile, postgres

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fixtures.images writes the image

# Anchors (the issue): Nomad C1M, Kubernetes scheduler throughput.
NOMAD_C1M_RATE = 3750.0
K8S_LOAD_TEST = 100.0
K8S_SCHEDULER_BENCH = 400.0
PER_WORKLOAD = 100  # WorkloadTemplate.count's maximum
HEARTBEAT_SECONDS = 5.0  # as cove.agent.main
SAMPLE_EVERY = 0.05


# ----------------------------------------------------------------------------- sim agents


@dataclass
class AgentStats:
    registered: int = 0
    requests: int = 0
    errors: int = 0
    started: int = 0
    stopped: int = 0
    polls: int = 0
    last_error: str = ""


def counted_reporter(client: Any, node_id: str, stats: AgentStats) -> Any:
    """The agent's own ``cove.agent.reports.Reporter``, its requests and errors counted."""
    from cove import errors
    from cove.agent.reports import Reporter

    class Counted(Reporter):
        async def send(self) -> None:
            if not (self.statuses or self.events):
                return await super().send()
            stats.requests += 1
            try:
                await super().send()
            except errors.CoveError as exc:
                stats.errors += 1
                stats.last_error = f"PUT reports: {exc.detail}"
                raise

    return Counted(client, node_id)


class SimNode:
    """One simulated node: the calls a real agent makes with the sim driver, nothing else."""

    def __init__(self, url: str, join_token: str, name: str, stats: AgentStats) -> None:
        self.url = url
        self.join_token = join_token
        self.name = name
        self.stats = stats
        self.node_id = ""
        self.client: Any = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wanted: dict[str, str] = {}
        self.reports: Any = None
        self.changed: dict[str, asyncio.Event] = {}

    def want(self, iid: str, desired: str) -> None:
        if self.wanted.get(iid) != desired:
            self.wanted[iid] = desired
            if iid in self.changed:
                self.changed[iid].set()

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        from cove import errors

        self.stats.requests += 1
        try:
            if method == "GET":
                return await self.client.get(path, **kw)
            if method == "PUT":
                return await self.client.put(path, body)
            return await self.client.post(path, body)
        except errors.CoveError as exc:
            self.stats.errors += 1
            self.stats.last_error = f"{method} {path}: {exc.detail}"
            raise

    async def register(self, capacity: dict[str, float]) -> None:
        from cove import __version__, errors
        from cove.client import AsyncClient
        from cove.runtime.sim import DETAIL

        anon = AsyncClient(self.url)
        try:
            for attempt in range(20):
                try:
                    res = await anon.post(
                        "/v1/nodes/register",
                        {
                            "name": self.name,
                            "join_token": self.join_token,
                            "region": "sim",
                            "capacity": capacity,
                            "driver": "sim",
                            "driver_detail": DETAIL,
                            "accel": None,
                            "version": __version__,
                        },
                    )
                    break
                except errors.Transient:
                    await asyncio.sleep(0.2 * (attempt + 1))
            else:
                raise BenchError(f"{self.name} could not register")
        finally:
            await anon.aclose()
        self.node_id = str(res["node"]["id"])
        self.client = AsyncClient(self.url, str(res["token"]), timeout=90.0)
        self.reports = counted_reporter(self.client, self.node_id, self.stats)
        self.stats.registered += 1

    async def heartbeat(self, capacity: dict[str, float]) -> None:
        from cove import errors

        await asyncio.sleep(random.uniform(0, HEARTBEAT_SECONDS))  # agents start at once
        while True:
            with contextlib.suppress(errors.CoveError):
                await self.call(
                    "POST", f"/v1/nodes/{self.node_id}/heartbeat", {"capacity": capacity}
                )
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def assignments(self) -> None:
        from cove import errors

        since = 0
        while True:
            try:
                data = await self.call(
                    "GET", f"/v1/nodes/{self.node_id}/assignments", since=since, wait=25, timeout=60
                )
            except errors.CoveError:
                await asyncio.sleep(1.0)
                continue
            self.stats.polls += 1
            since = int(data["revision"])
            seen = set()
            for item in data["items"]:
                ins = item["instance"]
                iid = ins["id"]
                seen.add(iid)
                self.want(iid, str(ins["spec"].get("desired", "running")))
                if iid not in self.tasks:
                    self.tasks[iid] = asyncio.ensure_future(self.instance(iid, ins))
            for iid in list(self.tasks):
                if iid not in seen:
                    self.want(iid, "gone")

    def status(self, iid: str, **body: Any) -> None:
        doc = {
            "state": "placed",
            "health": "unknown",
            "ready": False,
            "message": "",
            "restart_count": 0,
            "last_exit_code": None,
            "last_termination_reason": None,
            "addresses": {},
            "driver": "sim",
            "accel": None,
            "started_at": None,
        }
        doc.update(body)
        self.reports.status(iid, doc)  # sent with the node's others, as the agent does

    async def instance(self, iid: str, ins: dict[str, Any]) -> None:
        """cove.agent.instance.InstanceWorker with the sim driver, as HTTP calls."""
        from cove import errors
        from cove.model.resource import now_iso

        try:
            if self.wanted.get(iid) != "running":
                return
            self.status(iid, state="preparing", message="pulling the image (sim: nothing)")
            with contextlib.suppress(errors.CoveError):
                await self.call("GET", f"/v1/instances/{iid}/secrets")
            self.status(iid, state="starting", message="creating the sandbox")
            await asyncio.sleep(0.05)  # SimDriver's default start delay
            n = len(self.tasks) % 250 + 2
            addresses = {"ipv4": f"10.213.0.{n}", "ipv6": f"fd00:c0e::{n:x}"}
            started = now_iso()
            self.status(
                iid, state="running", message="started", addresses=addresses, started_at=started
            )
            self.reports.event(iid, "Normal", "Started", "sim as user 0 on sim")
            self.status(
                iid,
                state="running",
                health="passing",
                ready=True,
                message="running",
                addresses=addresses,
                started_at=started,
            )
            self.stats.started += 1
            while self.wanted.get(iid) == "running":  # woken when that changes (as the agent)
                changed = self.changed.setdefault(iid, asyncio.Event())
                await changed.wait()
                changed.clear()
            self.status(iid, state="stopping", message="stopping")
            self.status(iid, state="stopped", last_exit_code=0, message="stopped")
            self.status(iid, state="destroyed", message="destroyed")
            self.stats.stopped += 1
        finally:
            self.tasks.pop(iid, None)
            self.changed.pop(iid, None)


async def _run_agents(
    url: str, join_token: str, nodes: int, capacity: dict[str, float], prefix: str, conn: Any
) -> None:
    stats = AgentStats()
    sims = [SimNode(url, join_token, f"{prefix}-{i:04d}", stats) for i in range(nodes)]
    sem = asyncio.Semaphore(32)

    async def join(s: SimNode) -> None:
        async with sem:
            await s.register(capacity)

    await asyncio.gather(*(join(s) for s in sims))
    conn.send({"registered": stats.registered})
    tasks = []
    for s in sims:
        tasks.append(asyncio.ensure_future(s.heartbeat(capacity)))
        tasks.append(asyncio.ensure_future(s.assignments()))
        tasks.append(asyncio.ensure_future(s.reports.run()))
    loop = asyncio.get_running_loop()
    while True:
        ready = await loop.run_in_executor(None, conn.poll, 1.0)
        if ready:
            msg = conn.recv()
            if msg == "stats":
                conn.send(dict(stats.__dict__))
            elif msg == "stop":
                break
    for t in tasks:
        t.cancel()
    for s in sims:
        for t in list(s.tasks.values()):
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in sims:
        if s.client is not None:
            await s.client.aclose()
    conn.send(dict(stats.__dict__))


def agents_main(
    url: str, join_token: str, nodes: int, capacity: dict[str, float], prefix: str, conn: Any
) -> None:
    """The child process: ``nodes`` sim agents on one event loop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us in order
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_run_agents(url, join_token, nodes, capacity, prefix, conn))


class Agents:
    """The child process running the simulated agents."""

    def __init__(self, url: str, join_token: str, nodes: int, capacity: dict[str, float]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=agents_main,
            args=(url, join_token, nodes, capacity, "sim", child),
            daemon=True,
        )
        self.proc.start()

    def wait_registered(self, timeout: float) -> int:
        if not self.conn.poll(timeout):
            raise BenchError(f"the simulated agents did not register within {timeout:g}s")
        return int(self.conn.recv()["registered"])

    def stats(self) -> dict[str, Any]:
        self.conn.send("stats")
        if not self.conn.poll(30):
            return {}
        return dict(self.conn.recv())

    def cpu_seconds(self) -> float:
        return _proc_cpu(self.proc.pid)

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send("stop")
                if self.conn.poll(20):
                    out = dict(self.conn.recv())
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        return out


def _proc_cpu(pid: int | None) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- latency sampler


class Sampler:
    """GET /v1/apps every SAMPLE_EVERY seconds on one keep-alive connection, in a thread."""

    def __init__(self, url: str, token: str, params: dict[str, str]) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        self.params = params
        self.samples: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                r = self.http.get("/v1/apps", params=self.params)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            dt = time.perf_counter() - t0
            if ok:
                self.samples.append(dt * 1000)
            else:
                self.failures += 1
            self._stop.wait(max(0.0, SAMPLE_EVERY - dt))

    def start(self) -> None:
        self.samples, self.failures = [], 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        ms = sorted(self.samples)
        return {
            "n": len(ms),
            "failures": self.failures,
            "p50_ms": round(percentile(ms, 0.5), 2) if ms else None,
            "p99_ms": round(percentile(ms, 0.99), 2) if ms else None,
            "max_ms": round(ms[-1], 2) if ms else None,
        }

    def measure_for(self, seconds: float) -> dict[str, Any]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def close(self) -> None:
        self.http.close()


# ----------------------------------------------------------------------------- one backend


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _cond(res: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in res["status"].get("conditions") or []:
        if c["type"] == ctype:
            return dict(c)
    return None


@dataclass
class Run:
    backend: str
    database: str
    nodes: int
    instances: int
    apps: int
    result: dict[str, Any] = field(default_factory=dict)


class Api:
    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=120)

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        # a read is sent again once after a transport error (a kept-alive connection the
        # server closed as the request went out); a write never is (see deploy)
        for attempt in (1, 2):
            try:
                r = self.http.request(method, path, json=body, params=params or None)
                break
            except httpx.TransportError as exc:
                if method != "GET" or attempt == 2:
                    raise BenchError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise BenchError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if r.status_code >= 400:
            raise BenchError(f"{method} {path} -> {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else None

    def close(self) -> None:
        self.http.close()


def run_backend(
    backend: str, database_url: str | None, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    from tests.fixtures.images import benign_layer, write_oci_layout

    t_backend = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    image = write_oci_layout(work / "image", [benign_layer()], tag="v1")
    os.environ["COVE_LOCAL_IMAGES"] = "1"  # the server resolves the oci: layout
    note(f"[{backend}] starting cove server")
    (work / "home").mkdir(parents=True, exist_ok=True)
    server = Server(work / "home", database_url)
    agents: Agents | None = None
    api = sampler = None
    out: dict[str, Any] = {"backend": backend}
    try:
        url = server.wait_ready()
    except BaseException:
        server.stop()
        raise
    try:
        anon = Api(url)
        rec = anon.call(
            "POST",
            "/v1/auth/signup",
            {"email": "bench@example.com", "password": "bench-password-1", "org": "bench"},
        )
        anon.close()
        api = Api(url, rec["token"])
        n_apps = -(-args.instances // PER_WORKLOAD)
        counts = [PER_WORKLOAD] * (args.instances // PER_WORKLOAD)
        if args.instances % PER_WORKLOAD:
            counts.append(args.instances % PER_WORKLOAD)
        apps_per_project = max(1, args.per_project // PER_WORKLOAD)
        projects = [f"fleet-{p:03d}" for p in range(-(-n_apps // apps_per_project))]
        where = [(projects[i // apps_per_project], f"app-{i:04d}") for i in range(n_apps)]
        note(f"[{backend}] creating {len(projects)} project(s) and {n_apps} apps")
        for project in projects:
            api.call("POST", "/v1/projects", {"name": project, "org": "bench"})
            size = sum(counts[j] for j in range(n_apps) if where[j][0] == project)
            _raise_quotas(url, rec["token"], project, size)
        ops = []
        for project, app in where:
            r = api.call("POST", "/v1/apps", {"name": app, "org": "bench", "project": project})
            ops.append(r["operation"])
        for op in ops:
            api.call("GET", f"/v1/operations/{op}/wait", **{"for": "done", "timeout": "120s"})
        sampler = Sampler(
            url, rec["token"], {"org": "bench", "project": projects[0], "limit": "100"}
        )
        note(f"[{backend}] API latency on the idle server ({args.idle_seconds:g}s)")
        out["idle"] = sampler.measure_for(args.idle_seconds)

        join_token = (server.home / "data" / "join-token").read_text().strip()
        capacity = {"vcpu": float(args.node_vcpu), "memory_mb": float(args.node_memory)}
        note(f"[{backend}] starting {args.nodes} simulated agents")
        t0 = time.monotonic()
        agents = Agents(url, join_token, args.nodes, capacity)
        registered = agents.wait_registered(max(60.0, args.nodes * 0.5))
        out["register_seconds"] = round(time.monotonic() - t0, 2)
        note(f"[{backend}] {registered} nodes registered in {out['register_seconds']:.1f}s")
        # every node Ready and Schedulable (the node controller sees a heartbeat)
        deadline = time.monotonic() + 60 + args.nodes * 0.1
        while True:
            nodes = _list_all(api, "/v1/nodes", {})
            ok = sum(
                1
                for n in nodes
                if (_cond(n, "Ready") or {}).get("status") == "true"
                and (_cond(n, "Schedulable") or {}).get("status") == "true"
            )
            if ok >= args.nodes:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"only {ok} of {args.nodes} nodes became Ready and schedulable")
            time.sleep(1.0)
        out["nodes_ready_seconds"] = round(time.monotonic() - t0, 2)
        note(f"[{backend}] API latency with {args.nodes} idle agents ({args.idle_seconds:g}s)")
        idle0, idle_t = server.cpu_seconds(), time.monotonic()
        out["agents_idle"] = sampler.measure_for(args.idle_seconds)
        # what the joined agents alone cost (heartbeats, long-polls, the node controller)
        out["idle_server_cpu_share"] = round(
            (server.cpu_seconds() - idle0) / max(1e-6, time.monotonic() - idle_t), 2
        )

        note(
            f"[{backend}] deploying {args.instances:,} instances: {n_apps} apps, "
            f"up to {PER_WORKLOAD} each"
        )
        cpu0, acpu0 = server.cpu_seconds(), agents.cpu_seconds()
        sampler.start()
        t_deploy = time.time()
        m0 = time.monotonic()

        def deploy(i: int) -> dict[str, Any]:
            if time.monotonic() - m0 > args.timeout:
                return {}  # out of time: the deploys left are not made (reported)
            body = {
                "org": "bench",
                "project": where[i][0],
                "app": where[i][1],
                "env": "prod",
                "image": f"oci:{image.layout}:v1",
                # the rollout must not halt (and stop what is not Ready yet) while the
                # cluster converges: its deadline is the bench's timeout
                "workloads": {
                    "web": {
                        "count": counts[i],
                        "size": "nano",
                        "deadline": f"{int(args.timeout)}s",
                    }
                },
            }
            # one attempt: a retry after a timeout could make a second release of an app whose
            # first one the server did accept (more instances than asked for)
            try:
                return dict(api.call("POST", "/v1/deploys", body))
            except BenchError as exc:
                note(f"deploy of {where[i][1]} failed: {exc}")
                return {}

        pool = ThreadPoolExecutor(max_workers=args.deploy_workers)
        try:
            receipts = list(pool.map(deploy, range(n_apps)))
        finally:  # on Ctrl-C, don't wait for the deploys still in flight
            pool.shutdown(wait=False, cancel_futures=True)
        deploys_s = time.monotonic() - m0
        note(f"[{backend}] {n_apps} deploys accepted in {deploys_s:.1f}s; converging")
        out["deploys_seconds"] = round(deploys_s, 2)
        converged: float | None = None
        last_note = time.monotonic()
        progress: list[tuple[float, int, int]] = []
        while time.monotonic() - m0 < args.timeout:
            wls = _list_all(api, "/v1/workloads", {"org": "bench"})
            ready = sum(int(w["status"].get("ready") or 0) for w in wls)
            running = sum(int(w["status"].get("running") or 0) for w in wls)
            progress.append((round(time.monotonic() - m0, 2), running, ready))
            if ready >= args.instances:
                converged = time.monotonic() - m0
                break
            if time.monotonic() - last_note >= 10:
                last_note = time.monotonic()
                note(
                    f"[{backend}]   {time.monotonic() - m0:5.0f}s: {running:,} instances created, "
                    f"{ready:,} Ready"
                )
            time.sleep(0.5)
        out["busy"] = sampler.stop()
        out["server_cpu_s"] = round(server.cpu_seconds() - cpu0, 1)
        out["agents_cpu_s"] = round(agents.cpu_seconds() - acpu0, 1)
        out["converge_seconds"] = None if converged is None else round(converged, 2)
        out["progress"] = progress[:: max(1, len(progress) // 60)]
        if converged is None:
            note(f"[{backend}] NOT converged within {args.timeout:g}s")
        # the instances' own records: placement and running times
        note(f"[{backend}] reading the instances' records")
        items = _list_all(api, "/v1/instances", {"org": "bench"})
        placed_at, ready_at, created_at = [], [], []
        for ins in items:
            sch = _cond(ins, "Scheduled")
            if sch and sch["status"] == "true":
                placed_at.append(_ts(sch.get("last_transition")) or 0.0)
            rdy = _cond(ins, "Ready")
            if rdy and rdy["status"] == "true":
                ready_at.append(_ts(rdy.get("last_transition")) or 0.0)
            created_at.append(_ts(ins["metadata"]["created_at"]) or 0.0)
        out["placed"] = len(placed_at)
        out["ready"] = len(ready_at)
        out["receipts"] = sum(1 for r in receipts if r)
        out.update(_rates(t_deploy, created_at, placed_at, ready_at))
        out["agents"] = agents.stats()
        out["loadavg"] = loadavg()
    except BenchError as exc:
        raise BenchError(f"{exc}\n{server.log_tail()}") from exc
    finally:
        if sampler is not None:
            with contextlib.suppress(Exception):
                sampler.stop()
            sampler.close()
        if agents is not None:
            note(f"[{backend}] stopping the agents")
            final = agents.stop()
            if final:
                out["agents"] = final
        if api is not None:
            api.close()
        note(f"[{backend}] stopping cove server")
        server.stop()
    out["database"] = "SQLite (WAL)" if database_url is None else "PostgreSQL"
    out["seconds"] = round(time.monotonic() - t_backend, 1)
    return out


def _raise_quotas(url: str, token: str, project: str, size: int) -> None:
    """Room for the project's *size* nano instances (0.25 vCPU, 128 MiB each): through
    PUT /v1/projects/{p}/quotas, else a PATCH of the project's spec. Each try on a fresh
    connection (a server error may close it)."""
    want = {"instances": size, "vcpu": -(-size // 4), "memory_mb": size * 128}
    tries = [
        ("PUT", f"/v1/projects/{project}/quotas", want),
        ("PATCH", f"/v1/projects/{project}", {"spec": {"quotas": want}}),
    ]
    for method, path, body in tries:
        api = Api(url, token)
        try:
            api.call(method, path, body, org="bench")
            return
        except BenchError as exc:
            note(f"raising the quotas of {project} with {method} {path} failed: {exc}")
        finally:
            api.close()


def _list_all(api: Api, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        q = dict(params, limit="1000")
        if after:
            q["after"] = after
        page = api.call("GET", path, **q)
        items.extend(page["items"])
        after = page.get("next")
        if not after:
            return items


def _rates(
    t_deploy: float, created: list[float], placed: list[float], ready: list[float]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if placed:
        placed = sorted(placed)
        span = placed[-1] - t_deploy
        out["placement_span_s"] = round(span, 2)
        out["placements_per_s"] = round(len(placed) / span, 1) if span > 0 else None
        first = created and min(created)
        if first:
            inner = placed[-1] - first
            out["placements_per_s_from_first_instance"] = (
                round(len(placed) / inner, 1) if inner > 0 else None
            )
        # best 1-second window
        best, j = 0, 0
        for i in range(len(placed)):
            while placed[i] - placed[j] > 1.0:
                j += 1
            best = max(best, i - j + 1)
        out["placements_best_1s"] = best
    if ready:
        ready = sorted(ready)
        out["last_ready_s"] = round(ready[-1] - t_deploy, 2)
        out["p50_ready_s"] = round(ready[len(ready) // 2] - t_deploy, 2)
    return out


# ----------------------------------------------------------------------------- report


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    for r in runs:
        print()
        title = (
            f"cove placement - {r['backend']} ({r['database']}): {args.instances:,} instances "
            f"over {args.nodes} simulated nodes, a real `cove server`"
        )
        print(title)
        print("=" * len(title))
        rate = r.get("placements_per_s")
        conv = r.get("converge_seconds")
        rows = [
            ("placements/s (first deploy -> last placement)", _fmt(rate)),
            (
                "placements/s (first instance -> last placement)",
                _fmt(r.get("placements_per_s_from_first_instance")),
            ),
            ("placements in the best second", _fmt(r.get("placements_best_1s"), "d")),
            (
                "placed / Ready / expected",
                f"{r.get('placed', 0):,} / {r.get('ready', 0):,} / {args.instances:,}",
            ),
            (
                "deploys accepted (POST /v1/deploys)",
                f"{r.get('receipts', 0)} of {-(-args.instances // PER_WORKLOAD)} in "
                f"{_fmt(r.get('deploys_seconds'))} s",
            ),
            ("last placement after the first deploy", f"{_fmt(r.get('placement_span_s'))} s"),
            (
                "time to converge (all running + Ready)",
                f"{_fmt(conv)} s" if conv else "NOT converged",
            ),
            ("half of the instances Ready after", f"{_fmt(r.get('p50_ready_s'))} s"),
            (
                "nodes registered / Ready after",
                f"{_fmt(r.get('register_seconds'))} s / {_fmt(r.get('nodes_ready_seconds'))} s",
            ),
            ("server CPU during convergence", f"{_fmt(r.get('server_cpu_s'))} s"),
            (
                "server CPU with the agents idle (cores)",
                f"{_fmt(r.get('idle_server_cpu_share'), '.2f')} (with the latency sampler)",
            ),
            ("agents' process CPU during convergence", f"{_fmt(r.get('agents_cpu_s'))} s"),
        ]
        w = max(len(a) for a, _ in rows)
        for a, b in rows:
            print(f"  {a:<{w}}  {b}")
        print()
        print(
            f"  {'GET /v1/apps (one project, limit 100)':<44} {'n':>6} {'p50 ms':>9} "
            f"{'p99 ms':>9} {'max ms':>9} {'fail':>5}"
        )
        for key, label in (
            ("idle", "idle server (no agents)"),
            ("agents_idle", f"{args.nodes} agents joined, nothing deployed"),
            ("busy", "during convergence"),
        ):
            s = r.get(key) or {}
            print(
                f"  {label:<44} {s.get('n', 0):>6} {_fmt(s.get('p50_ms'), '.2f'):>9} "
                f"{_fmt(s.get('p99_ms'), '.2f'):>9} {_fmt(s.get('max_ms'), '.2f'):>9} "
                f"{s.get('failures', 0):>5}"
            )
        print()
        print("  beside the anchors (placements/s):")
        anchors = [
            ("cove (this run)", rate),
            ("Nomad C1M: 1,000,000 containers / 5,000 hosts < 5 min", NOMAD_C1M_RATE),
            ("Kubernetes scheduler benchmark gate", K8S_SCHEDULER_BENCH),
            ("Kubernetes load test gate", K8S_LOAD_TEST),
        ]
        for label, v in anchors:
            ratio = "" if not rate or label.startswith("cove") else f"  (cove = {rate / v:.2f}x)"
            print(f"    {label:<56} {_fmt(v):>8}{ratio}")
        ag = r.get("agents") or {}
        print(
            f"\n  agents: {ag.get('registered', 0)} registered, "
            f"{ag.get('requests', 0):,} requests, "
            f"{ag.get('errors', 0)} errors, {ag.get('polls', 0):,} assignment answers"
            + (f"; last error: {ag['last_error']}" if ag.get("last_error") else "")
        )
        print(f"  backend run time {r.get('seconds', 0):.0f}s; load average {r.get('loadavg')}")
    print(
        """
How to read this:
  placements/s  instances placed (Scheduled=true) divided by the time from the first
                POST /v1/deploys to the last placement (server clock, same host); the
                second figure starts at the first instance's creation, the best second is
                the most placements whose Scheduled times fall in one 1-second window.
  converge      from the first deploy until every instance is running and Ready, as the
                workloads' status counts say (polled every 0.5 s).
  latency       GET /v1/apps?limit=100 on one keep-alive client every 50 ms; "during
                convergence" spans the deploys and the convergence.
  The simulated agents run in one child process (asyncio); they and the server share this
  machine's CPUs, so the figures are a floor for what the control plane does alone.
  A benchmark, not a test: it exits 0 whatever the figures."""
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", type=int, default=500, help="simulated nodes")
    p.add_argument("--instances", type=int, default=10_000, help="instances to converge")
    p.add_argument("--backends", default="sqlite,postgres", help="sqlite and/or postgres")
    p.add_argument("--node-vcpu", type=int, default=8, help="each node's CPUs")
    p.add_argument("--node-memory", type=int, default=16384, help="each node's memory, MiB")
    p.add_argument(
        "--per-project",
        type=int,
        default=100,
        help="instances per project (its quotas are raised to fit)",
    )
    p.add_argument("--deploy-workers", type=int, default=4, help="concurrent deploy POSTs")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="length of each idle sample")
    p.add_argument("--timeout", type=float, default=900.0, help="most seconds to converge")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in ("sqlite", "postgres"):
            p.error(f"unknown backend {b!r} (sqlite, postgres)")
    if args.nodes < 1 or args.instances < 1:
        p.error("--nodes and --instances must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cove-bench-placement-"))
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    try:
        for backend in args.backends:
            if backend == "sqlite":
                runs.append(run_backend("sqlite", None, work / "sqlite", args))
                continue
            note("[postgres] starting a throwaway PostgreSQL (scripts/pg.sh)")
            with postgres(work) as pg_url:
                if pg_url is None:
                    skipped["postgres"] = "PostgreSQL could not start"
                    continue
                runs.append(run_backend("postgres", pg_url, work / "postgres", args))
    except KeyboardInterrupt:
        note("interrupted; cleaning up")
        return 130
    except BenchError as exc:
        note(f"benchmark failed: {exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(runs, args)
    for backend, why in skipped.items():
        print(f"\n{backend}: skipped ({why})")
    total = time.monotonic() - t0
    print(f"\nTotal run time: {total:.0f}s on {os.cpu_count()} CPUs")
    summary = {
        "bench": "placement",
        "nodes": args.nodes,
        "instances": args.instances,
        "anchors_placements_per_s": {
            "nomad_c1m": NOMAD_C1M_RATE,
            "k8s_scheduler_benchmark": K8S_SCHEDULER_BENCH,
            "k8s_load_test": K8S_LOAD_TEST,
        },
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "backends": {r["backend"]: r for r in runs},
        "skipped": skipped,
        "total_seconds": round(total, 1),
    }
    print("RESULT " + json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
