"""One worker per instance on this node: converge the runtime to what the API wants.

    desired running:  pull by digest -> create -> start -> health checks -> Ready
                      on exit: restart per policy (always | on-failure | never) with
                      exponential backoff and a cap; every step is an event
    desired stopped / gone:  stop (graceful, then SIGKILL at the deadline) -> destroy

The worker never blocks the agent: everything runs on the event loop, blocking work in
subprocesses (skopeo, bwrap) through the image and runtime packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from cove import errors
from cove.agent.network import AddressPool
from cove.agent.reports import Reporter
from cove.agent.volumes import Volumes
from cove.client import AsyncClient

log = logging.getLogger("cove.agent")

TICK = 0.5
STABLE_AFTER = 30.0  # a run this long resets the backoff


def _seconds(value: str) -> float:
    from cove.model.workload import seconds

    return seconds(value)


@dataclass
class NodeContext:
    client: AsyncClient
    node_id: str
    driver: Any  # cove.runtime.Driver | None
    driver_name: str
    state_dir: Path
    pool: AddressPool
    volumes: Volumes
    reports: Reporter
    edge: Any = None  # cove.agent.edge.EdgeRunner | None


@dataclass
class CheckState:
    spec: dict[str, Any]
    next_at: float = 0.0
    ok_streak: int = 0
    fail_streak: int = 0
    passing: bool = False
    last_error: str = ""


@dataclass
class Report:
    state: str = "placed"
    health: str = "unknown"
    ready: bool = False
    message: str = ""
    restart_count: int = 0
    last_exit_code: int | None = None
    last_termination_reason: str | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    started_at: str | None = None


class InstanceWorker:
    def __init__(self, ctx: NodeContext, item: dict[str, Any], *, adopted: bool) -> None:
        self.ctx = ctx
        self.item: dict[str, Any] | None = item
        self.iid: str = item["instance"]["id"]
        self.name: str = item["instance"]["name"]
        self.adopted = adopted
        self.changed = asyncio.Event()
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        st = item["instance"]["status"]
        self.report = Report(
            state=st.get("state", "placed"),
            restart_count=int(st.get("restart_count") or 0),
            last_exit_code=st.get("last_exit_code"),
            last_termination_reason=st.get("last_termination_reason"),
            started_at=st.get("started_at"),
            # an adopted instance keeps its addresses: report them, don't blank them
            addresses=dict(st.get("addresses") or {}),
        )
        self.started = adopted
        self.failed_for_good = False
        self.checks: list[CheckState] = []
        self.ipv4: str | None = None
        self.run_started = time.monotonic()
        self.quick_failures = 0
        self.shipper: asyncio.Task[None] | None = None

    # -- plumbing ----------------------------------------------------------------------------

    def update(self, item: dict[str, Any] | None) -> None:
        """A new view from the API. Wakes the worker only when what it wants changed: the
        assignments answer on every write in the cluster (including this worker's own
        events), and a retry pause cut short by each of those would be a hot loop."""

        def wanted(it: dict[str, Any] | None) -> Any:
            if it is None:
                return None
            return (it["instance"]["spec"], it["instance"]["metadata"]["deleting"])

        if wanted(item) != wanted(self.item):
            self.changed.set()
        self.item = item

    def volumes(self) -> list[dict[str, Any]]:
        if self.finished or self.item is None:
            return []
        return list(self.item.get("volumes") or [])

    def cancel(self) -> None:
        if self.shipper is not None:
            self.shipper.cancel()
        if self.task is not None:
            self.task.cancel()

    @property
    def simulated(self) -> bool:
        """The sim driver: no image to pull, no volume to mount, no check to probe."""
        return bool(getattr(self.ctx.driver, "simulated", False))

    @property
    def desired(self) -> str:
        if self.item is None:
            return "gone"
        return str(self.item["instance"]["spec"].get("desired", "running"))

    def _send(self, **changes: Any) -> None:
        """Report the instance's status (``ctx.reports`` sends it with the node's others)."""
        for k, v in changes.items():
            setattr(self.report, k, v)
        r = self.report
        self.ctx.reports.status(
            self.iid,
            {
                "state": r.state,
                "health": r.health,
                "ready": r.ready,
                "message": r.message[:2000],
                "restart_count": r.restart_count,
                "last_exit_code": r.last_exit_code,
                "last_termination_reason": r.last_termination_reason,
                "addresses": r.addresses,
                "driver": self.ctx.driver_name,
                "accel": getattr(self.ctx.driver, "accel_name", None),
                "started_at": r.started_at,
            },
        )

    def _event(self, etype: str, reason: str, message: str) -> None:
        self.ctx.reports.event(self.iid, etype, reason, message[:4000])

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up early when the API changes what it wants."""
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), seconds)

    # -- main loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: worker crashed", self.name)
            self._send(state="failed", ready=False, message=f"agent error: {exc}")
        finally:
            if self.shipper is not None:
                self.shipper.cancel()
            self.finished = True

    async def _run(self) -> None:
        if self.ctx.driver is None:
            self._send(
                state="failed", message="this node has no runtime driver; it can't run instances"
            )
            while self.desired == "running":
                await self._pause(5.0)
            return
        if self.adopted:
            log.info("%s: adopted, still running", self.name)
            await self._prepare_checks()
            self._start_shipper()
        while True:
            if self.desired != "running":
                await self._teardown()
                return
            if self.failed_for_good:
                await self._pause(5.0)
                continue
            if not self.started:
                await self._start()
                continue
            await self._tick()
            await self._pause(TICK)

    # -- start ---------------------------------------------------------------------------------

    def _template(self) -> tuple[dict[str, Any], dict[str, Any]]:
        assert self.item is not None
        rel = self.item["release"]
        wl = self.item["instance"]["parent"]["name"]
        return rel, rel["spec"]["workloads"][wl]

    async def _start(self) -> None:
        from cove import image as image_mod
        from cove.runtime import InstanceSpec, NetConfig, VolumeMount

        assert self.item is not None
        ins = self.item["instance"]
        rel, tmpl = self._template()
        try:
            self._send(state="preparing", ready=False, message=f"pulling {rel['spec']['image']}")
            ref = image_mod.parse_ref(rel["spec"]["image"]).pinned(rel["spec"]["digest"])
            creds_doc = self.item.get("pull_credentials")
            creds = (creds_doc["username"], creds_doc["password"]) if creds_doc else None
            insecure = image_mod.on_loopback(ref.registry)
            t0 = time.monotonic()
            cache = self.ctx.state_dir / "images"
            img: Any = _SIM_IMAGE if self.simulated else None  # sim: nothing to pull
            if img is None:
                img = image_mod.load_cached(cache, rel["spec"]["digest"])
            if img is None:  # content-addressed: a cached digest needs no registry at all
                resolved = await image_mod.resolve(ref, creds=creds, tls_verify=not insecure)
                if resolved.digest != rel["spec"]["digest"]:
                    raise errors.UserError(
                        f"the image changed: {resolved.digest} is not the release's "
                        f"{rel['spec']['digest']}",
                        code="image_changed",
                    )
                img = await image_mod.pull(resolved, cache, creds=creds, tls_verify=not insecure)
            pulled = time.monotonic() - t0
            argv = list(tmpl.get("command") or img.config.argv)
            if not argv:
                raise errors.UserError(
                    "the image has no entrypoint or cmd and the workload sets no command",
                    hint="set command = [...] for the workload in cove.toml",
                )
            secrets = await self.ctx.client.get(f"/v1/instances/{self.iid}/secrets")
            secrets_json = (
                json.dumps(secrets, sort_keys=True).encode() if secrets.get("bundle") else None
            )
            env = dict(img.config.env_dict)
            env.update(rel["spec"].get("variables") or {})
            env.update(tmpl.get("env") or {})
            env.update(
                COVE_INSTANCE=ins["name"],
                COVE_WORKLOAD=ins["parent"]["name"],
                COVE_RELEASE=rel["name"],
            )
            mounts = []
            for v in self.item.get("volumes") or []:
                if self.simulated:  # nothing mounts it: no filesystem to make
                    host = self.ctx.state_dir / "volumes" / v["id"]
                elif self.ctx.driver_name == "microvm":
                    host = await self.ctx.volumes.block(v["id"], int(v["size_gb"]))
                else:
                    host = await self.ctx.volumes.ensure(v["id"], int(v["size_gb"]))
                mounts.append(VolumeMount(host_path=host, container_path=v["path"]))
            want = {m["volume"] for m in ins["spec"].get("mounts") or []}
            have = {v["name"] for v in self.item.get("volumes") or []}
            if want - have:
                raise errors.NotFound(f"volume(s) {', '.join(sorted(want - have))} not found")
            ipv4, ipv6 = self.ctx.pool.allocate(self.iid)
            self.ipv4 = ipv4.split("/")[0]
            spec = InstanceSpec(
                instance_id=self.iid,
                hostname=ins["name"],
                layers=list(img.layer_dirs),
                argv=argv,
                env=env,
                workdir=img.config.working_dir or "/",
                user=img.config.user or "0",
                memory_mb=int(ins["spec"].get("memory_mb", 256)),
                cpu_millis=int(ins["spec"].get("cpu_millis", 500)),
                secrets_json=secrets_json,
                volumes=mounts,
                network=NetConfig(
                    bridge=self.ctx.pool.bridge,
                    ipv4=ipv4,
                    ipv6=ipv6,
                    gateway4=self.ctx.pool.gateway4,
                    gateway6=self.ctx.pool.gateway6,
                ),
            )
            self._send(state="starting", message="creating the sandbox")
            await self.ctx.driver.create(spec)
            await self.ctx.driver.start(self.iid)
            await self._until_running()
        except (errors.UserError, errors.NotFound, errors.Unauthenticated, errors.Conflict) as exc:
            self.failed_for_good = True
            self._event("Warning", "StartFailed", f"{exc.detail}")
            self._send(state="failed", ready=False, message=exc.detail)
            return
        except errors.CoveError as exc:
            self._event("Warning", "StartRetrying", exc.detail)
            self._send(state="backoff", ready=False, message=f"retrying: {exc.detail}")
            await self._pause(3.0)
            return
        self.started = True
        self.run_started = time.monotonic()
        addresses = {"ipv4": self.ipv4 or "", "ipv6": ipv6.split("/")[0]}
        from cove.model.resource import now_iso

        self._send(
            state="running",
            health="unknown",
            message="started",
            addresses=addresses,
            started_at=now_iso(),
        )
        shown = " ".join(" ".join(argv).split())
        shown = shown if len(shown) <= 100 else shown[:97] + "..."
        self._event(
            "Normal",
            "Started",
            f"{shown} as user {spec.user} on {self.ctx.driver_name} (image ready in {pulled:.2f}s)",
        )
        await self._prepare_checks()
        self._start_shipper()

    async def _until_running(self, timeout: float = 5.0) -> None:
        """After a start, wait for the new run to be recorded, so the previous run's exit
        status is not mistaken for a crash of this one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await self.ctx.driver.status(self.iid)
            if st.state == "running":
                return
            await asyncio.sleep(0.05)

    async def _prepare_checks(self) -> None:
        if self.item is None:
            return
        _, tmpl = self._template()
        grace = time.monotonic()
        self.checks = []
        for c in tmpl.get("checks") or []:
            self.checks.append(CheckState(spec=c, next_at=grace + _seconds(c.get("grace", "0s"))))
        if self.ipv4 is None:
            self.ipv4 = self.ctx.pool.allocate(self.iid)[0].split("/")[0]

    # -- running -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        st = await self.ctx.driver.status(self.iid)
        if st.state == "running":
            await self._run_checks()
            return
        if st.state in ("exited", "unknown"):
            await self._exited(st)

    async def _run_checks(self) -> None:
        now = time.monotonic()
        for c in self.checks:
            if now < c.next_at:
                continue
            c.next_at = now + _seconds(c.spec.get("interval", "5s"))
            ok, err = await self._check(c.spec)
            before = c.passing
            if ok:
                c.ok_streak += 1
                c.fail_streak = 0
                if c.ok_streak >= int(c.spec.get("healthy_threshold", 1)):
                    c.passing = True
            else:
                c.fail_streak += 1
                c.ok_streak = 0
                c.last_error = err
                if c.fail_streak >= int(c.spec.get("unhealthy_threshold", 3)):
                    c.passing = False
                    if before or c.fail_streak == int(c.spec.get("unhealthy_threshold", 3)):
                        await self._unhealthy(c)
                        return
            if c.passing != before:
                what = _describe_check(c.spec)
                if c.passing:
                    self._event("Normal", "Healthy", f"{what} passing")
        if not self.checks:
            self._send(state="running", health="passing", ready=True, message="running")
            return
        all_ok = all(c.passing for c in self.checks)
        failing = [c for c in self.checks if c.fail_streak > 0]
        health = "passing" if all_ok else ("failing" if failing else "unknown")
        msg = "health checks passing" if all_ok else "waiting for health checks"
        if failing:
            # out of rotation at the first failure; restarted at unhealthy_threshold
            msg = f"{_describe_check(failing[0].spec)}: {failing[0].last_error}"
        self._send(state="running", health=health, ready=all_ok and not failing, message=msg)

    async def _check(self, spec: dict[str, Any]) -> tuple[bool, str]:
        if self.simulated:
            return True, ""  # a simulated instance is healthy: nothing listens to probe
        timeout = _seconds(spec.get("timeout", "2s"))
        host = self.ipv4
        try:
            if spec["type"] == "tcp":
                _, w = await asyncio.wait_for(asyncio.open_connection(host, spec["port"]), timeout)
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
                return True, ""
            if spec["type"] == "http":
                url = f"http://{host}:{spec['port']}{spec.get('path', '/')}"
                async with httpx.AsyncClient(timeout=timeout) as h:
                    r = await h.get(url)
                if r.status_code < 400:
                    return True, ""
                return False, f"HTTP {r.status_code}"
            proc = await self.ctx.driver.exec(self.iid, list(spec["command"]), tty=False)
            out, err, code = await asyncio.wait_for(proc.output(), timeout)
            if code == 0:
                return True, ""
            tail = (err or out).decode(errors="replace").strip()[-200:]
            return False, f"exit code {code}" + (f": {tail}" if tail else "")
        except TimeoutError:
            return False, f"timed out after {timeout:g}s"
        except (OSError, httpx.HTTPError, errors.CoveError) as exc:
            return False, str(exc) or type(exc).__name__

    async def _unhealthy(self, c: CheckState) -> None:
        what = _describe_check(c.spec)
        msg = f"{what} failed {c.fail_streak} times ({c.last_error}); restarting"
        self._event("Warning", "Unhealthy", msg)
        self._send(state="stopping", health="failing", ready=False, message=msg)
        st = await self.ctx.driver.stop(self.iid, timeout=10.0)
        _, tmpl = self._template()
        if (tmpl.get("restart") or {}).get("policy", "always") == "never":
            self.failed_for_good = True
            self._send(
                state="failed",
                ready=False,
                last_exit_code=st.exit_code,
                last_termination_reason="health",
                message=f"{msg[: -len('; restarting')]}; restart policy never",
            )
            return
        await self._restart(exit_code=st.exit_code, reason="health", message=msg)

    async def _exited(self, st: Any) -> None:
        code, reason = st.exit_code, st.reason or "exited"
        if reason == "oom":
            self._event("Warning", "OOMKilled", f"out of memory (exit code {code})")
        elif reason in ("crashed", "hung"):
            what = "Crashed" if reason == "crashed" else "Hung"
            self._event("Warning", what, st.message or reason)
        else:
            etype = "Normal" if code == 0 else "Warning"
            self._event(etype, "Exited", f"exited with code {code} ({reason})")
        _, tmpl = self._template()
        policy = (tmpl.get("restart") or {}).get("policy", "always")
        again = policy == "always" or (policy == "on-failure" and (code != 0 or reason != "exited"))
        if not again:
            state = "stopped" if code == 0 else "failed"
            self._send(
                state=state,
                health="unknown",
                ready=False,
                last_exit_code=code,
                last_termination_reason=reason,
                message=f"exited with code {code}; restart policy {policy}",
            )
            self.failed_for_good = True
            return
        await self._restart(exit_code=code, reason=reason, message=f"exited with code {code}")

    async def _restart(self, *, exit_code: int | None, reason: str, message: str) -> None:
        _, tmpl = self._template()
        restart = tmpl.get("restart") or {}
        if time.monotonic() - self.run_started > STABLE_AFTER:
            self.quick_failures = 0
        base = _seconds(restart.get("backoff", "1s"))
        cap = _seconds(restart.get("max_backoff", "60s"))
        delay = min(cap, base * (2**self.quick_failures))
        self.quick_failures += 1
        self._send(
            state="backoff",
            health="unknown",
            ready=False,
            last_exit_code=exit_code,
            last_termination_reason=reason,
            message=f"{message}; restarting in {delay:g}s",
        )
        self._event("Warning", "BackOff", f"{message}; restarting in {delay:g}s")
        await self._pause(delay)
        if self.desired != "running":
            return
        await self.ctx.driver.start(self.iid)
        await self._until_running()
        self.run_started = time.monotonic()
        await self._prepare_checks()
        self.report.restart_count += 1
        from cove.model.resource import now_iso

        self._send(state="running", message="restarted", started_at=now_iso())
        self._event("Normal", "Restarted", f"restart #{self.report.restart_count}")
        self._start_shipper()

    # -- stop ------------------------------------------------------------------------------------

    async def _teardown(self) -> None:
        driver = self.ctx.driver
        try:
            st = await driver.status(self.iid)
        except errors.CoveError:
            st = None
        if st is not None and st.state == "running":
            self._send(state="stopping", ready=False, message="stopping")
            if self.ctx.edge is not None:
                t0 = time.monotonic()
                d = await self.ctx.edge.drain(self.iid)
                if d.open_here or d.waited_for or not d.drained:
                    took = time.monotonic() - t0
                    what = []
                    if d.open_here:
                        what.append(f"{d.open_here} open connection(s) through this node's edge")
                    if d.waited_for:
                        what.append(f"the edge on {', '.join(sorted(d.waited_for))}")
                    if d.problem:
                        what.append(d.problem)
                    self._event(
                        "Normal" if d.drained else "Warning",
                        "Drained" if d.drained else "DrainTimeout",
                        (" and ".join(what) or "the edges")
                        + (
                            f": done in {took:.1f}s"
                            if d.drained
                            else f": not done after {took:.0f}s"
                        )
                        + "; stopping",
                    )
            st = await driver.stop(self.iid, timeout=10.0)
            self._event("Normal", "Stopped", f"stopped (exit code {st.exit_code}, {st.reason})")
            self._send(
                state="stopped",
                last_exit_code=st.exit_code,
                last_termination_reason=st.reason,
                message="stopped",
            )
        if self.shipper is not None:
            await asyncio.sleep(0.3)  # let the last lines go out
            self.shipper.cancel()
        with contextlib.suppress(errors.CoveError):
            await driver.destroy(self.iid)
        self.ctx.pool.release(self.iid)
        self._send(state="destroyed", ready=False, message="destroyed")

    # -- logs ------------------------------------------------------------------------------------

    def _start_shipper(self) -> None:
        if self.shipper is None or self.shipper.done():
            self.shipper = asyncio.ensure_future(self._ship_logs())

    async def _ship_logs(self) -> None:
        cursor_file = self.ctx.state_dir / "log-cursors" / self.iid
        cursor_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            cursor = int(cursor_file.read_text())
        except (OSError, ValueError):
            cursor = 0
        pending: list[dict[str, Any]] = []

        async def read() -> None:
            async for line in self.ctx.driver.logs(self.iid, after_seq=cursor, follow=True):
                pending.append(
                    {"seq": line.seq, "ts": line.ts, "stream": line.stream, "line": line.line}
                )

        while True:
            reader = asyncio.ensure_future(read())
            try:
                while not reader.done() or pending:
                    await asyncio.sleep(0.2)
                    while pending:
                        batch = pending[:1000]
                        try:
                            await self.ctx.client.post(
                                f"/v1/instances/{self.iid}/logs", {"lines": batch}
                            )
                        except errors.NotFound:
                            return
                        except errors.CoveError as exc:
                            log.warning("%s: log shipping failed: %s", self.name, exc.detail)
                            await asyncio.sleep(1.0)
                            break
                        # lines read while the POST was in flight are after the batch
                        del pending[: len(batch)]
                        cursor = batch[-1]["seq"]
                        cursor_file.write_text(str(cursor))
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            # the supervisor ended (exit or restart): look again shortly
            await asyncio.sleep(0.5)


# what the sim driver gets instead of a pulled image: no layers, a stand-in command
_SIM_IMAGE = SimpleNamespace(
    layer_dirs=(), config=SimpleNamespace(argv=("sim",), env_dict={}, working_dir="/", user="0")
)


def _describe_check(spec: dict[str, Any]) -> str:
    if spec["type"] == "exec":
        return f"exec check `{' '.join(spec.get('command') or [])}`"
    if spec["type"] == "http":
        return f"http check :{spec['port']}{spec.get('path', '/')}"
    return f"tcp check :{spec['port']}"
