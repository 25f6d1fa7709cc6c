"""Views of the store shared by every node's long-poll.

Each agent long-polls for what concerns its node (its assignments, its edge's
configuration). Woken by every write in the cluster and each reading the store for itself,
500 agents cost 500 reads per write, and at 10,000 instances starting that was most of
what the server did. A ``NodeView`` reads what every node would be told in one go, again
at most every ``every`` seconds while the revision moves and someone waits, keeps a value
per node, and wakes only the waiters whose node's value changed.

A view may be older than the store (by up to ``every`` seconds plus a read): what a node is
answered is read fresh, and the fingerprint kept with that answer comes from the view it
was compared with, so a change the view had not seen yet still wakes the node once the
view sees it (never a change missed, at worst one answer more).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from anyio import CapacityLimiter, to_thread

from cove.store.notify import RevisionNotifier

log = logging.getLogger("cove.api.views")
V = TypeVar("V")


class NodeView(Generic[V]):
    def __init__(
        self,
        notifier: RevisionNotifier,
        read: Callable[[], dict[str, V]],
        limiter: CapacityLimiter,
        *,
        every: float = 0.2,
    ) -> None:
        self.notifier = notifier
        self._read = read
        self.limiter = limiter
        self.every = every
        self.lock = threading.Lock()
        self.revision = -1
        self.at = 0.0
        self.by_node: dict[str, V] = {}
        # node -> {future: the fingerprint its waiter has}
        self.waiting: dict[str, dict[asyncio.Future[None], int]] = {}
        self.refresher: asyncio.Task[None] | None = None

    def fingerprint(self, node_id: str, by_node: dict[str, V] | None = None) -> int:
        return hash((by_node if by_node is not None else self.by_node).get(node_id))

    def fresh_enough(self) -> bool:
        """Read again at most every ``every`` seconds, and by one thread at a time."""
        return (
            self.notifier.revision == self.revision
            or time.monotonic() - self.at < self.every
            or self.lock.locked()
        )

    def current(self) -> dict[str, V]:
        """The view, read again first if it is behind and not fresh enough (blocking: run it
        in a thread). A thread that finds another one reading takes the view as it is
        (older is safe, see above) rather than wait, holding a worker thread."""
        if self.fresh_enough() or not self.lock.acquire(blocking=False):
            return self.by_node
        try:
            rev = self.notifier.revision
            if rev != self.revision:
                self.by_node = self._read()
                self.revision, self.at = rev, time.monotonic()
        finally:
            self.lock.release()
        return self.by_node

    async def now(self) -> dict[str, V]:
        """The view, read again in a thread of the view's own when it is behind."""
        if self.fresh_enough():
            return self.by_node
        return await to_thread.run_sync(self.current, limiter=self.limiter)

    async def changed(self, node_id: str, fingerprint: int, timeout: float) -> None:
        """Return when the view shows *node_id* other than *fingerprint*, or after *timeout*
        seconds."""
        if self.fingerprint(node_id) != fingerprint:
            return  # the view moved on after the caller looked at it
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(node_id, {})[fut] = fingerprint
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.create_task(self._refresh())
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            mine = self.waiting.get(node_id, {})
            mine.pop(fut, None)
            if not mine:
                self.waiting.pop(node_id, None)

    def _wake(self, view: dict[str, V]) -> None:
        for node_id, futs in list(self.waiting.items()):
            fp = self.fingerprint(node_id, view)
            for fut, had in list(futs.items()):
                if fp != had and not fut.done():
                    fut.set_result(None)

    async def _refresh(self) -> None:
        """While anyone waits: when the revision moves, read the view again; whenever the
        view is a new one (read here or by a long-poll's own thread), wake the waiters whose
        node changed in it."""
        checked: dict[str, V] | None = None
        while self.waiting:
            try:
                if self.notifier.revision != self.revision:
                    await to_thread.run_sync(self.current, limiter=self.limiter)
                view = self.by_node
                if view is not checked:
                    self._wake(view)
                    checked = view
                if self.notifier.revision != self.revision:
                    # still behind: read too recently, or another thread is reading now
                    await asyncio.sleep(self.every)
                else:
                    await self.notifier.wait(self.revision, 1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading a shared node view failed; retrying")
                await asyncio.sleep(1.0)
