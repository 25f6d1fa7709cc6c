"""Wakes long-polls and controllers when the store's revision moves.

Writes happen on worker threads; ``bump`` is thread-safe and hands the new revision to the
event loop. Waiters also re-check on a short timer, so writes made by other processes
(another server replica on the same PostgreSQL) are seen within that interval.
"""

from __future__ import annotations

import asyncio


class RevisionNotifier:
    def __init__(self) -> None:
        self.revision = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond: asyncio.Condition | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cond = asyncio.Condition()

    def bump(self, revision: int) -> None:
        """Thread-safe: note a committed revision and wake waiters."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.revision = max(self.revision, revision)
            return
        try:
            loop.call_soon_threadsafe(self._bump, revision)
        except RuntimeError:  # loop closed between the check and the call
            pass

    def _bump(self, revision: int) -> None:
        self.revision = max(self.revision, revision)
        cond = self._cond
        if cond is None:
            return

        async def _notify() -> None:
            async with cond:
                cond.notify_all()

        task = asyncio.ensure_future(_notify())
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)

    async def wait(self, after: int, timeout: float) -> int:
        """Return once the revision passes *after*, or after *timeout* seconds."""
        cond = self._cond
        if cond is None or self.revision > after:
            if cond is None:
                await asyncio.sleep(min(timeout, 0.2))
            return self.revision
        try:
            async with cond:
                await asyncio.wait_for(
                    cond.wait_for(lambda: self.revision > after), timeout=timeout
                )
        except TimeoutError:
            pass
        return self.revision


_PENDING: set[asyncio.Future[None]] = set()
