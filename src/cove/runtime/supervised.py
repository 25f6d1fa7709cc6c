"""What the sandbox and microvm drivers share: instances run under a supervisor process.

Each instance has a directory (``cove.runtime.layout``) and, while it runs, one supervisor
process (``python -m <driver's supervisor module> <dir>``) that owns it, records its status
and output, and outlives the agent. The driver talks to the supervisor through files
(``spec.json``, ``stop.json``, ``status.json``) and signals (SIGUSR1: read ``stop.json``).
A subclass says how to prepare and tear down an instance, which supervisor runs it, and
how to exec into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cove.errors import Conflict, NotFound, Permanent, Transient, UserError
from cove.runtime import idmap, network
from cove.runtime._util import (
    atomic_write_bytes,
    atomic_write_json,
    now_ts,
    pid_matches,
    read_json,
    unlink_quiet,
)
from cove.runtime.base import InstanceSpec, InstanceStatus, LogLine
from cove.runtime.cgroups import Cgroups
from cove.runtime.layout import InstancePaths
from cove.runtime.logs import DEFAULT_MAX_BYTES, read_logs

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
RESERVED_MOUNTS = ("/proc", "/dev", "/tmp", "/run/cove")


def validate_spec(spec: InstanceSpec, *, min_memory_mb: int = 8) -> None:
    """The checks every driver makes; a driver adds its own (layers, volumes' host side)."""
    if not ID_RE.fullmatch(spec.instance_id):
        raise UserError(
            f"bad instance id {spec.instance_id!r}",
            hint="1-63 characters: letters, digits, '_', '.', '-'",
        )
    if not HOSTNAME_RE.fullmatch(spec.hostname):
        raise UserError(f"bad hostname {spec.hostname!r}", hint="a DNS label, 1-63 chars")
    if not spec.layers:
        raise UserError("an instance needs at least one image layer")
    for layer in spec.layers:
        if not layer.is_absolute() or not layer.is_dir():
            raise UserError(f"image layer {layer} is not a directory")
    if not spec.argv or not spec.argv[0]:
        raise UserError("empty command", hint="the image needs an entrypoint or cmd")
    for item in [*spec.argv, *spec.env.keys(), *spec.env.values(), spec.workdir, spec.user]:
        if "\0" in item:
            raise UserError("NUL character in the command, environment, workdir or user")
    for key in spec.env:
        if not key or "=" in key:
            raise UserError(f"bad environment variable name {key!r}")
    if not spec.workdir.startswith("/") or ".." in spec.workdir.split("/"):
        raise UserError(f"workdir must be an absolute path: {spec.workdir!r}")
    if spec.memory_mb < min_memory_mb:
        raise UserError(
            f"memory_mb {spec.memory_mb} is too small", hint=f"at least {min_memory_mb}"
        )
    if spec.cpu_millis < 10:
        raise UserError(f"cpu_millis {spec.cpu_millis} is too small", hint="at least 10")
    if spec.pids_max < 4:
        raise UserError(f"pids_max {spec.pids_max} is too small", hint="at least 4")
    if spec.secrets_json is not None:
        try:
            json.loads(spec.secrets_json)
        except ValueError as exc:
            raise UserError(f"secrets_json is not JSON: {exc}") from exc
    for vol in spec.volumes:
        cp = vol.container_path
        parts = cp.split("/")
        if not cp.startswith("/") or cp == "/" or ".." in parts:
            raise UserError(f"bad volume mount path {cp!r}", hint="an absolute path, not /")
        if any(cp == r or cp.startswith(r + "/") for r in RESERVED_MOUNTS):
            raise UserError(f"volume mount path {cp!r} is reserved")
    if spec.network is not None:
        network.validate(spec.network)


def helper_env() -> dict[str, str]:
    """The environment of the supervisor and exec helpers: nothing of the agent's but what
    Python needs to find cove."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    for key in ("PYTHONPATH", "LANG", "LC_ALL"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


class SupervisedDriver:
    """Instances under ``state_dir/instances/<id>/``, each run by a supervisor process."""

    name = "supervised"
    kind = "instance"  # how errors name an instance: "sandbox", "microVM"
    supervisor_module = ""

    def __init__(
        self,
        state_dir: Path,
        cgroup_root: str = "cove",
        *,
        python: str = sys.executable,
        start_timeout: float = 30.0,
        max_log_bytes: int = DEFAULT_MAX_BYTES,
        idmap_registry: Path = idmap.DEFAULT_REGISTRY,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", cgroup_root):
            raise UserError(f"bad cgroup root {cgroup_root!r}")
        self.state_dir = Path(state_dir).resolve()
        self.cgroup_root = cgroup_root
        self.python = python
        self.start_timeout = start_timeout
        self.max_log_bytes = max_log_bytes
        self.instances_dir = self.state_dir / "instances"
        self.idmap_registry = idmap_registry
        self.adopted: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    # -- what a driver provides ---------------------------------------------------------
    def _validate(self, spec: InstanceSpec) -> None:
        validate_spec(spec)

    def _ensure_state_dir(self) -> None:
        self.instances_dir.mkdir(parents=True, exist_ok=True)

    def _driver_settings(self) -> dict[str, Any]:
        """``driver.json``: what the supervisor needs to know about this driver."""
        return {"cgroup_root": self.cgroup_root, "max_log_bytes": self.max_log_bytes}

    async def _prepare(self, p: InstancePaths, spec: InstanceSpec) -> None:
        """Make the instance startable (idempotent; also what makes it startable again after
        a node reboot): ``_prepare_sync`` in a thread, OS errors as Transient."""
        try:
            await asyncio.to_thread(self._prepare_sync, p, spec)
        except (UserError, Permanent, Transient):
            raise
        except OSError as exc:
            raise Transient(f"cannot prepare instance {spec.instance_id}: {exc}") from exc

    def _prepare_sync(self, p: InstancePaths, spec: InstanceSpec) -> None:
        raise NotImplementedError

    async def _teardown(
        self, p: InstancePaths, instance_id: str, spec: InstanceSpec | None
    ) -> None:
        """Remove everything the instance had (every step attempted)."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------
    def _lock(self, instance_id: str) -> asyncio.Lock:
        """Serialises create/start/stop/destroy of one instance within this process."""
        return self._locks.setdefault(instance_id, asyncio.Lock())

    def _paths(self, instance_id: str) -> InstancePaths:
        if not ID_RE.fullmatch(instance_id):
            raise UserError(
                f"bad instance id {instance_id!r}",
                hint="1-63 characters: letters, digits, '_', '.', '-'",
            )
        return InstancePaths(self.instances_dir / instance_id)

    def _existing(self, instance_id: str) -> InstancePaths:
        p = self._paths(instance_id)
        if not p.spec.exists():
            raise NotFound(f"no {self.kind} instance {instance_id!r} on this node")
        return p

    def _spec(self, p: InstancePaths) -> InstanceSpec:
        return InstanceSpec.from_json(read_json(p.spec))

    def _cgroups(self, instance_id: str) -> Cgroups:
        return Cgroups(self.cgroup_root, instance_id)

    @staticmethod
    def _supervisor_alive(p: InstancePaths) -> int | None:
        """The supervisor's pid if it is running (same pid *and* start time as recorded)."""
        try:
            doc = read_json(p.supervisor)
        except (OSError, ValueError):
            return None
        pid, start = doc.get("pid"), doc.get("starttime")
        return int(pid) if pid_matches(pid, start) else None

    # -- create ----------------------------------------------------------------------
    async def create(self, spec: InstanceSpec) -> None:
        self._validate(spec)
        async with self._lock(spec.instance_id):
            await self._create(spec)

    async def _create(self, spec: InstanceSpec) -> None:
        p = self._paths(spec.instance_id)
        spec_doc = spec.to_json()
        if p.spec.exists():
            if read_json(p.spec) != spec_doc or self._secrets_differ(p, spec.secrets_json):
                raise Conflict(
                    f"instance {spec.instance_id!r} exists with a different spec",
                    hint="destroy it first, or use a new instance id",
                )
            if self._supervisor_alive(p) is None:
                await self._prepare(p, spec)
            return
        self._ensure_state_dir()
        p.dir.mkdir(mode=0o700, exist_ok=True)
        try:
            p.logs.mkdir(mode=0o700, exist_ok=True)
            if spec.secrets_json is not None:
                atomic_write_bytes(p.secrets, spec.secrets_json, mode=0o400)
            atomic_write_json(p.driver, self._driver_settings(), mode=0o600)
            await self._prepare(p, spec)
            atomic_write_json(p.status, InstanceStatus(state="created").to_json(), mode=0o600)
            atomic_write_json(p.spec, spec_doc, mode=0o600)  # last: it means "created"
        except BaseException:
            with contextlib.suppress(Exception):
                await self._teardown(p, spec.instance_id, spec)
            raise

    @staticmethod
    def _secrets_differ(p: InstancePaths, secrets: bytes | None) -> bool:
        try:
            current: bytes | None = p.secrets.read_bytes()
        except FileNotFoundError:
            current = None
        return current != secrets

    # -- start -----------------------------------------------------------------------
    async def start(self, instance_id: str) -> None:
        async with self._lock(instance_id):
            await self._start(instance_id)

    async def _start(self, instance_id: str) -> None:
        p = self._existing(instance_id)
        if self._supervisor_alive(p) is not None:
            if (await self.status(instance_id)).state != "exited":
                return  # already running: nothing to do
            # the last run ended and its supervisor is still winding down (it records the
            # end, then exits): wait for it, or this start would silently do nothing
            await self._wait_supervisor_gone(p, 5.0)
        spec = self._spec(p)
        await self._prepare(p, spec)
        unlink_quiet(p.stop_request)
        unlink_quiet(p.sandbox)
        log_fd = os.open(p.supervisor_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                self.supervisor_module,
                str(p.dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_fd,
                start_new_session=True,
                cwd="/",
                env=helper_env(),
            )
        finally:
            os.close(log_fd)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.start_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            await self._kill_supervisor(p)
            raise Transient(
                f"instance {instance_id} did not start within {self.start_timeout:.0f}s"
            ) from None
        try:
            result = json.loads(out or b"{}")
        except ValueError:
            result = {}
        if not result.get("ok"):
            raise Permanent(
                f"instance {instance_id} failed to start: {result.get('error') or 'unknown'}",
                hint=f"see {p.supervisor_log} and the instance log",
                code="start_failed",
            )
        self.adopted.add(instance_id)

    # -- stop ------------------------------------------------------------------------
    async def stop(
        self, instance_id: str, sig: int = signal.SIGTERM, timeout: float = 10.0
    ) -> InstanceStatus:
        async with self._lock(instance_id):
            return await self._stop(instance_id, sig, timeout)

    async def _stop(self, instance_id: str, sig: int, timeout: float) -> InstanceStatus:
        p = self._existing(instance_id)
        sup = self._supervisor_alive(p)
        if sup is None:
            return await self.status(instance_id)
        st = await self.status(instance_id)
        if st.state == "exited":  # recorded the end, about to exit
            return st
        atomic_write_json(p.stop_request, {"signal": int(sig), "timeout": float(timeout)})
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGUSR1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0) + 10.0
        while loop.time() < deadline:
            st = await self.status(instance_id)
            if st.state != "running":
                return st
            await asyncio.sleep(0.02)
        # the supervisor does not answer: end it (the instance dies with it)
        await self._kill_supervisor(p)
        st = InstanceStatus(
            state="exited",
            started_at=st.started_at,
            finished_at=now_ts(),
            reason="killed",
            supervisor_pid=sup,
            message="the supervisor did not stop the instance in time and was killed",
        )
        atomic_write_json(p.status, st.to_json())
        return st

    async def _wait_supervisor_gone(self, p: InstancePaths, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._supervisor_alive(p) is not None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self._kill_supervisor(p)  # (only if it is still there)

    async def _kill_supervisor(self, p: InstancePaths) -> None:
        sup = self._supervisor_alive(p)
        if sup is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sup, signal.SIGKILL)
            for _ in range(250):
                if self._supervisor_alive(p) is None:
                    break
                await asyncio.sleep(0.02)

    # -- destroy ---------------------------------------------------------------------
    async def destroy(self, instance_id: str) -> None:
        async with self._lock(instance_id):
            await self._destroy(instance_id)
        self._locks.pop(instance_id, None)

    async def _destroy(self, instance_id: str) -> None:
        p = self._paths(instance_id)
        spec: InstanceSpec | None = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            spec = self._spec(p)
        if self._supervisor_alive(p) is not None and spec is not None:
            await self._stop(instance_id, signal.SIGKILL, 5.0)
        await self._kill_supervisor(p)
        await self._teardown(p, instance_id, spec)
        self.adopted.discard(instance_id)

    # -- status / logs ---------------------------------------------------------------
    async def status(self, instance_id: str) -> InstanceStatus:
        p = self._existing(instance_id)
        try:
            st = InstanceStatus.from_json(read_json(p.status))
        except (OSError, ValueError):
            st = InstanceStatus(state="unknown", message="no readable status")
        if st.state == "running" and self._supervisor_alive(p) is None:
            # the end was never recorded: the supervisor died (its instance with it)
            st.state = "unknown"
            st.pid = None
            st.message = "the supervisor is gone without recording how the instance ended"
        return st

    async def logs(
        self, instance_id: str, *, after_seq: int = 0, follow: bool = False
    ) -> AsyncIterator[LogLine]:
        p = self._existing(instance_id)
        async for line in read_logs(
            p.logs,
            after_seq=after_seq,
            follow=follow,
            alive=lambda: self._supervisor_alive(p) is not None,
        ):
            yield line

    # -- adopt -----------------------------------------------------------------------
    async def adopt(self) -> list[str]:
        found: list[str] = []
        if not self.instances_dir.is_dir():
            return found
        for d in sorted(self.instances_dir.iterdir()):
            if not ID_RE.fullmatch(d.name):
                continue
            p = InstancePaths(d)
            if p.spec.exists() and self._supervisor_alive(p) is not None:
                found.append(d.name)
        self.adopted = set(found)
        return found

    # -- introspection (tests, `cove node` diagnostics) -------------------------------
    def instance_dir(self, instance_id: str) -> Path:
        return self._paths(instance_id).dir

    def cgroup_paths(self, instance_id: str) -> dict[str, Path]:
        return dict(self._cgroups(instance_id).paths)
