"""The microvm driver with real QEMU guests (TCG here; KVM where the host has it).

Same image as the sandbox tests (busybox layers). Every test boots real microVMs; network
traffic only goes to addresses inside ``cove-t-*`` namespaces made here.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cove.errors import UserError
from cove.runtime import NetConfig, VolumeMount
from cove.runtime._util import read_json
from cove.runtime.cgroups import v1_mounts
from cove.runtime.microvm.driver import MicroVMDriver
from tests.integration.test_sandbox_support import (
    arun,
    collect,
    exec_output,
    in_netns,
    layers,
    make_spec,
    own_netns,
    stdout_of,
    wait_for_line,
)

__all__ = ["layers"]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the microvm driver needs root (cgroups, taps)"
    for tool in ("qemu-system-x86_64", "qemu-img", "gcc", "busybox"):
        if shutil.which(tool) is None and not Path(f"/bin/{tool}").exists():
            return f"{tool} is not installed (bash scripts/setup.sh)"
    if not glob.glob("/boot/vmlinuz-*"):
        return "no /boot/vmlinuz-* kernel (apt-get install linux-image-amd64)"
    return None


pytestmark = [
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
    pytest.mark.timeout(300),
]
BOOT = 120.0  # generous: TCG boots on a loaded 2-core CI machine


@pytest.fixture
def driver() -> Iterator[MicroVMDriver]:
    state = Path(tempfile.mkdtemp(prefix="cove-vm-", dir="/var/tmp"))
    drv = MicroVMDriver(state, cgroup_root=f"cove-test-{uuid.uuid4().hex[:8]}", hang_timeout=6.0)
    yield drv

    async def destroy_all() -> list[str]:
        errors = []
        if drv.instances_dir.is_dir():
            for d in drv.instances_dir.iterdir():
                try:
                    await drv.destroy(d.name)
                except Exception as exc:
                    errors.append(f"{d.name}: {exc}")
        return errors

    errors = asyncio.run(destroy_all())
    for mount in v1_mounts().values():
        if (mount / drv.cgroup_root).exists():
            (mount / drv.cgroup_root).rmdir()
    shutil.rmtree(state)
    assert not errors, errors


def qemu_pid(drv: MicroVMDriver, iid: str) -> int:
    return int(read_json(drv.instance_dir(iid) / "sandbox.json")["qemu_pid"])


@arun
async def test_runs_the_command_with_its_user_env_secrets_and_exit_code(
    driver: MicroVMDriver, layers: list[Path]
) -> None:
    script = (
        "echo out-line; echo err-line >&2; id; pwd; echo FOO=$FOO; hostname;"
        " cat /run/cove/secrets.json; echo; stat -c '%a %u' /run/cove/secrets.json;"
        " cat /proc/meminfo | head -1;"
        # more processes than pids_max (16): the subshell dies at the first refused fork;
        # what follows uses shell builtins only (a fork could be refused too until the
        # sleeps end)
        " (for i in $(seq 30); do sleep 2 & done) 2>/dev/null;"
        " read m < /sys/fs/cgroup/cove/pids.max; echo $m;"
        " while read k v; do echo $k $v; done < /sys/fs/cgroup/cove/pids.events; exit 3"
    )
    spec = make_spec(
        layers,
        argv=["sh", "-c", script],
        env={"FOO": "bar baz"},
        user="app",
        workdir="/home/app",
        memory_mb=160,
        pids_max=16,
        secrets_json=b'{"bundle": "sec_1", "version": 1, "values": {"K": "v"}}',
    )
    await driver.create(spec)
    t0 = time.monotonic()
    await asyncio.wait_for(driver.start(spec.instance_id), BOOT)
    boot = time.monotonic() - t0
    lines = await collect(driver, spec.instance_id, timeout=BOOT)
    st = await driver.status(spec.instance_id)
    out = stdout_of(lines)
    assert (st.state, st.exit_code, st.reason) == ("exited", 3, "exited"), (st, out)
    assert out[0] == "out-line"
    assert [x.line for x in lines if x.stream == "stderr"] == ["err-line"]
    assert out[1].startswith("uid=1000(app) gid=1000(app)") and "50(staff)" in out[1]
    assert out[2:5] == ["/home/app", "FOO=bar baz", "web-1"]
    assert out[5] == '{"bundle": "sec_1", "version": 1, "values": {"K": "v"}}'
    assert out[6] == "400 1000"
    mem_kb = int(out[7].split()[1])
    assert 100_000 < mem_kb <= 160 * 1024, out[7]  # the memory limit is the VM's size
    assert out[8] == "16"  # the pids limit holds inside the guest too
    assert out[9].startswith("max ") and int(out[9].split()[1]) > 0, out[9:]
    print(f"\nmicroVM ({driver.accel.name}) start() returned after {boot:.2f}s")


@arun
async def test_stop_is_graceful_then_forced(driver: MicroVMDriver, layers: list[Path]) -> None:
    polite = make_spec(
        layers,
        argv=["sh", "-c", "trap 'echo bye; exit 42' TERM; echo ready; while :; do sleep 1; done"],
    )
    stubborn = make_spec(
        layers, argv=["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]
    )
    for spec in (polite, stubborn):
        await driver.create(spec)
    await asyncio.gather(
        *(asyncio.wait_for(driver.start(s.instance_id), BOOT) for s in (polite, stubborn))
    )
    for spec in (polite, stubborn):
        await wait_for_line(driver, spec.instance_id, "ready", timeout=BOOT)
    st = await driver.stop(polite.instance_id, signal.SIGTERM, 10.0)
    assert (st.exit_code, st.reason) == (42, "exited"), st
    t0 = time.monotonic()
    st = await driver.stop(stubborn.instance_id, signal.SIGTERM, 2.0)
    took = time.monotonic() - t0
    assert (st.exit_code, st.reason, st.signal) == (137, "killed", 9), st
    assert 1.5 < took < 15, took
    lines = await collect(driver, polite.instance_id)
    assert "bye" in stdout_of(lines)


@arun
async def test_exec_pipes_tty_and_errors(driver: MicroVMDriver, layers: list[Path]) -> None:
    spec = make_spec(
        layers, argv=["sh", "-c", "echo ready; exec sleep 100000"], user="app", env={"A": "1"}
    )
    await driver.create(spec)
    await asyncio.wait_for(driver.start(spec.instance_id), BOOT)
    await wait_for_line(driver, spec.instance_id, "ready", timeout=BOOT)

    out, err, code = await exec_output(
        driver,
        spec.instance_id,
        ["sh", "-c", "echo $A $B; id -u; echo oops >&2; exit 7"],
        env={"B": "2"},
    )
    assert (out, err, code) == ("1 2\n1000\n", "oops\n", 7)

    proc = await driver.exec(spec.instance_id, ["cat"], tty=False)
    payload = os.urandom(200_000).hex().encode()  # several frames, both ways
    await proc.write(payload)
    out_b, _, code = await asyncio.wait_for(proc.output(), 60)
    assert (len(out_b), code) == (len(payload), 0) and out_b == payload

    tty = await driver.exec(spec.instance_id, ["sh"], tty=True, rows=30, cols=100)
    await tty.write(b"tty; stty size; exit 5\n")
    seen = b""
    while chunk := await asyncio.wait_for(tty.read(), 30):
        seen += chunk
    assert await tty.wait(10) == 5
    text = seen.decode(errors="replace")
    assert "/dev/pts/" in text and "30 100" in text, text
    await tty.resize(10, 20)  # after the end: harmless

    with pytest.raises(UserError, match="no-such-program"):
        await driver.exec(spec.instance_id, ["no-such-program"], tty=False)


@arun
async def test_volumes_persist_and_network_reaches_the_guest(
    driver: MicroVMDriver, layers: list[Path], tmp_path: Path
) -> None:
    image = tmp_path / "vol.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", str(image)], check=True)
    with own_netns() as ns:
        net = NetConfig(
            bridge="cvt9",
            ipv4="10.213.9.2/24",
            ipv6="fd00:c0e:9::2/64",
            gateway4="10.213.9.1",
            gateway6="fd00:c0e:9::1",
            netns=ns,
        )
        spec = make_spec(
            layers,
            argv=[
                "sh",
                "-c",
                "echo kept > /data/file; sync; echo ready; exec httpd -f -p 8080 -h /www",
            ],
            volumes=[VolumeMount(host_path=image, container_path="/data")],
            network=net,
        )
        await driver.create(spec)
        await asyncio.wait_for(driver.start(spec.instance_id), BOOT)
        await wait_for_line(driver, spec.instance_id, "ready", timeout=BOOT)
        for url in ("http://10.213.9.2:8080/index.html", "http://[fd00:c0e:9::2]:8080/index.html"):
            fetch = (
                "import urllib.request,time\n"
                "for i in range(100):\n"
                "    try:\n"
                f"        r = urllib.request.urlopen({url!r}, timeout=3)\n"
                "        print(r.read().decode(), end=''); break\n"
                "    except OSError: time.sleep(0.2)\n"
            )
            res = await asyncio.to_thread(in_netns, ns, fetch, 60.0)
            assert res.stdout == "hello from the sandbox\n", res
        # the guest sees its own disks only, no host file system
        out, _, _ = await exec_output(driver, spec.instance_id, ["cat", "/proc/mounts"])
        devices = sorted({ln.split()[0] for ln in out.splitlines() if ln.startswith("/dev/")})
        assert devices == ["/dev/vda", "/dev/vdb"], out
        fstypes = {ln.split()[2] for ln in out.splitlines()}
        assert not fstypes & {"9p", "virtiofs", "nfs"}, fstypes
        marker = tmp_path / "host-secret"
        marker.write_text("host only")
        _, _, code = await exec_output(driver, spec.instance_id, ["cat", str(marker)])
        assert code != 0
        await driver.stop(spec.instance_id, signal.SIGTERM, 5.0)
    await driver.destroy(spec.instance_id)
    dump = subprocess.run(
        ["debugfs", "-R", "cat /data/file", str(image)], capture_output=True, text=True
    )
    assert dump.stdout == "kept\n", dump


@arun
async def test_out_of_memory_in_the_guest_is_reported(
    driver: MicroVMDriver, layers: list[Path]
) -> None:
    spec = make_spec(
        layers,
        argv=["sh", "-c", "echo ready; x=a; while :; do x=$x$x; done"],
        memory_mb=96,
    )
    await driver.create(spec)
    await asyncio.wait_for(driver.start(spec.instance_id), BOOT)
    await collect(driver, spec.instance_id, timeout=BOOT)
    st = await driver.status(spec.instance_id)
    assert (st.reason, st.exit_code) == ("oom", 137), st


@arun
async def test_panic_kill_and_hang_are_noticed(driver: MicroVMDriver, layers: list[Path]) -> None:
    panic = make_spec(
        layers, argv=["sh", "-c", "echo ready; sleep 1; echo c > /proc/sysrq-trigger"]
    )
    killed = make_spec(layers, argv=["sh", "-c", "echo ready; exec sleep 100000"])
    hung = make_spec(layers, argv=["sh", "-c", "echo ready; exec sleep 100000"])
    specs = (panic, killed, hung)
    for spec in specs:
        await driver.create(spec)
    await asyncio.gather(*(asyncio.wait_for(driver.start(s.instance_id), BOOT) for s in specs))
    for spec in specs:
        await wait_for_line(driver, spec.instance_id, "ready", timeout=BOOT)
    os.kill(qemu_pid(driver, killed.instance_id), signal.SIGKILL)
    os.kill(qemu_pid(driver, hung.instance_id), signal.SIGSTOP)
    for spec in specs:
        await collect(driver, spec.instance_id, timeout=60)
    st = await driver.status(panic.instance_id)
    assert (st.reason, st.exit_code) == ("crashed", None), st
    assert (st.message or "").startswith("guest kernel panic: "), st
    st = await driver.status(killed.instance_id)
    assert st.reason == "crashed" and "signal 9" in (st.message or ""), st
    st = await driver.status(hung.instance_id)
    assert st.reason == "hung", st
    # a crashed instance starts again
    await asyncio.wait_for(driver.start(killed.instance_id), BOOT)
    again = driver.logs(killed.instance_id, after_seq=1, follow=True)
    line = await asyncio.wait_for(anext(again), BOOT)
    assert (line.line, line.seq) == ("ready", 2)
    await again.aclose()


@arun
async def test_adopt_after_the_driver_restarts(driver: MicroVMDriver, layers: list[Path]) -> None:
    spec = make_spec(layers, argv=["sh", "-c", "echo ready; exec sleep 100000"])
    await driver.create(spec)
    await asyncio.wait_for(driver.start(spec.instance_id), BOOT)
    await wait_for_line(driver, spec.instance_id, "ready", timeout=BOOT)
    again = MicroVMDriver(driver.state_dir, cgroup_root=driver.cgroup_root)
    assert await again.adopt() == [spec.instance_id]
    out, _, code = await exec_output(again, spec.instance_id, ["echo", "still here"])
    assert (out, code) == ("still here\n", 0)
    st = await again.stop(spec.instance_id, signal.SIGTERM, 5.0)
    assert st.state == "exited"


@arun
async def test_bad_specs_are_refused_before_anything_is_made(
    driver: MicroVMDriver, layers: list[Path], tmp_path: Path
) -> None:
    bad = [
        (make_spec(layers, argv=["true"], memory_mb=32), "too small"),
        (
            make_spec(
                layers,
                argv=["true"],
                volumes=[VolumeMount(host_path=tmp_path, container_path="/d")],
            ),
            "not a disk image",
        ),
        (
            make_spec(
                layers,
                argv=["true"],
                volumes=[VolumeMount(host_path=tmp_path / "x.img", container_path="/proc")],
            ),
            "reserved",
        ),
        (make_spec(layers, argv=[""]), "empty command"),
        (make_spec(layers, argv=["true"], env={"A": "b\0c"}), "NUL"),
        (make_spec(layers, argv=["true"], hostname="-bad-"), "bad hostname"),
        (make_spec(layers, argv=["true"], secrets_json=b"{nope"), "not JSON"),
    ]
    for spec, needle in bad:
        with pytest.raises(UserError, match=needle):
            await driver.create(spec)
        assert not driver.instance_dir(spec.instance_id).exists()
    with pytest.raises(UserError, match="bad instance id"):
        await driver.status("../etc")
