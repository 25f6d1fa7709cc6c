"""Wakes long-polls and controllers when the store's revision moves.

Writes happen on worker threads; ``bump`` is thread-safe and hands the new revision to the
event loop. Waiters also re-check on a short timer, so writes made by other processes
(another server replica on the same PostgreSQL) are seen within that interval.

A burst of commits costs one call into the event loop, not one per commit: ``bump`` only
schedules a wake-up when none is pending, and the wake-up takes the newest revision. Each
waiter waits on a future of its own, resolved by the wake-up (no lock every woken waiter
must take again in turn, as with ``asyncio.Condition.notify_all``).
"""

from __future__ import annotations

import asyncio
import threading


class RevisionNotifier:
    def __init__(self) -> None:
        self.revision = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._latest = 0  # the newest revision bumped, not yet handed to the loop
        self._scheduled = False
        self._waiters: set[asyncio.Future[None]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def bump(self, revision: int) -> None:
        """Thread-safe: note a committed revision and wake waiters."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.revision = max(self.revision, revision)
            return
        with self._lock:
            self._latest = max(self._latest, revision)
            if self._scheduled:
                return  # the wake-up already on its way takes this revision too
            self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # loop closed between the check and the call
            with self._lock:
                self._scheduled = False

    def _wake(self) -> None:
        with self._lock:
            self._scheduled = False
            latest = self._latest
        if latest <= self.revision:
            return
        self.revision = latest
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, after: int, timeout: float) -> int:
        """Return once the revision passes *after*, or after *timeout* seconds."""
        if self._loop is None:
            if self.revision <= after:
                await asyncio.sleep(min(timeout, 0.2))
            return self.revision
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while self.revision <= after:
                    fut: asyncio.Future[None] = loop.create_future()
                    self._waiters.add(fut)
                    try:
                        await fut
                    finally:
                        self._waiters.discard(fut)
        except TimeoutError:
            pass
        return self.revision
