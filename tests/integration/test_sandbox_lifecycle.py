"""Sandbox driver: running programs, logs, status, limits, stop semantics (real bwrap)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
from pathlib import Path

import pytest

from cove.errors import Conflict, NotFound, Permanent, UserError
from cove.runtime import InstanceStatus, SandboxDriver, VolumeMount
from cove.runtime.cgroups import Cgroups
from tests.integration.test_sandbox_support import (
    arun,
    collect,
    driver,
    layers,
    make_spec,
    requires_sandbox,
    run_to_end,
    stdout_of,
    wait_for_line,
)

__all__ = ["driver", "layers"]  # fixtures, re-exported for pytest
pytestmark = requires_sandbox


@arun
async def test_program_output_is_logged_with_seq_ts_and_stream(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    spec = make_spec(
        layers,
        argv=["sh", "-c", "echo one; echo two >&2; echo three; printf 'no newline'; exit 3"],
    )
    st, lines = await run_to_end(driver, spec)
    assert (st.state, st.exit_code, st.reason) == ("exited", 3, "exited")
    assert st.started_at and st.finished_at and st.started_at <= st.finished_at
    by_stream = {(x.stream, x.line) for x in lines}
    assert by_stream == {
        ("stdout", "one"),
        ("stderr", "two"),
        ("stdout", "three"),
        ("stdout", "no newline"),
    }
    assert [x.seq for x in lines] == [1, 2, 3, 4]
    for x in lines:
        parsed = dt.datetime.strptime(x.ts, "%Y-%m-%dT%H:%M:%S.%fZ")
        assert abs(dt.datetime.utcnow() - parsed) < dt.timedelta(minutes=1)
    # resume after a seq; a non-follow read ends at the end of the log
    rest = [x async for x in driver.logs(spec.instance_id, after_seq=2)]
    assert [x.seq for x in rest] == [3, 4]


@arun
async def test_env_workdir_hostname_and_user_are_honoured(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    os.environ["COVE_TEST_AGENT_SECRET"] = "agent-only"  # the agent's env must not leak
    script = "id -u; id -g; id -G; pwd; hostname; env | sort; tr '\\0' '\\n' </proc/1/environ"
    spec = make_spec(
        layers,
        argv=["sh", "-c", script],
        env={"GREETING": "hi there", "EMPTY": ""},
        workdir="/home/app",
        user="app",
        hostname="my-host",
    )
    try:
        st, lines = await run_to_end(driver, spec)
    finally:
        del os.environ["COVE_TEST_AGENT_SECRET"]
    assert st.exit_code == 0, lines
    out = stdout_of(lines)
    assert out[:5] == ["1000", "1000", "1000 50", "/home/app", "my-host"]
    assert out[-1] == "PATH=/usr/sbin:/usr/bin:/sbin:/bin"  # bwrap's own (pid 1) environment
    env = dict(line.split("=", 1) for line in out[5:-1])
    # exactly the spec's env, PATH defaulted; PWD comes from bwrap, SHLVL from sh itself
    assert set(env) == {"GREETING", "EMPTY", "PATH", "PWD", "SHLVL"}
    assert env["GREETING"] == "hi there" and env["EMPTY"] == ""
    assert env["PATH"].startswith("/usr/local/sbin:")


@arun
async def test_numeric_user_and_root_user(driver: SandboxDriver, layers: list[Path]) -> None:
    numeric = make_spec(layers, argv=["sh", "-c", "id -u; id -g"], user="4242:4343")
    root = make_spec(layers, argv=["sh", "-c", "id -u; id -g"])
    (_, l1), (_, l2) = await asyncio.gather(run_to_end(driver, numeric), run_to_end(driver, root))
    assert stdout_of(l1) == ["4242", "4343"]
    assert stdout_of(l2) == ["0", "0"]


@arun
async def test_unknown_user_name_is_refused_at_create(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    spec = make_spec(layers, argv=["true"], user="nobody-here")
    with pytest.raises(UserError, match="not in the image's /etc/passwd"):
        await driver.create(spec)
    assert not driver.instance_dir(spec.instance_id).exists()
    assert not any(p.exists() for p in driver.cgroup_paths(spec.instance_id).values())


@arun
async def test_secrets_file_content_mode_and_owner(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    secret = b'{"bundle": "sec_1", "version": 3, "values": {"DB_PASSWORD": "s3cr3t"}}'
    spec = make_spec(
        layers,
        argv=["sh", "-c", "stat -c '%a %u %g' /run/cove/secrets.json; cat /run/cove/secrets.json"],
        user="app",
        secrets_json=secret,
    )
    await driver.create(spec)
    await driver.start(spec.instance_id)
    lines = await collect(driver, spec.instance_id)
    assert stdout_of(lines) == ["400 1000 1000", secret.decode()]
    # the secret lives in the sandbox's memory, not in the instance's writable layer
    upper = driver.instance_dir(spec.instance_id) / "rootfs" / "upper"
    assert b"s3cr3t" not in b"".join(
        p.read_bytes() for p in upper.rglob("*") if p.is_file() and not p.is_symlink()
    )


@arun
async def test_root_in_the_sandbox_has_no_capabilities(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    script = (
        "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status;"
        "unshare -U true && echo USERNS-OK;"
        "mount -t tmpfs none /mnt && echo MOUNT-OK;"
        "echo x > /proc/sys/kernel/hostname && echo SYSCTL-OK;"
        "echo 1 > /proc/sys/vm/drop_caches && echo GLOBAL-SYSCTL-OK;"
        "touch /proc/sysrq-trigger && echo SYSRQ-OK;"
        "cat /proc/self/uid_map;"
        "chown 1000 /bin/busybox && echo CHOWN-OK;"
        "echo end"
    )
    spec = make_spec(layers, argv=["sh", "-c", script])  # uid 0 inside
    _, lines = await run_to_end(driver, spec)
    out = stdout_of(lines)
    status = dict(line.split(":\t") for line in out if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[cap] == "0000000000000000", (cap, status)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # filter mode
    assert not any(x.endswith("-OK") for x in out), out
    assert out[-1] == "end"
    # the image's root is an unprivileged host id of the instance's own block
    inside, host, count = (int(x) for x in out[-2].split())
    assert (inside, count) == (0, 65536) and host >= 1 << 30


@arun
async def test_crash_and_signal_exit_are_recorded(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    segv = make_spec(layers, argv=["sh", "-c", "kill -SEGV $$"])
    code = make_spec(layers, argv=["sh", "-c", "exit 42"])
    (st1, _), (st2, _) = await asyncio.gather(run_to_end(driver, segv), run_to_end(driver, code))
    assert (st1.state, st1.exit_code, st1.reason, st1.signal) == ("exited", 139, "signal", 11)
    assert (st2.exit_code, st2.reason, st2.signal) == (42, "exited", None)


@arun
async def test_memory_limit_kills_with_reason_oom(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    # dd's 96 MiB buffer, filled from /dev/zero, cannot fit in 32 MiB
    spec = make_spec(
        layers, argv=["dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1"], memory_mb=32
    )
    await driver.create(spec)
    limits = Cgroups(driver.cgroup_root, spec.instance_id).limits()
    assert limits["memory.limit_in_bytes"] == str(32 * 1024 * 1024)
    await driver.start(spec.instance_id)
    await collect(driver, spec.instance_id)
    st = await driver.status(spec.instance_id)
    assert (st.exit_code, st.reason) == (137, "oom")


@arun
async def test_pids_limit_is_enforced(driver: SandboxDriver, layers: list[Path]) -> None:
    script = "for i in $(seq 1 30); do sleep 5 & done; echo all-forked"
    spec = make_spec(layers, argv=["sh", "-c", script], pids_max=8, cpu_millis=250)
    await driver.create(spec)
    limits = Cgroups(driver.cgroup_root, spec.instance_id).limits()
    assert limits["pids.max"] == "8"
    assert (limits["cpu.cfs_quota_us"], limits["cpu.cfs_period_us"]) == ("25000", "100000")
    await driver.start(spec.instance_id)
    lines = await collect(driver, spec.instance_id)
    assert any("can't fork" in x.line for x in lines if x.stream == "stderr"), lines
    assert "all-forked" not in stdout_of(lines)


@arun
async def test_stop_graceful_term_vs_ignored_term_vs_default(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    graceful = make_spec(
        layers,
        argv=["sh", "-c", "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done"],
    )
    stubborn = make_spec(
        layers, argv=["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]
    )
    plain = make_spec(layers, argv=["sh", "-c", "echo ready; exec sleep 1000"])
    specs = (graceful, stubborn, plain)
    for spec in specs:
        await driver.create(spec)
        await driver.start(spec.instance_id)
    for spec in specs:
        await wait_for_line(driver, spec.instance_id, "ready")

    async def timed_stop(iid: str) -> tuple[float, InstanceStatus]:
        t0 = time.monotonic()
        st = await driver.stop(iid, signal.SIGTERM, timeout=1.0)
        return time.monotonic() - t0, st

    (t1, s1), (t2, s2), (t3, s3) = await asyncio.gather(*(timed_stop(s.instance_id) for s in specs))
    assert (s1.state, s1.exit_code, s1.reason) == ("exited", 0, "exited")
    assert "bye" in stdout_of(await collect(driver, graceful.instance_id))
    assert (s2.exit_code, s2.reason) == (137, "killed")
    assert 1.0 <= t2 < 5.0
    assert (s3.exit_code, s3.reason, s3.signal) == (143, "signal", 15)
    assert t1 < t2 and t3 < t2  # the graceful ones did not wait for the deadline
    # stopping again is harmless and returns the recorded end
    again = await driver.stop(stubborn.instance_id)
    assert again.reason == "killed"


@arun
async def test_restart_after_exit_continues_the_log(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    spec = make_spec(layers, argv=["sh", "-c", "echo run"])
    _, first = await run_to_end(driver, spec)
    await driver.start(spec.instance_id)  # the agent's restart policy: start it again
    second = await collect(driver, spec.instance_id, after_seq=first[-1].seq)
    assert [x.line for x in second] == ["run"]
    assert second[0].seq == first[-1].seq + 1
    assert (await driver.status(spec.instance_id)).state == "exited"


@arun
async def test_create_is_idempotent_and_start_of_a_running_instance_is_a_no_op(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    spec = make_spec(layers, argv=["sh", "-c", "echo up; exec sleep 1000"])
    await driver.create(spec)
    await driver.create(spec)
    assert (await driver.status(spec.instance_id)).state == "created"
    with pytest.raises(Conflict, match="not running"):
        await driver.exec(spec.instance_id, ["true"], tty=False)
    await driver.start(spec.instance_id)
    pid = (await driver.status(spec.instance_id)).pid
    await driver.start(spec.instance_id)
    assert (await driver.status(spec.instance_id)).pid == pid
    changed = make_spec(layers, instance_id=spec.instance_id, argv=["true"])
    with pytest.raises(Conflict):
        await driver.create(changed)
    await driver.destroy(spec.instance_id)
    await driver.destroy(spec.instance_id)  # idempotent
    with pytest.raises(NotFound):
        await driver.status(spec.instance_id)


@arun
async def test_volumes_read_write_and_read_only(
    driver: SandboxDriver, layers: list[Path], tmp_path: Path
) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "data.txt").write_text("read me\n")
    spec = make_spec(
        layers,
        argv=["sh", "-c", "echo hi > /data/out.txt; cat /conf/data.txt; echo x > /conf/y || true"],
        volumes=[VolumeMount(rw, "/data"), VolumeMount(ro, "/conf", read_only=True)],
    )
    _, lines = await run_to_end(driver, spec)
    assert (rw / "out.txt").read_text() == "hi\n"
    assert "read me" in stdout_of(lines)
    assert not (ro / "y").exists()
    assert any("Read-only file system" in x.line for x in lines if x.stream == "stderr")


@arun
async def test_a_missing_program_is_reported_in_the_log(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    spec = make_spec(layers, argv=["/no/such/program", "arg"])
    st, lines = await run_to_end(driver, spec)
    assert (st.state, st.exit_code, st.reason) == ("exited", 1, "exited")
    assert any(
        "/no/such/program" in x.line and "No such file" in x.line
        for x in lines
        if x.stream == "stderr"
    ), lines


@arun
async def test_a_start_failure_is_a_clear_error(driver: SandboxDriver, layers: list[Path]) -> None:
    broken = SandboxDriver(driver.state_dir, driver.cgroup_root, bwrap="/nonexistent/bwrap")
    spec = make_spec(layers, argv=["true"])
    await broken.create(spec)
    with pytest.raises(Permanent, match=r"failed to start.*nonexistent/bwrap") as info:
        await broken.start(spec.instance_id)
    assert info.value.code == "start_failed"
    st = await broken.status(spec.instance_id)
    assert st.state == "exited" and st.message and "nonexistent" in st.message
