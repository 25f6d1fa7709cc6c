"""Writes that many requests bring, done together: what agents report about their instances.

500 agents report at once while 10,000 instances start. A request that held a worker thread
while its write waited for the store's write lock capped the reports in flight at the
threads there were (16): the others queued for a thread, behind the controllers' turns,
for longer than the agents' 90-second timeout. Here a request parks its write and awaits
a future, no thread held; one thread of the batcher's own writes whatever is parked (up to
``batch`` requests) in one transaction, each in a savepoint (``Store.write_each``), then
the next. A write that raises fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from anyio import CapacityLimiter, to_thread

from cove.store import Store, Tx

log = logging.getLogger("cove.api.batch")
T = TypeVar("T")


class WriteBatcher:
    def __init__(self, store: Store, *, batch: int = 64) -> None:
        self.store = store
        self.batch = batch
        self.limiter = CapacityLimiter(1)
        self.pending: list[tuple[Callable[[Tx], Any], asyncio.Future[Any]]] = []
        self.writer: asyncio.Task[None] | None = None

    async def write(self, fn: Callable[[Tx], T]) -> T:
        """``fn(tx)``, written with the other requests' writes parked meanwhile."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.pending.append((fn, fut))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write_pending())
        return await fut

    async def _write_pending(self) -> None:
        while self.pending:
            todo, self.pending = self.pending[: self.batch], self.pending[self.batch :]
            try:
                done = await to_thread.run_sync(
                    self.store.write_each, [fn for fn, _ in todo], limiter=self.limiter
                )
            except BaseException as exc:  # cancelled (the server stops), or a bug here
                for _, fut in todo:
                    if not fut.done():
                        fut.set_exception(
                            exc if isinstance(exc, Exception) else RuntimeError("stopped")
                        )
                if not isinstance(exc, Exception):
                    raise
                log.exception("writing a batch of reports failed")
                continue
            for (_, fut), (result, error) in zip(todo, done, strict=True):
                if fut.done():  # the request went away meanwhile
                    continue
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
