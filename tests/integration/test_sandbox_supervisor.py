"""The supervisor outlives the agent; a new driver adopts it; destroy leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cove.runtime import NetConfig, SandboxDriver, VolumeMount
from cove.runtime._util import proc_starttime
from cove.runtime.network import host_ifname
from cove.runtime.rootfs import mount_points
from tests.integration.test_sandbox_support import (
    arun,
    collect,
    driver,
    exec_output,
    layers,
    make_spec,
    netns_links,
    own_netns,
    poll_until,
    requires_sandbox,
    stdout_of,
    wait_for_line,
)

__all__ = ["driver", "layers"]
pytestmark = requires_sandbox

FAKE_AGENT = """
import asyncio, json, sys
from pathlib import Path
from cove.runtime import InstanceSpec, SandboxDriver

async def main() -> None:
    drv = SandboxDriver(Path(sys.argv[1]), cgroup_root=sys.argv[2])
    spec = InstanceSpec.from_json(json.loads(sys.argv[3]))
    await drv.create(spec)
    await drv.start(spec.instance_id)
    print("started", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


@arun
async def test_supervisor_survives_the_agent_and_is_adopted(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    spec = make_spec(
        layers, argv=["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.05; done"]
    )
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FAKE_AGENT,
            str(driver.state_dir),
            driver.cgroup_root,
            json.dumps(spec.to_json()),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert agent.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(agent.stdout.readline), 30)
    assert line.strip() == "started"
    before = await driver.status(spec.instance_id)
    assert before.state == "running" and before.pid and before.supervisor_pid
    assert _ppid(before.supervisor_pid) != agent.pid  # not the agent's child any more

    os.kill(agent.pid, signal.SIGKILL)  # the agent dies hard
    agent.wait()
    agent.stdout.close()
    await asyncio.sleep(0.3)

    # "restart the agent": a new driver on the same state dir
    reborn = SandboxDriver(driver.state_dir, cgroup_root=driver.cgroup_root)
    assert await reborn.adopt() == [spec.instance_id]
    after = await reborn.status(spec.instance_id)
    assert (after.state, after.pid, after.supervisor_pid) == (
        "running",
        before.pid,
        before.supervisor_pid,
    )  # not restarted
    seen = [x async for x in reborn.logs(spec.instance_id)]
    await wait_for_line(reborn, spec.instance_id, f"tick {len(seen) + 5}")  # still producing
    out, _, code = await exec_output(reborn, spec.instance_id, ["echo", "exec-ok"])
    assert (out, code) == ("exec-ok\n", 0)

    # SIGTERM to the supervisor is a stop with the default deadline: the shell dies of TERM
    os.kill(before.supervisor_pid, signal.SIGTERM)
    await poll_until(lambda: proc_starttime(before.supervisor_pid) is None, 15)
    final = await reborn.status(spec.instance_id)
    assert (final.state, final.reason, final.exit_code) == ("exited", "signal", 143)
    assert await reborn.adopt() == []


@arun
async def test_a_lost_supervisor_takes_its_sandbox_along(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    spec = make_spec(layers, argv=["sh", "-c", "echo ready; exec sleep 1000"])
    await driver.create(spec)
    await driver.start(spec.instance_id)
    await wait_for_line(driver, spec.instance_id, "ready")
    st = await driver.status(spec.instance_id)
    assert st.pid and st.supervisor_pid
    # a second supervisor for the same instance refuses to start, and changes nothing
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "cove.runtime.supervisor",
            str(driver.instance_dir(spec.instance_id)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1 and "already running" in second.stdout
    assert await driver.status(spec.instance_id) == st
    os.kill(st.supervisor_pid, signal.SIGKILL)
    await poll_until(lambda: proc_starttime(st.pid) is None, 5)  # --die-with-parent
    lost = await driver.status(spec.instance_id)
    assert lost.state == "unknown" and lost.pid is None and lost.message
    assert await driver.adopt() == []


@arun
async def test_destroy_leaves_nothing_behind(
    driver: SandboxDriver, layers: list[Path], tmp_path: Path
) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    with own_netns() as ns:
        spec = make_spec(
            layers,
            argv=["sh", "-c", "echo ready; exec sleep 1000"],
            user="app",
            secrets_json=b'{"values": {}}',
            volumes=[VolumeMount(vol, "/data")],
            network=NetConfig(
                bridge="cvt9",
                ipv4="10.213.9.2/24",
                ipv6="fd00:c0e:9::2/64",
                gateway4="10.213.9.1",
                gateway6="fd00:c0e:9::1",
                netns=ns,
            ),
        )
        await driver.create(spec)
        await driver.start(spec.instance_id)
        await wait_for_line(driver, spec.instance_id, "ready")
        idir = driver.instance_dir(spec.instance_id)
        ident = json.loads((idir / "ident.json").read_text())
        slot = driver.idmap_registry / str((ident["uid_base"] - (1 << 30)) // 65536)
        assert slot.exists()
        assert any(m.startswith(str(idir)) for m in mount_points())
        assert host_ifname(spec.instance_id) in netns_links(ns)
        lingering = await driver.exec(spec.instance_id, ["sleep", "1000"], tty=False)
        st = await driver.status(spec.instance_id)

        await driver.destroy(spec.instance_id)

        assert not any(m.startswith(str(driver.state_dir)) for m in mount_points())
        assert not any(p.exists() for p in driver.cgroup_paths(spec.instance_id).values())
        assert host_ifname(spec.instance_id) not in netns_links(ns)
        assert not idir.exists()
        assert not slot.exists()
        assert st.pid and proc_starttime(st.pid) is None  # gone (or a zombie for init)
        assert st.supervisor_pid and proc_starttime(st.supervisor_pid) is None
        assert await lingering.wait(5) == 128 + signal.SIGKILL
        assert vol.exists()  # volumes belong to the environment, not the instance
        await driver.destroy(spec.instance_id)  # idempotent
        assert await driver.adopt() == []


@arun
async def test_restart_keeps_the_writable_layer(driver: SandboxDriver, layers: list[Path]) -> None:
    spec = make_spec(
        layers, argv=["sh", "-c", "cat /state 2>/dev/null; echo run >> /state"], user="0"
    )
    await driver.create(spec)
    await driver.start(spec.instance_id)
    first = stdout_of(await collect(driver, spec.instance_id))
    await driver.start(spec.instance_id)
    second = stdout_of(await collect(driver, spec.instance_id, after_seq=len(first)))
    assert (first, second) == ([], ["run"])
