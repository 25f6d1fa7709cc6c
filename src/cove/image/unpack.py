"""A safe, streaming unpacker for one OCI layer into a directory usable as an overlay lowerdir.

Streaming: the blob is read once, decompressed on the fly — gzip; zstd with the
``zstandard`` module when importable, else the ``zstd`` binary; or an uncompressed tar —
sniffed from the magic bytes (``docker-archive`` layers are plain tars labelled
``tar.gzip``), and the sha256 of the uncompressed stream (the layer's diff_id) is computed
as it goes.

OCI whiteouts become overlayfs whiteouts, so layer directories stack as lowerdirs directly:

- ``dir/.wh.NAME``      -> ``dir/NAME`` as a character device 0:0
- ``dir/.wh..wh..opq``  -> xattr ``trusted.overlay.opaque=y`` on ``dir``

(Whiteouts hide only lower layers: a whiteout for a name this layer also creates keeps the
entry — a directory becomes opaque.)

Rejected with ``ImageRejected`` (code ``image_rejected``):

- absolute member names and ``..`` components; hardlink targets likewise
- any member whose path goes *through* a symlink or a non-directory (every parent is
  opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent, so no check/use race)
- hardlinks to something not (yet) extracted in this layer, to a directory, or to a device
- block and character devices and FIFOs in the tar (the whiteout devices are ours)
- members, layers or entry counts over ``UnpackLimits``
- corrupt or truncated streams, and a diff_id that does not match the expected one

Symlinks themselves may point anywhere (``/bin/sh -> busybox``, ``x -> ../../bin/x``): they
are never followed here and resolve inside the container's root at run time.

Kept: permission bits including setuid/setgid/sticky, numeric uid/gid (names in the tar are
ignored), mtimes. Not kept: extended attributes from the tar (so a layer cannot set
``trusted.overlay.*`` itself), access times.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import importlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from cove.errors import Permanent, Transient
from cove.image.errors import ImageRejected

GiB = 1024**3
_CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


@dataclass(frozen=True)
class UnpackLimits:
    """Upper bounds for one layer. Exceeding one rejects the image."""

    max_layer_bytes: int = 16 * GiB  # the uncompressed tar stream
    max_file_bytes: int = 8 * GiB  # one member's content
    max_entries: int = 1_000_000


class UnpackCancelled(Exception):
    """The caller asked the unpack to stop (its coroutine was cancelled)."""


def _reject(detail: str, **extra: Any) -> ImageRejected:
    return ImageRejected(
        detail,
        hint="the image contains content cove will not unpack; rebuild it without it "
        "(nothing of this image was kept)",
        extra=extra or None,
    )


class _HashingReader(io.RawIOBase):
    """Reads the decompressed stream, hashing and counting every byte (the diff_id)."""

    def __init__(self, source: IO[bytes], limit: int) -> None:
        self._source = source
        self._limit = limit
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(len(view))
        n = len(data)
        if n:
            self.count += n
            if self.count > self._limit:
                raise _reject(
                    f"layer is larger than the limit of {self._limit} bytes uncompressed",
                    limit=self._limit,
                )
            self.hash.update(data)
            view[:n] = data
        return n

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _CorruptStream(Exception):
    """The decompressor said the stream is corrupt."""


class _ZstdProcess(io.RawIOBase):
    """zstd decompression through the ``zstd`` binary (when the Python module is absent).

    Runs in the unpacking worker thread (never on the event loop): a pump thread feeds the
    compressed blob to ``zstd -dcq`` while the reader consumes its output.
    """

    def __init__(self, source: IO[bytes], binary: str) -> None:
        self._proc = subprocess.Popen(
            [binary, "-d", "-c", "-q"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._pump = threading.Thread(target=self._feed, args=(source,), daemon=True)
        self._pump.start()

    def _feed(self, source: IO[bytes]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            while chunk := source.read(_CHUNK):
                stdin.write(chunk)
        except (OSError, ValueError):
            pass  # zstd exited (corrupt input or close()); the reader reports it
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        stdout = self._proc.stdout
        assert stdout is not None
        view = memoryview(buffer).cast("B")
        data = os.read(stdout.fileno(), len(view))
        n = len(data)
        view[:n] = data
        if not n:
            self._pump.join()
            stderr = self._proc.stderr.read() if self._proc.stderr else b""
            if self._proc.wait() != 0:
                raise _CorruptStream(stderr.decode(errors="replace").strip() or "zstd failed")
        return n

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._pump.join()
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                pipe.close()
        super().close()


def _zstd_reader(source: IO[bytes]) -> IO[bytes]:
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        binary = shutil.which("zstd")
        if binary is None:
            raise ImageRejected(
                "layer is zstd-compressed and this host has no zstd support",
                hint="install zstd on the node (apt-get install zstd, or the Python "
                "package 'zstandard'), or push the image with gzip layers",
            ) from None
        return cast(IO[bytes], io.BufferedReader(_ZstdProcess(source, binary), _CHUNK))
    reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
    return reader


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    if isinstance(raw, io.BufferedReader):
        buffered: io.BufferedReader = raw
    else:  # any readable binary stream: buffer it to peek at the magic
        buffered = io.BufferedReader(cast(io.RawIOBase, raw), _CHUNK)
    magic = buffered.peek(4)[:4]
    if magic[:2] == _GZIP_MAGIC:
        return cast(IO[bytes], gzip.GzipFile(fileobj=buffered, mode="rb"))
    if magic == _ZSTD_MAGIC:
        return _zstd_reader(buffered)
    return buffered


def _components(name: str, what: str) -> list[str]:
    """Split a member name into safe path components ([] for the layer root)."""
    if "\x00" in name:
        raise _reject(f"{what} {name!r} contains a NUL byte", member=name)
    if name.startswith("/") and name.strip("/."):  # a bare "/" is just the root entry
        raise _reject(f"{what} {name!r} is an absolute path", member=name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _reject(f"{what} {name!r} escapes the layer with '..'", member=name)
    return parts


class _Layer:
    """The destination tree, reached only through directory file descriptors."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.is_root = os.geteuid() == 0
        self.whiteouts: set[tuple[str, ...]] = set()
        self.dir_meta: dict[tuple[str, ...], tarfile.TarInfo] = {}

    def close(self) -> None:
        os.close(self.root_fd)

    def open_dir(self, parts: list[str], *, create: bool, member: str) -> int:
        """A new fd for the directory *parts*; never follows a symlink on the way."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                if part.startswith(WHITEOUT_PREFIX):
                    raise _reject(f"member {member!r} has a whiteout as a parent", member=member)
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        prefix = "/".join(parts[: i + 1])
                        kind = "a symlink" if exc.errno == errno.ELOOP else "not a directory"
                        if exc.errno == errno.ENOTDIR and _is_symlink(fd, part):
                            kind = "a symlink"
                        raise _reject(
                            f"member {member!r} goes through {prefix!r}, which is {kind}",
                            member=member,
                        ) from None
                    raise
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def clear(self, pfd: int, leaf: str, key: tuple[str, ...], *, keep_dir: bool) -> bool:
        """Remove what *leaf* (at *key*) is now: in a tar a later member wins. True if an
        existing directory was kept instead."""
        try:
            st = os.lstat(leaf, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(leaf, dir_fd=pfd)
            n = len(key)  # forget what was recorded below the removed directory
            for k in [k for k in self.dir_meta if k[:n] == key]:
                del self.dir_meta[k]
            self.whiteouts = {k for k in self.whiteouts if k[:n] != key or k == key}
        else:
            os.unlink(leaf, dir_fd=pfd)
        return False

    def chown(self, leaf_or_fd: str | int, info: tarfile.TarInfo, pfd: int | None = None) -> None:
        if not self.is_root:
            return  # unprivileged (tests): ownership cannot be given away
        if isinstance(leaf_or_fd, int):
            os.fchown(leaf_or_fd, info.uid, info.gid)
        else:
            os.chown(leaf_or_fd, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)

    def mknod_whiteout(self, pfd: int, name: str) -> None:
        try:
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
        except PermissionError as exc:
            raise Permanent(
                "cannot create an overlay whiteout (a 0:0 character device)",
                hint="unpacking image layers needs root (CAP_MKNOD) on the node",
            ) from exc

    def set_opaque(self, fd: int) -> None:
        try:
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        except PermissionError as exc:
            raise Permanent(
                f"cannot set {OPAQUE_XATTR} on a layer directory",
                hint="unpacking image layers needs root (CAP_SYS_ADMIN for trusted.* xattrs)",
            ) from exc


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _mtime_ns(info: tarfile.TarInfo) -> tuple[int, int] | None:
    try:
        ns = int(info.mtime * 1_000_000_000)
    except (OverflowError, ValueError, TypeError):
        return None
    return (ns, ns)


def _set_times(target: str | int, info: tarfile.TarInfo, pfd: int | None = None) -> None:
    times = _mtime_ns(info)
    if times is None:
        return
    try:
        if isinstance(target, int):
            os.utime(target, ns=times)
        else:
            os.utime(target, ns=times, dir_fd=pfd, follow_symlinks=False)
    except (OverflowError, ValueError):
        pass


def unpack_layer(
    blob: IO[bytes],
    dest: Path,
    *,
    limits: UnpackLimits | None = None,
    expected_diff_id: str | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """Unpack the layer *blob* (compressed or not) into the existing empty directory *dest*.

    Returns the diff_id (``sha256:<hex>`` of the uncompressed tar). Raises
    ``ImageRejected`` for unsafe or corrupt content and when the diff_id differs from
    *expected_diff_id*. On any error *dest* is left partially written: the caller removes it
    (``cove.image.pull`` unpacks into a temporary directory and renames only on success).
    """
    limits = limits or UnpackLimits()
    try:
        with _decompressed(blob) as stream:
            reader = _HashingReader(stream, limits.max_layer_bytes)
            layer = _Layer(dest)
            try:
                with tarfile.open(fileobj=reader, mode="r|", bufsize=256 * 1024) as tf:
                    _extract_all(tf, layer, limits, cancel)
                reader.drain()
                _apply_dir_meta(layer)
            finally:
                layer.close()
    except (ImageRejected, Permanent, Transient, UnpackCancelled):
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, _CorruptStream) as exc:
        raise _reject(f"layer is corrupt or truncated: {exc}") from exc
    except (UnicodeError, ValueError, OverflowError) as exc:
        raise _reject(f"layer has an invalid member: {exc}") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Transient(
                f"no space left while unpacking a layer into {dest}: {exc}",
                hint="free disk space on the node (cove.image.gc removes unused layers)",
            ) from exc
        raise Permanent(f"unpacking a layer into {dest} failed: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("zstd"):
            raise _reject(f"layer is corrupt or truncated (zstd): {exc}") from exc
        raise
    diff_id = "sha256:" + reader.hash.hexdigest()
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise _reject(
            f"layer content does not match its diff_id: expected {expected_diff_id}, got {diff_id}",
            expected=expected_diff_id,
            actual=diff_id,
        )
    return diff_id


def _extract_all(
    tf: tarfile.TarFile,
    layer: _Layer,
    limits: UnpackLimits,
    cancel: threading.Event | None,
) -> None:
    for count, info in enumerate(tf, start=1):
        if count > limits.max_entries:
            raise _reject(
                f"layer has more than {limits.max_entries} entries", limit=limits.max_entries
            )
        if cancel is not None and cancel.is_set():
            raise UnpackCancelled()
        _extract_one(tf, info, layer, limits)


def _extract_one(
    tf: tarfile.TarFile, info: tarfile.TarInfo, layer: _Layer, limits: UnpackLimits
) -> None:
    name = info.name
    parts = _components(name, "member")
    if not parts:  # the layer root itself ("./")
        if not info.isdir():
            raise _reject(f"member {name!r} names the layer root but is not a directory")
        layer.dir_meta[()] = info
        return
    leaf = parts[-1]
    if leaf.startswith(WHITEOUT_PREFIX):
        _whiteout(layer, parts, name)
        return
    if info.ischr() or info.isblk():
        raise _reject(f"member {name!r} is a device node", member=name)
    if info.isfifo():
        raise _reject(f"member {name!r} is a FIFO", member=name)
    if not (info.isdir() or info.isreg() or info.issym() or info.islnk()):
        raise _reject(f"member {name!r} has unsupported type {info.type!r}", member=name)
    if info.isreg() and info.size > limits.max_file_bytes:
        raise _reject(
            f"member {name!r} is {info.size} bytes, over the limit of {limits.max_file_bytes}",
            member=name,
            limit=limits.max_file_bytes,
        )
    key = tuple(parts)
    pfd = layer.open_dir(parts[:-1], create=True, member=name)
    try:
        if info.isdir():
            kept = layer.clear(pfd, leaf, key, keep_dir=True)
            if not kept:
                os.mkdir(leaf, 0o700, dir_fd=pfd)
            layer.dir_meta[key] = info
            if key in layer.whiteouts:  # ".wh.x" then "x/": x hides the lower x
                fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
                try:
                    layer.set_opaque(fd)
                finally:
                    os.close(fd)
            return
        layer.clear(pfd, leaf, key, keep_dir=False)
        layer.dir_meta.pop(key, None)
        if info.isreg():
            _write_file(tf, info, layer, pfd, leaf)
        elif info.issym():
            if not info.linkname:
                raise _reject(f"symlink {name!r} has an empty target", member=name)
            os.symlink(info.linkname, leaf, dir_fd=pfd)
            layer.chown(leaf, info, pfd)
            _set_times(leaf, info, pfd)
        else:
            _hardlink(info, layer, pfd, leaf, parts)
    finally:
        os.close(pfd)


def _write_file(
    tf: tarfile.TarFile, info: tarfile.TarInfo, layer: _Layer, pfd: int, leaf: str
) -> None:
    fd = os.open(
        leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd
    )
    try:
        src = tf.extractfile(info)
        if src is not None:
            written = 0
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if written != info.size:
                raise _reject(f"member {info.name!r} is truncated", member=info.name)
        layer.chown(fd, info)
        os.fchmod(fd, info.mode & 0o7777)  # after chown, which clears setuid/setgid
        _set_times(fd, info)
    finally:
        os.close(fd)


def _hardlink(info: tarfile.TarInfo, layer: _Layer, pfd: int, leaf: str, parts: list[str]) -> None:
    name = info.name
    target = _components(info.linkname, f"hardlink target of {name!r}:")
    if not target:
        raise _reject(f"hardlink {name!r} points at the layer root", member=name)
    if target == parts:
        raise _reject(f"hardlink {name!r} points at itself", member=name)
    missing = _reject(
        f"hardlink {name!r} points at {info.linkname!r}, which is not in this layer (before it)",
        member=name,
    )
    try:
        tpfd = layer.open_dir(target[:-1], create=False, member=name)
    except FileNotFoundError:
        raise missing from None
    try:
        try:
            st = os.lstat(target[-1], dir_fd=tpfd)
        except FileNotFoundError:
            raise missing from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise _reject(
                f"hardlink {name!r} points at {info.linkname!r}, which is not a regular file",
                member=name,
            )
        os.link(target[-1], leaf, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(tpfd)


def _whiteout(layer: _Layer, parts: list[str], name: str) -> None:
    leaf = parts[-1]
    pfd = layer.open_dir(parts[:-1], create=True, member=name)
    try:
        if leaf == OPAQUE_MARKER:
            layer.set_opaque(pfd)
            return
        if leaf.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other ".wh..wh." names are aufs bookkeeping: meaningless here
        hidden = leaf[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise _reject(f"whiteout {name!r} names no file", member=name)
        key = (*parts[:-1], hidden)
        try:
            st = os.lstat(hidden, dir_fd=pfd)
        except FileNotFoundError:
            layer.mknod_whiteout(pfd, hidden)
            layer.whiteouts.add(key)
            return
        # this layer also has the name: it stays, and hides the lower one by itself
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(hidden, _DIR_FLAGS, dir_fd=pfd)
            try:
                layer.set_opaque(fd)
            finally:
                os.close(fd)
    finally:
        os.close(pfd)


def _apply_dir_meta(layer: _Layer) -> None:
    if () not in layer.dir_meta:  # no "./" member: the layer root is a plain 0755 root dir
        root = tarfile.TarInfo(".")
        root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, 0o755, 0, 0
        root.mtime = os.fstat(layer.root_fd).st_mtime
        layer.dir_meta[()] = root
    # deepest first, so a parent's mtime is set after its children are final
    for key in sorted(layer.dir_meta, key=len, reverse=True):
        info = layer.dir_meta[key]
        fd = layer.open_dir(list(key), create=False, member=info.name)
        try:
            layer.chown(fd, info)
            os.fchmod(fd, info.mode & 0o7777)
            _set_times(fd, info)
        finally:
            os.close(fd)


def unpack_layer_file(
    path: Path,
    dest: Path,
    *,
    limits: UnpackLimits | None = None,
    expected_diff_id: str | None = None,
    cancel: threading.Event | None = None,
) -> str:
    """``unpack_layer`` for a blob on disk."""
    with open(path, "rb") as blob:
        return unpack_layer(
            blob, dest, limits=limits, expected_diff_id=expected_diff_id, cancel=cancel
        )


def remove_tree(path: Path) -> None:
    """Remove an unpacked tree if present (as root modes do not matter; unprivileged, a
    read-only directory of a layer is opened up and the removal retried)."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return

    def retry(func: Callable[[str], Any], p: str, _exc: Any) -> None:
        os.chmod(os.path.dirname(p), 0o700)
        if func is os.rmdir or func is os.unlink:
            func(p)
        elif os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
            shutil.rmtree(p, onerror=retry)

    shutil.rmtree(path, onerror=retry)
