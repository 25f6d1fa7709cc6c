"""A microVM's root disk: the image's layers as one ext4 file, cached per image, and a
copy-on-write qcow2 overlay per instance.

``base_disk(layers, cache_dir)`` stacks the unpacked layers (overlayfs, whiteouts honoured),
adds the mount points cove-init needs, and writes ``<cache>/rootfs/<key>/root.ext4`` with
``mkfs.ext4 -d`` (ids kept as the image has them). The file is sparse and has room to grow:
an instance writes into its own overlay, never into the base. The key covers the layer
directories (they are named by digest), so two releases of the same image share one base.
``/etc/passwd`` and ``/etc/group`` are kept beside it: the instance's user is resolved on the
host, as for sandboxes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cove.errors import Permanent, UserError
from cove.runtime import rootfs
from cove.runtime.microvm.initramfs import build_ext4_image

MOUNT_POINTS = ("/dev", "/proc", "/sys", "/tmp", "/run", "/.cove")
MIN_DISK_MB = 256
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class BaseDisk:
    path: Path  # root.ext4
    passwd: str | None
    group: str | None
    size_mb: int


def disk_key(layers: list[Path]) -> str:
    h = hashlib.sha256(f"cove-rootfs-v{FORMAT_VERSION}\0".encode())
    for layer in layers:
        h.update(str(layer.resolve()).encode() + b"\0")
    return h.hexdigest()[:24]


def _tree_bytes(root: Path) -> int:
    """Apparent size of a tree plus one block per entry (what mkfs.ext4 -d will need)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size + 4096
    return total


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def base_disk(layers: list[Path], cache_dir: Path) -> BaseDisk:
    """The cached ext4 root disk of these layers, built once (concurrent callers wait)."""
    if not layers:
        raise UserError("an instance needs at least one image layer")
    key = disk_key(layers)
    d = cache_dir / "rootfs" / key
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = d / "size_mb"
        if not done.is_file():
            _build(layers, d)
        return BaseDisk(
            path=d / "root.ext4",
            passwd=_read(d / "passwd"),
            group=_read(d / "group"),
            size_mb=int(done.read_text()),
        )


def _build(layers: list[Path], d: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="build-", dir=d) as tmp:
        t = Path(tmp)
        upper, work, merged = t / "upper", t / "work", t / "merged"
        for x in (upper, work, merged):
            x.mkdir()
        try:
            rootfs.mount_overlay(layers, upper, work, merged)
        except OSError as exc:
            raise Permanent(f"cannot stack the image layers: {exc}") from exc
        try:
            for mp in MOUNT_POINTS:
                rootfs.ensure_dir_in_root(merged, mp, 0o1777 if mp == "/tmp" else 0o755)
            for name in ("passwd", "group"):
                data = rootfs.read_file_in_root(merged, f"/etc/{name}")
                if data is not None:
                    (d / name).write_bytes(data)
            used_mb = _tree_bytes(merged) // (1 << 20)
            size_mb = max(MIN_DISK_MB, used_mb * 2 + MIN_DISK_MB)
            tmp_image = d / "root.ext4.tmp"
            build_ext4_image(merged, tmp_image, size_mb)
            os.replace(tmp_image, d / "root.ext4")
        finally:
            rootfs.unmount_all(merged)
    (d / "size_mb").write_text(f"{size_mb}\n")


def qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise Permanent("qemu-img is not installed", hint="apt-get install qemu-utils")
    return found


def create_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 file whose reads fall through to ``base`` until written (idempotent)."""
    if overlay.is_file():
        return
    tmp = overlay.with_suffix(".tmp")
    proc = subprocess.run(
        [qemu_img(), "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(tmp)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise Permanent(f"qemu-img create failed: {proc.stderr.strip()}")
    os.replace(tmp, overlay)
