"""The runtime driver interface: what the agent asks of any driver (sandbox, microvm, sim).

A driver owns instances on one node. The agent gives it an :class:`InstanceSpec` (image layers
already unpacked, argv resolved, limits, secrets, volumes, network) and drives the lifecycle
``create -> start -> stop -> destroy``. Each started instance has a supervisor process that
outlives the agent; ``adopt`` finds them again after an agent restart.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

State = Literal["created", "running", "exited", "unknown"]
Reason = Literal["exited", "oom", "killed", "signal", "crashed", "hung"]
Stream = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class VolumeMount:
    """A host directory bind-mounted into the instance."""

    host_path: Path
    container_path: str
    read_only: bool = False


@dataclass(frozen=True)
class NetConfig:
    """The instance's addresses on a bridge.

    ``ipv4``/``ipv6`` carry the prefix length (``"10.213.0.5/24"``, ``"fd00:c0e::5/64"``); the
    bridge gets ``gateway4``/``gateway6`` with the same prefix lengths when the driver creates it.
    ``netns`` names the host-side network namespace holding the bridge (``None``: the current
    one).
    """

    bridge: str
    ipv4: str
    ipv6: str
    gateway4: str
    gateway6: str
    netns: str | None = None


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a driver needs to run one instance."""

    instance_id: str
    hostname: str
    layers: list[Path]  # lowest first, directly stackable as overlayfs lowerdirs
    argv: list[str]  # entrypoint + cmd, already resolved
    env: dict[str, str]
    workdir: str = "/"
    user: str = "0"  # "uid[:gid]" or "name[:group]" from the rootfs /etc/passwd, /etc/group
    memory_mb: int = 256
    cpu_millis: int = 1000
    pids_max: int = 512
    secrets_json: bytes | None = None  # -> /run/cove/secrets.json, mode 0400, the instance user's
    volumes: list[VolumeMount] = field(default_factory=list)
    network: NetConfig | None = None

    def to_json(self, *, with_secrets: bool = False) -> dict[str, Any]:
        """A JSON-able dict; secrets are left out unless asked for (they live in their own
        file)."""
        doc: dict[str, Any] = {
            "instance_id": self.instance_id,
            "hostname": self.hostname,
            "layers": [str(p) for p in self.layers],
            "argv": list(self.argv),
            "env": dict(self.env),
            "workdir": self.workdir,
            "user": self.user,
            "memory_mb": self.memory_mb,
            "cpu_millis": self.cpu_millis,
            "pids_max": self.pids_max,
            "volumes": [
                {
                    "host_path": str(v.host_path),
                    "container_path": v.container_path,
                    "read_only": v.read_only,
                }
                for v in self.volumes
            ],
            "network": None,
        }
        if self.network is not None:
            n = self.network
            doc["network"] = {
                "bridge": n.bridge,
                "ipv4": n.ipv4,
                "ipv6": n.ipv6,
                "gateway4": n.gateway4,
                "gateway6": n.gateway6,
                "netns": n.netns,
            }
        if with_secrets and self.secrets_json is not None:
            doc["secrets_json"] = self.secrets_json.decode("utf-8", "surrogateescape")
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, secrets_json: bytes | None = None) -> InstanceSpec:
        net = doc.get("network")
        return cls(
            instance_id=str(doc["instance_id"]),
            hostname=str(doc["hostname"]),
            layers=[Path(p) for p in doc["layers"]],
            argv=[str(a) for a in doc["argv"]],
            env={str(k): str(v) for k, v in doc["env"].items()},
            workdir=str(doc.get("workdir", "/")),
            user=str(doc.get("user", "0")),
            memory_mb=int(doc.get("memory_mb", 256)),
            cpu_millis=int(doc.get("cpu_millis", 1000)),
            pids_max=int(doc.get("pids_max", 512)),
            secrets_json=secrets_json,
            volumes=[
                VolumeMount(
                    host_path=Path(v["host_path"]),
                    container_path=str(v["container_path"]),
                    read_only=bool(v.get("read_only", False)),
                )
                for v in doc.get("volumes", [])
            ],
            network=None
            if not net
            else NetConfig(
                bridge=str(net["bridge"]),
                ipv4=str(net["ipv4"]),
                ipv6=str(net["ipv6"]),
                gateway4=str(net["gateway4"]),
                gateway6=str(net["gateway6"]),
                netns=None if net.get("netns") is None else str(net["netns"]),
            ),
        )


@dataclass
class InstanceStatus:
    """What a driver knows about an instance.

    ``reason`` says why it ended: ``exited`` (the main process exited by itself), ``oom`` (the
    memory limit was hit and the kernel killed a process), ``killed`` (SIGKILL at the stop
    deadline), ``signal`` (ended by a signal, e.g. the stop signal or a crash), and for a
    microVM ``crashed`` (the VM ended without its guest reporting an exit: kernel panic, QEMU
    killed; ``exit_code`` is None, ``message`` says what is known) or ``hung`` (the guest
    stopped answering and was killed). ``exit_code``
    follows the shell convention: 128 + N when ended by signal N (``signal`` then holds N).
    ``state`` is ``unknown`` when the supervisor disappeared without recording an end.
    """

    state: State
    pid: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: Reason | None = None
    supervisor_pid: int | None = None
    signal: int | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "supervisor_pid": self.supervisor_pid,
            "signal": self.signal,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> InstanceStatus:
        return cls(
            state=doc.get("state", "unknown"),
            pid=doc.get("pid"),
            started_at=doc.get("started_at"),
            finished_at=doc.get("finished_at"),
            exit_code=doc.get("exit_code"),
            reason=doc.get("reason"),
            supervisor_pid=doc.get("supervisor_pid"),
            signal=doc.get("signal"),
            message=doc.get("message"),
        )


@dataclass
class LogLine:
    """One line of the instance's output. ``seq`` increases by one per line, across restarts."""

    ts: str
    stream: Stream
    line: str
    seq: int


class ExecProcess(Protocol):
    """A command running inside an instance (``Driver.exec``).

    With a TTY, ``read`` returns the terminal output and ``read_stderr`` returns ``b""`` at once;
    without, they are the command's stdout and stderr. ``read*`` return ``b""`` at end of file.
    """

    tty: bool

    async def write(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def read(self, n: int = 65536) -> bytes: ...

    async def read_stderr(self, n: int = 65536) -> bytes: ...

    async def resize(self, rows: int, cols: int) -> None: ...

    async def signal(self, sig: int) -> None: ...

    async def wait(self, timeout: float | None = None) -> int: ...


class Driver(Protocol):
    """One runtime driver on one node."""

    name: str

    async def create(self, spec: InstanceSpec) -> None:
        """Prepare the instance (rootfs, cgroups, files). Idempotent."""
        ...

    async def start(self, instance_id: str) -> None:
        """Launch it under a supervisor that survives the caller restarting."""
        ...

    async def stop(
        self, instance_id: str, sig: int = signal.SIGTERM, timeout: float = 10.0
    ) -> InstanceStatus:
        """Send *sig*, wait up to *timeout* seconds, then SIGKILL; return the final status."""
        ...

    async def destroy(self, instance_id: str) -> None:
        """Stop if needed and remove everything the instance had. Idempotent."""
        ...

    async def status(self, instance_id: str) -> InstanceStatus: ...

    def logs(
        self, instance_id: str, *, after_seq: int = 0, follow: bool = False
    ) -> AsyncIterator[LogLine]: ...

    async def exec(
        self,
        instance_id: str,
        argv: list[str],
        *,
        tty: bool,
        env: dict[str, str] | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> ExecProcess: ...

    async def adopt(self) -> list[str]:
        """Instance ids whose supervisors are alive, re-attached without restarting them."""
        ...
