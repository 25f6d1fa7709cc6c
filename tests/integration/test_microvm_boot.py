"""A real microVM boot: QEMU (TCG) runs the host kernel, cove's initramfs and an ext4 root
disk made from a busybox tree; cove-init runs the configured command and powers off.

Needs qemu-system-x86_64, a /boot/vmlinuz-* kernel with its modules, gcc (the guest init is
built on demand), mkfs.ext4 and busybox-static. Run with ``-s`` to see the boot figures.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cove.runtime.microvm import (
    GuestConfig,
    Kernel,
    boot_image,
    build_ext4_image,
    build_initramfs,
    find_kernel,
    kernel_cmdline,
    write_guest_config,
)


def _missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if not glob.glob("/boot/vmlinuz-*"):
        return "no /boot/vmlinuz-* kernel (apt-get install linux-image-amd64)"
    if shutil.which("gcc") is None:
        return "gcc is not installed: the guest init cannot be built"
    if shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        return "mkfs.ext4 is not installed (apt-get install e2fsprogs)"
    if not Path("/bin/busybox").is_file():
        return "/bin/busybox is not installed (apt-get install busybox-static)"
    return None


pytestmark = [
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
    pytest.mark.timeout(300),
]

BOOT_TIMEOUT = 90.0  # a TCG boot takes ~2-6 s; generous for a loaded CI machine
APPLETS = ("sh", "echo", "cat", "id", "pwd", "env", "ls", "sleep", "kill", "hostname", "true")


@dataclass
class Boot:
    lines: list[str]  # console output, one entry per line, CR/LF stripped
    returncode: int
    first_output_s: float | None  # QEMU start -> first line containing the marker
    exit_s: float  # QEMU start -> QEMU exited

    def init_lines(self) -> list[str]:
        return [line for line in self.lines if line.startswith("cove-init: ")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("microvm-cache")


@pytest.fixture(scope="module")
def initramfs(cache: Path) -> Path:
    return build_initramfs(cache)


@pytest.fixture(scope="module")
def kernel_image(cache: Path) -> Path:
    """The uncompressed PVH vmlinux when the host kernel has one (the fast boot path)."""
    return boot_image(find_kernel(), cache)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "tmp", "home/app", "dev", "proc", "sys"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "hostname").write_text("cove-guest\n")
    (root / "tmp").chmod(0o1777)
    os.chown(root / "home" / "app", 1000, 1000)
    return root


def boot(
    initramfs: Path,
    rootfs: Path,
    config: GuestConfig | None,
    marker: str,
    kernel_image: Path | None = None,
) -> Boot:
    """Write the config, make the disk, boot it; return the console lines and timings."""
    if config is not None:
        write_guest_config(rootfs, config)
    image = build_ext4_image(rootfs, rootfs.parent / "root.img", 32)
    kernel = kernel_image or find_kernel().image
    cmd = [
        "qemu-system-x86_64",
        "-M", "microvm",
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio",
        "-kernel", str(kernel),
        "-initrd", str(initramfs),
        "-append", kernel_cmdline(root="/dev/vda"),
        "-drive", f"id=root,file={image},format=raw,if=none",
        "-device", "virtio-blk-device,drive=root",
        "-no-reboot",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    timer = threading.Timer(BOOT_TIMEOUT, proc.kill)
    timer.start()
    lines: list[str] = []
    first: float | None = None
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            if first is None and marker in line:
                first = time.monotonic() - start
        returncode = proc.wait()
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    exited = time.monotonic() - start
    assert exited < BOOT_TIMEOUT, f"QEMU did not exit by itself within {BOOT_TIMEOUT}s: {lines}"
    if not lines:
        pytest.fail(f"QEMU printed nothing (exit {returncode}); command line: {cmd}")
    result = Boot(lines=lines, returncode=returncode, first_output_s=first, exit_s=exited)
    first_txt = f"{first:.2f}s" if first is not None else "never"
    print(
        f"\n[microvm boot] kernel {kernel.name}: first output ({marker!r}) at {first_txt},"
        f" QEMU exit at {exited:.2f}s"
    )
    return result


def test_program_output_and_exit_status_then_qemu_exits(
    initramfs: Path, rootfs: Path, kernel_image: Path
) -> None:
    cfg = GuestConfig(
        argv=["sh", "-c", "echo hello from $(cat /etc/hostname); exit 3"],
        env={"PATH": "/bin"},
    )
    result = boot(initramfs, rootfs, cfg, "hello from", kernel_image)
    assert "hello from cove-guest" in result.lines, result.lines
    assert result.init_lines() == ["cove-init: exit 3"], result.lines
    assert result.lines.index("hello from cove-guest") < result.lines.index("cove-init: exit 3")
    assert result.returncode == 0  # a guest power-off: QEMU exits cleanly by itself


def test_compressed_vmlinuz_boots_too(initramfs: Path, rootfs: Path) -> None:
    # the fallback when the kernel has no PVH entry: QEMU boots the bzImage, which
    # decompresses itself (slow under TCG)
    cfg = GuestConfig(argv=["echo", "plain bzImage"], env={"PATH": "/bin"})
    result = boot(initramfs, rootfs, cfg, "plain bzImage", find_kernel().image)
    assert "plain bzImage" in result.lines, result.lines
    assert result.init_lines() == ["cove-init: exit 0"], result.lines


def test_fast_path_is_a_pvh_vmlinux(kernel_image: Path) -> None:
    kernel: Kernel = find_kernel()
    if kernel_image == kernel.image:
        pytest.skip(f"{kernel.image} has no PVH entry: boots use the compressed image")
    assert kernel_image.read_bytes()[:4] == b"\x7fELF"


def test_missing_command_is_a_clear_fatal_and_exit_127(
    initramfs: Path, rootfs: Path, kernel_image: Path
) -> None:
    cfg = GuestConfig(argv=["no-such-program", "--flag"], env={"PATH": "/bin"})
    result = boot(initramfs, rootfs, cfg, "cove-init:", kernel_image)
    assert result.init_lines() == [
        "cove-init: fatal: exec no-such-program: No such file or directory",
        "cove-init: exit 127",
    ], result.lines
    assert result.returncode == 0


def test_env_workdir_user_and_hostname_are_applied(
    initramfs: Path, rootfs: Path, kernel_image: Path
) -> None:
    cfg = GuestConfig(
        argv=["sh", "-c", 'echo "ids=$(id -u):$(id -g) pwd=$(pwd) foo=$FOO host=$(hostname)"'],
        env={"PATH": "/bin", "FOO": "bar baz"},
        workdir="/home/app",
        uid=1000,
        gid=1000,
        hostname="vm-7",
    )
    result = boot(initramfs, rootfs, cfg, "ids=", kernel_image)
    assert "ids=1000:1000 pwd=/home/app foo=bar baz host=vm-7" in result.lines, result.lines
    assert result.init_lines() == ["cove-init: exit 0"], result.lines


def test_death_by_signal_is_reported_as_signal(
    initramfs: Path, rootfs: Path, kernel_image: Path
) -> None:
    cfg = GuestConfig(argv=["sh", "-c", "echo dying; kill -9 $$"], env={"PATH": "/bin"})
    result = boot(initramfs, rootfs, cfg, "dying", kernel_image)
    assert result.init_lines() == ["cove-init: signal 9"], result.lines


def test_background_children_do_not_keep_the_vm_up(
    initramfs: Path, rootfs: Path, kernel_image: Path
) -> None:
    # the main program leaves a sleeper behind: init reports the main exit and powers off
    cfg = GuestConfig(argv=["sh", "-c", "sleep 600 & echo left a child"], env={"PATH": "/bin"})
    result = boot(initramfs, rootfs, cfg, "left a child", kernel_image)
    assert result.init_lines() == ["cove-init: exit 0"], result.lines
    assert result.exit_s < 60


def test_bad_workdir_is_a_clear_fatal(initramfs: Path, rootfs: Path, kernel_image: Path) -> None:
    cfg = GuestConfig(argv=["true"], env={"PATH": "/bin"}, workdir="/nope")
    result = boot(initramfs, rootfs, cfg, "cove-init:", kernel_image)
    assert result.init_lines() == [
        "cove-init: fatal: chdir to workdir /nope: No such file or directory",
        "cove-init: exit 125",
    ], result.lines


def test_missing_config_is_a_fatal_setup_error_and_powers_off(
    initramfs: Path, rootfs: Path, kernel_image: Path
) -> None:
    result = boot(initramfs, rootfs, None, "cove-init:", kernel_image)
    assert result.init_lines() == [
        "cove-init: fatal: read config /.cove/config: No such file or directory"
    ], result.lines
    assert result.returncode == 0
