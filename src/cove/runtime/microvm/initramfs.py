"""Host-side pieces of a microVM boot: the kernel, its modules, the initramfs, the root disk.

* :func:`find_kernel` picks the newest ``/boot/vmlinuz-*`` that has a modules directory;
  :func:`boot_image` gives QEMU its uncompressed PVH vmlinux when there is one (cached).
* :func:`kernel_cmdline` is the guest kernel command line (with ``tsc_early_khz`` from
  :func:`host_tsc_khz`: the TCG boot otherwise hangs now and then at TSC calibration).
* :func:`resolve_modules` turns module names into ``modules.dep`` paths in load order
  (dependencies first).
* :func:`build_initramfs` writes a newc cpio holding ``/init`` (the static ``cove-init``),
  ``/modules/*.ko`` (decompressed) and ``/modules/order``, cached by content hash.
* :class:`GuestConfig` is the command the guest runs; :func:`write_guest_config` puts it at
  ``/.cove/config`` in a root directory and :func:`build_ext4_image` makes the ext4 disk.
* :func:`ensure_guest_init` builds ``guest/build/cove-init`` when it is missing or stale.

Everything here blocks (files, ``make``, ``mkfs.ext4``): call it from a worker thread
(``asyncio.to_thread``), not on the event loop.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cove.errors import Permanent, UserError
from cove.runtime._util import atomic_write_bytes

# What a cove microVM needs, in the order the guest should load them (each one's dependencies
# are inserted before it). crc32c_generic is no modules.dep dependency of ext4 (it is found
# through the crypto API at mount time) but ext4 mounts fail without it.
DEFAULT_MODULES: tuple[str, ...] = (
    "crc32c_generic",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "ext4",
)

CONFIG_PATH = ".cove/config"  # inside the root filesystem
CONFIG_VERSION = "1"

_MODULE_SUFFIXES = (".ko.zst", ".ko.xz", ".ko.gz", ".ko")


# -- kernel ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel image and the modules built for it."""

    image: Path
    version: str
    modules_dir: Path


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple(
        (int(part), "") if part.isdigit() else (-1, part)
        for part in re.split(r"[.\-+~_]", version)
        if part
    )


def find_kernel(boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> Kernel:
    """The newest ``boot/vmlinuz-VERSION`` whose ``modules_root/VERSION/modules.dep`` exists."""
    found: list[Kernel] = []
    for image in boot.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        mdir = modules_root / version
        if image.is_file() and (mdir / "modules.dep").is_file():
            found.append(Kernel(image=image, version=version, modules_dir=mdir))
    if not found:
        raise Permanent(
            f"no kernel for microVMs: no {boot}/vmlinuz-* with a matching "
            f"{modules_root}/<version>/modules.dep",
            hint="install one: apt-get install linux-image-amd64 (scripts/setup.sh does)",
        )
    return max(found, key=lambda k: _version_key(k.version))


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether an x86-64 ELF kernel carries the Xen PVH entry note QEMU boots it through."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False  # not a little-endian ELF64
    phoff = int.from_bytes(elf[32:40], "little")
    phentsize = int.from_bytes(elf[54:56], "little")
    phnum = int.from_bytes(elf[56:58], "little")
    for i in range(phnum):
        ph = elf[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        if len(ph) < 56 or int.from_bytes(ph[0:4], "little") != 4:  # PT_NOTE
            continue
        off = int.from_bytes(ph[8:16], "little")
        end = off + int.from_bytes(ph[32:40], "little")
        while off + 12 <= end:
            namesz, descsz, ntype = (
                int.from_bytes(elf[off + j : off + j + 4], "little") for j in (0, 4, 8)
            )
            name = elf[off + 12 : off + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            off += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _decompress_bzimage(image: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage (payload_offset/payload_length of the boot header)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS boot header)")
    setup_sects = image[0x1F1] or 4
    start = (setup_sects + 1) * 512 + int.from_bytes(image[0x248:0x24C], "little")
    payload = image[start : start + int.from_bytes(image[0x24C:0x250], "little")]
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
        return subprocess.run(
            ["zstd", "-dc"], input=payload, check=True, capture_output=True
        ).stdout
    raise ValueError(f"unsupported kernel compression (payload starts {payload[:4].hex()})")


def boot_image(kernel: Kernel, cache_dir: Path) -> Path:
    """What to pass to QEMU's ``-kernel``: the uncompressed vmlinux when it has a PVH entry
    (cached under ``cache_dir``), else the compressed ``vmlinuz``.

    Under TCG the bzImage's own xz decompression takes ~4 s of a ~5.5 s boot; QEMU loads a
    PVH ELF directly, which brings the boot to ~2.5 s.
    """
    data = kernel.image.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:20]
    target = cache_dir / f"vmlinux-{kernel.version}-{digest}"
    if target.is_file():
        return target
    try:
        elf = _decompress_bzimage(data)
    except (ValueError, lzma.LZMAError, zlib.error, subprocess.CalledProcessError):
        return kernel.image
    if not _has_pvh_entry(elf):
        return kernel.image
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, elf, 0o644)
    return target


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC frequency in kHz, when it can be known without measuring; else None.

    Under TCG the guest's TSC ticks at the host's rate, and the guest kernel's PIT-based
    calibration fails now and then ("tsc: Unable to calibrate against PIT"), after which the
    boot hangs. Passing ``tsc_early_khz=`` skips that calibration. ``COVE_TSC_KHZ`` overrides;
    otherwise ``/proc/cpuinfo``'s "cpu MHz" is used when the host kernel knows the TSC rate
    (``tsc_known_freq``, ``constant_tsc``) and has no APERF/MPERF (then "cpu MHz" is the TSC
    rate, not the current core clock) - the usual case in a VM.
    """
    env = os.environ.get("COVE_TSC_KHZ")
    if env:
        return int(env) if env.isdigit() and int(env) > 0 else None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    mhz: float | None = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
    if mhz is None or mhz <= 0 or "aperfmperf" in flags:
        return None
    if not {"constant_tsc", "tsc_known_freq"} <= flags:
        return None
    return round(mhz * 1000)


def kernel_cmdline(
    *, root: str = "/dev/vda", tsc_khz: int | None = None, extra: Sequence[str] = ()
) -> str:
    """The guest kernel command line: serial console, quiet, no reboot on panic, the TSC
    settings TCG needs, and cove-init's ``cove.root`` (see guest/README.md)."""
    if not re.fullmatch(r"/dev/[A-Za-z0-9/_-]+", root):
        raise UserError(f"root device {root!r} is not a /dev path")
    args = ["console=ttyS0", "quiet", "panic=-1", "tsc=reliable"]
    khz = tsc_khz if tsc_khz is not None else host_tsc_khz()
    if khz:
        args.append(f"tsc_early_khz={khz}")
    args.append(f"cove.root={root}")
    args.extend(extra)
    return " ".join(args)


# -- modules --------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """``kernel/fs/ext4/ext4.ko.xz`` -> ``ext4``; dashes and underscores are the same."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` -> {name: (path, [dependency paths])}."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[module_name(path)] = (path.strip(), rest.split())
    return deps


def resolve_modules(
    deps: Mapping[str, tuple[str, list[str]]],
    wanted: Iterable[str],
    builtin: Iterable[str] = (),
) -> list[str]:
    """Paths of ``wanted`` and all their dependencies, each after what it needs, no repeats.

    Names in ``builtin`` (``modules.builtin``) are skipped; an unknown name raises
    :class:`Permanent`.
    """
    built_in = {module_name(b) for b in builtin}
    by_path = {path: name for name, (path, _) in deps.items()}
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name not in deps:
            if name in built_in:
                done.add(name)
                return
            why = f"needed by {' <- '.join(reversed(chain))}" if chain else "asked for"
            raise Permanent(
                f"kernel module {name!r} not found in modules.dep ({why})",
                hint="install the matching linux-image package or drop the module",
            )
        if name in visiting:
            raise Permanent(f"modules.dep has a dependency cycle through {name!r}")
        visiting.add(name)
        path, dep_paths = deps[name]
        for dep in dep_paths:
            visit(by_path.get(dep, module_name(dep)), (*chain, name))
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for want in wanted:
        visit(want.replace("-", "_"), ())
    return order


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes: .ko as is, .ko.xz/.ko.gz/.ko.zst decompressed."""
    name = path.name
    try:
        if name.endswith(".ko"):
            return path.read_bytes()
        if name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
        if name.endswith(".ko.zst"):
            zstd = shutil.which("zstd")
            if zstd is None:
                raise Permanent(
                    f"{path} is zstd-compressed and the zstd command is missing",
                    hint="apt-get install zstd",
                )
            return subprocess.run(
                [zstd, "-dc", "--", str(path)], check=True, capture_output=True
            ).stdout
    except (OSError, lzma.LZMAError, subprocess.CalledProcessError) as exc:
        raise Permanent(f"cannot read kernel module {path}: {exc}") from exc
    raise Permanent(f"{path}: not a kernel module file name")


def module_paths(kernel: Kernel, wanted: Iterable[str] = DEFAULT_MODULES) -> list[Path]:
    """``wanted`` and their dependencies for ``kernel``, as files, in load order."""
    deps = parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.is_file() else []
    return [kernel.modules_dir / p for p in resolve_modules(deps, wanted, builtin)]


# -- cpio (newc) ----------------------------------------------------------------------------

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``data`` is the file content (or the symlink target)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") cpio archive, uid/gid 0, mtime 0, ending with ``TRAILER!!!``."""
    out = bytearray()

    def put(ino: int, entry: CpioEntry, nlink: int) -> None:
        name = entry.name.encode() + b"\0"
        fields = (
            ino,
            entry.mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime: 0 keeps the archive reproducible
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.extend(header + name)
        out.extend(_pad4(len(header) + len(name)))
        out.extend(entry.data)
        out.extend(_pad4(len(entry.data)))

    ino = 0
    for ino, entry in enumerate(entries, start=1):
        put(ino, entry, 2 if entry.mode & 0o170000 == S_IFDIR else 1)
    put(ino + 1, CpioEntry(name="TRAILER!!!", mode=0), 1)
    return bytes(out)


def read_newc(archive: bytes) -> list[CpioEntry]:
    """Parse a newc archive (the inverse of :func:`write_newc`, without the trailer)."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        header = archive[pos : pos + 110]
        if len(header) != 110 or header[:6] != b"070701":
            raise ValueError(f"bad cpio header at offset {pos}")
        f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize
        data_start += -data_start % 4
        data = archive[data_start : data_start + size]
        pos = data_start + size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries.append(CpioEntry(name=name, mode=mode, data=data, rdev=(rmaj, rmin)))


# -- guest init binary ----------------------------------------------------------------------


def guest_source_dir() -> Path:
    """The ``guest/`` directory (``COVE_GUEST_DIR`` overrides; default: beside ``src/``)."""
    env = os.environ.get("COVE_GUEST_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "guest"


def ensure_guest_init(guest_dir: Path | None = None) -> Path:
    """``guest/build/cove-init``, (re)built with ``make`` when missing or older than its
    sources. A lock file keeps concurrent builders from reading a half-written binary."""
    gdir = guest_dir or guest_source_dir()
    src = gdir / "init.c"
    out = gdir / "build" / "cove-init"
    if not src.is_file():
        raise Permanent(
            f"guest init source {src} not found",
            hint="run from a cove checkout or set COVE_GUEST_DIR to its guest/ directory",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sources = [src, gdir / "Makefile"]
        newest = max(p.stat().st_mtime for p in sources if p.exists())
        if out.is_file() and out.stat().st_mtime >= newest:
            return out
        make = shutil.which("make")
        gcc = shutil.which("gcc")
        tmp = out.with_suffix(".tmp")
        if make is not None and (gdir / "Makefile").is_file():
            cmd = [make, "-s", "-C", str(gdir)]
        elif gcc is not None:
            cmd = [gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp), str(src)]
        else:
            raise Permanent(
                "cannot build the guest init: neither make nor gcc is installed",
                hint="apt-get install build-essential",
            )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise Permanent(f"building {out} failed:\n{proc.stderr.strip()}")
        if tmp.exists():  # the plain-gcc build
            os.replace(tmp, out)
        if not out.is_file():
            raise Permanent(f"building the guest init did not produce {out}")
        return out


# -- initramfs ------------------------------------------------------------------------------


def initramfs_entries(init_binary: bytes, modules: Sequence[tuple[str, bytes]]) -> list[CpioEntry]:
    """The initramfs members: /dev/console, /init, /modules/<name>.ko, /modules/order."""
    entries = [
        CpioEntry("dev", S_IFDIR | 0o755),
        CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("proc", S_IFDIR | 0o755),
        CpioEntry("sys", S_IFDIR | 0o755),
        CpioEntry("init", S_IFREG | 0o755, init_binary),
        CpioEntry("modules", S_IFDIR | 0o755),
    ]
    order: list[str] = []
    for name, data in modules:
        fname = f"{name}.ko"
        entries.append(CpioEntry(f"modules/{fname}", S_IFREG | 0o644, data))
        order.append(fname)
    entries.append(
        CpioEntry("modules/order", S_IFREG | 0o644, "".join(f"{o}\n" for o in order).encode())
    )
    return entries


def build_initramfs(
    cache_dir: Path,
    *,
    kernel: Kernel | None = None,
    modules: Iterable[str] = DEFAULT_MODULES,
    init_binary: Path | None = None,
) -> Path:
    """Write (or reuse) ``cache_dir/initramfs-<hash>.cpio`` for ``kernel`` and return it.

    The hash covers the init binary and every module's bytes, so a rebuilt init or an
    upgraded kernel gives a new file; an unchanged one is reused without rewriting.
    """
    kern = kernel or find_kernel()
    init = (init_binary or ensure_guest_init()).read_bytes()
    mods = [(module_name(str(p)), read_module(p)) for p in module_paths(kern, modules)]
    digest = hashlib.sha256()
    digest.update(b"cove-initramfs-v1\0")
    digest.update(hashlib.sha256(init).digest())
    for name, data in mods:
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256(data).digest())
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"initramfs-{digest.hexdigest()[:20]}.cpio"
    if target.is_file():
        return target
    atomic_write_bytes(target, write_newc(initramfs_entries(init, mods)), 0o644)
    return target


# -- the guest's command and the root disk --------------------------------------------------


@dataclass(frozen=True)
class GuestConfig:
    """What cove-init runs: argv (PATH looked up in ``env``), env, workdir, numeric ids."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    uid: int = 0
    gid: int = 0
    hostname: str | None = None

    def encode(self) -> bytes:
        """NUL-terminated ``key=value`` records (see guest/README.md)."""
        if not self.argv or not self.argv[0]:
            raise UserError("the guest command is empty", hint="give at least a program name")
        records = [("version", CONFIG_VERSION)]
        for what, values in (("argument", self.argv), ("workdir", [self.workdir])):
            for v in values:
                if "\0" in v:
                    raise UserError(f"{what} {v!r} contains a NUL byte")
        if not self.workdir.startswith("/"):
            raise UserError(f"workdir {self.workdir!r} is not an absolute path")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise UserError(f"environment variable {key!r} has an invalid name or value")
            records.append(("env", f"{key}={value}"))
        for ident, what in ((self.uid, "uid"), (self.gid, "gid")):
            if not 0 <= ident < 2**32 - 1:
                raise UserError(f"{what} {ident} is out of range")
        if self.hostname is not None:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})", self.hostname):
                raise UserError(f"hostname {self.hostname!r} is not a valid host name")
            records.append(("hostname", self.hostname))
        records += [("workdir", self.workdir), ("uid", str(self.uid)), ("gid", str(self.gid))]
        records += [("arg", a) for a in self.argv]
        return b"".join(f"{k}={v}".encode() + b"\0" for k, v in records)


def write_guest_config(rootfs: Path, config: GuestConfig) -> Path:
    """Write ``rootfs/.cove/config`` (mode 0600, root's) and return its path."""
    data = config.encode()
    path = rootfs / CONFIG_PATH
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def build_ext4_image(source_dir: Path, image: Path, size_mb: int) -> Path:
    """Make ``image`` an ext4 filesystem of ``size_mb`` MiB holding ``source_dir``'s tree."""
    mkfs = shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if mkfs is None:
        raise Permanent("mkfs.ext4 is not installed", hint="apt-get install e2fsprogs")
    if size_mb <= 0:
        raise UserError(f"disk size {size_mb} MiB must be positive")
    image.unlink(missing_ok=True)
    cmd = [
        mkfs,
        "-q",
        "-F",
        "-d",
        str(source_dir),
        "-E",
        "root_owner=0:0",
        str(image),
        f"{size_mb}M",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        image.unlink(missing_ok=True)
        raise Permanent(
            f"mkfs.ext4 of {source_dir} into {image} ({size_mb} MiB) failed: "
            f"{proc.stderr.strip() or proc.stdout.strip()}",
            hint="a bigger size may be needed" if "No space" in proc.stderr else None,
        )
    return image
