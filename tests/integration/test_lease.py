"""The controller lease and cross-replica wake-ups, against the real store (both backends).

Two "replicas" are two Store objects (two connection pools) on one database, as two
``cove server`` processes would be.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from cove import errors
from cove.control.lease import (
    TERM_SETTING,
    FileLease,
    Leadership,
    PgLease,
    Replica,
    leader_doc,
    lease_for,
)
from cove.store import Store


def _replica_pair(store: Store, tmp_path: Path) -> tuple[Store, Store]:
    other = Store(store.url)
    return store, other


def _kill_lock_backend(store: Store, lease: PgLease) -> None:
    """What a dead leader looks like to PostgreSQL: its lock connection is gone."""
    assert lease.conn is not None
    pid = lease.conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    with store.engine.connect() as c:
        c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        c.commit()


def test_one_holder_at_a_time(store: Store, tmp_path: Path) -> None:
    a_store, b_store = _replica_pair(store, tmp_path)
    try:
        a, b = lease_for(a_store, tmp_path), lease_for(b_store, tmp_path)
        assert a.try_acquire()
        assert a.still_held()
        assert not b.try_acquire()
        assert not b.try_acquire()  # asking again changes nothing
        a.release()
        assert b.try_acquire() and b.still_held()
        assert not a.try_acquire()
        b.release()
    finally:
        b_store.close()


def test_a_file_lease_is_freed_when_its_process_dies(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "controllers.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from cove.control.lease import FileLease;"
            f" l = FileLease(Path({str(path)!r})); assert l.try_acquire(); print('held',"
            " flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        mine = FileLease(path)
        assert not mine.try_acquire()
        holder.kill()
        holder.wait()
        assert mine.try_acquire()
        mine.release()
    finally:
        holder.kill()


@pytest.mark.postgres
def test_a_pg_lease_is_lost_with_its_connection(store: Store, tmp_path: Path) -> None:
    if store.dialect != "postgresql":
        pytest.skip("PostgreSQL's advisory lock")
    a, b = PgLease(store.engine), PgLease(store.engine)
    assert a.try_acquire()
    _kill_lock_backend(store, a)
    assert not a.still_held()
    assert b.try_acquire()
    b.release()


def test_leadership_moves_when_the_leader_goes(store: Store, tmp_path: Path) -> None:
    """Two replicas: exactly one runs the work; when the leader's lease goes, the other
    takes over within seconds and the old one stops its work."""
    a_store, b_store = _replica_pair(store, tmp_path)
    running: dict[str, bool] = {"a": False, "b": False}
    both = threading.Event()

    def work(name: str):  # type: ignore[no-untyped-def]
        async def run(fenced: Store) -> None:
            assert fenced.url == store.url
            running[name] = True
            if all(running.values()):
                both.set()
            try:
                await asyncio.Event().wait()
            finally:
                running[name] = False

        return run

    async def main() -> float:
        a = Leadership(a_store, lease_for(a_store, tmp_path), Replica("a"), retry=0.1)
        b = Leadership(b_store, lease_for(b_store, tmp_path), Replica("b"), retry=0.1)
        ta = asyncio.create_task(a.run(work("a")))
        await asyncio.sleep(0.5)
        tb = asyncio.create_task(b.run(work("b")))
        await asyncio.sleep(1.0)
        assert (running, a.leading, b.leading) == ({"a": True, "b": False}, True, False)
        doc = await asyncio.to_thread(leader_doc, b_store)
        assert doc is not None and doc["id"] == "a"
        t0 = time.monotonic()
        if store.dialect == "postgresql":  # the leader's database session dies
            assert isinstance(a.lease, PgLease)
            await asyncio.to_thread(_kill_lock_backend, store, a.lease)
        else:  # the leader process goes away: its task (and descriptor) with it
            ta.cancel()
            with pytest.raises(asyncio.CancelledError):
                await ta
        while not running["b"]:
            assert time.monotonic() - t0 < 5.0, "no takeover within 5 s"
            await asyncio.sleep(0.02)
        took = time.monotonic() - t0
        await asyncio.sleep(0.3)
        assert not running["a"], "the old leader still runs its controllers"
        assert b.leading and not both.is_set()
        doc = await asyncio.to_thread(leader_doc, a_store)
        assert doc is not None and doc["id"] == "b"
        for t in (ta, tb):
            t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)
        return took

    try:
        took = asyncio.run(main())
        print(f"\ntakeover after {took:.2f}s ({store.dialect})")
    finally:
        b_store.close()


def test_a_deposed_leader_can_no_longer_write(store: Store, tmp_path: Path) -> None:
    """Fencing: the new leader's term shuts the old leader's controller writes out, whatever
    the old one believes; the API's own writes are not fenced."""
    a_store, b_store = _replica_pair(store, tmp_path)
    try:
        term_a = Leadership(a_store, lease_for(a_store, tmp_path), Replica("a"))._record()
        old = a_store.fenced(TERM_SETTING, term_a)
        with old.write() as tx:
            tx.create("org", "acme", spec={})
        term_b = Leadership(b_store, lease_for(b_store, tmp_path), Replica("b"))._record()
        assert int(term_b) == int(term_a) + 1
        assert (leader_doc(a_store) or {}).get("term") == int(term_b)
        before = store.head_revision()
        with pytest.raises(errors.Transient, match="fenced") as exc, old.write() as tx:
            tx.create("org", "late", spec={})
        assert exc.value.code == "fenced"
        assert store.head_revision() == before
        with store.read() as conn:
            from cove.store.db import Tx

            assert Tx(conn).find("org", None, "late") is None
        with b_store.fenced(TERM_SETTING, term_b).write() as tx:
            tx.create("org", "late", spec={})
        with a_store.write() as tx:  # an API write on the old leader's replica
            tx.create("org", "api", spec={})
    finally:
        b_store.close()


@pytest.mark.postgres
def test_writes_wake_other_replicas_at_once(store: Store, tmp_path: Path) -> None:
    if store.dialect != "postgresql":
        pytest.skip("LISTEN/NOTIFY")
    other = Store(store.url)
    seen: list[tuple[float, int]] = []
    got = threading.Event()
    stop = threading.Event()

    def on_revision(rev: int) -> None:
        seen.append((time.monotonic(), rev))
        got.set()

    listener = threading.Thread(target=other.listen, args=(on_revision, stop), daemon=True)
    listener.start()
    try:
        time.sleep(0.5)  # LISTEN is in place
        t0 = time.monotonic()
        with store.write() as tx:
            tx.create("org", "acme", spec={})
            rev = tx.last_revision
        assert got.wait(2.0), "no notification within 2 s"
        at, payload = seen[0]
        assert payload == rev
        assert at - t0 < 1.0
        # a read-only transaction notifies nobody
        got.clear()
        with store.write():
            pass
        assert not got.wait(0.5)
    finally:
        stop.set()
        listener.join(5)
        other.close()
