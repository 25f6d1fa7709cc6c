"""Per-instance id shifting: image ids 0-65535 run as host ids ``base .. base+65535``.

Why: with ids mapped 1:1, the image's root would be host uid 0 - no capabilities, but the
kernel still trusts uid 0 in places that check the id rather than a capability (sysctl files
under /proc/sys, for one: a capability-less uid 0 can rewrite ``kernel.core_pattern``). So
every instance gets its own block of 65536 unprivileged host ids (``base`` >= 2^30):

- the sandbox's user namespace maps ``0 base 65536``;
- the image layers, the instance's writable layer and its volumes are *idmapped mounts*
  (``mount_setattr(MOUNT_ATTR_IDMAP)``) with the same mapping, so on disk everything keeps
  the image's own ids (root's files are uid 0 on disk, and the upper layer stays portable),
  while the instance sees them with the right owners;
- the overlay is mounted with the instance's root (``base``) as mounter credentials, which
  is what overlayfs needs on idmapped layers.

Instances no longer share host uids with each other nor with host accounts.

Blocks are claimed host-wide in ``/run/cove/idmap/<slot>`` (tmpfs: rebuilt after a reboot by
re-preparing the instances; a block may change between runs, nothing on disk depends on it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cove.errors import Permanent, Transient

T = TypeVar("T")

RANGE = 65536
BASE = 1 << 30
SLOTS = 16384  # BASE + SLOTS * RANGE = 2^31
DEFAULT_REGISTRY = Path("/run/cove/idmap")

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _err(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


# -- host id blocks ----------------------------------------------------------------------


def claim(owner: Path, registry: Path = DEFAULT_REGISTRY, prefer: int | None = None) -> int:
    """Claim a block for *owner* (an instance directory); return its base host id.

    Keeps *prefer* (a base this owner held before) when it is still free or already ours.
    A block whose owner directory no longer exists is taken over.
    """
    registry.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = os.open(registry / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        me = str(owner)
        order = list(range(SLOTS))
        if prefer is not None and BASE <= prefer < BASE + SLOTS * RANGE:
            first = (prefer - BASE) // RANGE
            order.remove(first)
            order.insert(0, first)
        for slot in order:
            path = registry / str(slot)
            try:
                holder = path.read_text()
            except FileNotFoundError:
                holder = None
            if holder is None or holder == me or not Path(holder).exists():
                path.write_text(me)
                return BASE + slot * RANGE
        raise Transient("no free host id block for another sandbox instance")
    finally:
        os.close(lock)


def release(owner: Path, base: int, registry: Path = DEFAULT_REGISTRY) -> None:
    path = registry / str((base - BASE) // RANGE)
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == str(owner):
            path.unlink()


# -- user namespace + idmapped mounts ---------------------------------------------------


def userns_fd(base: int, timeout: float = 5.0) -> int:
    """An fd for a fresh user namespace mapping ``0..65535 -> base..`` (uids and gids)."""
    own = os.stat("/proc/self/ns/user").st_ino
    proc = subprocess.Popen(
        ["unshare", "--user", "--", "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.stat(f"/proc/{proc.pid}/ns/user").st_ino != own:
                    break
            except FileNotFoundError:
                pass
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise Permanent(f"cannot create a user namespace: {err.strip()}")
            if time.monotonic() > deadline:
                raise Transient("timed out creating a user namespace")
            time.sleep(0.001)
        mapping = f"0 {base} {RANGE}\n"
        with open(f"/proc/{proc.pid}/uid_map", "w") as f:
            f.write(mapping)
        with open(f"/proc/{proc.pid}/gid_map", "w") as f:
            f.write(mapping)
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def idmapped_bind(src: Path, dst: Path, ns_fd: int, *, read_only: bool = False) -> None:
    """Bind *src* on *dst* (an existing directory) with the id mapping of *ns_fd*."""
    fd = _libc.syscall(
        _SYS_OPEN_TREE, AT_FDCWD, os.fsencode(src), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
    )
    if fd < 0:
        raise _err(f"open_tree {src}")
    try:
        attr = _MountAttr(
            MOUNT_ATTR_IDMAP
            | MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | (MOUNT_ATTR_RDONLY if read_only else 0),
            0,
            0,
            ns_fd,
        )
        if (
            _libc.syscall(
                _SYS_MOUNT_SETATTR,
                fd,
                b"",
                AT_EMPTY_PATH,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            )
            != 0
        ):
            raise _err(f"idmap {src} (does its filesystem support idmapped mounts?)")
        if (
            _libc.syscall(
                _SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(dst), MOVE_MOUNT_F_EMPTY_PATH
            )
            != 0
        ):
            raise _err(f"move_mount to {dst}")
    finally:
        os.close(fd)


def as_instance_root(base: int, fn: Callable[[], T]) -> T:
    """Run *fn* on a fresh thread whose filesystem ids are the instance's root (``base``),
    keeping the thread's capabilities. Files it creates through the idmapped mounts are
    owned by the image's root (0) on disk; the overlay mounted there records these
    credentials for its own writes."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            # thread-local: the raw syscalls change only this thread's credentials
            # (glibc's setfsuid/setfsgid are plain syscalls, not broadcast to other threads)
            _libc.setfsgid(base)
            _libc.setfsuid(base)
            if _fsuid() != base:
                raise OSError("setfsuid failed")
            hdr = _CapHeader(0x20080522, 0)
            data = (_CapData * 2)()
            if _libc.capget(ctypes.byref(hdr), data) != 0:
                raise _err("capget")
            for d in data:
                d.effective = d.permitted  # setfsuid dropped the file capabilities
            if _libc.capset(ctypes.byref(hdr), data) != 0:
                raise _err("capset")
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=run, name="cove-idmap")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _fsuid() -> int:
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[4])
    return -1
