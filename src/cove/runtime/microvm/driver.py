"""The ``microvm`` runtime driver: one QEMU ``-M microvm`` guest per instance.

Isolation: a separate guest kernel per instance. QEMU itself runs as the instance's own
unprivileged host uid (``-runas``, the id block of cove.runtime.idmap), with QEMU's seccomp
sandbox, in the instance's cgroups (memory: the guest's RAM plus QEMU's overhead; CPU quota).
The guest sees only its own disks (root overlay, volumes), its own memory (``-m``: the
memory limit *is* the VM size) and its tap on the node bridge.

Boot: the host kernel (Debian's linux-image-amd64; the PVH vmlinux inside it when present),
cove's initramfs (cove-init + virtio/ext4 modules), the image's layers as a cached ext4 base
under a per-instance qcow2 overlay. cove-init gets the command over the ``cove.ctl``
virtio-serial port (guest/PROTOCOL.md); the supervisor (cove.runtime.microvm.supervisor)
relays logs, exec and stop.

Acceleration: KVM when the host's ``/dev/kvm`` runs a probe guest (cove.runtime.microvm.accel),
TCG emulation otherwise - correct, and several times slower; ``accel`` says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cove.errors import Conflict, Permanent, Transient, UserError, WaitTimeout
from cove.runtime import idmap, network
from cove.runtime._util import atomic_write_json, read_json
from cove.runtime.base import Driver, InstanceSpec
from cove.runtime.bwrap import sandbox_env
from cove.runtime.layout import InstancePaths
from cove.runtime.logs import DEFAULT_MAX_BYTES
from cove.runtime.microvm import protocol as P
from cove.runtime.microvm.accel import Accel, probe
from cove.runtime.microvm.disk import base_disk, create_overlay
from cove.runtime.microvm.initramfs import (
    boot_image,
    build_initramfs,
    find_kernel,
    kernel_cmdline,
)
from cove.runtime.microvm.supervisor import HANG_TIMEOUT, run_dir
from cove.runtime.supervised import SupervisedDriver, validate_spec
from cove.runtime.users import resolve_user

MIN_MEMORY_MB = 64  # the guest kernel and cove-init need this much before the command
TCG_TB_MB = 64  # TCG's translation cache: bounded, it is host memory per VM
# kernel images, initramfs and the KVM probe: content-addressed, shared by the host's agents
BOOT_CACHE = Path(os.environ.get("COVE_MICROVM_CACHE", "/var/cache/cove/microvm"))


class MicroVMDriver(SupervisedDriver):
    """Runs instances as microVMs; state under ``state_dir/instances/<id>/``, per-image ext4
    bases under ``cache_dir``, the kernel image and initramfs under ``boot_cache``."""

    name = "microvm"
    kind = "microVM"
    supervisor_module = "cove.runtime.microvm.supervisor"

    def __init__(
        self,
        state_dir: Path,
        cgroup_root: str = "cove",
        *,
        accel: Accel | None = None,
        qemu: str = "qemu-system-x86_64",
        cache_dir: Path | None = None,
        boot_cache: Path | None = None,
        python: str = sys.executable,
        start_timeout: float = 150.0,
        hang_timeout: float = HANG_TIMEOUT,
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
        found = shutil.which(qemu)
        if found is None:
            raise Permanent(
                f"{qemu} is not installed", hint="apt-get install qemu-system-x86 qemu-utils"
            )
        self.qemu = found
        self.cache_dir = Path(cache_dir or self.state_dir / "cache").resolve()
        self.boot_cache = Path(boot_cache or BOOT_CACHE).resolve()
        self.kernel = find_kernel()
        self.hang_timeout = hang_timeout
        self._image: Path | None = None
        self._initrd: Path | None = None
        self.accel = accel or probe(self.qemu, self._kernel_image(), self.boot_cache)

    @property
    def accel_name(self) -> str:
        return self.accel.name

    def _kernel_image(self) -> Path:
        if self._image is None:
            self._image = boot_image(self.kernel, self.boot_cache)
        return self._image

    def _initramfs(self) -> Path:
        """Built once per process (and cached on disk by content)."""
        if self._initrd is None:
            self._initrd = build_initramfs(self.boot_cache, kernel=self.kernel)
        return self._initrd

    # -- validation ------------------------------------------------------------------
    def _validate(self, spec: InstanceSpec) -> None:
        validate_spec(spec, min_memory_mb=MIN_MEMORY_MB)
        for vol in spec.volumes:
            if not vol.host_path.is_absolute() or not vol.host_path.is_file():
                raise UserError(
                    f"volume {vol.host_path} is not a disk image on this node",
                    hint="a microVM mounts volumes as block devices (ext4 image files)",
                )
        if len(spec.volumes) > 20:
            raise UserError("a microVM takes at most 20 volumes")

    def _driver_settings(self) -> dict[str, Any]:
        return {**super()._driver_settings(), "hang_timeout": self.hang_timeout}

    # -- prepare ---------------------------------------------------------------------
    def _prepare_sync(self, p: InstancePaths, spec: InstanceSpec) -> None:
        """The boot files, the root disk overlay, the user, the QEMU command line."""
        image, initrd = self._kernel_image(), self._initramfs()
        base = base_disk(spec.layers, self.cache_dir)
        disk = p.dir / "root.qcow2"
        create_overlay(base.path, disk)
        prev: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            prev = read_json(p.ident)
        uid_base = idmap.claim(p.dir, self.idmap_registry, prefer=prev.get("uid_base"))
        ident = resolve_user(spec.user, base.passwd, base.group)
        atomic_write_json(
            p.ident,
            {
                "uid": ident.uid,
                "gid": ident.gid,
                "groups": list(ident.groups),
                "name": ident.name,
                "uid_base": uid_base,
            },
        )
        atomic_write_json(
            p.dir / "vm.json",
            {"accel": self.accel.name, "argv": self._qemu_argv(spec, image, initrd, disk)},
        )
        # (the cgroups are the supervisor's to make: QEMU's limits are the guest's plus
        # QEMU's own overhead; the guest enforces pids_max itself)

    def _qemu_argv(self, spec: InstanceSpec, image: Path, initrd: Path, disk: Path) -> list[str]:
        kvm = self.accel.name == "kvm"
        vcpus = max(1, min(math.ceil(spec.cpu_millis / 1000), os.cpu_count() or 1))
        argv = [
            self.qemu,
            "-name", f"cove-{spec.instance_id},debug-threads=on",
            "-M", "microvm,rtc=on",
            "-accel", "kvm" if kvm else f"tcg,tb-size={TCG_TB_MB}",
            "-cpu", "host" if kvm else "max",
            "-m", str(spec.memory_mb),
            "-smp", str(vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=con,signal=off",
            "-serial", "chardev:con",
            "-kernel", str(image),
            "-initrd", str(initrd),
            "-append", kernel_cmdline(root="/dev/vda"),
            "-drive", f"id=root,file={disk},format=qcow2,if=none,discard=unmap",
            "-device", "virtio-blk-device,drive=root",
        ]  # fmt: skip
        for n, vol in enumerate(spec.volumes):
            ro = ",readonly=on" if vol.read_only else ""
            argv += [
                "-drive", f"id=vol{n},file={vol.host_path},format=raw,if=none{ro}",
                "-device", f"virtio-blk-device,drive=vol{n}",
            ]  # fmt: skip
        argv += [
            "-device", "virtio-serial-device,max_ports=2",
            "-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
        ]  # fmt: skip
        return argv

    # -- teardown --------------------------------------------------------------------
    async def _teardown(
        self, p: InstancePaths, instance_id: str, spec: InstanceSpec | None
    ) -> None:
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
            await asyncio.to_thread(self._cgroups(instance_id).remove)
        except Exception as exc:
            errors.append(f"cgroups: {exc}")
        for d in (run_dir(p.dir), p.dir):
            if d.exists():
                try:
                    await asyncio.to_thread(shutil.rmtree, d)
                except OSError as exc:
                    errors.append(f"files: {exc}")
        if "uid_base" in ident:
            idmap.release(p.dir, int(ident["uid_base"]), self.idmap_registry)
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
    ) -> MicroVMExecProcess:
        p = self._existing(instance_id)
        if not argv or any("\0" in a for a in argv):
            raise UserError("exec needs a command (without NUL characters)")
        if self._supervisor_alive(p) is None:
            raise Conflict(f"instance {instance_id} is not running")
        try:
            vm = read_json(p.sandbox)
            sock = str(vm["exec_socket"])
        except (OSError, ValueError, KeyError):
            raise Conflict(f"instance {instance_id} is not running") from None
        spec = self._spec(p)
        ident = read_json(p.ident)
        extra = dict(env or {})
        if tty:
            extra.setdefault("TERM", spec.env.get("TERM", "xterm"))
        items: list[tuple[str, str]] = [
            ("tty", "1" if tty else "0"),
            ("rows", str(rows)),
            ("cols", str(cols)),
            ("workdir", spec.workdir),
            ("uid", str(ident["uid"])),
            ("gid", str(ident["gid"])),
        ]
        items += [("group", str(g)) for g in ident.get("groups", [])]
        items += [("env", f"{k}={v}") for k, v in sandbox_env(spec.env, extra).items()]
        items += [("arg", a) for a in argv]
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(sock), 10.0)
        except (OSError, TimeoutError) as exc:
            raise Conflict(f"instance {instance_id} is not running ({exc})") from exc
        proc = MicroVMExecProcess(reader, writer, tty=tty)
        writer.write(P.encode(P.EXEC, 0, P.records(items)))
        await proc.started(argv[0], instance_id)
        return proc


class MicroVMExecProcess:
    """A command running in a microVM (``cove.runtime.base.ExecProcess``), through the
    supervisor's exec socket."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tty: bool
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tty = tty
        self.pid: int | None = None
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._err: asyncio.Queue[bytes] = asyncio.Queue()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fatal: list[str] = []
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def started(self, program: str, instance_id: str) -> None:
        waiting: set[asyncio.Future[Any]] = {self._started, self._exit}
        await asyncio.wait(waiting, timeout=30.0, return_when="FIRST_COMPLETED")
        if self._started.done():
            return
        if not self._exit.done():
            self.close()
            raise Transient(f"exec into {instance_id}: the guest did not answer in 30s")
        code = self._exit.result()
        error = "; ".join(self._fatal) or f"exit {code}"
        if code in (126, 127):
            raise UserError(f"cannot run {program!r} in {instance_id}: {error}")
        raise Transient(f"exec into {instance_id} failed: {error}")

    async def _pump(self) -> None:
        decoder = P.Decoder()
        code = 255
        try:
            while data := await self.reader.read(1 << 16):
                for f in decoder.feed(data):
                    if f.type == P.STDOUT:
                        self._out.put_nowait(f.payload)
                    elif f.type == P.STDERR:
                        self._err.put_nowait(f.payload)
                    elif f.type == P.EXEC_STARTED:
                        with contextlib.suppress(ValueError):
                            self.pid = int(f.text)
                        if not self._started.done():
                            self._started.set_result(None)
                    elif f.type == P.FATAL:
                        self._fatal.append(f.text)
                    elif f.type == P.EXIT:
                        code = P.parse_exit(f.text)[0]
                        return
        except (ConnectionError, P.ProtocolError):
            pass
        finally:
            self._out.put_nowait(b"")
            self._err.put_nowait(b"")
            if not self._exit.done():
                self._exit.set_result(code)

    async def _send(self, type_: int, payload: bytes = b"") -> None:
        if self.writer.is_closing():
            return
        self.writer.write(P.encode(type_, 0, payload))
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await self._send(P.STDIN, bytes(view[: P.MAX_DATA]))
            view = view[P.MAX_DATA :]

    async def close_stdin(self) -> None:
        if self.tty:
            await self._send(P.STDIN, b"\x04")  # ^D: end of input for the terminal's reader
        else:
            await self._send(P.STDIN, b"")

    async def read(self, n: int = 65536) -> bytes:
        return await self._read(self._out)

    async def read_stderr(self, n: int = 65536) -> bytes:
        if self.tty:
            return b""
        return await self._read(self._err)

    @staticmethod
    async def _read(q: asyncio.Queue[bytes]) -> bytes:
        chunk = await q.get()
        if not chunk:
            q.put_nowait(b"")  # end of file stays end of file
        return chunk

    async def resize(self, rows: int, cols: int) -> None:
        if self.tty:
            await self._send(P.RESIZE, f"{int(rows)} {int(cols)}".encode())

    async def signal(self, sig: int) -> None:
        if not self._exit.done():
            await self._send(P.SIGNAL, str(int(sig)).encode())

    async def wait(self, timeout: float | None = None) -> int:
        try:
            return await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            raise WaitTimeout(f"the command did not finish within {timeout}s") from None

    async def output(self) -> tuple[bytes, bytes, int]:
        """Convenience: read everything to the end and wait (stdin is closed first)."""
        await self.close_stdin()
        out, err = bytearray(), bytearray()
        while chunk := await self.read():
            out += chunk
        while chunk := await self.read_stderr():
            err += chunk
        code = await self.wait()
        self.close()
        return bytes(out), bytes(err), code

    def close(self) -> None:
        self.writer.close()


if TYPE_CHECKING:  # the microvm driver implements the driver interface

    def _conforms(driver: MicroVMDriver) -> Driver:
        return driver
