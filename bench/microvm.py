"""MicroVM figures: boot to running, boot to healthy, host memory per VM, starts per second.

Runs the real ``microvm`` driver (KVM when the host's KVM runs a guest, else TCG - the report
says which) on a busybox image, and prints each figure beside:

- Firecracker's published figures (≤ 125 ms from start to guest init, ≤ 5 MiB memory
  overhead per microVM, 5 microVMs per host core per second), and
- references measured in the same run: the bare QEMU boot of the same kernel, initramfs and
  disk to cove-init's HELLO (what cove adds around QEMU), and the ``sandbox`` driver on the
  same image (the weaker-isolation alternative).

Traffic (the health probe) only goes to instances on a bridge inside a network namespace
this script creates and removes.

    .venv/bin/python bench/microvm.py [--count 5] [--parallel 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import loadavg, note, stop_on_signals
from cove.runtime import InstanceSpec, NetConfig, SandboxDriver
from cove.runtime._util import read_json
from cove.runtime.cgroups import v1_mounts
from cove.runtime.microvm import protocol as P
from cove.runtime.microvm.driver import TCG_TB_MB, MicroVMDriver

FIRECRACKER_BOOT_MS = 125
FIRECRACKER_OVERHEAD_MIB = 5
FIRECRACKER_PER_CORE_PER_S = 5
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def build_layer(base: Path) -> Path:
    layer = base / "layer"
    for d in ("bin", "etc", "tmp", "www"):
        (layer / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, layer / "bin" / "busybox")
    for name in subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout.split():
        if name != "busybox":
            os.symlink("busybox", layer / "bin" / name)
    (layer / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (layer / "etc" / "group").write_text("root:x:0:\n")
    (layer / "www" / "index.html").write_text("ok\n")
    return layer


def spec(layer: Path, n: int, netns: str, memory_mb: int) -> InstanceSpec:
    return InstanceSpec(
        instance_id=f"bench-{uuid.uuid4().hex[:8]}",
        hostname=f"b{n}",
        layers=[layer],
        argv=["httpd", "-f", "-p", "8080", "-h", "/www"],
        env={},
        memory_mb=memory_mb,
        network=NetConfig(
            bridge="cvbench0",
            ipv4=f"10.213.250.{n + 2}/24",
            ipv6=f"fd00:c0e:250::{n + 2:x}/64",
            gateway4="10.213.250.1",
            gateway6="fd00:c0e:250::1",
            netns=netns,
        ),
    )


def healthy_in_netns(netns: str, addr: str, timeout: float = 120.0) -> float:
    """Seconds until a TCP connection to addr:8080 succeeds, from inside *netns*."""
    code = (
        "import socket,time,sys\n"
        "t=time.monotonic()\n"
        f"while time.monotonic()-t<{timeout}:\n"
        "    try:\n"
        f"        socket.create_connection(({addr!r},8080),timeout=1).close(); break\n"
        "    except OSError: time.sleep(0.02)\n"
        "print(time.monotonic()-t)\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def qemu_memory_mib(pid: int, guest_mb: int) -> dict[str, float]:
    """QEMU's proportional resident memory (PSS: pages shared with other processes, like
    the kernel image in the page cache, count for their share), split into the guest's RAM
    mapping, TCG's translation cache, the kernel image mapping, and the rest."""
    parts = {"guest": 0, "tcg": 0, "kernel": 0, "rest": 0}
    part = "rest"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                size, name = (hi - lo) >> 20, head[5] if len(head) > 5 else ""
                if not name and size == guest_mb:
                    part = "guest"
                elif not name and TCG_TB_MB - 2 <= size <= TCG_TB_MB:
                    part = "tcg"
                elif "vmlinu" in name:
                    part = "kernel"
                else:
                    part = "rest"
            elif head[0] == "Pss:":
                parts[part] += int(head[1])
    return {k: v / 1024 for k, v in parts.items()}


def bare_qemu_boot(drv: MicroVMDriver, layer: Path, work: Path) -> float:
    """QEMU spawn -> cove-init's HELLO on the control port, without cove's supervisor."""
    s = InstanceSpec(instance_id="bare", hostname="bare", layers=[layer], argv=["true"], env={})
    from cove.runtime.microvm.disk import base_disk, create_overlay

    disk = work / "bare.qcow2"
    create_overlay(base_disk([layer], drv.cache_dir).path, disk)
    sock = work / "ctl.sock"
    argv = drv._qemu_argv(s, drv._kernel_image(), drv._initramfs(), disk)
    argv += [
        "-chardev", f"socket,id=ctl,path={sock},server=on,wait=on",
        "-device", f"virtserialport,chardev=ctl,name={P.PORT_NAME}",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        while not sock.exists():
            time.sleep(0.001)
        c = socket.socket(socket.AF_UNIX)
        while True:
            try:
                c.connect(str(sock))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                time.sleep(0.001)
        dec = P.Decoder()
        while True:
            data = c.recv(4096)
            if not data:
                raise RuntimeError("QEMU closed the port before HELLO")
            if any(f.type == P.HELLO for f in dec.feed(data)):
                return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


async def run(count: int, parallel: int, memory_mb: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="cove-bench-vm-", dir="/var/tmp"))
    work.chmod(0o711)
    netns = f"cove-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    root = f"cove-bench-{uuid.uuid4().hex[:6]}"
    vm = MicroVMDriver(work / "vm", cgroup_root=root)
    sbx = SandboxDriver(work / "sbx", cgroup_root=root + "s")
    made: list[tuple[MicroVMDriver | SandboxDriver, str]] = []
    try:
        layer = build_layer(work)
        note(f"accel: {vm.accel.name} ({vm.accel.detail})")
        note("building the boot artefacts and the image's base disk")
        bare = [bare_qemu_boot(vm, layer, work) for _ in range(3)]

        running: list[float] = []
        healthy: list[float] = []
        pids: list[int] = []
        for n in range(count):
            s = spec(layer, n, netns, memory_mb)
            await vm.create(s)
            made.append((vm, s.instance_id))
            t0 = time.monotonic()
            await vm.start(s.instance_id)
            running.append(time.monotonic() - t0)
            assert s.network is not None
            addr = s.network.ipv4.split("/")[0]
            healthy.append(running[-1] + await asyncio.to_thread(healthy_in_netns, netns, addr))
            pids.append(int(read_json(vm.instance_dir(s.instance_id) / "sandbox.json")["qemu_pid"]))
            note(f"vm {n}: running {running[-1]:.2f}s, healthy {healthy[-1]:.2f}s")
        # with all of them running: shared pages count for their share
        mem = [qemu_memory_mib(pid, memory_mb) for pid in pids]
        for drv, iid in made:
            await drv.destroy(iid)
        made.clear()

        note(f"starting {parallel} microVMs at once")
        batch = [spec(layer, 100 + n, netns, memory_mb) for n in range(parallel)]
        for s in batch:
            await vm.create(s)
            made.append((vm, s.instance_id))
        t0 = time.monotonic()
        await asyncio.gather(*(vm.start(s.instance_id) for s in batch))
        wall = time.monotonic() - t0
        rate = parallel / wall
        for drv, iid in made:
            await drv.destroy(iid)
        made.clear()

        note("the sandbox driver on the same image")
        sbx_running: list[float] = []
        for n in range(count):
            s = spec(layer, 50 + n, netns, memory_mb)
            await sbx.create(s)
            made.append((sbx, s.instance_id))
            t0 = time.monotonic()
            await sbx.start(s.instance_id)
            sbx_running.append(time.monotonic() - t0)
        for drv, iid in made:
            await drv.destroy(iid)
        made.clear()

        cores = os.cpu_count() or 1
        med = statistics.median
        print(f"microVM benchmark: accel {vm.accel.name}, {cores} cores, load {loadavg()}")
        print(f"  ({vm.accel.detail})")
        print(f"{'figure':44} {'cove':>12} {'reference':>34}")
        print(
            f"{'boot to running (start() returns), median':44} {med(running) * 1000:10.0f}ms"
            f" {'Firecracker start->init ≤ ' + str(FIRECRACKER_BOOT_MS) + 'ms':>34}"
        )
        print(
            f"{'  bare QEMU spawn -> cove-init HELLO':44} {med(bare) * 1000:10.0f}ms"
            f" {'(same run, no cove around QEMU)':>34}"
        )
        print(
            f"{'  sandbox driver start()':44} {med(sbx_running) * 1000:10.0f}ms"
            f" {'(same run, weaker isolation)':>34}"
        )
        print(f"{'boot to healthy (TCP :8080 answers), median':44} {med(healthy) * 1000:10.0f}ms")
        over = [m["tcg"] + m["kernel"] + m["rest"] for m in mem]
        print(
            f"{'host memory beyond guest RAM, per VM (PSS)':44} {med(over):9.1f}MiB"
            f" {'Firecracker ≤ ' + str(FIRECRACKER_OVERHEAD_MIB) + ' MiB':>34}"
        )
        for key, what in (
            ("tcg", "TCG translation cache (none under KVM)"),
            ("kernel", "kernel image mapping (shared page cache)"),
            ("rest", "QEMU itself (code, heap, devices)"),
        ):
            print(f"{'  ' + what:44} {med(m[key] for m in mem):9.1f}MiB")
        print(
            f"{'  guest RAM resident (of ' + str(memory_mb) + ' MiB)':44}"
            f" {med(m['guest'] for m in mem):9.1f}MiB"
        )
        print(
            f"{'microVMs started per core per second':44} {rate / cores:12.2f}"
            f" {'Firecracker ' + str(FIRECRACKER_PER_CORE_PER_S) + '/core/s':>34}"
        )
        print(f"{'  (' + str(parallel) + ' at once: wall time)':44} {wall:11.2f}s")
    finally:
        for drv, iid in made:
            try:
                await drv.destroy(iid)
            except Exception as exc:
                note(f"cleanup {iid}: {exc}")
        subprocess.run(["ip", "netns", "del", netns], check=False)
        subprocess.run(["ip", "link", "del", "cvbench0"], check=False, capture_output=True)
        for mount in v1_mounts().values():
            for r in (root, root + "s"):
                if (mount / r).exists():
                    (mount / r).rmdir()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=5, help="sequential boots measured")
    ap.add_argument("--parallel", type=int, default=4, help="microVMs started at once")
    ap.add_argument("--memory", type=int, default=128, help="guest memory, MiB")
    args = ap.parse_args()
    stop_on_signals()
    asyncio.run(run(args.count, args.parallel, args.memory))


if __name__ == "__main__":
    main()
