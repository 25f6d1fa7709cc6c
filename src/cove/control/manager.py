"""The reconcile framework (ARCHITECTURE §3).

Event handlers only map a change to a key and enqueue it; workers take a key, run one
reconcile, forget it on success, requeue it with exponential backoff on error. One worker
per key at a time. A reconcile returns ``None`` (done) or seconds after which to look again;
it never sleeps waiting for something.

The manager watches the store's revision: every write after the last seen revision
enqueues the written resource (and its parent) to the controllers of those kinds, and a
periodic resync enqueues everything, so a missed wake-up costs latency, never correctness.
Everything is enqueued at once at start; later passes start every ``resync`` seconds and are
fed to each controller at most ``resync_rate`` keys a second, so with 10,000 instances the
safety net does not crowd out the real work (a pass then takes longer than ``resync``).

Not every write wakes every controller of its kind: a controller may filter the changes
to its own resources (``wants``) and to their children (``wants_child``), or, instead of
keys that poll themselves, name every ``sweep_every``
seconds those that need a look (``sweep``: the node controller, from one read of every
node and heartbeat).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from cove import errors
from cove.model.kinds import kind_by_prefix
from cove.store import Store
from cove.store.notify import RevisionNotifier

log = logging.getLogger("cove.control")
T = TypeVar("T")


class Controller(Protocol):
    name: str
    kinds: tuple[str, ...]

    def reconcile(self, key: str) -> float | None: ...


def wanted(c: Controller, change: dict[str, Any], *, child: bool = False) -> bool:
    """Whether a write (a row of ``Store.changes_since``) wakes *c* for the written resource
    (or, with *child*, for its parent). A controller may say with ``wants(change)`` (and
    ``wants_child(change)``): most writes at scale are instances' status reports, which
    need nothing from the scheduler or the garbage collector, and reading each one back to
    find that out costs more than the filter."""
    wants: Callable[[dict[str, Any]], bool] | None = getattr(
        c, "wants_child" if child else "wants", None
    )
    return wants is None or wants(change)


class WorkQueue:
    """Dedups keys; never hands out a key that a worker holds; delays with a heap."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ready: list[str] = []
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()  # re-added while processing: run again after
        self._delayed: list[tuple[float, str]] = []
        self._failures: dict[str, int] = {}
        self._event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queued) + len(self._delayed)

    def add(self, key: str) -> None:
        if key in self._processing:
            self._dirty.add(key)
            return
        if key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._event.set()

    def add_after(self, key: str, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        heapq.heappush(self._delayed, (self._clock() + delay, key))
        self._event.set()

    def backoff(self, key: str, base: float = 0.05, cap: float = 30.0) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        return float(min(cap, base * (2**n)))

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def _promote(self) -> float | None:
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, key = heapq.heappop(self._delayed)
            self.add(key)
        return self._delayed[0][0] - now if self._delayed else None

    async def get(self) -> str:
        while True:
            wait = self._promote()
            if self._ready:
                key = self._ready.pop(0)
                self._queued.discard(key)
                self._processing.add(key)
                return key
            self._event.clear()
            try:
                await asyncio.wait_for(
                    self._event.wait(), timeout=wait if wait is not None else 1.0
                )
            except TimeoutError:
                pass

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)


class Manager:
    def __init__(
        self,
        store: Store,
        controllers: list[Controller],
        notifier: RevisionNotifier,
        *,
        workers: int = 2,
        resync: float = 30.0,
        resync_rate: float = 50.0,
    ) -> None:
        self.store = store
        self.controllers = controllers
        self.notifier = notifier
        self.workers = workers
        self.resync = resync
        self.resync_rate = resync_rate
        # the keys of the resync pass in progress not handed to each controller yet
        self._resync_left: dict[str, list[str]] = {}
        self.queues = {c.name: WorkQueue() for c in controllers}
        self._by_kind: dict[str, list[Controller]] = {}
        for c in controllers:
            for k in c.kinds:
                self._by_kind.setdefault(k, []).append(c)
        self.revision = 0
        self._pool: ThreadPoolExecutor | None = None
        # target id -> receipts (operations) not yet settled, so a change of the target
        # wakes them at once instead of on their next poll
        self._receipts: dict[str, set[str]] = {}
        self._receipt_target: dict[str, str] = {}

    def enqueue(self, kind: str, key: str, change: dict[str, Any] | None = None) -> None:
        """Wake the controllers of *kind* for *key*; with *change*, only those that want it."""
        for c in self._by_kind.get(kind, []):
            if change is None or wanted(c, change):
                self.queues[c.name].add(key)

    def enqueue_parent(self, kind: str, key: str, change: dict[str, Any]) -> None:
        """A child of *key* was written (*change*): wake the controllers of *kind* that want
        it (``wants_child``)."""
        for c in self._by_kind.get(kind, []):
            if wanted(c, change, child=True):
                self.queues[c.name].add(key)

    async def run(self) -> None:
        """Run until cancelled. Every task started here is owned and awaited here.

        Reconciles run in threads of the manager's own pool, one per worker (and one for
        the watch): in the event loop's default pool (a handful of threads, shared with
        everything else in the process) workers waiting for the store's write lock took
        every thread, and a controller with work to do (the scheduler, under a busy API)
        waited for a thread rather than for the lock."""
        pool = ThreadPoolExecutor(
            max_workers=len(self.controllers) * self.workers + 1,
            thread_name_prefix="cove-control",
        )
        self._pool = pool
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch())
                for c in self.controllers:
                    for i in range(self.workers):
                        tg.create_task(self._work(c, i))
        finally:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _sweep(self, swept: dict[str, float]) -> None:
        """Controllers with a ``sweep()`` (every ``sweep_every`` seconds) name the keys that
        need a look from one read of them all, instead of each key polling itself."""
        for c in self.controllers:
            sweep: Callable[[], list[str]] | None = getattr(c, "sweep", None)
            every = float(getattr(c, "sweep_every", 5.0))
            if sweep is None or time.monotonic() - swept.get(c.name, 0.0) < every:
                continue
            swept[c.name] = time.monotonic()
            for key in await self._in_pool(sweep):
                self.queues[c.name].add(key)

    async def _watch(self) -> None:
        swept: dict[str, float] = {}
        last_resync = 0.0
        fed_at = time.monotonic()
        credit = 0.0  # resync keys each controller may be given now (resync_rate a second)
        while True:
            try:
                passing = any(self._resync_left.values())
                if time.monotonic() - last_resync > self.resync and not passing:
                    first = last_resync == 0.0
                    if first:  # everything is enqueued below: start watching from here
                        self.revision = await self._in_pool(self.store.head_revision)
                    for c in self.controllers:
                        # everything once at start; later only controllers that ask for it
                        if not first and not getattr(c, "periodic_resync", True):
                            continue
                        keys = [
                            rid
                            for kind in c.kinds
                            for rid in await self._in_pool(self.store.ids_of_kind, kind)
                        ]
                        if first:
                            for rid in keys:
                                self.queues[c.name].add(rid)
                        else:
                            self._resync_left[c.name] = keys[::-1]  # popped from the end
                    last_resync = fed_at = time.monotonic()
                now = time.monotonic()
                credit = min(credit + self.resync_rate * (now - fed_at), self.resync_rate)
                fed_at = now
                for name, left in self._resync_left.items():
                    for _ in range(min(int(credit), len(left))):
                        self.queues[name].add(left.pop())
                credit -= int(credit)
                await self._sweep(swept)
                changes = await self._in_pool(self.store.changes_since, self.revision)
                for ch in changes:
                    self.revision = max(self.revision, int(ch["revision"]))
                    self.enqueue(ch["kind"], ch["id"], ch)
                    if ch["kind"] == "operation" and ch["parent_id"]:
                        self._receipts.setdefault(ch["parent_id"], set()).add(ch["id"])
                        self._receipt_target[ch["id"]] = ch["parent_id"]
                    for op_id in self._receipts.get(ch["id"], ()):
                        self.enqueue("operation", op_id)  # a receipt settles with its target
                    if ch["parent_id"]:
                        k = kind_by_prefix(ch["parent_id"].split("_", 1)[0])
                        if k is not None:
                            self.enqueue_parent(k.name, ch["parent_id"], ch)
                if len(changes) >= 1000:
                    continue
            except errors.Transient:
                log.warning("store unavailable; retrying")
            except Exception:
                log.exception("watch failed; retrying")
            await self.notifier.wait(max(self.revision, self.notifier.revision), 1.0)

    async def _work(self, c: Controller, _i: int) -> None:
        q = self.queues[c.name]
        while True:
            key = await q.get()
            try:
                after = await self._in_pool(c.reconcile, key)
            except errors.Conflict:
                q.add_after(key, q.backoff(key, base=0.01, cap=1.0))
            except Exception as exc:
                delay = q.backoff(key)
                log.warning("%s: reconcile %s failed (%s); retry in %.2fs", c.name, key, exc, delay)
                q.add_after(key, delay)
            else:
                q.forget(key)
                if after is not None:
                    q.add_after(key, after)
                elif key in self._receipt_target:  # settled: stop waking it
                    target = self._receipt_target.pop(key)
                    waiting = self._receipts.get(target, set())
                    waiting.discard(key)
                    if not waiting:
                        self._receipts.pop(target, None)
            finally:
                q.done(key)
