"""The store's write lock (``cove.store.locks.FairRLock``): waiters get it in the order they
came, a thread that writes in a loop cannot take it back before them, it is re-entrant,
and only its holder can release it."""

from __future__ import annotations

import threading
import time

import pytest

from cove.store.locks import FairRLock


def _queued(lock: FairRLock, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(lock._waiters) < n:
        assert time.monotonic() < deadline, "the threads did not queue"
        time.sleep(0.001)


def test_waiters_get_the_lock_in_the_order_they_came() -> None:
    lock = FairRLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for i in range(8):

        def take(i: int = i) -> None:
            with lock:
                order.append(i)

        th = threading.Thread(target=take)
        th.start()
        _queued(lock, i + 1)
        threads.append(th)
    lock.release()
    for th in threads:
        th.join(5)
    assert order == list(range(8))


def test_a_thread_writing_in_a_loop_does_not_starve_a_waiter() -> None:
    """A thread that takes the lock again as soon as it lets it go (a controller's worker
    writing one key after another) has at most the turn it holds and the one it had queued
    for before the waiter gets it."""
    lock = FairRLock()
    turns = [0]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with lock:
                turns[0] += 1
                time.sleep(0.0005)  # a short write (the GIL let go meanwhile, as SQLite does)

    looper = threading.Thread(target=loop)
    looper.start()
    time.sleep(0.05)
    worst = 0
    for _ in range(20):
        before = turns[0]
        with lock:
            worst = max(worst, turns[0] - before)
        time.sleep(0.002)
    stop.set()
    looper.join(5)
    assert worst <= 2, worst


def test_it_is_reentrant_and_only_its_holder_releases_it() -> None:
    lock = FairRLock()
    with lock, lock:
        errors: list[Exception] = []

        def other() -> None:
            try:
                lock.release()
            except RuntimeError as exc:
                errors.append(exc)

        th = threading.Thread(target=other)
        th.start()
        th.join(5)
        assert len(errors) == 1
    # free again: another thread takes it at once
    got = threading.Event()
    th = threading.Thread(target=lambda: (lock.acquire(), got.set(), lock.release()))
    th.start()
    assert got.wait(2)
    th.join(5)
    with pytest.raises(RuntimeError):
        lock.release()
