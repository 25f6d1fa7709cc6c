"""Sandbox driver: what an instance can and cannot see or change; exec into it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from cove.errors import UserError
from cove.runtime import SandboxDriver
from tests.integration.test_sandbox_support import (
    arun,
    collect,
    driver,
    exec_output,
    layers,
    make_spec,
    requires_sandbox,
    stdout_of,
    tree_digest,
    wait_for_line,
)

__all__ = ["driver", "layers"]
pytestmark = requires_sandbox


async def _running(driver: SandboxDriver, layers: list[Path], marker: str, **kw: object) -> str:
    script = (
        f"echo {marker} > /tmp/{marker}; touch /{marker}-root-file; echo ready; exec sleep 1000"
    )
    spec = make_spec(layers, argv=["sh", "-c", script], **kw)  # type: ignore[arg-type]
    await driver.create(spec)
    await driver.start(spec.instance_id)
    await wait_for_line(driver, spec.instance_id, "ready")
    return spec.instance_id


@arun
async def test_instances_see_neither_the_host_nor_each_other(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    before = [tree_digest(layer) for layer in layers]
    a, b = await asyncio.gather(
        _running(driver, layers, "alpha"), _running(driver, layers, "bravo", user="app")
    )
    host_hostname = (
        Path("/etc/hostname").read_text().strip() if Path("/etc/hostname").exists() else ""
    )

    _, err, code = await exec_output(driver, a, ["ls", "/root"])
    assert code != 0 and "No such file" in err  # the host's /root is not there
    out, _, code = await exec_output(
        driver, a, ["sh", "-c", "ps -o pid,args; ls /; cat /etc/hostname; ls /tmp"]
    )
    assert "alpha" in out and "bravo" not in out
    assert "image-hostname" in out
    assert not host_hostname or host_hostname not in out.split()
    # only its own processes: bwrap's pid 1, the program, the exec'd shell and ps
    pids = [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(pids) <= 4 and "1" in pids

    ls_b, _, _ = await exec_output(driver, b, ["ls", "/", "/tmp"])
    assert "bravo-root-file" not in ls_b  # uid 1000 cannot write to /
    assert "alpha" not in ls_b
    assert "bravo" in ls_b.split()  # its own /tmp file
    ps_b, _, _ = await exec_output(driver, b, ["ps", "-o", "pid,args"])
    assert "alpha" not in ps_b and "bravo" in ps_b

    # the host's view: the program runs as unprivileged, per-instance host ids
    pid_a = (await driver.status(a)).pid
    pid_b = (await driver.status(b)).pid
    assert pid_a and pid_b
    uids = {}
    for name, pid in (("a", pid_a), ("b", pid_b)):
        line = next(
            x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:")
        )
        uids[name] = int(line.split()[1])
    assert uids["a"] >= 1 << 30 and uids["b"] >= 1 << 30
    assert uids["a"] != uids["b"] - 1000  # different blocks, not just different users

    # writes in an instance (even as its root) never reach the cached layers
    _, _, code = await exec_output(
        driver, a, ["sh", "-c", "echo evil >> /etc/passwd && rm /bin/ls && mkdir /newdir"]
    )
    assert code == 0
    out_b, _, _ = await exec_output(driver, b, ["sh", "-c", "grep -c evil /etc/passwd; ls /bin/ls"])
    assert out_b.split() == ["0", "/bin/ls"]
    assert [tree_digest(layer) for layer in layers] == before
    # ... and land in the instance's own writable layer, with the image's ids on disk
    upper = driver.instance_dir(a) / "rootfs" / "rw" / "upper"
    assert "evil" in (upper / "etc" / "passwd").read_text()
    assert (upper / "etc" / "passwd").stat().st_uid == 0
    assert (upper / "newdir").stat().st_uid == 0


@arun
async def test_exec_without_tty(driver: SandboxDriver, layers: list[Path]) -> None:
    iid = await _running(driver, layers, "exec", user="app", env={"FROM_SPEC": "1"})
    t0 = time.monotonic()
    out, err, code = await exec_output(
        driver,
        iid,
        ["sh", "-c", "echo out; echo err >&2; id -u; echo $FROM_SPEC$EXTRA; exit 7"],
        env={"EXTRA": "x"},
    )
    latency = time.monotonic() - t0
    assert (out.split(), err, code) == (["out", "1000", "1x"], "err\n", 7)
    assert latency < 5.0

    # stdin is the command's stdin
    proc = await driver.exec(iid, ["cat"], tty=False)
    await proc.write(b"line one\nline two\n")
    await proc.close_stdin()
    data = b""
    while chunk := await proc.read():
        data += chunk
    assert data == b"line one\nline two\n"
    assert await proc.wait(5) == 0
    assert await proc.read_stderr() == b""

    # the exec'd process is confined like the program: caps, no_new_privs, seccomp, cgroups
    proc = await driver.exec(
        iid,
        [
            "sh",
            "-c",
            "grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status; sleep 1000",
        ],
        tty=False,
    )
    text = b""
    while text.count(b"\n") < 5:
        text += await asyncio.wait_for(proc.read(), 5)
    fields = dict(line.split(":\t") for line in text.decode().splitlines())
    assert fields == {
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapBnd": "0000000000000000",
        "NoNewPrivs": "1",
        "Seccomp": "2",
    }
    in_cgroups = {
        ctrl: proc.pid in {int(x) for x in (path / "cgroup.procs").read_text().split()}
        for ctrl, path in driver.cgroup_paths(iid).items()
    }
    # the shell forked `sleep`: look for the shell itself
    assert all(in_cgroups.values()), in_cgroups
    await proc.signal(signal.SIGTERM)
    assert await proc.wait(5) == 128 + signal.SIGTERM

    with pytest.raises(UserError, match="no-such-command"):
        await driver.exec(iid, ["no-such-command"], tty=False)


@arun
async def test_exec_with_tty_resize_and_ctrl_c(driver: SandboxDriver, layers: list[Path]) -> None:
    iid = await _running(driver, layers, "tty", user="app")
    proc = await driver.exec(iid, ["sh"], tty=True, rows=24, cols=80)
    assert proc.tty

    pending = bytearray()  # terminal output not yet matched

    async def until(pattern: bytes, timeout: float = 5.0) -> bytes:
        """Output up to and including *pattern* (the rest stays for the next call)."""
        end = time.monotonic() + timeout
        while pattern not in pending:
            chunk = await asyncio.wait_for(proc.read(), max(0.01, end - time.monotonic()))
            assert chunk, f"EOF before {pattern!r}: {bytes(pending)!r}"
            pending.extend(chunk)
        cut = pending.index(pattern) + len(pattern)
        out = bytes(pending[:cut])
        del pending[:cut]
        return out

    await proc.write(b"tty; stty size; id -u; stat -c '%u' $(tty)\n")
    out = await until(b"24 80\r\n")
    assert b"/dev/pts/" in out
    await until(b"1000\r\n1000\r\n")  # the user, and the owner of its terminal
    await proc.resize(40, 120)
    await proc.write(b"stty size\n")
    await until(b"40 120")
    await proc.write(b"echo sleeping; sleep 100\n")
    await until(b"sleeping\r\n")
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await proc.write(b"\x03")  # Ctrl-C, as bytes through the terminal
    await proc.write(b"echo rc=$?\n")
    await until(b"rc=130")
    assert time.monotonic() - t0 < 5
    await proc.write(b"exit 5\n")
    assert await proc.wait(5) == 5
    proc.close()


@arun
async def test_exec_ends_with_the_instance(driver: SandboxDriver, layers: list[Path]) -> None:
    iid = await _running(driver, layers, "ends")
    proc = await driver.exec(iid, ["sleep", "1000"], tty=False)
    st = await driver.stop(iid, signal.SIGKILL, 5)
    assert st.reason == "killed"
    assert await proc.wait(5) == 128 + signal.SIGKILL
    assert not os.path.exists(f"/proc/{proc.pid}")
    await collect(driver, iid)
    assert "ready" in stdout_of(await collect(driver, iid))
