"""Volumes on this node: an ext4 filesystem in a file of the volume's size, loop-mounted
under the agent's state dir and bind-mounted into the instance. The filesystem's size is
the volume's size, so the size is enforced by the kernel, and the data outlives
instances, deploys, rollbacks and agent restarts until the volume is destroyed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

from cove import errors


def _mounted(target: Path) -> bool:
    want = str(target)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == want for line in f)
    except OSError:
        return False


async def _run(*argv: str, timeout: float = 120.0) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise errors.Transient(f"{argv[0]} timed out") from None
    if proc.returncode != 0:
        raise errors.Permanent(
            f"{' '.join(argv[:2])} failed: {err.decode(errors='replace')[-300:]}"
        )


class Volumes:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, asyncio.Lock] = {}

    def paths(self, vol_id: str) -> tuple[Path, Path]:
        return self.root / f"{vol_id}.img", self.root / vol_id

    async def _image(self, vol_id: str, size_gb: int) -> tuple[Path, Path]:
        image, mnt = self.paths(vol_id)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        if not image.exists():
            if shutil.which("mkfs.ext4") is None:
                raise errors.Permanent("mkfs.ext4 is missing (install e2fsprogs)")
            tmp = image.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.truncate(size_gb * 1024**3)  # sparse: takes no space until written
            await _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", str(tmp))
            tmp.rename(image)
        return image, mnt

    async def ensure(self, vol_id: str, size_gb: int) -> Path:
        """Create (once) and mount the volume; return the directory to bind into instances."""
        async with self._locks.setdefault(vol_id, asyncio.Lock()):
            image, mnt = await self._image(vol_id, size_gb)
            mnt.mkdir(exist_ok=True)
            if not _mounted(mnt):
                await _run("mount", "-o", "loop,nosuid,nodev", str(image), str(mnt))
            data = mnt / "data"
            data.mkdir(exist_ok=True)
            return data

    async def block(self, vol_id: str, size_gb: int) -> Path:
        """Create (once) the volume and return its image file, for a microVM to attach as a
        disk; never mounted on the host meanwhile (one writer per filesystem). The guest
        mounts it and uses its ``data`` directory, as the host mount does."""
        async with self._locks.setdefault(vol_id, asyncio.Lock()):
            image, mnt = await self._image(vol_id, size_gb)
            if _mounted(mnt):
                await _run("umount", str(mnt))
            return image

    async def delete(self, vol_id: str) -> None:
        image, mnt = self.paths(vol_id)
        if _mounted(mnt):
            await _run("umount", str(mnt))
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        with contextlib.suppress(OSError):
            mnt.rmdir()
