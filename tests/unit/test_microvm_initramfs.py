"""The pure parts of the microVM boot artefacts: module order, cpio bytes, the guest config."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cove.errors import Permanent, UserError
from cove.runtime.microvm import (
    GuestConfig,
    Kernel,
    boot_image,
    build_initramfs,
    find_kernel,
    host_tsc_khz,
    kernel_cmdline,
    write_guest_config,
)
from cove.runtime.microvm.initramfs import (
    S_IFCHR,
    S_IFDIR,
    S_IFREG,
    CpioEntry,
    module_name,
    module_paths,
    parse_modules_dep,
    read_module,
    read_newc,
    resolve_modules,
    write_newc,
)

# The shape of Debian 6.1's modules.dep for what cove loads (deps listed as depmod does:
# the one needed last first), with a compressed entry and a dash in a name.
FAKE_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko.xz:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko.zst: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""  # noqa: E501

WANTED = ("crc32c_generic", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "ext4")


def names(paths: list[str]) -> list[str]:
    return [module_name(p) for p in paths]


def test_modules_come_after_their_dependencies_each_once() -> None:
    order = names(resolve_modules(parse_modules_dep(FAKE_DEP), WANTED))
    assert order == [
        "crc32c_generic",
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_console",
        "crc16",
        "mbcache",
        "jbd2",
        "ext4",
    ]
    deps = parse_modules_dep(FAKE_DEP)
    for i, name in enumerate(order):
        for dep in deps[name][1]:
            assert order.index(module_name(dep)) < i, f"{dep} must load before {name}"


def test_module_names_ignore_compression_suffix_and_dashes() -> None:
    deps = parse_modules_dep(FAKE_DEP)
    assert module_name("kernel/crypto/crc32c_generic.ko.xz") == "crc32c_generic"
    assert resolve_modules(deps, ["virtio-rng"]) == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/char/hw_random/virtio-rng.ko.zst",
    ]


def test_unknown_module_is_a_clear_error_and_builtins_are_skipped() -> None:
    deps = parse_modules_dep(FAKE_DEP)
    with pytest.raises(Permanent, match=r"'virtio_gpu' not found in modules.dep \(asked for\)"):
        resolve_modules(deps, ["virtio_gpu"])
    broken = parse_modules_dep("kernel/a.ko: kernel/missing.ko\n")
    with pytest.raises(Permanent, match=r"'missing' not found in modules.dep \(needed by a\)"):
        resolve_modules(broken, ["a"])
    assert resolve_modules(broken, ["a"], builtin=["kernel/missing.ko"]) == ["kernel/a.ko"]


def test_dependency_cycle_is_refused() -> None:
    cyclic = parse_modules_dep("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
    with pytest.raises(Permanent, match="cycle"):
        resolve_modules(cyclic, ["a"])


def test_compressed_modules_are_decompressed(tmp_path: Path) -> None:
    elf = b"\x7fELF fake module" * 50
    (tmp_path / "a.ko").write_bytes(elf)
    (tmp_path / "b.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "c.ko.gz").write_bytes(gzip.compress(elf))
    for name in ("a.ko", "b.ko.xz", "c.ko.gz"):
        assert read_module(tmp_path / name) == elf
    (tmp_path / "d.ko.xz").write_bytes(b"not xz")
    with pytest.raises(Permanent, match="cannot read kernel module"):
        read_module(tmp_path / "d.ko.xz")
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", str(tmp_path / "a.ko"), "-o", str(tmp_path / "e.ko.zst")])
        assert read_module(tmp_path / "e.ko.zst") == elf


ENTRIES = [
    CpioEntry("dev", S_IFDIR | 0o755),
    CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
    CpioEntry("init", S_IFREG | 0o755, b"#!init" * 7),  # 42 bytes: exercises padding
    CpioEntry("modules/order", S_IFREG | 0o644, b"a.ko\nb.ko\n"),
    CpioEntry("empty", S_IFREG | 0o644, b""),
]


def test_cpio_round_trips() -> None:
    archive = write_newc(ENTRIES)
    assert archive.startswith(b"070701")
    assert len(archive) % 4 == 0
    assert read_newc(archive) == ENTRIES


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is not installed")
def test_cpio_tool_reads_the_archive(tmp_path: Path) -> None:
    archive = write_newc(ENTRIES)
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == [e.name for e in ENTRIES]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames", "init", "modules/order"],
        input=archive,
        cwd=out,
        check=True,
        capture_output=True,
    )
    assert (out / "init").read_bytes() == b"#!init" * 7
    assert (out / "modules" / "order").read_text() == "a.ko\nb.ko\n"
    assert (out / "init").stat().st_mode & 0o777 == 0o755


def fake_kernel(tmp_path: Path, version: str = "6.1.0-9-amd64") -> Kernel:
    mdir = tmp_path / "lib" / "modules" / version
    for line in FAKE_DEP.splitlines():
        rel = line.split(":")[0]
        path = mdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        body = f"\x7fELF {module_name(rel)}".encode()
        if rel.endswith(".xz"):
            path.write_bytes(lzma.compress(body, format=lzma.FORMAT_XZ))
        elif rel.endswith(".zst"):
            path.write_bytes(b"never read")
        else:
            path.write_bytes(body)
    (mdir / "modules.dep").write_text(FAKE_DEP)
    boot = tmp_path / "boot"
    boot.mkdir(exist_ok=True)
    (boot / f"vmlinuz-{version}").write_bytes(b"kernel")
    return Kernel(image=boot / f"vmlinuz-{version}", version=version, modules_dir=mdir)


def test_initramfs_holds_init_modules_and_order_and_is_cached(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)
    init = tmp_path / "cove-init"
    init.write_bytes(b"\x7fELF init v1")
    cache = tmp_path / "cache"
    first = build_initramfs(cache, kernel=kernel, init_binary=init)
    members = {e.name: e for e in read_newc(first.read_bytes())}
    assert members["init"].data == b"\x7fELF init v1"
    assert members["init"].mode == S_IFREG | 0o755
    assert members["dev/console"].rdev == (5, 1)
    order = members["modules/order"].data.decode().split()
    assert order[0] == "crc32c_generic.ko" and order[-1] == "ext4.ko"
    assert members["modules/crc32c_generic.ko"].data == b"\x7fELF crc32c_generic"  # unpacked xz
    assert all(f"modules/{o}" in members for o in order)
    assert [p.name for p in module_paths(kernel)][:2] == ["crc32c_generic.ko.xz", "virtio_ring.ko"]

    mtime = first.stat().st_mtime_ns
    assert build_initramfs(cache, kernel=kernel, init_binary=init) == first
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten
    init.write_bytes(b"\x7fELF init v2")
    second = build_initramfs(cache, kernel=kernel, init_binary=init)
    assert second != first
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])


def test_find_kernel_picks_the_newest_with_modules(tmp_path: Path) -> None:
    fake_kernel(tmp_path, "6.1.0-9-amd64")
    fake_kernel(tmp_path, "6.1.0-10-amd64")
    (tmp_path / "boot" / "vmlinuz-6.2.0-1-amd64").write_bytes(b"no modules for this one")
    found = find_kernel(tmp_path / "boot", tmp_path / "lib" / "modules")
    assert found.version == "6.1.0-10-amd64"
    with pytest.raises(Permanent, match="no kernel for microVMs"):
        find_kernel(tmp_path / "nowhere", tmp_path / "lib" / "modules")


def test_guest_config_records() -> None:
    cfg = GuestConfig(
        argv=["sh", "-c", "echo a=b"],
        env={"PATH": "/bin", "FOO": "x y"},
        workdir="/srv",
        uid=1000,
        gid=100,
        hostname="web-1",
    )
    records = cfg.encode().split(b"\0")
    assert records[-1] == b""  # every record is NUL-terminated
    assert records[:-1] == [
        b"version=1",
        b"env=PATH=/bin",
        b"env=FOO=x y",
        b"hostname=web-1",
        b"workdir=/srv",
        b"uid=1000",
        b"gid=100",
        b"arg=sh",
        b"arg=-c",
        b"arg=echo a=b",
    ]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (GuestConfig(argv=[]), "command is empty"),
        (GuestConfig(argv=[""]), "command is empty"),
        (GuestConfig(argv=["sh", "a\0b"]), "NUL"),
        (GuestConfig(argv=["sh"], env={"A=B": "x"}), "invalid name"),
        (GuestConfig(argv=["sh"], env={"": "x"}), "invalid name"),
        (GuestConfig(argv=["sh"], env={"A": "x\0"}), "invalid name or value"),
        (GuestConfig(argv=["sh"], workdir="srv"), "not an absolute path"),
        (GuestConfig(argv=["sh"], uid=-1), "uid -1 is out of range"),
        (GuestConfig(argv=["sh"], gid=2**32), "out of range"),
        (GuestConfig(argv=["sh"], hostname="bad host"), "not a valid host name"),
    ],
)
def test_bad_guest_config_is_refused_and_nothing_written(
    tmp_path: Path, cfg: GuestConfig, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        write_guest_config(tmp_path, cfg)
    assert os.listdir(tmp_path) == []


VM_CPUINFO = """\
processor\t: 0
cpu MHz\t\t: 2596.146
flags\t\t: fpu tsc constant_tsc nonstop_tsc tsc_known_freq hypervisor
processor\t: 1
cpu MHz\t\t: 1200.000
"""


def test_host_tsc_rate_only_when_cpuinfo_can_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COVE_TSC_KHZ", raising=False)
    assert host_tsc_khz(VM_CPUINFO) == 2596146
    # with APERF/MPERF "cpu MHz" is the current core clock, not the TSC rate
    assert host_tsc_khz(VM_CPUINFO.replace("hypervisor", "aperfmperf")) is None
    assert host_tsc_khz(VM_CPUINFO.replace(" tsc_known_freq", "")) is None
    assert host_tsc_khz("flags : constant_tsc tsc_known_freq\n") is None
    monkeypatch.setenv("COVE_TSC_KHZ", "1000000")
    assert host_tsc_khz(VM_CPUINFO) == 1000000
    monkeypatch.setenv("COVE_TSC_KHZ", "fast")
    assert host_tsc_khz(VM_CPUINFO) is None


def test_kernel_cmdline_carries_the_contract() -> None:
    line = kernel_cmdline(root="/dev/vdb", tsc_khz=2000000, extra=["cove.config=/etc/c"])
    assert line.split() == [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "tsc=reliable",
        "tsc_early_khz=2000000",
        "cove.root=/dev/vdb",
        "cove.config=/etc/c",
    ]
    with pytest.raises(UserError, match="not a /dev path"):
        kernel_cmdline(root="/dev/vda quiet init=/bin/sh")


def test_boot_image_falls_back_to_the_compressed_kernel(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)  # "kernel": no bzImage header, nothing to extract
    assert boot_image(kernel, tmp_path / "cache") == kernel.image
    # a bzImage header whose payload is not a known compression: same fallback
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    kernel.image.write_bytes(bytes(image))
    assert boot_image(kernel, tmp_path / "cache") == kernel.image
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
