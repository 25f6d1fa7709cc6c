"""A re-entrant lock that goes to its waiters in the order they came.

The store's write lock is taken by every controller's workers, the agents' report batches
and the API's requests. ``threading.RLock`` lets the thread that just released it take it
again at once (it still holds the GIL; the woken waiter does not run yet), so a controller
that writes in a loop kept it for minutes while 500 agents' reports timed out behind it. Here
the releaser hands the lock to the first waiter directly: no one can barge in.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class FairRLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._waiters: deque[tuple[int, threading.Lock]] = deque()

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None:
                self._owner, self._depth = me, 1
                return
            gate = threading.Lock()
            gate.acquire()
            self._waiters.append((me, gate))
        gate.acquire()  # released by the thread that hands us the lock (owner set already)

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a lock this thread does not hold")
            self._depth -= 1
            if self._depth:
                return
            if not self._waiters:
                self._owner = None
                return
            self._owner, gate = self._waiters.popleft()
            self._depth = 1
        gate.release()

    def __enter__(self) -> FairRLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
