"""The controller lease: every ``cove server`` replica serves the API, one runs the controllers.

- PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) on a connection kept for as
  long as the replica leads. PostgreSQL drops it with the connection: a leader that dies (or
  loses its database) frees the lease at once, and another replica - retrying every
  ``retry`` seconds - takes over.
- SQLite (one machine): an ``flock`` on ``<data dir>/controllers.lock``, released by the
  kernel when the process dies.

The leader checks its lease every ``check_every`` seconds and stops its controllers when the
check fails; on PostgreSQL a new leader waits twice that long after taking the lease before
it starts its own, so a leader that lost its lease (rather than died) has stopped first.
Who leads is recorded in the store (setting ``leader``) and served at ``GET /v1/cluster``.

Fencing: each new leader increments the setting ``leader_term`` and hands its controllers a
store view fenced on that value (``Store.fenced``): every controller write checks it inside
its transaction, under the store's write lock. A deposed leader whose controllers are still
running (its lease check hung, or it has not noticed yet) can't write anything once the new
leader has taken its term.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from cove.model.resource import now_iso
from cove.store import schema as t
from cove.store.db import Store

log = logging.getLogger("cove.lease")

LOCK_KEY = 0x636F7665  # "cove": the advisory lock's key
TERM_SETTING = "leader_term"  # incremented by every new leader: the fence


class Lease(Protocol):
    def try_acquire(self) -> bool: ...

    def still_held(self) -> bool: ...

    def release(self) -> None: ...


class PgLease:
    """A session advisory lock on a dedicated connection."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.conn: sa.Connection | None = None

    def try_acquire(self) -> bool:
        try:
            if self.conn is None:
                self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = self.conn.execute(
                sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}
            ).scalar()
        except sa.exc.DBAPIError as exc:
            log.warning("controller lease: the database is unreachable (%s)", exc.orig)
            self.release()
            return False
        return bool(got)

    def still_held(self) -> bool:
        if self.conn is None:
            return False
        try:
            held = self.conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND pid = pg_backend_pid() AND objid = :k"
                ),
                {"k": LOCK_KEY},
            ).scalar()
        except sa.exc.DBAPIError:
            self.release()
            return False
        return bool(held)

    def release(self) -> None:
        if self.conn is not None:
            # Unlock first: closing the connection frees the lock only once its backend has
            # noticed the disconnect, which another replica could race. Then invalidate:
            # really close the session (a connection merely returned to the pool would keep
            # holding the lock if the unlock did not reach the server).
            with contextlib.suppress(Exception):
                self.conn.execute(sa.text("SELECT pg_advisory_unlock_all()"))
            with contextlib.suppress(Exception):
                self.conn.invalidate()
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


class FileLease:
    """An exclusive flock on a file (replicas on one machine sharing a SQLite file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def still_held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the lock
            self.fd = None


def lease_for(store: Store, data_dir: Path) -> Lease:
    if store.dialect == "postgresql":
        return PgLease(store.engine)
    return FileLease(data_dir / "controllers.lock")


@dataclass
class Replica:
    """This server process, as the cluster sees it."""

    id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    url: str = ""
    started_at: str = field(default_factory=now_iso)

    def doc(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "started_at": self.started_at}


class Leadership:
    """Runs *work* (the controller manager) only while this replica holds the lease."""

    def __init__(
        self,
        store: Store,
        lease: Lease,
        replica: Replica,
        *,
        retry: float = 1.0,
        check_every: float = 0.5,
    ) -> None:
        self.store = store
        self.lease = lease
        self.replica = replica
        self.retry = retry
        self.check_every = check_every
        # a new leader waits this long before starting: a previous leader that lost the lease
        # (rather than died) notices at its next check and stops first - never two at once.
        # An flock is only ever lost with its process: no wait there.
        self.takeover_delay = 0.0 if isinstance(lease, FileLease) else check_every * 2
        self.leading = False
        self.since: float | None = None
        self.terms = 0

    async def run(self, work: Callable[[Store], Coroutine[Any, Any, None]]) -> None:
        """Lead whenever the lease can be had: ``work(fenced_store)`` runs while it is held."""
        try:
            while True:
                if not await asyncio.to_thread(self.lease.try_acquire):
                    await asyncio.sleep(self.retry)
                    continue
                await self._lead(work)
        finally:
            self.leading = False
            await asyncio.to_thread(self.lease.release)

    async def _lead(self, work: Callable[[Store], Coroutine[Any, Any, None]]) -> None:
        await asyncio.sleep(self.takeover_delay)
        if not await asyncio.to_thread(self.lease.still_held):
            await asyncio.to_thread(self.lease.release)
            return
        try:
            term = await asyncio.to_thread(self._record)
        except Exception as exc:  # no term, no fence: don't lead on a store we can't write
            log.warning("can't record this replica as the leader (%s); retrying", exc)
            await asyncio.to_thread(self.lease.release)
            await asyncio.sleep(self.retry)
            return
        self.terms += 1
        self.leading, self.since = True, time.monotonic()
        log.info("this replica (%s) now runs the controllers (term %s)", self.replica.id, term)
        task = asyncio.create_task(work(self.store.fenced(TERM_SETTING, term)))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=self.check_every)
                if task.done():
                    break
                if not await asyncio.to_thread(self.lease.still_held):
                    log.warning("controller lease lost: stopping the controllers")
                    break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self.leading = False
            await asyncio.to_thread(self.lease.release)
        if task.done() and not task.cancelled() and task.exception() is None:
            return
        await asyncio.sleep(self.retry)  # let another replica have it first

    def _record(self) -> str:
        """Record this replica as the leader and start a new term; returns the term."""
        with self.store.write() as tx:
            raw = tx.conn.execute(
                sa.select(t.cluster_settings.c.value).where(
                    t.cluster_settings.c.key == TERM_SETTING
                )
            ).scalar()
            term = str(int(raw or 0) + 1)
            tx.set_setting(TERM_SETTING, term)
            doc = dict(self.replica.doc(), since=now_iso(), term=int(term))
            tx.set_setting("leader", json.dumps(doc, sort_keys=True))
        return term


def leader_doc(store: Store) -> dict[str, Any] | None:
    raw = store.setting("leader")
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        doc = json.loads(raw)
        if isinstance(doc, dict):
            return doc
    return None
