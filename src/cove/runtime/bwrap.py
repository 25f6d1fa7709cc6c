"""The bubblewrap command line for an instance.

bwrap is run *as the instance user* - its host id, ``base + uid`` (see cove.runtime.idmap) -
with a new user namespace whose id map the supervisor writes itself (``--userns-block-fd``):
``0 base 65536``. Inside, the program is the image user; files (idmapped mounts) keep their
image owners. bwrap holds capabilities only inside that new user namespace, uses them to set
up the mounts, and drops them all before the program runs; it also sets no_new_privs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cove.runtime.base import InstanceSpec

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SECRETS_PATH = "/run/cove/secrets.json"


def id_map(base: int) -> str:
    """The sandbox's uid_map/gid_map: image ids 0-65535 -> host ids base..base+65535."""
    return f"0 {base} 65536\n"


@dataclass(frozen=True)
class BwrapFds:
    info: int
    userns_block: int
    seccomp: int | None = None
    secrets: int | None = None


def sandbox_env(spec_env: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(spec_env)
    if extra:
        env.update(extra)
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def build_argv(
    spec: InstanceSpec,
    rootfs: Path,
    fds: BwrapFds,
    *,
    volume_sources: list[Path] | None = None,
    bwrap: str = "bwrap",
) -> list[str]:
    """bwrap's arguments; *volume_sources* are the (idmapped) mounts to bind for
    ``spec.volumes``, in order (default: the volumes' host paths)."""
    argv = [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--userns-block-fd",
        str(fds.userns_block),
        "--info-fd",
        str(fds.info),
        "--die-with-parent",
        "--new-session",
        "--hostname",
        spec.hostname,
        "--bind",
        str(rootfs),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(spec.memory_mb * 1024 * 1024),
        "--tmpfs",
        "/tmp",
    ]
    if fds.secrets is not None:
        argv += ["--perms", "0400", "--ro-bind-data", str(fds.secrets), SECRETS_PATH]
    sources = volume_sources or [v.host_path for v in spec.volumes]
    for vol, src in zip(spec.volumes, sources, strict=True):
        argv += ["--ro-bind" if vol.read_only else "--bind", str(src), vol.container_path]
    argv += ["--cap-drop", "ALL"]
    if fds.seccomp is not None:
        argv += ["--seccomp", str(fds.seccomp)]
    argv.append("--clearenv")
    for key, value in sandbox_env(spec.env).items():
        argv += ["--setenv", key, value]
    argv += ["--chdir", spec.workdir or "/", "--", *spec.argv]
    return argv
