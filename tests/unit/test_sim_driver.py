"""The sim runtime driver: lifecycles without processes, state kept for adoption."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cove import errors
from cove.agent.main import probe_driver
from cove.runtime import InstanceSpec
from cove.runtime.base import LogLine
from cove.runtime.sim import SimDriver


def spec(iid: str = "ins_1", **kw: object) -> InstanceSpec:
    base: dict[str, object] = {
        "instance_id": iid,
        "hostname": "web-1",
        "layers": [],
        "argv": ["sim"],
        "env": {"A": "1"},
    }
    base.update(kw)
    return InstanceSpec(**base)  # type: ignore[arg-type]


async def until_running(d: SimDriver, iid: str, timeout: float = 2.0) -> float:
    t0 = time.monotonic()
    while (await d.status(iid)).state != "running":
        assert time.monotonic() - t0 < timeout, "never reached running"
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


def test_lifecycle_create_start_running_stop_destroy(tmp_path: Path) -> None:
    async def run() -> None:
        d = SimDriver(tmp_path, start_delay=0.1)
        await d.create(spec())
        assert (await d.status("ins_1")).state == "created"
        await d.start("ins_1")
        assert (await d.status("ins_1")).state == "created"  # still "starting"
        took = await until_running(d, "ins_1")
        assert took >= 0.05
        st = await d.status("ins_1")
        assert st.started_at and st.exit_code is None
        ended = await d.stop("ins_1")
        assert (ended.state, ended.exit_code, ended.reason) == ("exited", 0, "exited")
        assert (await d.status("ins_1")).state == "exited"
        await d.start("ins_1")  # a restart plays the lifecycle again
        await until_running(d, "ins_1")
        await d.destroy("ins_1")
        with pytest.raises(errors.NotFound):
            await d.status("ins_1")
        await d.destroy("ins_1")  # idempotent
        assert not list((tmp_path / "instances").iterdir())

    asyncio.run(run())


def test_create_is_idempotent_and_refuses_a_different_spec(tmp_path: Path) -> None:
    async def run() -> None:
        d = SimDriver(tmp_path)
        await d.create(spec())
        await d.create(spec())
        with pytest.raises(errors.Conflict, match="different spec"):
            await d.create(spec(argv=["other"]))

    asyncio.run(run())


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"instance_id": "../etc"}, "bad instance id"),
        ({"hostname": "no spaces"}, "bad hostname"),
        ({"argv": []}, "empty command"),
    ],
)
def test_bad_specs_are_refused_and_nothing_is_written(
    tmp_path: Path, kw: dict[str, object], needle: str
) -> None:
    async def run() -> None:
        d = SimDriver(tmp_path)
        with pytest.raises(errors.UserError, match=needle):
            await d.create(spec(**kw))

    asyncio.run(run())
    assert not (tmp_path / "instances").exists()


def test_unknown_instances_are_not_found(tmp_path: Path) -> None:
    async def run() -> None:
        d = SimDriver(tmp_path)
        for call in (d.start("ins_x"), d.status("ins_x"), d.stop("ins_x")):
            with pytest.raises(errors.NotFound, match="no sim instance"):
                await call

    asyncio.run(run())


def test_logs_are_synthetic_lines_and_follow_ends_with_the_run(tmp_path: Path) -> None:
    async def run() -> None:
        d = SimDriver(tmp_path, start_delay=0)
        await d.create(spec())
        await d.start("ins_1")
        await until_running(d, "ins_1")
        lines = [x async for x in d.logs("ins_1")]
        assert [x.seq for x in lines] == [1, 2]
        assert "sim driver" in lines[0].line and "sim" in lines[1].line
        assert [x.seq for x in [y async for y in d.logs("ins_1", after_seq=1)]] == [2]

        got: list[LogLine] = []

        async def follow() -> None:
            async for x in d.logs("ins_1", follow=True):
                got.append(x)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.05)
        assert not task.done() and len(got) == 2  # follows while it runs
        await d.stop("ins_1")
        await asyncio.wait_for(task, 1.0)  # and ends with the run

    asyncio.run(run())


def test_exec_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    async def run() -> None:
        d = SimDriver(tmp_path)
        await d.create(spec())
        with pytest.raises(errors.UserError) as info:
            await d.exec("ins_1", ["sh"], tty=False)
        assert info.value.code == "exec_unsupported"
        assert "runs no processes" in info.value.detail

    asyncio.run(run())


def test_adopt_finds_running_instances_from_the_state_dir(tmp_path: Path) -> None:
    async def run() -> None:
        d = SimDriver(tmp_path, start_delay=0)
        for iid in ("ins_a", "ins_b", "ins_c"):
            await d.create(spec(iid))
        await d.start("ins_a")
        await until_running(d, "ins_a")
        await d.start("ins_b")
        await until_running(d, "ins_b")
        await d.stop("ins_b")
        # a new driver (an agent restart) knows only what the state dir says
        again = SimDriver(tmp_path)
        assert await again.adopt() == ["ins_a"]
        assert (await again.status("ins_a")).state == "running"
        assert (await again.status("ins_c")).state == "created"

    asyncio.run(run())


def test_probe_driver_sim_needs_nothing_and_says_what_it_is(tmp_path: Path) -> None:
    drv, name, detail = probe_driver("sim", tmp_path)
    assert isinstance(drv, SimDriver) and name == "sim"
    assert "nothing runs" in detail
    with pytest.raises(errors.UserError, match="sim"):
        probe_driver("simulated", tmp_path)
