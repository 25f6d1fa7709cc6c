"""WorkQueue: dedup, one worker per key, dirty re-add, delays and backoff (asyncio)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from cove.control.manager import WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _get(q: WorkQueue, timeout: float = 0.2) -> str | None:
    try:
        return await asyncio.wait_for(q.get(), timeout)
    except TimeoutError:
        return None


def test_duplicate_adds_are_one_item() -> None:
    async def main() -> None:
        q = WorkQueue()
        for key in ("a", "b", "a", "a", "c", "b"):
            q.add(key)
        assert len(q) == 3
        got = [await _get(q) for _ in range(3)]
        assert got == ["a", "b", "c"]  # first-in, first-out
        assert await _get(q, 0.05) is None

    asyncio.run(main())


def test_a_key_being_processed_is_not_handed_out_again() -> None:
    async def main() -> None:
        q = WorkQueue()
        q.add("k")
        assert await _get(q) == "k"
        q.add("k")  # changed again while a worker holds it
        q.add("other")
        assert await _get(q) == "other"
        assert await _get(q, 0.05) is None  # not while the first worker still holds "k"
        q.done("other")
        q.done("k")  # released: the dirty key runs once more
        assert await _get(q) == "k"
        q.done("k")
        assert await _get(q, 0.05) is None

    asyncio.run(main())


def test_concurrent_workers_never_share_a_key() -> None:
    async def main() -> None:
        q = WorkQueue()
        holding: set[str] = set()
        overlaps: list[str] = []
        runs: dict[str, int] = {}

        async def worker() -> None:
            while True:
                key = await q.get()
                if key in holding:
                    overlaps.append(key)
                holding.add(key)
                runs[key] = runs.get(key, 0) + 1
                await asyncio.sleep(0.001)
                if runs[key] < 3:
                    q.add(key)  # dirty while held
                holding.discard(key)
                q.done(key)

        for i in range(10):
            q.add(f"k{i % 4}")
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(worker()) for _ in range(4)]
            for _ in range(200):
                await asyncio.sleep(0.002)
                if len(q) == 0 and not holding and all(v >= 3 for v in runs.values()):
                    break
            for t in tasks:
                t.cancel()
        assert overlaps == []
        assert runs == {"k0": 3, "k1": 3, "k2": 3, "k3": 3}

    asyncio.run(main())


def test_delayed_items_wait_for_their_time() -> None:
    async def main() -> None:
        clock = FakeClock()
        q = WorkQueue(clock=clock)
        q.add_after("later", 30.0)
        q.add_after("sooner", 10.0)
        assert len(q) == 2
        assert await _get(q, 0.05) is None
        clock.now += 10.0
        assert await _get(q) == "sooner"
        assert await _get(q, 0.05) is None
        clock.now += 20.0
        assert await _get(q) == "later"
        q.add_after("now", 0)  # no delay: ready at once
        assert await _get(q) == "now"

    asyncio.run(main())


def test_delayed_item_already_queued_is_not_duplicated() -> None:
    async def main() -> None:
        clock = FakeClock()
        q = WorkQueue(clock=clock)
        q.add("k")
        q.add_after("k", 1.0)
        clock.now += 1.0
        assert await _get(q) == "k"
        q.done("k")
        assert await _get(q, 0.05) is None

    asyncio.run(main())


def test_a_waiting_getter_wakes_on_add() -> None:
    async def main() -> None:
        q = WorkQueue()
        getter = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        assert not getter.done()
        q.add("x")
        assert await asyncio.wait_for(getter, 0.5) == "x"

    asyncio.run(main())


@pytest.mark.parametrize(("base", "cap"), [(0.05, 30.0), (0.01, 1.0)])
def test_backoff_doubles_up_to_a_cap_and_resets(base: float, cap: float) -> None:
    q = WorkQueue()
    delays = [q.backoff("k", base=base, cap=cap) for _ in range(15)]
    for prev, cur in itertools.pairwise(delays):
        assert cur == min(cap, prev * 2)
    assert delays[0] == base
    assert delays[-1] == cap
    assert q.backoff("other", base=base, cap=cap) == base  # per key
    q.forget("k")
    assert q.backoff("k", base=base, cap=cap) == base
