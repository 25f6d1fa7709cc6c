#!/usr/bin/env python3
"""Deploys on a real ``cove up``: deploy-to-healthy latency, instances started per second and
log throughput, each beside the direct path (the sandbox driver alone, no control plane).

It starts ``cove up --detach --port 0`` in a temporary COVE_HOME (API, controllers and one
node agent with the sandbox driver), signs up, creates a project and two apps through the
HTTP API, builds a busybox image with umoci (tests/fixtures/images.py, no Docker) and pushes
it to a throwaway local registry (Debian's docker-registry), then measures:

1. deploy to healthy, cached image: one deploy warms the agent's image cache, then N
   deploys of new releases (POST /v1/deploys with a changed variable, count=1, an http
   check every 200ms), each timed from the POST until its operation succeeded
   (GET /v1/operations/{op}/wait?for=done). Direct path: SandboxDriver.create + start of the
   same image and the time until its HTTP port answers, in a network namespace and bridge
   of the bench's own (``ip netns add``); the two alternate, one of each per round;
2. instances started per second: PATCH /v1/environments/{id} spec.scale from 0 to K, timed
   until all K instances are Ready; direct path: K create + start in parallel until all K
   answer HTTP;
3. log throughput: an instance prints M lines as fast as it can (``seq 1 M``); a
   ``GET /v1/logs?follow=1`` reader opened before the deploy counts lines/s from the first
   to the last line it receives. Reference: the rate the supervisor wrote them on the node
   (its own timestamps), and SandboxDriver.logs(follow=True) on a direct instance: the path
   without shipping.

A benchmark: it prints figures beside the published anchors and exits 0 whether or not a
target is met (non-zero only when it cannot run). It always stops what it started: direct
instances, the network namespace, ``cove down``, every sandbox the agent left (instances
outlive the agent by design), leftover ``cove.runtime.supervisor`` processes of its state
dirs, the registry and the temporary directories — also on an error, Ctrl-C or SIGTERM.

    .venv/bin/python bench/deploy.py [--deploys 15] [--scale 10] [--lines 200000]
                                     [--phases deploy,scale,logs]

Needs root, bubblewrap, cgroup v1, skopeo, umoci, docker-registry and ip (scripts/setup.sh).
Progress goes to stderr; the figures and a final ``RESULT {json}`` line go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import glob
import ipaddress
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from _common import loadavg, note, stop_on_signals

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fixtures.images builds the image

# Published anchors. The target is the issue's; the others are what comparable systems say.
TARGET_P50_S = 1.0  # deploy to healthy, cached image, p50 on this machine
FLY_START_MS = 300  # Fly.io: Machines start in ~300 ms
K8S_POD_STARTUP_P99_S = 5.0  # Kubernetes SLO: pod startup p99 <= 5 s (image pull excluded)

ORG, PROJECT, WEB_APP, LOG_APP, ENV = "bench", "bench", "web", "chatty", "prod"
EMAIL, PASSWORD = "bench@example.com", "bench-password-1"
HTTP_PORT = 8080
SIZE = "nano"  # 250 millicores, 128 MiB: K instances fit the node's capacity
SIZE_CPU_MILLIS, SIZE_MEMORY_MB = 250, 128
CLONE_NEWNET = 0x40000000
STUCK_AFTER = 5.0  # an operation 'pending' this long, its target caught up: never taken up
# the chatty app: a second to let the readers attach, then M lines as fast as it can
LOG_COMMAND = ["sh", "-c", 'sleep 1; seq 1 "$BENCH_LINES"; exec sleep 1000000']


class BenchError(Exception):
    """The benchmark cannot go on."""


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(values: list[float]) -> dict[str, Any]:
    """p50/p90/max (seconds) of a series."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.5), 4),
        "p90": round(percentile(values, 0.9), 4),
        "max": round(max(values), 4),
        "min": round(min(values), 4),
    }


def epoch(ts: str) -> float:
    """An RFC 3339 timestamp ('Z') as epoch seconds."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def ready(res: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "true"
        for c in res.get("status", {}).get("conditions") or []
    )


def condition(res: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in res.get("status", {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


# ----------------------------------------------------------------------------- processes


def cove_executable() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "cove", Path(sys.executable).parent / "cove"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("cove")
    if found is None:
        raise BenchError("no `cove` executable (run `make setup`)")
    return found


def cove_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
    env.update(COVE_HOME=str(home), NO_COLOR="1", TERM="dumb", COLUMNS="200")
    return env


def run_cove(home: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [cove_executable(), *args],
            env=cove_env(home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"`cove {' '.join(args)}` did not finish in {timeout:g}s") from exc


def _proc_read(pid: str, name: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def supervisors_under(roots: list[Path]) -> list[int]:
    """Live ``python -m cove.runtime.supervisor DIR`` processes whose DIR is under *roots*."""
    prefixes = [str(r).encode() + b"/" for r in roots]
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        argv = _proc_read(pid, "cmdline")
        if b"cove.runtime.supervisor" not in argv:
            continue
        i = argv.index(b"cove.runtime.supervisor")
        target = argv[i + 1] if len(argv) > i + 1 else b""
        if any(target.startswith(p) for p in prefixes):
            found.append(int(pid))
    return found


def cove_processes_of(home: Path) -> list[int]:
    """Live cove processes (``cove.cli`` or the ``cove`` script) with COVE_HOME=*home*."""
    want = f"COVE_HOME={home}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        argv = _proc_read(pid, "cmdline")
        if not any(b"cove" in a for a in argv[:3]) or want not in _proc_read(pid, "environ"):
            continue
        found.append(int(pid))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- HTTP probe


def http_ok(host: str, port: int, timeout: float = 0.25) -> bool:
    """One HTTP/1.0 GET /: True on a 2xx/3xx status line."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            head = s.recv(32)
    except OSError:
        return False
    return head.startswith(b"HTTP/1.") and head[9:10] in (b"2", b"3")


def wait_http(host: str, port: int, timeout: float = 30.0, every: float = 0.005) -> float:
    """Probe until the port answers; the perf_counter() at which it did."""
    deadline = time.perf_counter() + timeout
    while True:
        if http_ok(host, port):
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"http://{host}:{port}/ did not answer within {timeout:g}s")
        time.sleep(every)


# ----------------------------------------------------------------------------- netns


class NetNs:
    """A network namespace of the bench's own with a bridge in it; probes run in threads
    that entered the namespace (setns is per thread)."""

    def __init__(self, threads: int) -> None:
        self.name = f"covebench-{secrets.token_hex(3)}"
        self.bridge = "cvbbr0"
        self.net4 = ipaddress.IPv4Network("10.77.0.0/16")
        self.net6 = ipaddress.IPv6Network("fd00:77:0:1::/64")
        self.gateway4 = str(self.net4.network_address + 1)
        self.gateway6 = str(self.net6.network_address + 1)
        self.next_host = 2
        self.created = False
        self.threads = threads
        self.pool: ThreadPoolExecutor | None = None

    def _ip(self, *args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BenchError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")

    def create(self) -> None:
        self._ip("netns", "add", self.name)
        self.created = True
        n = ["-n", self.name]
        self._ip(*n, "link", "set", "lo", "up")
        self._ip(*n, "link", "add", self.bridge, "type", "bridge")
        self._ip(*n, "addr", "add", f"{self.gateway4}/{self.net4.prefixlen}", "dev", self.bridge)
        self._ip(
            *n,
            "addr",
            "add",
            f"{self.gateway6}/{self.net6.prefixlen}",
            "dev",
            self.bridge,
            "nodad",
        )
        self._ip(*n, "link", "set", self.bridge, "up")
        self.pool = ThreadPoolExecutor(
            max_workers=self.threads, initializer=_enter_netns, initargs=(self.name,)
        )

    def addresses(self) -> tuple[str, str]:
        """A fresh (ipv4/len, ipv6/len) for the next instance (never reused in a run)."""
        i = self.next_host
        self.next_host += 1
        return (
            f"{self.net4.network_address + i}/{self.net4.prefixlen}",
            f"{self.net6.network_address + i}/{self.net6.prefixlen}",
        )

    async def wait_http(self, host: str, port: int, timeout: float = 30.0) -> float:
        assert self.pool is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, wait_http, host, port, timeout)

    def delete(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.created:
            self._ip("netns", "del", self.name)
            self.created = False


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- direct path


class Direct:
    """The sandbox driver alone: no API, no controllers, no agent. Same image (its own cache
    copy, pulled by digest), same size, a NetConfig on the bench's own bridge and netns."""

    def __init__(self, work: Path, cache: Path, digest: str, netns: NetNs) -> None:
        self.state = work / "runtime"
        self.cache = cache
        self.digest = digest
        self.netns = netns
        self.counter = 0
        self.live: set[str] = set()
        self.prefix = f"bench-{secrets.token_hex(3)}"

    def driver(self) -> Any:
        # one per event loop: the driver keeps asyncio locks
        from cove.runtime import SandboxDriver

        return SandboxDriver(self.state)

    def spec(self, argv: list[str] | None = None, env: dict[str, str] | None = None) -> Any:
        from cove.image import load_cached
        from cove.runtime import InstanceSpec, NetConfig

        img = load_cached(self.cache, self.digest)
        if img is None:
            raise BenchError(f"image {self.digest} is not in {self.cache}")
        self.counter += 1
        iid = f"{self.prefix}-{self.counter}"
        ipv4, ipv6 = self.netns.addresses()
        full_env = dict(img.config.env_dict)
        full_env.update(env or {})
        full_env.update(COVE_INSTANCE=iid, COVE_WORKLOAD="web", COVE_RELEASE="direct")
        return InstanceSpec(
            instance_id=iid,
            hostname=f"direct-{self.counter}",
            layers=list(img.layer_dirs),
            argv=list(argv or img.config.argv),
            env=full_env,
            workdir=img.config.working_dir or "/",
            user=img.config.user or "0",
            memory_mb=SIZE_MEMORY_MB,
            cpu_millis=SIZE_CPU_MILLIS,
            network=NetConfig(
                bridge=self.netns.bridge,
                ipv4=ipv4,
                ipv6=ipv6,
                gateway4=self.netns.gateway4,
                gateway6=self.netns.gateway6,
                netns=self.netns.name,
            ),
        )

    async def _up(self, drv: Any) -> dict[str, float]:
        """create + start one instance and wait for its HTTP port (seconds per step)."""
        t0 = time.perf_counter()
        spec = self.spec()  # load_cached + the spec, as the agent does
        self.live.add(spec.instance_id)
        await drv.create(spec)
        t1 = time.perf_counter()
        await drv.start(spec.instance_id)
        t2 = time.perf_counter()
        t3 = await self.netns.wait_http(spec.network.ipv4.split("/")[0], HTTP_PORT)
        return {"create": t1 - t0, "start": t2 - t1, "http": t3 - t2, "total": t3 - t0}

    async def _destroy(self, drv: Any, ids: list[str]) -> None:
        async def one(iid: str) -> None:
            await drv.destroy(iid)
            self.live.discard(iid)

        await asyncio.gather(*(one(i) for i in ids))

    def once(self) -> dict[str, float]:
        async def run() -> dict[str, float]:
            drv = self.driver()
            before = set(self.live)
            try:
                return await self._up(drv)
            finally:
                await self._destroy(drv, sorted(self.live - before))

        return asyncio.run(run())

    def many(self, k: int) -> dict[str, Any]:
        """K instances created and started in parallel; seconds until each answered."""

        async def run() -> dict[str, Any]:
            drv = self.driver()
            before = set(self.live)
            t0 = time.perf_counter()
            try:

                async def one() -> float:
                    await self._up(drv)
                    return time.perf_counter() - t0

                done = await asyncio.gather(*(one() for _ in range(k)))
                return {"all": max(done), "each": sorted(done)}
            finally:
                await self._destroy(drv, sorted(self.live - before))

        return asyncio.run(run())

    def log_rate(self, lines: int, timeout: float) -> dict[str, Any]:
        """An instance running ``seq 1 M``; SandboxDriver.logs(follow=True) read from its
        start. Arrival rate at that reader, and the supervisor's own write rate (its
        timestamps)."""

        async def run() -> dict[str, Any]:
            drv = self.driver()
            spec = self.spec(argv=LOG_COMMAND, env={"BENCH_LINES": str(lines)})
            iid = spec.instance_id
            self.live.add(iid)
            got = Tally(lines)
            try:
                await drv.create(spec)
                t_start = time.perf_counter()
                await drv.start(iid)

                async def follow() -> None:
                    async for rec in drv.logs(iid, follow=True):
                        if got.add(rec.line, rec.seq, rec.ts, time.perf_counter()):
                            return

                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(follow(), timeout)
                out = got.summary()
                if got.first_at is not None:
                    out["first_after_start_s"] = round(got.first_at - t_start, 4)
                return out
            finally:
                await self._destroy(drv, [iid])

        return asyncio.run(run())

    def destroy_all(self) -> None:
        if not self.live:
            return

        async def run() -> None:
            await self._destroy(self.driver(), sorted(self.live))

        asyncio.run(run())


@dataclass
class Tally:
    """Numbered lines ('1'..'M') seen by a reader: arrival times and the writer's stamps."""

    want: int
    count: int = 0
    first_at: float | None = None
    last_at: float | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    first_ts: str | None = None
    last_ts: str | None = None
    first_value: int | None = None
    last_value: int | None = None
    gaps: int = 0  # places where the numbers jump (lines missing in between)
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, text: str, seq: int, ts: str, now: float) -> bool:
        """Count one line; True once line M has arrived."""
        if not text.isdigit():
            return False
        value = int(text)
        with self.lock:
            self.count += 1
            if self.last_value is not None and value != self.last_value + 1:
                self.gaps += 1
            if self.first_at is None:
                self.first_at, self.first_seq, self.first_ts = now, seq, ts
                self.first_value = value
            self.last_at, self.last_seq, self.last_ts, self.last_value = now, seq, ts, value
            if value >= self.want:
                self.done = True
        return self.done

    def summary(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {
                "lines": self.want,
                "received": self.count,
                "complete": self.done and self.count == self.want,
                "first_value": self.first_value,
                "last_value": self.last_value,
                "gaps": self.gaps,
            }
            if self.first_at is not None and self.last_at is not None and self.count > 1:
                span = self.last_at - self.first_at
                out["arrival_seconds"] = round(span, 4)
                out["arrival_lines_per_s"] = round((self.count - 1) / span) if span > 0 else None
            if self.first_ts and self.last_ts and self.first_seq is not None:
                assert self.last_seq is not None
                span = epoch(self.last_ts) - epoch(self.first_ts)
                out["written_seconds"] = round(span, 4)
                written = self.last_seq - self.first_seq
                out["written_lines_per_s"] = round(written / span) if span > 0 else None
            return out


def node_write_rate(log_dir: Path) -> dict[str, Any]:
    """How fast the supervisor wrote the numbered lines into the instance's log files on the
    node: seq and timestamp of the oldest record still kept (rotation drops the oldest
    file) and of the newest one."""

    def records(path: Path, last: bool) -> dict[str, Any] | None:
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            return None
        for raw in reversed(lines) if last else lines:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                doc: dict[str, Any] = json.loads(raw)
                if str(doc["line"]).isdigit():
                    return doc
        return None

    oldest = records(log_dir / "output.log.1", False) or records(log_dir / "output.log", False)
    newest = records(log_dir / "output.log", True) or records(log_dir / "output.log.1", True)
    if oldest is None or newest is None:
        return {}
    span = epoch(newest["ts"]) - epoch(oldest["ts"])
    n = int(newest["seq"]) - int(oldest["seq"])
    return {
        "first_kept_line": int(oldest["line"]),
        "last_line": int(newest["line"]),
        "seconds": round(span, 4),
        "written_lines_per_s": round(n / span) if span > 0 else None,
    }


# ----------------------------------------------------------------------------- the API


class Api:
    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url, self.token = url, token
        self.http = httpx.Client(base_url=url, headers=headers, timeout=30.0)

    def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            r = self.http.request(
                method,
                path,
                json=body,
                params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise BenchError(f"{method} {path}: {exc!r}") from exc
        if r.status_code >= 400:
            raise BenchError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:800]}")
        return r.json() if r.content else None

    def wait_op(self, op: str, timeout: float = 120.0) -> dict[str, Any]:
        """GET /v1/operations/{op}/wait?for=done: the operation once it succeeded.

        The wait is asked for in slices of STUCK_AFTER seconds. An operation still
        ``pending`` after a slice (never looked at by the operations controller) whose
        target has caught up with it will not move: it is returned as it is, with
        ``stuck`` set, instead of waiting out the whole timeout."""
        deadline = time.monotonic() + timeout
        path = f"/v1/operations/{op}/wait"
        while True:
            slice_s = max(1.0, min(STUCK_AFTER, deadline - time.monotonic()))
            try:
                r = self.http.get(
                    path, params={"for": "done", "timeout": f"{slice_s:g}s"}, timeout=slice_s + 30
                )
            except httpx.HTTPError as exc:
                raise BenchError(f"GET {path}: {exc!r}") from exc
            if r.status_code == 200:
                doc: dict[str, Any] = r.json()
                return doc
            if r.status_code != 408:
                raise BenchError(f"GET {path} -> HTTP {r.status_code}: {r.text[:800]}")
            cur = r.json().get("resource") or {}
            if cur.get("status", {}).get("state") == "pending" and self._caught_up(cur):
                note(
                    f"  operation {op} is still 'pending' after {STUCK_AFTER:g}s though its "
                    f"{cur['spec']['target']['kind']} caught up: the controllers never took it"
                )
                return dict(cur, stuck=True)
            if time.monotonic() >= deadline:
                raise BenchError(f"GET {path} -> HTTP 408: {r.text[:800]}")

    def _caught_up(self, op: dict[str, Any]) -> bool:
        from cove.model.kinds import get_kind

        target = op["spec"]["target"]
        try:
            res = self.call("GET", f"/v1/{get_kind(target['kind']).plural}/{target['id']}")
        except BenchError:
            return False
        observed = res["status"].get("observed_generation") or 0
        return bool(observed >= op["spec"]["target_generation"] and ready(res))

    def close(self) -> None:
        self.http.close()


def scope(app: str) -> dict[str, str]:
    return {"org": ORG, "project": PROJECT, "app": app, "env": ENV}


def instances(api: Api, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = api.call(
        "GET", "/v1/instances", params={**scope(app), "limit": 1000}
    )["items"]
    return items


def settle(api: Api, app: str, count: int, timeout: float = 60.0) -> float:
    """Wait (untimed) until *app* has exactly *count* instances, all wanted running and
    Ready: the previous release's instances are gone. Seconds waited."""
    t0 = time.perf_counter()
    while True:
        items = instances(api, app)
        if len(items) == count and all(
            i["spec"].get("desired") == "running" and ready(i) for i in items
        ):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            states = [(i["name"], i["spec"].get("desired"), ready(i)) for i in items]
            note(f"  not settled after {timeout:g}s ({states}); going on")
            return time.perf_counter() - t0
        time.sleep(0.1)


def diagnose(api: Api, app: str) -> str:
    """The environment's and instances' state, for an error message."""
    try:
        env = api.call(
            "GET", f"/v1/environments/{ENV}", params={"org": ORG, "project": PROJECT, "app": app}
        )
        conds = [(c["type"], c["status"], c["reason"]) for c in env["status"].get("conditions", [])]
        lines = [
            f"environment {app}/{ENV}: generation {env['metadata']['generation']}, observed "
            f"{env['status'].get('observed_generation')}, conditions {conds}"
        ]
        for i in instances(api, app):
            st = i["status"]
            lines.append(
                f"  {i['name']} {i['spec'].get('release_name')} desired={i['spec'].get('desired')} "
                f"state={st.get('state')} ready={ready(i)} {st.get('message', '')!r}"
            )
        ops = api.call("GET", "/v1/operations", params={"org": ORG, "limit": 1000})["items"]
        pending = [o for o in ops if o["status"].get("state") not in ("succeeded", "failed")]
        lines.append(f"operations not settled: {[(o['id'], o['status']) for o in pending][:5]}")
        return "\n".join(lines)
    except Exception as exc:
        return f"(no diagnosis: {exc!r})"


# ----------------------------------------------------------------------------- the cluster


def reserve_addresses(state_dir: Path, window: int) -> list[int]:
    """Leave this agent a window of its IPv4 pool that other agents on the host don't use.

    Every agent on a host attaches its instances to the same bridge (cove0) and allocates
    from the same 10.213.0.0/24, each from an allocation file of its own: two ``cove up``
    on one host hand out the same addresses, and health checks then reach whichever instance
    answers ARP first. As the e2e suite does, the bench pre-fills its agent's allocation
    file with placeholders outside a window no known agent uses."""
    used: set[int] = set()
    for pattern in (
        "/var/lib/cove/*/net/addresses.json",
        "/tmp/*/agent/net/addresses.json",
        "/tmp/*/*/agent/net/addresses.json",
    ):
        for path in glob.glob(pattern):
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                used.update(int(v) for v in json.loads(Path(path).read_text()).values())
    window = max(8, min(window, 200))
    starts = [s for s in range(16, 254 - window) if not used & set(range(s, s + window))]
    start = random.choice(starts) if starts else random.randrange(16, 254 - window)
    keep = set(range(start, start + window))
    net = state_dir / "net"
    net.mkdir(parents=True, exist_ok=True)
    doc = {f"reserved-by-bench-{i}": i for i in range(2, 254) if i not in keep}
    (net / "addresses.json").write_text(json.dumps(doc, sort_keys=True))
    return sorted(keep)


def wait_node(api: Api, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for n in api.call("GET", "/v1/nodes", params={"limit": 100})["items"]:
            sched = condition(n, "Schedulable")
            if ready(n) and sched and sched["status"] == "true":
                return dict(n)
        if time.monotonic() > deadline:
            raise BenchError(f"no Ready, schedulable node within {timeout:g}s")
        time.sleep(0.2)


def signup(url: str) -> Api:
    anon = Api(url)
    try:
        r = anon.call(
            "POST", "/v1/auth/signup", body={"email": EMAIL, "password": PASSWORD, "org": ORG}
        )
    finally:
        anon.close()
    api = Api(url, r["token"])
    rec = api.call("POST", "/v1/projects", body={"name": PROJECT, "org": ORG})
    api.wait_op(rec["operation"], 60)
    for app in (WEB_APP, LOG_APP):
        rec = api.call("POST", "/v1/apps", body={"name": app, "org": ORG, "project": PROJECT})
        api.wait_op(rec["operation"], 60)
    return api


def web_template(count: int, interval: str) -> dict[str, Any]:
    check = {
        "type": "http",
        "port": HTTP_PORT,
        "path": "/",
        "interval": interval,
        "timeout": interval,
    }
    return {"count": count, "size": SIZE, "ports": [HTTP_PORT], "checks": [check]}


# ----------------------------------------------------------------------------- phases


class Bench:
    def __init__(
        self, args: argparse.Namespace, api: Api, image: str, direct: Direct, state_dir: Path
    ) -> None:
        self.args = args
        self.api = api
        self.image = image
        self.direct = direct
        self.state_dir = state_dir
        self.deploy_no = 0
        self.result: dict[str, Any] = {}
        self.stuck: list[dict[str, Any]] = []  # operations the controllers never took up

    def wait(self, op: str, what: str, timeout: float = 60.0) -> dict[str, Any]:
        doc = self.api.wait_op(op, timeout)
        if doc.get("stuck"):
            self.stuck.append({"what": what, "operation": op})
        return doc

    # -- 1. deploy to healthy ------------------------------------------------------------

    def deploy_web(self) -> dict[str, Any]:
        """POST /v1/deploys (a new release: a changed variable) and wait for its operation;
        seconds from the POST to the answer of the wait, and where the time went."""
        self.deploy_no += 1
        body = {
            **scope(WEB_APP),
            "image": self.image,
            "workloads": {"web": web_template(1, self.args.check_interval)},
            "variables": {"BENCH_DEPLOY": str(self.deploy_no)},
            "description": f"bench deploy {self.deploy_no}",
        }
        wall0 = time.time()
        t0 = time.perf_counter()
        rec = self.api.call("POST", "/v1/deploys", body=body, timeout=90)
        try:
            op = self.api.wait_op(rec["operation"], 120)
        except BenchError as exc:
            why = diagnose(self.api, WEB_APP)
            raise BenchError(f"deploy {self.deploy_no}: {exc}\n{why}") from None
        seconds = time.perf_counter() - t0
        out = {
            "seconds": seconds,
            "steps": self.steps(rec["release"]["id"], wall0, op),
            "stuck": bool(op.get("stuck")),
        }
        if op.get("stuck"):
            self.stuck.append(
                {
                    "what": f"the deploy of web v{self.deploy_no}",
                    "operation": rec["operation"],
                    "instance_ready_s": round(out["steps"].get("ready", -1), 4),
                }
            )
        return out

    def steps(self, release_id: str, wall0: float, op: dict[str, Any]) -> dict[str, float]:
        """Seconds from the POST to each step of the new instance, from the server's own
        records (same host clock): the instance created, scheduled, started by the agent,
        Ready, and the operation succeeded."""
        out: dict[str, float] = {}
        new = [i for i in instances(self.api, WEB_APP) if i["spec"].get("release") == release_id]
        if not new:
            return out
        ins = new[0]
        evs = self.api.call("GET", f"/v1/instances/{ins['id']}/events", params={"limit": 200})
        for ev in evs["items"]:
            reason = ev["spec"]["reason"]
            if reason in ("Created", "Scheduled", "Started") and reason.lower() not in out:
                out[reason.lower()] = epoch(ev["status"]["first_seen"]) - wall0
        rc = condition(ins, "Ready")
        if rc and rc.get("status") == "true" and rc.get("last_transition"):
            out["ready"] = epoch(rc["last_transition"]) - wall0
        where = {"org": ORG, "project": PROJECT, "app": WEB_APP}
        env = self.api.call("GET", f"/v1/environments/{ENV}", params=where)
        ec = condition(env, "Ready")
        if ec and ec.get("status") == "true" and ec.get("last_transition"):
            out["env_ready"] = epoch(ec["last_transition"]) - wall0
        if op["status"].get("finished_at"):
            out["succeeded"] = epoch(op["status"]["finished_at"]) - wall0
        return out

    def phase_deploy(self) -> None:
        n = self.args.deploys
        note(f"[deploy] first deploy of {self.image} (the agent pulls it into its cache)")
        first = self.deploy_web()
        settle(self.api, WEB_APP, 1)
        note(f"[deploy]   {first['seconds']:.2f}s; now {n} deploys of new releases, each beside")
        note("[deploy]   a direct create+start on the sandbox driver")
        api_s: list[float] = []
        direct_runs: list[dict[str, float]] = []
        steps: list[dict[str, float]] = []
        settles: list[float] = []
        attempts = 0
        while len(api_s) < n and attempts < n + 5:
            attempts += 1
            d = self.deploy_web()
            settles.append(settle(self.api, WEB_APP, 1))
            if d["stuck"]:  # no figure: the operation never succeeded; deploy once more
                continue
            api_s.append(d["seconds"])
            steps.append(d["steps"])
            r = self.direct.once()
            direct_runs.append(r)
            note(
                f"[deploy]   {len(api_s)}/{n}: through cove {d['seconds'] * 1e3:.0f} ms, "
                f"direct {r['total'] * 1e3:.0f} ms"
            )
        if not api_s:
            raise BenchError("no deploy's operation succeeded")
        keys = ("created", "scheduled", "started", "ready", "env_ready", "succeeded")
        self.result["deploy"] = {
            "first_deploy_s": round(first["seconds"], 4),
            "api": dist(api_s),
            "direct": dist([r["total"] for r in direct_runs]),
            "direct_steps_p50": {
                k: round(percentile([r[k] for r in direct_runs], 0.5), 4)
                for k in ("create", "start", "http")
            },
            "api_steps_p50": {
                k: round(percentile(v, 0.5), 4)
                for k in keys
                if (v := [s[k] for s in steps if k in s])
            },
            "attempts": attempts,
            "api_samples_s": [round(x, 4) for x in api_s],
            "direct_samples_s": [round(r["total"], 4) for r in direct_runs],
            "settle_between_s": dist(settles),
            "check_interval": self.args.check_interval,
            "loadavg": loadavg(),
        }

    # -- 2. instances started per second --------------------------------------------------

    def scale_to(self, env_id: str, count: int) -> str:
        rec = self.api.call(
            "PATCH",
            f"/v1/environments/{env_id}",
            body={"spec": {"scale": {"web": count}}},
        )
        return str(rec["operation"])

    def phase_scale(self) -> None:
        k = self.args.scale
        env = self.api.call(
            "GET",
            f"/v1/environments/{ENV}",
            params={"org": ORG, "project": PROJECT, "app": WEB_APP},
        )
        note(f"[scale] web to 0 (untimed), then 0 -> {k}")
        self.wait(self.scale_to(env["id"], 0), "scale web to 0")
        deadline = time.monotonic() + 60
        while instances(self.api, WEB_APP) and time.monotonic() < deadline:
            time.sleep(0.2)
        wall0 = time.time()
        t0 = time.perf_counter()
        op = self.scale_to(env["id"], k)
        seen: dict[str, float] = {}  # instance id -> seconds (Ready's last_transition)
        observed = None
        while time.perf_counter() - t0 < self.args.scale_timeout:
            items = [
                i for i in instances(self.api, WEB_APP) if i["spec"].get("desired") == "running"
            ]
            now = time.perf_counter() - t0
            for i in items:
                rc = condition(i, "Ready")
                if rc and rc.get("status") == "true" and i["id"] not in seen:
                    lt = rc.get("last_transition")
                    seen[i["id"]] = epoch(lt) - wall0 if lt else now
            if len(items) >= k and len(seen) >= k:
                observed = now
                break
            time.sleep(0.1)
        op_doc = self.wait(op, f"scale web to {k}") if observed is not None else None
        if observed is None:
            note(f"[scale]   only {len(seen)}/{k} Ready after {self.args.scale_timeout:g}s")
        each = sorted(seen.values())
        all_ready = each[-1] if len(each) >= k else None
        note(
            "[scale]   "
            + (
                f"{k} Ready in {all_ready:.2f}s through cove"
                if all_ready is not None
                else "not all Ready"
            )
            + f"; direct: {k} create+start in parallel"
        )
        d = self.direct.many(k)
        note(f"[scale]   direct: {k} answering HTTP in {d['all']:.2f}s")
        self.result["scale"] = {
            "k": k,
            "api_all_ready_s": None if all_ready is None else round(all_ready, 4),
            "api_observed_s": None if observed is None else round(observed, 4),
            "api_instances_per_s": None if not all_ready else round(k / all_ready, 2),
            "api_ready_each_s": [round(x, 4) for x in each],
            "api_operation_succeeded_s": None
            if not op_doc or op_doc.get("stuck") or not op_doc["status"].get("finished_at")
            else round(epoch(op_doc["status"]["finished_at"]) - wall0, 4),
            "direct_all_s": round(d["all"], 4),
            "direct_instances_per_s": round(k / d["all"], 2),
            "direct_each_s": [round(x, 4) for x in d["each"]],
            "loadavg": loadavg(),
        }
        # free the node for the next phase
        self.wait(self.scale_to(env["id"], 0), "scale web to 0 again")
        deadline = time.monotonic() + 60
        while instances(self.api, WEB_APP) and time.monotonic() < deadline:
            time.sleep(0.2)

    # -- 3. log throughput -----------------------------------------------------------------

    def phase_logs(self) -> None:
        m = self.args.lines
        got = Tally(m)
        connected = threading.Event()
        errors: list[str] = []
        params = {**scope(LOG_APP), "follow": "1"}

        def reader() -> None:
            try:
                with (
                    httpx.Client(
                        base_url=self.api.url,
                        headers={"Authorization": f"Bearer {self.api.token}"},
                        timeout=httpx.Timeout(30.0, read=None),
                    ) as c,
                    c.stream("GET", "/v1/logs", params=params) as r,
                ):
                    if r.status_code != 200:
                        errors.append(f"GET /v1/logs -> HTTP {r.status_code}")
                        return
                    connected.set()
                    for raw in r.iter_lines():
                        if not raw.strip():
                            continue
                        doc = json.loads(raw)
                        if got.add(doc["line"], doc["seq"], doc["ts"], time.perf_counter()):
                            return
            except Exception as exc:
                errors.append(repr(exc))
            finally:
                connected.set()

        note(f"[logs] a /v1/logs?follow=1 reader, then a deploy printing {m:,} lines")
        thread = threading.Thread(target=reader, name="log-reader", daemon=True)
        thread.start()
        if not connected.wait(30) or errors:
            raise BenchError(f"the log reader did not connect: {errors}")
        body = {
            **scope(LOG_APP),
            "image": self.image,
            "workloads": {
                "log": {
                    "count": 1,
                    "size": SIZE,
                    "command": LOG_COMMAND,
                }
            },
            "variables": {"BENCH_LINES": str(m)},
        }
        t0 = time.perf_counter()
        rec = self.api.call("POST", "/v1/deploys", body=body, timeout=90)
        deadline = t0 + self.args.log_timeout
        stalled = False
        while thread.is_alive() and time.perf_counter() < deadline:
            thread.join(0.2)
            last = got.last_at
            if last is not None and time.perf_counter() - last > self.args.log_stall:
                stalled = True
                break
        api_sum = got.summary()
        if got.first_at is not None:
            api_sum["first_after_post_s"] = round(got.first_at - t0, 4)
        if got.last_at is not None:
            api_sum["last_after_post_s"] = round(got.last_at - t0, 4)
        api_sum["stalled"] = stalled
        api_sum["timed_out"] = thread.is_alive() and not stalled
        api_sum["errors"] = list(errors)  # (cove down ends the stream later: not an error)
        # the supervisor's rate over the few lines that arrived says little: see "node"
        api_sum.pop("written_seconds", None)
        api_sum.pop("written_lines_per_s", None)
        note(
            f"[logs]   through cove: {got.count:,}/{m:,} lines"
            + (
                f", {api_sum['arrival_lines_per_s']:,} lines/s at the reader"
                if api_sum.get("arrival_lines_per_s")
                else ""
            )
        )
        with contextlib.suppress(BenchError):
            self.wait(rec["operation"], "deploy chatty", 30)
        note("[logs]   direct: the same command on the sandbox driver, SandboxDriver.logs")
        d = self.direct.log_rate(m, self.args.log_timeout)
        note(
            f"[logs]   direct: {d['received']:,}/{m:,} lines, "
            f"{d.get('arrival_lines_per_s') or 0:,} lines/s at the reader"
        )
        node: dict[str, Any] = {}
        for ins in instances(self.api, LOG_APP):
            node = node_write_rate(self.state_dir / "runtime" / "instances" / ins["id"] / "logs")
        self.result["logs"] = {"api": api_sum, "node": node, "direct": d, "loadavg": loadavg()}


# ----------------------------------------------------------------------------- output


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:,.0f} ms"


def _rate(x: float | None) -> str:
    return "-" if not x else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _received(t: dict[str, Any]) -> str:
    """'received X of M lines (a-b, N gaps)' for a Tally summary."""
    m, got = t["lines"], t["received"]
    if not got:
        return f"received none of {m:,} lines"
    span = f"lines {t['first_value']:,}-{t['last_value']:,}"
    gaps = f", {t['gaps']} gap(s)" if t["gaps"] else ", no gaps"
    lost = f"; {m - got:,} never arrived" if got < m else ""
    return f"received {got:,} of {m:,} ({span}{gaps}){lost}"


def print_report(res: dict[str, Any], args: argparse.Namespace) -> None:
    cpus = os.cpu_count() or 1
    print()
    print(
        f"cove deploys: a real `cove up` (sandbox driver) on this machine, {cpus} CPUs, "
        f"image {res.get('image_source', '?')}"
    )
    print("=" * 96)
    dep = res.get("deploy")
    if dep:
        a, d = dep["api"], dep["direct"]
        print(
            "1. Deploy to healthy, cached image: POST /v1/deploys -> operation succeeded\n"
            f"   (n={a['n']} new releases of one instance, http check every "
            f"{dep['check_interval']})"
            + (f", {dep['attempts']} deploys" if dep["attempts"] != a["n"] else "")
        )
        print(f"   {'':<44} {'p50':>9} {'p90':>9} {'max':>9}")
        print(
            f"   {'through cove (API, controllers, agent)':<44} {_ms(a['p50']):>9} "
            f"{_ms(a['p90']):>9} {_ms(a['max']):>9}"
        )
        print(
            f"   {'direct: SandboxDriver create+start+HTTP':<44} {_ms(d['p50']):>9} "
            f"{_ms(d['p90']):>9} {_ms(d['max']):>9}"
        )
        over = a["p50"] - d["p50"]
        print(f"   {'control-plane overhead (p50 difference)':<44} {_ms(over):>9}")
        ds = dep["direct_steps_p50"]
        print(
            f"   direct, p50 per step: create {_ms(ds['create'])}, start {_ms(ds['start'])}, "
            f"HTTP answering {_ms(ds['http'])} after start"
        )
        st = dep["api_steps_p50"]
        names = [
            ("created", "instance created"),
            ("scheduled", "scheduled"),
            ("started", "agent: Started"),
            ("ready", "instance Ready"),
            ("env_ready", "environment Ready"),
            ("succeeded", "operation succeeded"),
        ]
        parts = [f"{label} +{_ms(st[k])}" for k, label in names if k in st]
        print("   through cove, p50 time after the POST (server records):")
        print("     " + ", ".join(parts[:3]) + ",")
        print("     " + ", ".join(parts[3:]))
        first = _ms(dep["first_deploy_s"])
        print(f"   first deploy (pulls the image into the agent's cache): {first}")
        meets = "yes" if a["p50"] < TARGET_P50_S else "NO"
        print(f"   target: p50 < {TARGET_P50_S:g} s on this machine ... {meets}")
        print(
            f"   anchors: Fly.io quotes ~{FLY_START_MS} ms machine starts; Kubernetes' pod "
            f"startup SLO is p99 <= {K8S_POD_STARTUP_P99_S:g} s"
        )
        print(
            "            (stateless pods, image pull excluded; here max "
            f"{a['max']:.2f} s over {a['n']} deploys)"
        )
        print()
    sc = res.get("scale")
    if sc:
        k = sc["k"]
        print(f"2. Instances started per second: scale web 0 -> {k} (PATCH spec.scale)")
        print(
            f"   through cove: all {k} Ready after {_ms(sc['api_all_ready_s'])} "
            f"= {_rate(sc['api_instances_per_s'])} instances/s"
            + (
                f" (first Ready {_ms(sc['api_ready_each_s'][0])}, "
                f"median {_ms(percentile(sc['api_ready_each_s'], 0.5))})"
                if sc["api_ready_each_s"]
                else ""
            )
        )
        print(
            f"   direct: {k} SandboxDriver create+start in parallel, all answering HTTP after "
            f"{_ms(sc['direct_all_s'])} = {_rate(sc['direct_instances_per_s'])} instances/s"
        )
        print()
    lg = res.get("logs")
    if lg:
        a, d = lg["api"], lg["direct"]
        m = a["lines"]
        print(
            f"3. Log throughput: one instance prints {m:,} lines (seq) as fast as it can, "
            "after a 1 s sleep"
        )
        print(
            f"   through cove, GET /v1/logs?follow=1: {_rate(a.get('arrival_lines_per_s'))} "
            "lines/s, first to last line at the reader"
        )
        print(f"     {_received(a)}")
        if a.get("stalled"):
            print(f"     then nothing for {args.log_stall:g} s: the reader stopped waiting")
        elif a.get("timed_out"):
            print(f"     the reader was still receiving after {args.log_timeout:g} s: cut off")
        if a.get("first_after_post_s") is not None:
            print(
                f"     first line {_ms(a['first_after_post_s'])} after the POST (1 s of it the "
                f"app's sleep), last {_ms(a.get('last_after_post_s'))} after"
            )
        node = lg.get("node") or {}
        if node:
            kept = (
                f", lines {node['first_kept_line']:,}-{node['last_line']:,} still in its files"
                if node["first_kept_line"] > 1
                else ""
            )
            print(
                f"   on the node, same instance: the supervisor wrote them at "
                f"{_rate(node.get('written_lines_per_s'))} lines/s"
            )
            print(f"     (timestamps in the instance's log files{kept})")
        print(
            f"   direct, SandboxDriver.logs(follow=True), no shipping: "
            f"{_rate(d.get('arrival_lines_per_s'))} lines/s at the reader"
        )
        print(
            f"     {_received(d)}; the supervisor wrote them at "
            f"{_rate(d.get('written_lines_per_s'))} lines/s"
        )
        print()
    for w in res.get("warnings") or []:
        print(f"WARNING: {w}\n")
    stuck = res.get("stuck_operations") or []
    if stuck:
        print(
            f"WARNING: {len(stuck)} operation(s) stayed 'pending' although their target had "
            "caught up:\n         " + ", ".join(s["what"] for s in stuck) + ". The controllers "
            "never took them up; a client\n         waiting on them hangs until its timeout. "
            "Deploys among them are left out of the\n         figures and replaced by one more "
            "deploy each."
        )
        print()
    print(
        """How to read this:
  through cove  a real `cove up` in a temporary COVE_HOME: HTTP API, controllers (rollout,
                scheduler, operations) and the node agent, which pulls, creates, starts,
                health-checks and reports; timed from the client's request.
  direct        cove.runtime.SandboxDriver called in-process on the same host: load_cached,
                create, start, then the bench probes the instance's HTTP port every 5 ms
                from inside its own network namespace. No API, no agent, no checks.
  overhead      through cove minus direct: API, controllers, placement, the agent's polling,
                its status reports and the health-check interval.
  A benchmark, not a test: "NO" marks a missed target; the exit status stays 0."""
    )


# ----------------------------------------------------------------------------- main


class Cleanup:
    """Callbacks run in reverse order; every one is attempted, failures are collected."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.problems: list[str] = []
        self.failed = False  # the run failed: keep diagnostics

    def add(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def run(self) -> None:
        while self.steps:
            what, fn = self.steps.pop()
            try:
                fn()
            except BaseException as exc:
                self.problems.append(f"{what}: {exc!r}")
                note(f"cleanup: {what} failed: {exc!r}")


def check_host() -> None:
    missing = [t for t in ("bwrap", "skopeo", "umoci", "ip") if shutil.which(t) is None]
    if missing:
        raise BenchError(f"needs {', '.join(missing)} (scripts/setup.sh)")
    if os.geteuid() != 0:
        raise BenchError("needs root (the sandbox driver, network namespaces)")
    if not Path("/sys/fs/cgroup/memory").is_dir():
        raise BenchError("needs the cgroup v1 memory controller (the sandbox driver)")


def _running_url(home: Path, timeout: float = 30.0) -> str:
    """The URL of the cove up of *home* once its API answers (\"\" if it does not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            url = (home / "run" / "api.url").read_text().strip()
            with contextlib.suppress(httpx.HTTPError):
                if url and httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return url
        time.sleep(0.2)
    return ""


@contextlib.contextmanager
def cluster(home: Path, state_dir: Path, cleanup: Cleanup, warnings: list[str]) -> Iterator[str]:
    """``cove up --detach --port 0``; on the way out: cove down, every sandbox the agent
    left destroyed, leftover supervisors and cove processes of this COVE_HOME killed."""

    def down() -> None:
        r = run_cove(home, "down", timeout=60)
        if r.returncode != 0:
            note(f"cove down exited {r.returncode}: {r.stderr.strip()[-500:]}")
        left = cove_processes_of(home)
        if left:
            note(f"killing {len(left)} cove process(es) of {home} left after cove down")
            kill_pids(left)

    def sandboxes() -> None:
        runtime = state_dir / "runtime"
        d = runtime / "instances"
        if not d.is_dir():
            return
        from cove.runtime import SandboxDriver

        async def run() -> list[str]:
            drv = SandboxDriver(runtime)
            problems = []
            for p in sorted(d.iterdir()):
                try:
                    await drv.destroy(p.name)
                except Exception as exc:
                    problems.append(f"{p.name}: {exc}")
            return problems

        problems = asyncio.run(run())
        if problems:
            raise BenchError("; ".join(problems))

    def keep_log() -> None:
        # on a failure: the control plane's log outlives the temporary directory
        if not cleanup.failed:
            return
        log = home / "logs" / "cove.log"
        if log.exists():
            kept = Path(tempfile.gettempdir()) / f"cove-bench-deploy-{os.getpid()}.log"
            shutil.copy2(log, kept)
            tail = log.read_text(errors="replace").splitlines()[-40:]
            note("cove's log, last lines:\n" + "\n".join(tail))
            note(f"the whole log: {kept}")

    cleanup.add("sandboxes of the agent", sandboxes)
    cleanup.add("cove down", down)
    cleanup.add("keep the log", keep_log)
    note(f"cove up --detach --port 0 (COVE_HOME={home})")
    r = run_cove(home, "up", "--detach", "--port", "0", timeout=120)
    url = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
    if r.returncode != 0:
        # `cove up --detach` and the `cove up` it starts both save config.json through the
        # same config.tmp: the loser of that race exits with FileNotFoundError although cove
        # came up. Go on when the API answers, and say so.
        url = _running_url(home)
        last = (r.stderr.strip().splitlines() or [""])[-1]
        if not url:
            log = home / "logs" / "cove.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"cove up failed ({r.returncode}): {r.stderr.strip()}\n{tail}")
        note(f"WARNING: `cove up --detach` exited {r.returncode} ({last}), yet cove is up")
        warnings.append(f"cove up --detach exited {r.returncode} although cove came up: {last}")
    note(f"cove is up at {url}")
    yield url


def run(args: argparse.Namespace, cleanup: Cleanup) -> dict[str, Any]:
    from tests.fixtures.images import ImageBuilder, push, start_registry

    from cove.agent.main import default_state_dir
    from cove.image import parse_ref, pull, resolve

    check_host()
    work = Path(tempfile.mkdtemp(prefix="cove-bench-deploy-"))
    work.chmod(0o711)  # sandboxes run as unprivileged host ids: they traverse down to rootfs
    cleanup.add(f"remove {work}", lambda: shutil.rmtree(work, ignore_errors=True))
    home = work / "home"
    home.mkdir(mode=0o711)
    home.chmod(0o711)
    state_dir = default_state_dir(home)
    if not state_dir.is_relative_to(work):
        cleanup.add(f"remove {state_dir}", lambda: shutil.rmtree(state_dir, ignore_errors=True))
    direct_dir = work / "direct"
    direct_dir.mkdir(mode=0o711)
    direct_dir.chmod(0o711)

    def supervisors() -> None:
        left = supervisors_under([state_dir, direct_dir])
        if left:
            note(f"killing {len(left)} leftover cove.runtime.supervisor process(es)")
            kill_pids(left)

    cleanup.add("leftover supervisors", supervisors)
    window = reserve_addresses(state_dir, args.scale + 16)
    note(f"agent state {state_dir}; its IPv4 window 10.213.0.{window[0]}-{window[-1]}")

    note("building the image (umoci) and pushing it to a local docker-registry")
    t0 = time.perf_counter()
    builder = ImageBuilder(work / "images")
    import pytest

    try:
        img = builder.build(
            "bench-web",
            cmd=["httpd", "-f", "-p", str(HTTP_PORT), "-h", "/www"],
            files={"/www/index.html": "ok\n"},
            exposed_ports=[f"{HTTP_PORT}/tcp"],
        )
        if args.image_source == "registry":
            registry = cleanup_context(cleanup, "registry", start_registry(work / "registry"))
            ref = push(img, registry, "bench/web", "v1")
        else:
            ref = img.ref
    except pytest.skip.Exception as exc:
        raise BenchError(str(exc)) from None
    note(f"image {ref} ready in {time.perf_counter() - t0:.1f}s")

    warnings: list[str] = []
    url = cleanup_context(cleanup, "cove", cluster(home, state_dir, cleanup, warnings))
    api = signup(url)
    cleanup.add("API client", api.close)
    node = wait_node(api)
    note(f"node {node['name']} is Ready with driver {node['status'].get('driver')}")
    if node["status"].get("driver") != "sandbox":
        raise BenchError(f"the node's driver is {node['status'].get('driver')}, not sandbox")

    # the direct path: the same image by digest in a cache of its own, a netns and bridge
    parsed = parse_ref(ref)
    loopback = bool(parsed.registry and parsed.registry.startswith("127.0.0.1"))
    resolved = asyncio.run(resolve(parsed, tls_verify=not loopback))
    cache = direct_dir / "images"
    asyncio.run(pull(resolved, cache, tls_verify=not loopback))
    netns = NetNs(threads=max(4, args.scale))
    netns.create()
    cleanup.add(f"netns {netns.name}", netns.delete)
    direct = Direct(direct_dir, cache, resolved.digest, netns)
    cleanup.add("direct instances", direct.destroy_all)
    note(f"direct path: SandboxDriver in {direct.state}, netns {netns.name}")

    bench = Bench(args, api, ref, direct, state_dir)
    phases = args.phases
    if "deploy" in phases:
        bench.phase_deploy()
    elif "scale" in phases:
        note("[scale] a first deploy (untimed)")
        bench.deploy_web()
        settle(api, WEB_APP, 1)
    if "scale" in phases:
        bench.phase_scale()
    if "logs" in phases:
        bench.phase_logs()
    bench.result["stuck_operations"] = bench.stuck
    bench.result["warnings"] = warnings
    bench.result["image_source"] = args.image_source
    bench.result["image"] = ref
    bench.result["digest"] = resolved.digest
    return bench.result


def cleanup_context(cleanup: Cleanup, what: str, cm: contextlib.AbstractContextManager[Any]) -> Any:
    """Enter *cm* now; exit it when the cleanup runs."""
    value = cm.__enter__()
    cleanup.add(what, lambda: cm.__exit__(None, None, None))
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--deploys", type=int, default=15, help="N: timed deploys (after one warm-up)")
    p.add_argument("--scale", type=int, default=10, help="K: instances to scale 0 -> K")
    p.add_argument("--lines", type=int, default=200_000, help="M: lines the chatty app prints")
    p.add_argument(
        "--phases",
        default="deploy,scale,logs",
        help="which measurements, comma-separated: deploy, scale, logs",
    )
    p.add_argument(
        "--check-interval",
        default="200ms",
        help="the web workload's http check interval (and timeout); 200ms is the minimum format",
    )
    p.add_argument(
        "--image-source",
        choices=("registry", "oci"),
        default="registry",
        help="deploy from a local docker-registry (default) or the oci: layout directly",
    )
    p.add_argument("--scale-timeout", type=float, default=60.0, help="seconds to wait for K Ready")
    p.add_argument(
        "--log-timeout", type=float, default=60.0, help="most seconds for the log phase (each)"
    )
    p.add_argument(
        "--log-stall",
        type=float,
        default=10.0,
        help="stop reading once no line arrived for this long",
    )
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    bad = [x for x in args.phases if x not in ("deploy", "scale", "logs")]
    if bad or not args.phases:
        p.error(f"--phases takes deploy, scale and/or logs (not {bad})")
    if args.deploys < 1 or args.scale < 1 or args.lines < 2:
        p.error("--deploys and --scale must be >= 1, --lines >= 2")
    if args.scale > 100:
        p.error("--scale is at most 100 (the API's limit per workload)")
    from cove.model.workload import seconds

    try:
        seconds(args.check_interval)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    t0 = time.monotonic()
    cleanup = Cleanup()
    result: dict[str, Any] = {}
    try:
        result = run(args, cleanup)
    except KeyboardInterrupt:
        note("interrupted; cleaning up")
        return 130
    except BenchError as exc:
        cleanup.failed = True
        note(f"benchmark failed: {exc}")
        return 1
    finally:
        # a second Ctrl-C must not cut the clean-up short
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cleanup.run()
        finally:
            signal.signal(signal.SIGINT, old)
    total = time.monotonic() - t0
    print_report(result, args)
    print(f"\nTotal run time: {total:.0f}s on {os.cpu_count()} CPUs (load average {loadavg()})")
    summary = {
        "bench": "deploy",
        "params": {
            "deploys": args.deploys,
            "scale": args.scale,
            "lines": args.lines,
            "phases": args.phases,
            "check_interval": args.check_interval,
            "image_source": args.image_source,
        },
        "anchors": {
            "target_deploy_p50_s": TARGET_P50_S,
            "fly_machine_start_ms": FLY_START_MS,
            "k8s_pod_startup_p99_s": K8S_POD_STARTUP_P99_S,
        },
        "meets_target": None
        if "deploy" not in result
        else result["deploy"]["api"]["p50"] < TARGET_P50_S,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **result,
        "cleanup_problems": cleanup.problems,
        "total_seconds": round(total, 1),
    }
    print("RESULT " + json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
