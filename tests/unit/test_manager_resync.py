"""The manager's resync: everything once at start, then later passes fed to the controllers
at a bounded rate, so a large cluster's safety net does not crowd out the real work."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from cove.control.manager import Manager
from cove.store.notify import RevisionNotifier


class _Store:
    """What the manager's watch reads: 2,000 instances, no changes."""

    def head_revision(self) -> int:
        return 1

    def ids_of_kind(self, kind: str) -> list[str]:
        return [f"ins_{i:05d}" for i in range(2000)] if kind == "instance" else []

    def changes_since(self, revision: int, limit: int = 1000) -> list[dict[str, Any]]:
        return []


class _Counting:
    name = "counting"
    kinds = ("instance",)

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []

    def reconcile(self, key: str) -> float | None:
        self.seen.append((time.monotonic(), key))
        return None


def test_the_first_pass_is_whole_and_later_ones_are_paced() -> None:
    ctl = _Counting()

    async def run() -> float:
        notifier = RevisionNotifier()
        notifier.bind(asyncio.get_running_loop())
        m = Manager(_Store(), [ctl], notifier, resync=0.2, resync_rate=200)  # type: ignore[arg-type]
        task = asyncio.create_task(m.run())
        t0 = time.monotonic()
        while len(ctl.seen) < 2000 and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.05)
        first_done = time.monotonic()
        await asyncio.sleep(3.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return first_done

    first_done = asyncio.run(run())
    assert len({k for _, k in ctl.seen[:2000]}) == 2000, "the first pass reaches every key"
    later = [t for t, _ in ctl.seen[2000:] if t > first_done]
    # the second pass starts after the first (and the watch looks at least once a second):
    # within 3 s it is fed at 200 keys a second - far fewer than another 2,000 at once
    assert 100 <= len(later) <= 200 * 3 + 50, len(later)
