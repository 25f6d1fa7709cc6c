"""cgroup v1 limits for one instance: memory, cpu (CFS quota) and pids.

Layout: ``<mount of controller>/<cgroup_root>/<instance_id>``, e.g.
``/sys/fs/cgroup/memory/cove/ins_1``. Mount points are read from /proc/self/mountinfo, so
``cpu,cpuacct`` co-mounts work too. In cgroup v1 writing a pid to ``cgroup.procs`` moves only
that process, so a process is placed *before* it execs (its children inherit the cgroup).

Everything here is synchronous and cheap (a few small file writes); ``join`` is called from a
``preexec_fn`` and from the exec helper, where nothing else may run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from cove.errors import Permanent, Transient

CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000
MiB = 1024 * 1024


def v1_mounts() -> dict[str, Path]:
    """Controller name -> mount point of its cgroup v1 hierarchy."""
    found: dict[str, Path] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] != "cgroup":
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        for opt in rfields[2].split(","):
            if opt in CONTROLLERS and opt not in found:
                found[opt] = mount_point
    return found


class Cgroups:
    """The cgroups of one instance (one directory per controller)."""

    def __init__(
        self, cgroup_root: str, instance_id: str, mounts: dict[str, Path] | None = None
    ) -> None:
        mounts = v1_mounts() if mounts is None else mounts
        missing = [c for c in CONTROLLERS if c not in mounts]
        if missing:
            raise Permanent(
                f"cgroup v1 controller(s) not mounted: {', '.join(missing)}",
                hint="the sandbox driver needs cgroup v1 memory, cpu and pids hierarchies "
                "(hybrid layout); cgroup v2-only hosts are not supported yet",
                code="cgroups_unavailable",
            )
        self.paths: dict[str, Path] = {
            c: mounts[c] / cgroup_root / instance_id for c in CONTROLLERS
        }

    # -- setup -----------------------------------------------------------------------
    def create(self, *, memory_mb: int, cpu_millis: int, pids_max: int) -> None:
        """Create the directories and set the limits. Idempotent."""
        try:
            for path in self.paths.values():
                path.mkdir(parents=True, exist_ok=True)
            self._set_memory(memory_mb * MiB)
            cpu = self.paths["cpu"]
            _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(max(1000, cpu_millis * CFS_PERIOD_US // 1000)))
            with contextlib.suppress(FileNotFoundError):
                _write(cpu / "cpu.shares", str(max(2, cpu_millis * 1024 // 1000)))
            _write(self.paths["pids"] / "pids.max", str(pids_max))
        except OSError as exc:
            raise Transient(f"cannot set up cgroups for the instance: {exc}") from exc

    def _set_memory(self, limit: int) -> None:
        mem = self.paths["memory"]
        memsw = mem / "memory.memsw.limit_in_bytes"
        has_memsw = memsw.exists()
        try:
            _write(mem / "memory.limit_in_bytes", str(limit))
            if has_memsw:
                _write(memsw, str(limit))
        except OSError as exc:
            # raising the limit: memsw must grow first (memory <= memsw at all times)
            if exc.errno != errno.EINVAL or not has_memsw:
                raise
            _write(memsw, str(limit))
            _write(mem / "memory.limit_in_bytes", str(limit))

    def join(self, pid: int = 0) -> None:
        """Move *pid* (0: the calling process) into every controller's cgroup."""
        data = str(pid or os.getpid())
        for path in self.paths.values():
            _write(path / "cgroup.procs", data)

    # -- observation -----------------------------------------------------------------
    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup so far."""
        try:
            text = (self.paths["memory"] / "memory.oom_control").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def limits(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ctrl, name in (
            ("memory", "memory.limit_in_bytes"),
            ("memory", "memory.memsw.limit_in_bytes"),
            ("cpu", "cpu.cfs_quota_us"),
            ("cpu", "cpu.cfs_period_us"),
            ("pids", "pids.max"),
        ):
            with contextlib.suppress(OSError):
                out[name] = (self.paths[ctrl] / name).read_text().strip()
        return out

    def procs(self) -> set[int]:
        pids: set[int] = set()
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in (path / "cgroup.procs").read_text().split())
        return pids

    def exists(self) -> bool:
        return any(p.exists() for p in self.paths.values())

    # -- teardown --------------------------------------------------------------------
    def remove(self, timeout: float = 5.0) -> None:
        """SIGKILL whatever is left inside, then remove the directories. Idempotent."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.procs()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            left = []
            for path in self.paths.values():
                try:
                    path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise Transient(f"cannot remove cgroup {path}: {exc}") from exc
                    left.append(path)
            if not left:
                return
            if time.monotonic() > deadline:
                raise Transient(
                    f"cgroups still busy after {timeout:.0f}s: {', '.join(map(str, left))}"
                )
            time.sleep(0.02)


def _write(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
