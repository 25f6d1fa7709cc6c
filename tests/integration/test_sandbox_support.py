"""Fixtures and helpers for the sandbox driver tests (no tests in here).

Everything is real: bubblewrap, cgroup v1, namespaces, overlayfs, veth. The image is built
here: a busybox-static rootfs split into two layer directories (the shape cove.image hands
to the driver: unpacked, lowest first).

Network rule for these tests: traffic only to loopback or to addresses inside network
namespaces the tests create themselves (``cove-t-<random>``), deleted at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from cove.runtime import InstanceSpec, InstanceStatus, LogLine, SandboxDriver
from cove.runtime.cgroups import CONTROLLERS, v1_mounts
from cove.runtime.microvm.driver import MicroVMDriver
from cove.runtime.rootfs import mounts_under

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
P = ParamSpec("P")
AnyDriver = SandboxDriver | MicroVMDriver  # the helpers below serve both drivers' tests


def sandbox_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the sandbox driver needs root (cgroups, overlayfs, veth)"
    if not shutil.which("bwrap"):
        return "bubblewrap is not installed (bash scripts/setup.sh)"
    if not Path(BUSYBOX).exists():
        return "busybox-static is not installed (bash scripts/setup.sh)"
    missing = [c for c in CONTROLLERS if c not in v1_mounts()]
    if missing:
        return f"cgroup v1 controllers not mounted here: {', '.join(missing)}"
    return None


requires_sandbox = pytest.mark.skipif(
    sandbox_skip_reason() is not None, reason=sandbox_skip_reason() or ""
)


def arun(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    """Run an async test function in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        async def main() -> None:
            await fn(*args, **kwargs)

        asyncio.run(main())

    return wrapper


# -- the image -------------------------------------------------------------------------


def build_layers(base: Path) -> list[Path]:
    """Two layer dirs: busybox + applets; then /etc, a user `app` (1000), a web root."""
    low, high = base / "layer0", base / "layer1"
    (low / "bin").mkdir(parents=True)
    (low / "tmp").mkdir()
    (low / "tmp").chmod(0o1777)
    (low / "etc").mkdir()
    shutil.copy2(BUSYBOX, low / "bin" / "busybox")
    applets = subprocess.run(
        [BUSYBOX, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for name in applets:
        if name != "busybox":
            os.symlink("busybox", low / "bin" / name)
    (low / "etc" / "hostname").write_text("image-hostname\n")
    (high / "etc").mkdir(parents=True)
    (high / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
    )
    (high / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
    (high / "home" / "app").mkdir(parents=True)
    os.chown(high / "home" / "app", 1000, 1000)
    (high / "www").mkdir()
    (high / "www" / "index.html").write_text("hello from the sandbox\n")
    return [low, high]


def tree_digest(root: Path) -> str:
    """Digest of a directory tree: names, types, modes, owners, sizes, contents, links."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            h.update(f"{path.relative_to(root)} {st.st_mode} {st.st_uid} {st.st_gid}".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_layers(tmp_path_factory.mktemp("image"))


def state_dir() -> Path:
    """A state dir the sandbox users can traverse (pytest's tmp_path is under a 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="cove-sbx-", dir="/var/tmp"))
    d.chmod(0o711)
    return d


@pytest.fixture
def driver() -> Iterator[SandboxDriver]:
    reason = sandbox_skip_reason()
    if reason:
        pytest.skip(reason)
    root = f"cove-test-{uuid.uuid4().hex[:8]}"
    state = state_dir()
    drv = SandboxDriver(state, cgroup_root=root)
    yield drv
    cleanup_driver(drv)
    if not mounts_under(state):  # never delete through a mount
        shutil.rmtree(state)


def cleanup_driver(drv: SandboxDriver) -> None:
    """Destroy every instance the test left; fail loudly if anything stays behind."""
    errors: list[str] = []

    async def destroy_all() -> None:
        if drv.instances_dir.is_dir():
            for d in drv.instances_dir.iterdir():
                try:
                    await drv.destroy(d.name)
                except Exception as exc:
                    errors.append(f"{d.name}: {exc}")

    asyncio.run(destroy_all())
    for mount in v1_mounts().values():
        with contextlib.suppress(FileNotFoundError):
            (mount / drv.cgroup_root).rmdir()
    if mounts_under(drv.state_dir):
        errors.append(f"mounts left: {mounts_under(drv.state_dir)}")
    assert not errors, errors


def make_spec(layers: list[Path], instance_id: str | None = None, **kw: Any) -> InstanceSpec:
    iid = instance_id or f"ins_{uuid.uuid4().hex[:10]}"
    kw.setdefault("hostname", "web-1")
    kw.setdefault("env", {})
    return InstanceSpec(instance_id=iid, layers=layers, **kw)


async def collect(
    drv: AnyDriver, iid: str, *, after_seq: int = 0, timeout: float = 20.0
) -> list[LogLine]:
    """Follow the logs until the instance's supervisor is gone."""

    async def run() -> list[LogLine]:
        return [line async for line in drv.logs(iid, after_seq=after_seq, follow=True)]

    return await asyncio.wait_for(run(), timeout)


async def run_to_end(
    drv: AnyDriver, spec: InstanceSpec, timeout: float = 20.0
) -> tuple[InstanceStatus, list[LogLine]]:
    await drv.create(spec)
    await drv.start(spec.instance_id)
    lines = await collect(drv, spec.instance_id, timeout=timeout)
    return await drv.status(spec.instance_id), lines


def stdout_of(lines: list[LogLine]) -> list[str]:
    return [x.line for x in lines if x.stream == "stdout"]


async def wait_for_line(drv: AnyDriver, iid: str, text: str, timeout: float = 10.0) -> LogLine:
    async def find() -> LogLine:
        async for line in drv.logs(iid, follow=True):
            if text in line.line:
                return line
        raise AssertionError(f"instance ended without printing {text!r}")

    return await asyncio.wait_for(find(), timeout)


async def exec_output(drv: AnyDriver, iid: str, argv: list[str], **kw: Any) -> tuple[str, str, int]:
    proc = await drv.exec(iid, argv, tty=False, **kw)
    out, err, code = await asyncio.wait_for(proc.output(), 15.0)
    return out.decode(), err.decode(), code


# -- network namespaces the tests own ---------------------------------------------------


@contextlib.contextmanager
def own_netns() -> Iterator[str]:
    name = f"cove-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(netns: str, code: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet inside *netns* (all client traffic of the tests goes this way)."""
    import sys

    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def netns_links(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


async def poll_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def aiter_list(it: AsyncIterator[LogLine]) -> list[LogLine]:
    return [x async for x in it]
