"""Who wakes on a write: the notifier's waiters (a burst of commits is one wake-up), the
controllers (filtered on the change, children's writes, sweeps instead of polling keys)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

from cove.control.controllers import GarbageCollector
from cove.control.manager import Manager
from cove.control.rollout import RolloutController, Scheduler
from cove.store.notify import RevisionNotifier


def test_waiters_wake_on_a_newer_revision_and_time_out_otherwise() -> None:
    async def run() -> tuple[int, int, float]:
        n = RevisionNotifier()
        n.bind(asyncio.get_running_loop())
        n.revision = 5
        assert await n.wait(4, 1.0) == 5  # already past: no wait at all
        t0 = time.monotonic()
        assert await n.wait(5, 0.2) == 5  # nothing new: the timeout
        waited = time.monotonic() - t0
        waiter = asyncio.create_task(n.wait(5, 5.0))
        await asyncio.sleep(0.05)
        n.bump(5)  # not newer: no wake-up
        await asyncio.sleep(0.05)
        assert not waiter.done()
        threading.Thread(target=n.bump, args=(7,)).start()  # from a writer's thread
        got = await asyncio.wait_for(waiter, 2.0)
        late = asyncio.create_task(n.wait(8, 5.0))  # waits past a revision not reached yet
        n.bump(8)
        await asyncio.sleep(0.05)
        assert not late.done()
        n.bump(9)
        return got, await asyncio.wait_for(late, 2.0), waited

    got, late, waited = asyncio.run(run())
    assert got == 7 and late == 9
    assert 0.15 <= waited < 1.0


def test_a_burst_of_commits_is_one_call_into_the_loop() -> None:
    class Loop:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def is_closed(self) -> bool:
            return False

        def call_soon_threadsafe(self, fn: Any) -> None:
            self.calls.append(fn)

    loop = Loop()
    n = RevisionNotifier()
    n.bind(loop)  # type: ignore[arg-type]
    for rev in range(1, 101):
        n.bump(rev)
    assert len(loop.calls) == 1
    loop.calls[0]()
    assert n.revision == 100  # the one wake-up took the newest
    n.bump(101)
    assert len(loop.calls) == 2


def _change(**kw: Any) -> dict[str, Any]:
    base = {"id": "ins_1", "kind": "instance", "parent_id": "wl_1", "revision": 1}
    base.update({"deleting": False, "node": None, "desired": "running", "state": "pending"})
    base.update(kw)
    return base


def test_the_scheduler_and_the_collector_skip_writes_they_have_nothing_to_do_for() -> None:
    wants = Scheduler.wants
    assert wants(_change())  # waiting for a node
    assert not wants(_change(node="node_1", state="running"))  # a placed instance's report
    assert not wants(_change(node="node_1", desired="stopped", state="stopping"))
    assert wants(_change(node="node_1", desired="stopped", state="destroyed"))  # to remove
    assert wants(_change(node=None, desired="stopped"))  # stopped before it was placed
    wakes = RolloutController.wants_child  # the workload's rollout, for its instances
    for state in ("pending", "placed", "preparing", "starting"):
        assert not wakes(_change(node="node_1", state=state)), state
    assert wakes(_change(node="node_1", state="running"))  # Ready or not: counts may move
    assert wakes(_change(node="node_1", state="failed"))
    assert wakes(_change(node="node_1", state="starting", desired="stopped"))
    assert wakes(_change(node="node_1", state="starting", deleting=True))
    assert wakes(_change(kind="workload", state=None))
    assert not GarbageCollector.wants(_change(node="node_1"))
    assert GarbageCollector.wants(_change(node="node_1", deleting=True))


class _Store:
    def __init__(self, changes: list[dict[str, Any]]) -> None:
        self.changes = changes

    def head_revision(self) -> int:
        return 0

    def ids_of_kind(self, kind: str) -> list[str]:
        return []

    def changes_since(self, revision: int, limit: int = 1000) -> list[dict[str, Any]]:
        return [c for c in self.changes if c["revision"] > revision]


class _Recorder:
    def __init__(self, name: str, kinds: tuple[str, ...], **attrs: Any) -> None:
        self.name, self.kinds = name, kinds
        self.keys: list[str] = []
        for k, v in attrs.items():
            setattr(self, k, v)

    def reconcile(self, key: str) -> float | None:
        self.keys.append(key)
        return None


def _run(store: _Store, controllers: list[Any], seconds: float) -> None:
    async def run() -> None:
        notifier = RevisionNotifier()
        notifier.bind(asyncio.get_running_loop())
        m = Manager(store, controllers, notifier, resync=3600)  # type: ignore[arg-type]
        task = asyncio.create_task(m.run())
        await asyncio.sleep(seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_the_manager_filters_changes_children_and_sweeps() -> None:
    store = _Store(
        [
            _change(id="ins_a", revision=1, node="node_1", state="running"),
            _change(id="ins_b", revision=2),
            _change(id="ins_c", revision=3, node="node_1", deleting=True),
        ]
    )
    every = _Recorder("every", ("instance", "workload"))
    picky = _Recorder(
        "picky",
        ("instance", "workload"),
        wants=lambda ch: ch["node"] is None,
        wants_child=lambda ch: False,
    )
    sweeps: list[float] = []

    def sweep() -> list[str]:
        sweeps.append(time.monotonic())
        return ["node_x"]

    sweeper = _Recorder("sweeper", ("node",), sweep=sweep, sweep_every=0.3)
    _run(store, [every, picky, sweeper], 1.2)
    assert set(every.keys) == {"ins_a", "ins_b", "ins_c", "wl_1"}
    assert picky.keys == ["ins_b"]  # no parent wake-up, no placed or deleted instance
    # a sweep at start and every 0.3 s (the watch looks at least once a second)
    assert 2 <= len(sweeps) <= 6, sweeps
    assert set(sweeper.keys) == {"node_x"}


def test_a_node_view_wakes_only_the_nodes_whose_value_changed() -> None:
    from anyio import CapacityLimiter

    from cove.api.views import NodeView

    state = {f"node_{i}": i for i in range(500)}
    reads: list[int] = []

    def read() -> dict[str, int]:
        reads.append(1)
        return dict(state)

    async def run() -> tuple[set[str], int, int]:
        n = RevisionNotifier()
        n.bind(asyncio.get_running_loop())
        view = NodeView(n, read, CapacityLimiter(2), every=0.1)
        have = await view.now()
        woken: set[str] = set()

        async def wait(node: str) -> None:
            await view.changed(node, view.fingerprint(node, have), 3.0)
            woken.add(node)

        waiters = [asyncio.create_task(wait(node)) for node in state]
        await asyncio.sleep(0.2)
        before = len(reads)
        for rev in range(2, 52):  # 50 writes that change nothing any node sees
            n.bump(rev)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)
        quiet = len(woken)
        state["node_7"] = -1  # one node's value changes
        n.bump(60)
        await asyncio.sleep(0.5)
        changed = set(woken)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        return changed, quiet, len(reads) - before

    changed, quiet, extra_reads = asyncio.run(run())
    assert quiet == 0
    assert changed == {"node_7"}
    # read again at most every 0.1 s while the revision moved, not once per write or waiter
    assert 1 <= extra_reads <= 12, extra_reads


def test_a_node_view_read_by_a_long_polls_thread_still_wakes_the_waiters() -> None:
    """The view can be read again by a long-poll's own thread while the refresher waits for
    it (the refresher then finds the lock taken and the view as it was). The waiters must
    still be woken by that newer view, not only at the next write (the CI run where a
    rolling deploy's old instance was stopped while the edge still sent it connections)."""
    from anyio import CapacityLimiter

    from cove.api.views import NodeView

    state = {"node_1": 1, "node_2": 2}
    gate = threading.Event()
    gate.set()

    def read() -> dict[str, int]:
        gate.wait(5)
        return dict(state)

    async def run() -> tuple[float | None, bool]:
        n = RevisionNotifier()
        n.bind(asyncio.get_running_loop())
        limiter = CapacityLimiter(1)
        view = NodeView(n, read, limiter, every=0.05)
        have = view.fingerprint("node_1", await view.now())
        t0 = time.monotonic()
        woke: list[float] = []

        async def wait() -> None:
            await view.changed("node_1", have, 3.0)
            woke.append(time.monotonic() - t0)

        waiter = asyncio.create_task(wait())
        await asyncio.sleep(0.1)
        await limiter.acquire()  # the refresher's read waits for a thread
        gate.clear()  # and the next read takes a while
        state["node_1"] = -1
        n.bump(5)
        await asyncio.sleep(0.05)
        # a long-poll's own thread reads the view meanwhile
        reader = threading.Thread(target=view.current)
        reader.start()
        for _ in range(1000):
            if view.lock.locked():
                break
            await asyncio.sleep(0.001)
        limiter.release()  # the refresher finds the lock taken and the view as it was
        await asyncio.sleep(0.3)
        gate.set()
        await asyncio.to_thread(reader.join, 5)
        await asyncio.wait_for(waiter, 4.0)
        # a waiter that comes after the view moved returns at once
        t1 = time.monotonic()
        await view.changed("node_2", view.fingerprint("node_2", {"node_2": 0}), 3.0)
        return (woke[0] if woke else None), time.monotonic() - t1 < 0.5

    woke_after, late_waiter_returned = asyncio.run(run())
    assert woke_after is not None and woke_after < 1.5, woke_after
    assert late_waiter_returned
