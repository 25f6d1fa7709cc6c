"""The ``sandbox`` runtime driver: bubblewrap namespaces + cgroup v1 limits.

Isolation of an instance (weaker than the microvm driver: one shared kernel):

- namespaces: user, mount, pid, network, ipc, uts, cgroup (all new per instance);
- user namespace: image ids 0-65535 are a block of unprivileged host ids of this instance
  only (>= 2^30, cove.runtime.idmap) - the image's root is not the host's root, and two
  instances never share a host uid; the program runs as the image user; files keep their
  image owners (idmapped mounts); nested user namespaces are refused (seccomp);
- capabilities: none (effective, permitted, inheritable, ambient and bounding sets empty);
  no_new_privs; a seccomp deny-list (cove.runtime.seccomp);
- rootfs: overlayfs of the cached layers (read-only idmapped mounts) + a per-instance upper
  (nosuid, nodev); /proc of its own pid namespace, a minimal /dev, /tmp on tmpfs, secrets at
  /run/cove/secrets.json (0400, owned by the instance user, in bwrap's tmpfs - never on the
  instance's disk); no /sys;
- limits: memory (+memsw), CPU (CFS quota), pids - cgroup v1, joined before bwrap runs;
- network: only its own veth to its bridge (or nothing but ``lo`` without a NetConfig).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cove.errors import Conflict, NotFound, Permanent, Transient, UserError, WaitTimeout
from cove.runtime import idmap, network, rootfs
from cove.runtime._util import (
    atomic_write_bytes,
    atomic_write_json,
    now_ts,
    pid_matches,
    read_json,
    unlink_quiet,
)
from cove.runtime.base import Driver, InstanceSpec, InstanceStatus, LogLine
from cove.runtime.bwrap import SECRETS_PATH, sandbox_env
from cove.runtime.cgroups import Cgroups
from cove.runtime.layout import InstancePaths
from cove.runtime.logs import DEFAULT_MAX_BYTES, read_logs
from cove.runtime.users import resolve_user

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
RESERVED_MOUNTS = ("/proc", "/dev", "/tmp", "/run/cove")


class SandboxDriver:
    """Runs instances in bubblewrap sandboxes; state under ``state_dir/instances/<id>/``."""

    name = "sandbox"

    def __init__(
        self,
        state_dir: Path,
        cgroup_root: str = "cove",
        *,
        bwrap: str = "bwrap",
        python: str = sys.executable,
        start_timeout: float = 30.0,
        max_log_bytes: int = DEFAULT_MAX_BYTES,
        idmap_registry: Path = idmap.DEFAULT_REGISTRY,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", cgroup_root):
            raise UserError(f"bad cgroup root {cgroup_root!r}")
        self.state_dir = Path(state_dir).resolve()
        self.cgroup_root = cgroup_root
        self.bwrap = shutil.which(bwrap) or bwrap
        self.python = python
        self.start_timeout = start_timeout
        self.max_log_bytes = max_log_bytes
        self.instances_dir = self.state_dir / "instances"
        self.idmap_registry = idmap_registry
        self.adopted: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, instance_id: str) -> asyncio.Lock:
        """Serialises create/start/stop/destroy of one instance within this process."""
        return self._locks.setdefault(instance_id, asyncio.Lock())

    def _ensure_state_dir(self) -> None:
        """Create the state dirs. The sandbox's own user (an unprivileged host id) must be
        able to traverse down to its rootfs, so every ancestor needs o+x."""
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.state_dir, self.instances_dir):
            if d.stat().st_mode & 0o777 != 0o711:
                d.chmod(0o711)
        for parent in self.state_dir.parents:
            if not parent.stat().st_mode & 0o001:
                raise Permanent(
                    f"{parent} is not traversable by other users (mode "
                    f"{parent.stat().st_mode & 0o777:o}); sandboxes run as unprivileged "
                    "host users and must reach their rootfs under the state dir",
                    hint=f"chmod o+x {parent}, or put the state dir elsewhere",
                    code="state_dir_not_traversable",
                )

    # -- helpers ---------------------------------------------------------------------
    def _paths(self, instance_id: str) -> InstancePaths:
        if not _ID_RE.fullmatch(instance_id):
            raise UserError(
                f"bad instance id {instance_id!r}",
                hint="1-63 characters: letters, digits, '_', '.', '-'",
            )
        return InstancePaths(self.instances_dir / instance_id)

    def _existing(self, instance_id: str) -> InstancePaths:
        p = self._paths(instance_id)
        if not p.spec.exists():
            raise NotFound(f"no sandbox instance {instance_id!r} on this node")
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

    # -- validation ------------------------------------------------------------------
    def _validate(self, spec: InstanceSpec) -> None:
        self._paths(spec.instance_id)
        if not _HOSTNAME_RE.fullmatch(spec.hostname):
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
        if spec.memory_mb < 8:
            raise UserError(f"memory_mb {spec.memory_mb} is too small", hint="at least 8")
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
            if not vol.host_path.is_absolute() or not vol.host_path.is_dir():
                raise UserError(f"volume {vol.host_path} is not a directory on this node")
        if spec.network is not None:
            network.validate(spec.network)

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
            atomic_write_json(
                p.driver,
                {
                    "cgroup_root": self.cgroup_root,
                    "bwrap": self.bwrap,
                    "max_log_bytes": self.max_log_bytes,
                },
                mode=0o600,
            )
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

    async def _prepare(self, p: InstancePaths, spec: InstanceSpec) -> None:
        """Mount the rootfs, create mount points, resolve the user, set up cgroups.
        Idempotent; also what makes an instance startable again after a node reboot."""
        try:
            await asyncio.to_thread(self._prepare_sync, p, spec)
        except (UserError, Permanent, Transient):
            raise
        except OSError as exc:
            raise Transient(f"cannot prepare instance {spec.instance_id}: {exc}") from exc

    def _prepare_sync(self, p: InstancePaths, spec: InstanceSpec) -> None:
        prev: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            prev = read_json(p.ident)
        prev_base = prev.get("uid_base")
        mounted = rootfs.is_mountpoint(p.merged)
        base = idmap.claim(p.dir, self.idmap_registry, prefer=prev_base)
        if mounted and base != prev_base:  # our block was taken while we were away: remount
            rootfs.unmount_all(p.rootfs)
            mounted = False
        if not mounted:
            rootfs.unmount_all(p.rootfs)  # leftovers of an interrupted attempt
            try:
                self._mount_rootfs(p, spec, base)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    rootfs.unmount_all(p.rootfs)
                raise Permanent(f"cannot mount the instance rootfs: {exc}") from exc
        root = p.merged

        def text(path: str) -> str | None:
            data = rootfs.read_file_in_root(root, path)
            return None if data is None else data.decode("utf-8", "replace")

        ident = resolve_user(spec.user, text("/etc/passwd"), text("/etc/group"))
        atomic_write_json(
            p.ident,
            {
                "uid": ident.uid,
                "gid": ident.gid,
                "groups": list(ident.groups),
                "name": ident.name,
                "uid_base": base,
            },
            mode=0o600,
        )
        # bwrap runs as the instance user and must reach rootfs/merged and rootfs/vol/*:
        # let exactly that user's group through, nobody else
        for d in (p.dir, p.rootfs, p.rootfs / "vol"):
            if d.exists():
                os.chown(d, 0, base + ident.gid)
                d.chmod(0o710)
        self._cgroups(spec.instance_id).create(
            memory_mb=spec.memory_mb, cpu_millis=spec.cpu_millis, pids_max=spec.pids_max
        )

    def _mount_rootfs(self, p: InstancePaths, spec: InstanceSpec, base: int) -> None:
        """Idmapped layers + idmapped writable layer -> overlay on rootfs/merged."""
        for d in (p.rw / "upper", p.rw / "work", p.rw_idmap, p.merged):
            d.mkdir(parents=True, exist_ok=True)
        ns_fd = idmap.userns_fd(base)
        try:
            for n, layer in enumerate(spec.layers):
                p.lower(n).mkdir(parents=True, exist_ok=True)
                idmap.idmapped_bind(layer, p.lower(n), ns_fd, read_only=True)
            idmap.idmapped_bind(p.rw, p.rw_idmap, ns_fd)
            for n, vol in enumerate(spec.volumes):
                p.volume(n).mkdir(parents=True, exist_ok=True)
                idmap.idmapped_bind(vol.host_path, p.volume(n), ns_fd, read_only=vol.read_only)
        finally:
            os.close(ns_fd)
        lowers = [p.lower(n) for n in range(len(spec.layers))]

        def as_root() -> None:
            rootfs.mount_overlay(lowers, p.upper, p.work, p.merged)
            for d in ("/proc", "/dev", "/tmp", "/run/cove", spec.workdir):
                rootfs.ensure_dir_in_root(p.merged, d)
            for vol in spec.volumes:
                rootfs.ensure_dir_in_root(p.merged, vol.container_path)
            if spec.secrets_json is not None:
                rootfs.ensure_file_in_root(p.merged, SECRETS_PATH, 0o400)

        idmap.as_instance_root(base, as_root)

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
                "cove.runtime.supervisor",
                str(p.dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_fd,
                start_new_session=True,
                cwd="/",
                env=_helper_env(),
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
        # the supervisor does not answer: end it (the sandbox dies with it)
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

    async def _teardown(
        self, p: InstancePaths, instance_id: str, spec: InstanceSpec | None
    ) -> None:
        """Remove the veth, mounts, cgroups, id block and files; every step is attempted,
        failures are reported together. Files are removed only once no mount is left below
        the instance directory (never delete through a mount: volumes are mounted there)."""
        errors: list[str] = []
        if spec is not None and spec.network is not None:
            try:
                await network.detach(spec.network, instance_id)
            except Exception as exc:
                errors.append(f"network: {exc}")
        ident: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            ident = read_json(p.ident)
        try:
            await asyncio.to_thread(rootfs.unmount_all, p.dir)
        except OSError as exc:
            errors.append(f"unmount: {exc}")
        try:
            await asyncio.to_thread(self._cgroups(instance_id).remove)
        except Exception as exc:
            errors.append(f"cgroups: {exc}")
        left = rootfs.mounts_under(p.dir)
        if left:
            errors.append(f"still mounted, files kept: {', '.join(left)}")
        elif p.dir.exists():
            try:
                await asyncio.to_thread(shutil.rmtree, p.dir)
            except OSError as exc:
                errors.append(f"files: {exc}")
        if "uid_base" in ident and not left:
            base = int(ident["uid_base"])
            idmap.release(p.dir, base, self.idmap_registry)
            # bwrap's (empty) scratch mount point for its host uid
            with contextlib.suppress(OSError):
                os.rmdir(f"/tmp/.bubblewrap-{base + int(ident.get('uid', 0))}")
        if errors:
            raise Transient(f"cannot fully remove instance {instance_id}: " + "; ".join(errors))

    # -- status / logs ---------------------------------------------------------------
    async def status(self, instance_id: str) -> InstanceStatus:
        p = self._existing(instance_id)
        try:
            st = InstanceStatus.from_json(read_json(p.status))
        except (OSError, ValueError):
            st = InstanceStatus(state="unknown", message="no readable status")
        if st.state == "running" and self._supervisor_alive(p) is None:
            # the end was never recorded: the supervisor died (its sandbox with it)
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

    # -- exec ------------------------------------------------------------------------
    async def exec(
        self,
        instance_id: str,
        argv: list[str],
        *,
        tty: bool,
        env: dict[str, str] | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> SandboxExecProcess:
        p = self._existing(instance_id)
        if not argv or any("\0" in a for a in argv):
            raise UserError("exec needs a command (without NUL characters)")
        if self._supervisor_alive(p) is None:
            raise Conflict(f"instance {instance_id} is not running")
        try:
            sandbox = read_json(p.sandbox)
        except (OSError, ValueError):
            raise Conflict(f"instance {instance_id} is not running") from None
        spec = self._spec(p)
        ident = read_json(p.ident)
        extra = dict(env or {})
        if tty:
            extra.setdefault("TERM", spec.env.get("TERM", "xterm"))
        cfg = {
            "init_pid": sandbox["init_pid"],
            "init_starttime": sandbox["init_starttime"],
            "cgroups": [str(x) for x in self._cgroups(instance_id).paths.values()],
            "uid": ident["uid"],
            "gid": ident["gid"],
            "groups": ident.get("groups", []),
            "cwd": spec.workdir,
            "env": sandbox_env(spec.env, extra),
            "argv": list(argv),
            "tty": tty,
            "rows": rows,
            "cols": cols,
        }
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pipe = asyncio.subprocess.PIPE
            devnull = asyncio.subprocess.DEVNULL
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "cove.runtime.nsexec",
                str(theirs.fileno()),
                stdin=devnull if tty else pipe,
                stdout=devnull if tty else pipe,
                stderr=devnull if tty else pipe,
                pass_fds=(theirs.fileno(),),
                cwd="/",
                env=_helper_env(),
            )
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        ours.setblocking(False)
        master: int | None = None
        try:
            await loop.sock_sendall(ours, json.dumps(cfg).encode())
            reply_raw, fds = await asyncio.wait_for(_recv_fds(ours), 15.0)
            for fd in fds:
                if master is None and tty:
                    master = fd
                else:
                    os.close(fd)
            reply = json.loads(reply_raw or b"{}")
        except (TimeoutError, OSError, ValueError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise Transient(f"exec into {instance_id} failed: {exc}") from exc
        finally:
            ours.close()
        if not reply.get("ok"):
            if master is not None:
                os.close(master)
            code = await proc.wait()
            error = reply.get("error") or "the exec helper failed"
            if code in (126, 127):
                raise UserError(f"cannot run {argv[0]!r} in {instance_id}: {error}")
            raise Transient(f"exec into {instance_id} failed: {error}")
        if tty and master is None:
            await proc.wait()
            raise Transient("exec helper returned no terminal")
        return SandboxExecProcess(proc, master, pid=int(reply["pid"]))

    # -- adopt -----------------------------------------------------------------------
    async def adopt(self) -> list[str]:
        found: list[str] = []
        if not self.instances_dir.is_dir():
            return found
        for d in sorted(self.instances_dir.iterdir()):
            if not _ID_RE.fullmatch(d.name):
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


def _helper_env() -> dict[str, str]:
    """The environment of the supervisor and exec helper: nothing of the agent's but what
    Python needs to find cove."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    for key in ("PYTHONPATH", "LANG", "LC_ALL"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


async def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[tuple[bytes, list[int]]] = loop.create_future()

    def ready() -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 4)
        except BlockingIOError:
            return
        except OSError as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result((msg, list(fds)))

    loop.add_reader(sock.fileno(), ready)
    try:
        return await fut
    finally:
        loop.remove_reader(sock.fileno())


class SandboxExecProcess:
    """A command started by ``SandboxDriver.exec`` (see ``cove.runtime.base.ExecProcess``)."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int | None, *, pid: int) -> None:
        self.proc = proc
        self.master = master
        self.tty = master is not None
        self.pid = pid  # host pid of the command
        if master is not None:
            os.set_blocking(master, False)

    async def write(self, data: bytes) -> None:
        if self.master is not None:
            await self._pty_write(data)
            return
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def _pty_write(self, data: bytes) -> None:
        assert self.master is not None
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
                view = view[n:]
            except BlockingIOError:
                await self._wait_fd(self.master, write=True)

    async def close_stdin(self) -> None:
        if self.master is not None:
            await self._pty_write(b"\x04")  # ^D: end of input for the terminal's reader
            return
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await self.proc.stdin.wait_closed()

    async def read(self, n: int = 65536) -> bytes:
        if self.master is not None:
            return await self._pty_read(n)
        assert self.proc.stdout is not None
        return await self.proc.stdout.read(n)

    async def read_stderr(self, n: int = 65536) -> bytes:
        if self.master is not None:
            return b""
        assert self.proc.stderr is not None
        return await self.proc.stderr.read(n)

    async def _pty_read(self, n: int) -> bytes:
        while True:
            if self.master is None:
                return b""
            try:
                return os.read(self.master, n)
            except BlockingIOError:
                await self._wait_fd(self.master)
            except OSError as exc:
                if exc.errno == errno.EIO:  # every slave fd closed: the command is done
                    return b""
                raise

    @staticmethod
    async def _wait_fd(fd: int, *, write: bool = False) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if write:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def resize(self, rows: int, cols: int) -> None:
        if self.master is None:
            return
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)  # the helper relays it to the command

    async def wait(self, timeout: float | None = None) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
            return 128 - code if code < 0 else code  # the shell's convention for signals
        except TimeoutError:
            raise WaitTimeout(f"the command did not finish within {timeout}s") from None

    async def output(self) -> tuple[bytes, bytes, int]:
        """Convenience: read everything to the end and wait (stdin is closed first)."""
        await self.close_stdin()
        out, err = bytearray(), bytearray()

        async def pump(read: Any, buf: bytearray) -> None:
            while chunk := await read():
                buf.extend(chunk)

        await asyncio.gather(pump(self.read, out), pump(self.read_stderr, err))
        code = await self.wait()
        self.close()
        return bytes(out), bytes(err), code

    def close(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None


if TYPE_CHECKING:  # the sandbox driver implements the driver interface

    def _conforms(driver: SandboxDriver) -> Driver:
        return driver
