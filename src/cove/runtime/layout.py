"""Where an instance's state lives: ``<state_dir>/instances/<id>/``.

::

    spec.json        the InstanceSpec (without secrets)
    secrets.json     the secrets payload, mode 0400 root (only when the spec has secrets)
    ident.json       resolved user: uid, gid, groups
    driver.json      driver settings the supervisor needs (cgroup root)
    status.json      InstanceStatus, replaced atomically on every transition
    sandbox.json     while running: sandbox init pid + start time (for exec)
    supervisor.json  supervisor pid + start time (liveness: pid alive and same start time)
    stop.json        a pending stop request (signal, timeout) for the supervisor
    supervisor.log   the supervisor's own diagnostics
    logs/            instance output (see cove.runtime.logs)
    rootfs/rw/{upper,work}   the instance's writable layer (image ids on disk)
    rootfs/rw.idmap          idmapped mount of rootfs/rw
    rootfs/lower/<n>         idmapped, read-only mounts of the image layers
    rootfs/vol/<n>           idmapped mounts of the volumes
    rootfs/merged            the overlay: what the sandbox sees as /
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InstancePaths:
    dir: Path

    @property
    def spec(self) -> Path:
        return self.dir / "spec.json"

    @property
    def secrets(self) -> Path:
        return self.dir / "secrets.json"

    @property
    def ident(self) -> Path:
        return self.dir / "ident.json"

    @property
    def driver(self) -> Path:
        return self.dir / "driver.json"

    @property
    def status(self) -> Path:
        return self.dir / "status.json"

    @property
    def sandbox(self) -> Path:
        return self.dir / "sandbox.json"

    @property
    def supervisor(self) -> Path:
        return self.dir / "supervisor.json"

    @property
    def stop_request(self) -> Path:
        return self.dir / "stop.json"

    @property
    def supervisor_log(self) -> Path:
        return self.dir / "supervisor.log"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def rw(self) -> Path:
        return self.rootfs / "rw"

    @property
    def rw_idmap(self) -> Path:
        return self.rootfs / "rw.idmap"

    @property
    def upper(self) -> Path:
        return self.rw_idmap / "upper"

    @property
    def work(self) -> Path:
        return self.rw_idmap / "work"

    def lower(self, n: int) -> Path:
        return self.rootfs / "lower" / str(n)

    def volume(self, n: int) -> Path:
        return self.rootfs / "vol" / str(n)

    @property
    def merged(self) -> Path:
        return self.rootfs / "merged"
