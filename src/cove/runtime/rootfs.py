"""The instance root filesystem: an overlay of the cached image layers plus a private upper.

``lowerdir`` = the image layers (never written: overlayfs only writes to ``upperdir``), so
instances share the layer cache and cannot change it. The mount is ``nosuid,nodev``.

Paths *inside* an image are resolved with ``openat2(RESOLVE_IN_ROOT)`` so a hostile image
(``/etc/passwd -> /root/.ssh/id_ed25519``, ``/run -> /etc``) cannot make the host read or
create files outside the rootfs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from cove.errors import Permanent

_libc = ctypes.CDLL(None, use_errno=True)

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2

_SYS_OPENAT2 = 437  # same number on x86_64 and aarch64 (new-style syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

# new mount API (for layer lists too long for one mount(2) option page)
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_MOVE_MOUNT = 429
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
_OPTION_PAGE = 4000  # mount(2) copies at most one page of options


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _oserror(what: str, path: object = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", None if path is None else str(path))


# -- overlay -------------------------------------------------------------------------


def _escape(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(layers: Sequence[Path], upper: Path, work: Path) -> str:
    lower = ":".join(_escape(p) for p in reversed(layers))  # overlay wants topmost first
    return f"lowerdir={lower},upperdir={_escape(upper)},workdir={_escape(work)}"


def mount_overlay(layers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount the overlay of *layers* (lowest first) with *upper*/*work* on *target*."""
    if not layers:
        raise Permanent("an instance needs at least one image layer")
    opts = overlay_options(layers, upper, work)
    if len(opts) < _OPTION_PAGE:
        rc = _libc.mount(
            b"overlay",
            os.fsencode(target),
            b"overlay",
            ctypes.c_ulong(MS_NOSUID | MS_NODEV),
            opts.encode(),
        )
        if rc != 0:
            raise _oserror("mount overlay", target)
        return
    _mount_overlay_fsconfig(layers, upper, work, target)


def _mount_overlay_fsconfig(layers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount with fsopen/fsconfig, one ``lowerdir+`` per layer (Linux >= 6.8)."""
    fs_fd = _libc.syscall(_SYS_FSOPEN, b"overlay", 1)  # FSOPEN_CLOEXEC
    if fs_fd < 0:
        raise _oserror("fsopen overlay")
    try:

        def setstr(key: str, value: str) -> None:
            rc = _libc.syscall(
                _SYS_FSCONFIG, fs_fd, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0
            )
            if rc != 0:
                raise _oserror(f"fsconfig {key}")

        for layer in reversed(layers):
            setstr("lowerdir+", str(layer))
        setstr("upperdir", str(upper))
        setstr("workdir", str(work))
        if _libc.syscall(_SYS_FSCONFIG, fs_fd, FSCONFIG_CMD_CREATE, None, None, 0) != 0:
            raise _oserror("fsconfig create overlay")
        mnt_fd = _libc.syscall(
            _SYS_FSMOUNT, fs_fd, 1, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        )  # FSMOUNT_CLOEXEC
        if mnt_fd < 0:
            raise _oserror("fsmount overlay")
        try:
            rc = _libc.syscall(
                _SYS_MOVE_MOUNT, mnt_fd, b"", -100, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
            )
            if rc != 0:
                raise _oserror("move_mount overlay", target)
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


def _unescape_mountinfo(field: str) -> str:
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Mount points of the current mount namespace, in mount order."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f if line.strip()]


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below *path*."""
    prefix = str(path).rstrip("/")
    return [m for m in mount_points() if m == prefix or m.startswith(prefix + "/")]


def is_mountpoint(path: Path) -> bool:
    return str(path).rstrip("/") in mount_points()


def unmount_all(path: Path) -> None:
    """Unmount everything at or below *path*, deepest first (lazily if busy)."""
    for mp in reversed(mounts_under(path)):
        if _libc.umount2(os.fsencode(mp), 0) == 0:
            continue
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # not a mount point any more
            continue
        if err == errno.EBUSY and _libc.umount2(os.fsencode(mp), MNT_DETACH) == 0:
            continue
        raise _oserror("umount", mp)


# -- paths inside the rootfs -----------------------------------------------------------


def openat_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """``openat2(root_fd, path, RESOLVE_IN_ROOT)``: symlinks and ``..`` stay inside the root."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    rel = path.lstrip("/") or "."
    fd = int(
        _libc.syscall(
            _SYS_OPENAT2, root_fd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how)
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def read_file_in_root(root: Path, path: str, limit: int = 4 * 1024 * 1024) -> bytes | None:
    """Content of the regular file *path* inside *root*, or None when there is none."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = openat_in_root(root_fd, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        try:
            import stat

            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return os.read(fd, limit)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)


def ensure_dir_in_root(root: Path, path: str, mode: int = 0o755, _depth: int = 0) -> None:
    """Create directory *path* (and parents) inside *root* without leaving it.

    A symlink on the way is followed as the image would see it, and a missing target is
    created, inside the root too (like ``mkdir -p`` run in the instance)."""
    if _depth > 40:
        raise OSError(errno.ELOOP, "too many symlinks", path)
    parts = [p for p in path.split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise ValueError(f"'..' in {path!r}")
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        cur = "/"
        for part in parts:
            parent_fd = openat_in_root(root_fd, cur, os.O_PATH | os.O_DIRECTORY)
            try:
                try:
                    os.mkdir(part, mode, dir_fd=parent_fd)
                except FileExistsError:
                    pass
                nxt = cur.rstrip("/") + "/" + part
                try:
                    os.close(openat_in_root(root_fd, nxt, os.O_PATH | os.O_DIRECTORY))
                except FileNotFoundError:
                    # a dangling symlink: create its target, seen from inside the root
                    target = os.readlink(part, dir_fd=parent_fd)
                    base = "/" if target.startswith("/") else cur
                    joined = os.path.normpath(os.path.join(base, target))
                    ensure_dir_in_root(root, _clamp(joined), mode, _depth + 1)
            finally:
                os.close(parent_fd)
            cur = cur.rstrip("/") + "/" + part
        # the last component must resolve to a directory (not e.g. a file)
        os.close(openat_in_root(root_fd, cur, os.O_PATH | os.O_DIRECTORY))
    finally:
        os.close(root_fd)


def _clamp(path: str) -> str:
    """Drop leading '..' of a normalised absolute path (the root's parent is the root)."""
    parts = [p for p in path.split("/") if p and p != "."]
    while parts and parts[0] == "..":
        parts.pop(0)
    return "/" + "/".join(parts)


def ensure_file_in_root(root: Path, path: str, mode: int = 0o644) -> None:
    """Create an empty regular file *path* inside *root* (a bind-mount target)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    ensure_dir_in_root(root, parent or "/")
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent_fd = openat_in_root(root_fd, parent or "/", os.O_PATH | os.O_DIRECTORY)
        try:
            with contextlib.suppress(FileExistsError):
                os.close(
                    os.open(
                        name,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        mode,
                        dir_fd=parent_fd,
                    )
                )
        finally:
            os.close(parent_fd)
    finally:
        os.close(root_fd)
