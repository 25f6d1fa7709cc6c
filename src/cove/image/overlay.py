"""Stack an image's layers as an overlayfs root for the sandbox runtime.

``assemble_overlay`` mounts ``lowerdir`` = the image's layer directories (uppermost first),
``upperdir``/``workdir`` = per-instance writable directories (same filesystem, both empty
at first use), on ``target``. It runs ``mount(8)`` as a subprocess (needs root, or
CAP_SYS_ADMIN in the mount namespace); ``unmount`` undoes it. The layer directories are
shared by every instance of every image using them and must never be written to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cove.errors import Conflict, Permanent, Transient, UserError
from cove.image.model import Image

MOUNT_TIMEOUT = 30.0
MOUNT_FLAGS = frozenset({"nodev", "nosuid", "noexec", "noatime", "relatime", "ro"})
# the mount(2) data page is 4096 bytes; leave room for upper/work and the NUL
_MAX_OPTIONS = 3900  # room for the generic flags too
_UNSAFE = (",", ":", "\\", "\n", "\t", " ", "=")


def _check_path(path: Path, what: str) -> str:
    text = str(path)
    if any(c in text for c in _UNSAFE):
        raise UserError(
            f"{what} {text!r} contains a character overlayfs options cannot carry "
            "(',', ':', '=', '\\' or whitespace)",
            code="invalid_path",
            hint="put the image cache and instance directories on plain paths",
        )
    return text


def overlay_lowerdir(image: Image) -> str:
    """The overlayfs ``lowerdir`` value for *image*: its layer dirs, uppermost first."""
    if not image.layer_dirs:
        raise UserError(f"image {image.digest} has no layers to mount", code="image_empty")
    return ":".join(_check_path(d, "layer directory") for d in reversed(image.layer_dirs))


@dataclass(frozen=True)
class _Plan:
    options: str
    cwd: Path | None = None  # run mount(8) here (lowerdirs relative to it)
    aliases: tuple[tuple[str, Path], ...] = ()  # short symlinks to create in cwd first


def _plan(image: Image, upper: Path, work: Path) -> _Plan:
    """Mount options that fit in one page: absolute lowerdirs, else names relative to the
    layers directory, else short symlink aliases (overlayfs resolves them at mount time)."""
    tail = f",upperdir={_check_path(upper, 'upperdir')},workdir={_check_path(work, 'workdir')}"
    opts = f"lowerdir={overlay_lowerdir(image)}{tail}"
    if len(opts) <= _MAX_OPTIONS:
        return _Plan(opts)
    top_first = list(reversed(image.layer_dirs))
    parents = {d.parent for d in top_first}
    if len(parents) == 1:
        opts = f"lowerdir={':'.join(d.name for d in top_first)}{tail}"
        if len(opts) <= _MAX_OPTIONS:
            return _Plan(opts, cwd=parents.pop())
    aliases = tuple((f"{i:x}", d) for i, d in enumerate(top_first))
    opts = f"lowerdir={':'.join(name for name, _ in aliases)}{tail}"
    if len(opts) <= _MAX_OPTIONS:
        return _Plan(opts, aliases=aliases)
    raise Permanent(
        f"image {image.digest} has too many layers ({len(image.layer_dirs)}) for one overlay mount",
        hint="flatten the image (fewer layers) and deploy it again",
    )


async def assemble_overlay(
    image: Image,
    upper: Path | str,
    work: Path | str,
    target: Path | str,
    *,
    flags: Sequence[str] = (),
    timeout: float = MOUNT_TIMEOUT,
) -> None:
    """Mount *image*'s layers with a writable *upper* (and its *work* dir) on *target*.

    The three directories are created if absent; *upper* and *work* must be on the same
    filesystem and *work* must be empty and not shared with another mount. *flags* are
    generic mount flags for the runtime to choose, from ``MOUNT_FLAGS`` (e.g. ``nodev``;
    ``nosuid`` also disables the image's setuid binaries).
    """
    bad = [f for f in flags if f not in MOUNT_FLAGS]
    if bad:
        raise UserError(
            f"unsupported overlay mount flags {bad}",
            code="invalid_mount_flags",
            hint=f"use any of {', '.join(sorted(MOUNT_FLAGS))}",
        )
    upper, work, target = Path(upper), Path(work), Path(target)
    if is_mounted(target):
        raise Conflict(
            f"something is already mounted on {target}",
            code="already_mounted",
            hint="unmount it first (cove.image.unmount), or use it as it is",
        )
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    for d in image.layer_dirs:
        if not d.is_dir():
            raise Permanent(
                f"layer directory {d} of image {image.digest} is missing",
                hint="pull the image again (was the cache garbage-collected under it?)",
            )
    plan = _plan(image, upper, work)
    options = ",".join([*flags, plan.options])
    argv = [_mount_binary("mount"), "-t", "overlay", "overlay", "-o", options, str(target)]
    what = f"mounting the overlay root on {target}"
    if not plan.aliases:
        await _run(argv, cwd=plan.cwd, timeout=timeout, what=what)
        return
    alias_dir = Path(tempfile.mkdtemp(prefix="cove-lower-"))
    try:
        for name, layer in plan.aliases:
            (alias_dir / name).symlink_to(layer)
        await _run(argv, cwd=alias_dir, timeout=timeout, what=what)
    finally:  # the mount holds the resolved directories; the aliases can go
        shutil.rmtree(alias_dir, ignore_errors=True)


async def unmount(
    target: Path | str, *, lazy: bool = False, timeout: float = MOUNT_TIMEOUT
) -> None:
    """Unmount *target* if something is mounted there (``lazy``: ``umount -l``)."""
    target = Path(target)
    if not is_mounted(target):
        return
    argv = [_mount_binary("umount"), *(["-l"] if lazy else []), str(target)]
    await _run(argv, cwd=None, timeout=timeout, what=f"unmounting {target}")


def is_mounted(target: Path | str) -> bool:
    """True if *target* is a mount point (per /proc/self/mountinfo)."""
    try:
        want = os.path.realpath(target)
    except OSError:
        return False
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" ")
                if len(fields) > 4 and _unescape(fields[4]) == want:
                    return True
    except OSError:
        return False
    return False


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mount_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise Permanent(f"{name} is not installed on this host", hint="install util-linux")
    return path


async def _run(argv: list[str], *, cwd: Path | None, timeout: float, what: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException as exc:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise Transient(f"{what} did not finish within {timeout:g} s") from None
        raise
    if proc.returncode != 0:
        msg = stderr.decode(errors="replace").strip()
        raise Permanent(
            f"{what} failed: {msg or f'exit {proc.returncode}'}",
            code="mount_failed",
            hint="overlay mounts need root (CAP_SYS_ADMIN) and a kernel with overlayfs",
        )
