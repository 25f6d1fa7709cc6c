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
import shutil
import socket
import struct
import sys
import termios
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cove.errors import Conflict, Permanent, Transient, UserError, WaitTimeout
from cove.runtime import idmap, network, rootfs
from cove.runtime._util import (
    atomic_write_json,
    read_json,
)
from cove.runtime.base import Driver, InstanceSpec
from cove.runtime.bwrap import SECRETS_PATH, sandbox_env
from cove.runtime.layout import InstancePaths
from cove.runtime.logs import DEFAULT_MAX_BYTES
from cove.runtime.supervised import SupervisedDriver, helper_env, validate_spec
from cove.runtime.users import resolve_user


class SandboxDriver(SupervisedDriver):
    """Runs instances in bubblewrap sandboxes; state under ``state_dir/instances/<id>/``."""

    name = "sandbox"
    kind = "sandbox"
    supervisor_module = "cove.runtime.supervisor"

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
        super().__init__(
            state_dir,
            cgroup_root,
            python=python,
            start_timeout=start_timeout,
            max_log_bytes=max_log_bytes,
            idmap_registry=idmap_registry,
        )
        self.bwrap = shutil.which(bwrap) or bwrap

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

    def _validate(self, spec: InstanceSpec) -> None:
        validate_spec(spec)
        for vol in spec.volumes:
            if not vol.host_path.is_absolute() or not vol.host_path.is_dir():
                raise UserError(f"volume {vol.host_path} is not a directory on this node")

    def _driver_settings(self) -> dict[str, Any]:
        return {**super()._driver_settings(), "bwrap": self.bwrap}

    # -- prepare ----------------------------------------------------------------------
    def _prepare_sync(self, p: InstancePaths, spec: InstanceSpec) -> None:
        """Mount the rootfs, create mount points, resolve the user, set up cgroups."""
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

    # -- teardown --------------------------------------------------------------------
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
                env=helper_env(),
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
