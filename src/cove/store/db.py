"""Store and transactions.

Every write allocates the next value of one global revision counter in the same
transaction (``UPDATE revision_counter ... RETURNING``). The row lock that update takes is
held until commit, so writers are serialised and commits become visible in revision order:
a reader that resumes "after revision N" never misses a write numbered below one it saw.

The one exception is liveness: a node's heartbeat (``Store.heartbeat``) upserts its
``node_heartbeats`` row and takes no revision, so it neither queues behind the counter nor
wakes any watcher; readers overlay it onto the node's ``status.last_heartbeat``.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from cove import errors
from cove.ids import new_id
from cove.model import kinds as kinds_mod
from cove.model.resource import now_iso
from cove.store import meter
from cove.store import schema as t
from cove.store.locks import FairRLock

log = logging.getLogger("cove.store")
NOTIFY_CHANNEL = "cove_revision"

NODE_PREFIX = kinds_mod.get_kind("node").prefix

# kinds whose writes open and close spans of billable use (store/meter.py)
METERED = ("instance", "volume")
METERED_PREFIXES = ("ins", "vol")

_ANCESTOR_COLS = {
    "org": "org_id",
    "project": "project_id",
    "app": "app_id",
    "environment": "env_id",
}

# The write path's statements, built once: a statement built per call costs more Python
# than SQLite spends running it (coercing every clause, then working out its cache key
# again), and 10,000 instances starting are some 50 of them each. Parameters are bound at
# execution; an UPDATE without .values() sets the columns its parameters name.
_R = t.resources.c
_NEXT_REVISION = (
    sa.update(t.revision_counter)
    .where(t.revision_counter.c.id == 1)
    .values(value=t.revision_counter.c.value + 1)
    .returning(t.revision_counter.c.value)
)
_HEAD_REVISION = sa.select(t.revision_counter.c.value).where(t.revision_counter.c.id == 1)
_BY_ID = sa.select(t.resources).where(_R.id == sa.bindparam("b_id"))
_BY_ID_FOR_UPDATE = _BY_ID.with_for_update()
_BY_NAME = sa.select(t.resources).where(
    _R.kind == sa.bindparam("b_kind"),
    _R.parent_key == sa.bindparam("b_parent"),
    _R.name == sa.bindparam("b_name"),
)
_ANCESTRY = sa.select(*(_R[c] for c in _ANCESTOR_COLS.values())).where(
    _R.id == sa.bindparam("b_id")
)
_INSERT_RESOURCE = sa.insert(t.resources)
_UPDATE_RESOURCE = sa.update(t.resources).where(
    _R.id == sa.bindparam("b_id"), _R.revision == sa.bindparam("b_revision")
)
_E = t.events.c
_EVENT_BY_KEY = sa.select(t.events).where(_E.dedup_key == sa.bindparam("b_key"))
_INSERT_EVENT = sa.insert(t.events)
_UPDATE_EVENT = sa.update(t.events).where(_E.id == sa.bindparam("b_id"))


def resource_from_row(row: RowMapping) -> dict[str, Any]:
    parent = None
    if row["parent_id"]:
        parent = {"kind": row["parent_kind"], "id": row["parent_id"], "name": row["parent_name"]}
    return {
        "kind": row["kind"],
        "id": row["id"],
        "name": row["name"],
        "parent": parent,
        "labels": dict(row["labels"] or {}),
        "spec": dict(row["spec"] or {}),
        "status": dict(row["status"] or {}),
        "metadata": {
            "generation": int(row["generation"]),
            "revision": int(row["revision"]),
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "deleting": bool(row["deleting"]),
        },
    }


def last_heartbeats(conn: Connection, node_ids: Iterable[str] | None = None) -> dict[str, str]:
    """When each node last reported (``node_heartbeats``), by node ID: one query, for the
    given nodes or all of them. Nodes that never reported are absent."""
    q = sa.select(t.node_heartbeats.c.node_id, t.node_heartbeats.c.at)
    if node_ids is not None:
        ids = sorted(set(node_ids))
        if not ids:
            return {}
        q = q.where(t.node_heartbeats.c.node_id.in_(ids))
    return {str(r[0]): str(r[1]) for r in conn.execute(q)}


def last_heartbeat(conn: Connection, node: RowMapping | dict[str, Any]) -> str | None:
    """A node's last heartbeat: its ``node_heartbeats`` row, or else what its status says
    (nodes that last reported before that table existed)."""
    at = conn.execute(
        sa.select(t.node_heartbeats.c.at).where(t.node_heartbeats.c.node_id == node["id"])
    ).scalar()
    if at is not None:
        return str(at)
    legacy = (node["status"] or {}).get("last_heartbeat")
    return None if legacy is None else str(legacy)


def forget_heartbeat(conn: Connection, node_id: str) -> None:
    conn.execute(sa.delete(t.node_heartbeats).where(t.node_heartbeats.c.node_id == node_id))


def _overlay_heartbeats(conn: Connection, items: list[dict[str, Any]]) -> None:
    """Show each node's last heartbeat in ``status.last_heartbeat``, as before it moved to
    its own table (one query for the whole page)."""
    nodes = [i for i in items if i["kind"] == "node"]
    if not nodes:
        return
    beats = last_heartbeats(conn, (n["id"] for n in nodes))
    for n in nodes:
        if n["id"] in beats:
            n["status"]["last_heartbeat"] = beats[n["id"]]
        else:
            n["status"].setdefault("last_heartbeat", None)


def event_from_row(row: RowMapping | Mapping[str, Any]) -> dict[str, Any]:
    return {
        "kind": "event",
        "id": row["id"],
        "name": row["id"],
        "parent": {"kind": row["object_kind"], "id": row["object_id"], "name": row["object_name"]},
        "labels": {},
        "spec": {"type": row["type"], "reason": row["reason"], "message": row["message"]},
        "status": {
            "count": int(row["count"]),
            "first_seen": row["first_seen"],
            "last_seen": row["last_seen"],
        },
        "metadata": {
            "generation": 1,
            "revision": int(row["revision"]),
            "created_at": row["first_seen"],
            "updated_at": row["last_seen"],
            "deleting": False,
        },
    }


class Scope:
    """Which orgs a reader may see. ``None`` orgs means everything (controllers)."""

    def __init__(self, orgs: frozenset[str] | None, *, cluster: bool = True) -> None:
        self.orgs = orgs
        self.cluster = cluster  # may see cluster-scoped resources (nodes)

    @classmethod
    def everything(cls) -> Scope:
        return cls(None)

    def allows(self, org_id: str | None) -> bool:
        if self.orgs is None:
            return True
        if org_id is None:
            return self.cluster
        return org_id in self.orgs

    def clause(self, col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        if self.orgs is None:
            return sa.true()
        cond: sa.ColumnElement[bool] = col.in_(sorted(self.orgs))
        if self.cluster:
            cond = sa.or_(cond, col.is_(None))
        return cond


class Tx:
    """One write transaction. All writes go through here and stamp a new revision."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.last_revision = 0

    def next_revision(self) -> int:
        value = self.conn.execute(_NEXT_REVISION).scalar_one()
        self.last_revision = int(value)
        return self.last_revision

    # -- resources -------------------------------------------------------------------------

    def get(self, rid: str, *, for_update: bool = False) -> dict[str, Any] | None:
        locking = for_update and self.conn.dialect.name == "postgresql"
        q = _BY_ID_FOR_UPDATE if locking else _BY_ID
        row = self.conn.execute(q, {"b_id": rid}).mappings().first()
        return resource_from_row(row) if row else None

    def row(self, rid: str) -> RowMapping | None:
        return self.conn.execute(_BY_ID, {"b_id": rid}).mappings().first()

    def find(self, kind: str, parent_id: str | None, name: str) -> dict[str, Any] | None:
        params = {"b_kind": kind, "b_parent": parent_id or "", "b_name": name}
        row = self.conn.execute(_BY_NAME, params).mappings().first()
        return resource_from_row(row) if row else None

    def create(
        self,
        kind: str,
        name: str | None,
        *,
        parent: str | None = None,
        spec: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        status: dict[str, Any] | None = None,
        rid: str | None = None,
    ) -> dict[str, Any]:
        k = kinds_mod.get_kind(kind)
        rid = rid or new_id(k.prefix)
        name = name or rid
        ancestry: dict[str, str | None] = {c: None for c in _ANCESTOR_COLS.values()}
        parent_row = None
        if parent is not None:
            parent_row = self.row(parent)
            if parent_row is None:
                raise errors.NotFound(f"parent {parent} does not exist")
            for col in _ANCESTOR_COLS.values():
                ancestry[col] = parent_row[col]
        if kind in _ANCESTOR_COLS:
            ancestry[_ANCESTOR_COLS[kind]] = rid
        if kind == "operation" and parent_row is None:
            pass
        if self.find(kind, parent, name) is not None:
            where = f" in {parent_row['kind']} {parent_row['name']}" if parent_row else ""
            raise errors.Conflict(
                f"a {k.title} named {name!r} already exists{where}",
                hint="pick another name, or describe the existing one",
                code="already_exists",
            )
        rev = self.next_revision()
        now = now_iso()
        values = {
            "id": rid,
            "kind": kind,
            "name": name,
            "parent_kind": parent_row["kind"] if parent_row else None,
            "parent_id": parent,
            "parent_name": parent_row["name"] if parent_row else None,
            "parent_key": parent or "",
            **ancestry,
            "labels": labels or {},
            "spec": spec or {},
            "status": status or {},
            "generation": 1,
            "revision": rev,
            "created_at": now,
            "updated_at": now,
            "deleting": False,
        }
        try:
            self.conn.execute(_INSERT_RESOURCE, values)
        except IntegrityError as exc:
            raise errors.Conflict(
                f"a {k.title} named {name!r} already exists", code="already_exists"
            ) from exc
        out = self.get(rid)
        assert out is not None
        if kind in METERED:
            meter.observe(self, None, out)
        return out

    def update(
        self,
        rid: str,
        *,
        spec: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        status: dict[str, Any] | None = None,
        expected_revision: int | None = None,
        deleting: bool | None = None,
    ) -> dict[str, Any]:
        """Compare-and-swap write. A spec change bumps ``generation``; a stale
        ``expected_revision`` raises Conflict and writes nothing."""
        cur = self.get(rid)
        if cur is None:
            raise errors.NotFound(f"{rid} does not exist")
        if expected_revision is not None and cur["metadata"]["revision"] != expected_revision:
            raise errors.Conflict(
                f"{cur['kind']} {cur['name']} changed since revision {expected_revision} "
                f"(now {cur['metadata']['revision']})",
                hint="read it again and retry your change on the current version",
                code="stale_revision",
                extra={"current_revision": cur["metadata"]["revision"]},
            )
        values: dict[str, Any] = {}
        generation = cur["metadata"]["generation"]
        if spec is not None and spec != cur["spec"]:
            values["spec"] = spec
            generation += 1
            values["generation"] = generation
        if labels is not None and labels != cur["labels"]:
            values["labels"] = labels
        if status is not None and status != cur["status"]:
            values["status"] = status
        if deleting is not None and deleting != cur["metadata"]["deleting"]:
            values["deleting"] = deleting
            if deleting:
                generation += 1
                values["generation"] = generation
        if not values:
            return cur
        rev = self.next_revision()
        values["revision"] = rev
        values["updated_at"] = now_iso()
        values["b_id"], values["b_revision"] = rid, cur["metadata"]["revision"]
        res = self.conn.execute(_UPDATE_RESOURCE, values)
        if res.rowcount != 1:  # pragma: no cover - excluded by the revision lock
            raise errors.Conflict(f"{rid} changed concurrently", code="stale_revision")
        out = self.get(rid)
        assert out is not None
        if cur["kind"] in METERED:
            meter.observe(self, cur, out)
        return out

    def delete(self, rid: str) -> None:
        """Remove the row for good (after finalisation by the GC controller)."""
        if rid.split("_", 1)[0] in METERED_PREFIXES:
            meter.observe(self, self.get(rid), None)
        self.next_revision()
        self.conn.execute(sa.delete(t.resources).where(t.resources.c.id == rid))
        if rid.split("_", 1)[0] == NODE_PREFIX:
            forget_heartbeat(self.conn, rid)

    def children(self, rid: str, *, kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        q = sa.select(t.resources).where(t.resources.c.parent_id == rid)
        if kinds:
            q = q.where(t.resources.c.kind.in_(kinds))
        return [
            resource_from_row(r) for r in self.conn.execute(q.order_by(t.resources.c.id)).mappings()
        ]

    # -- events ----------------------------------------------------------------------------

    def event(self, obj: dict[str, Any], etype: str, reason: str, message: str) -> dict[str, Any]:
        """Record an event about *obj*. Repeats (same object, type, reason and message)
        are folded into one row: count goes up, last_seen moves, revision moves."""
        row = self.conn.execute(_ANCESTRY, {"b_id": obj["id"]}).mappings().first()
        anc = {c: (row[c] if row else None) for c in _ANCESTOR_COLS.values()}
        key = hashlib.sha256("\x00".join((obj["id"], etype, reason, message)).encode()).hexdigest()
        rev = self.next_revision()
        now = now_iso()
        existing = self.conn.execute(_EVENT_BY_KEY, {"b_key": key}).mappings().first()
        if existing:
            values = dict(existing, count=existing["count"] + 1, last_seen=now, revision=rev)
            self.conn.execute(
                _UPDATE_EVENT,
                {
                    "b_id": existing["id"],
                    "count": values["count"],
                    "last_seen": now,
                    "revision": rev,
                },
            )
        else:
            values = {
                "id": new_id("evt"),
                "dedup_key": key,
                "object_kind": obj["kind"],
                "object_id": obj["id"],
                "object_name": obj["name"],
                **anc,
                "type": etype,
                "reason": reason,
                "message": message[:4000],
                "count": 1,
                "first_seen": now,
                "last_seen": now,
                "revision": rev,
            }
            self.conn.execute(_INSERT_EVENT, values)
        return event_from_row(values)  # what was written

    # -- settings ----------------------------------------------------------------------------

    def set_setting(self, key: str, value: str) -> None:
        self.conn.execute(sa.delete(t.cluster_settings).where(t.cluster_settings.c.key == key))
        self.conn.execute(sa.insert(t.cluster_settings).values(key=key, value=value))


class _PendingBeats:
    """Heartbeats waiting for the flush in progress (``Store.heartbeat``)."""

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}
        self.inflight: dict[str, str] = {}  # the batch being written
        self.lock = threading.Lock()
        self.flushing = False


class Store:
    """Entry point to the database. Thread-safe; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = sa.engine.make_url(url).get_backend_name()
        self._write_lock = FairRLock()  # handed over in turn: see store.locks
        self._listeners: list[Callable[[int], None]] = []
        # (setting, value) every write of this view checks first (see fenced)
        self._fence: tuple[str, str] | None = None
        self._beats = _PendingBeats()  # shared with the views (see fenced)
        self.engine: Engine = self._make_engine(url)

    # -- setup -----------------------------------------------------------------------------

    def _make_engine(self, url: str) -> Engine:
        if self.dialect == "sqlite":
            path = sa.engine.make_url(url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": 30},
                # connections are kept, not opened per use: the API's and the controllers'
                # threads together use dozens at once, and opening one (WAL, schema) is
                # dear next to the query it serves
                pool_size=48,
                max_overflow=32,
            )

            @sa_event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @sa_event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                if conn.get_execution_options().get("cove_write"):
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                else:
                    conn.exec_driver_sql("BEGIN")

            return engine
        if self.dialect == "postgresql":
            # connections kept, as for SQLite: with 10 kept and 40 more opened on demand,
            # 500 agents' requests opened and closed PostgreSQL connections (a backend
            # process each) many times a second. At most 50 per replica either way.
            return sa.create_engine(url, pool_size=40, max_overflow=10, pool_pre_ping=True)
        raise errors.UserError(
            f"unsupported database URL {sa.engine.make_url(url).render_as_string()!r}",
            hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
        )

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self._write_lock, self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # one migrator at a time when several servers start together
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7426001)")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    def on_commit(self, fn: Callable[[int], None]) -> None:
        """Call *fn(revision)* after every committed write in this process."""
        self._listeners.append(fn)

    # -- liveness -------------------------------------------------------------------------------

    def heartbeat(self, node_id: str, at: str | None = None) -> None:
        """Record that *node_id* reported at *at* (now) in its ``node_heartbeats`` row. Not
        a revisioned write: no revision is taken, nothing is notified and no watcher wakes
        (the NodeController looks at the age every few seconds).

        Heartbeats are combined: the caller that finds no flush running writes every
        heartbeat pending in this process in one short transaction (an upsert of many rows),
        and again (twice at most) if more arrived meanwhile; a caller that finds a flush running
        leaves its heartbeat to it and returns at once. So 500 nodes cost one transaction
        per turn of the write lock, not 100 a second each queueing for it (on SQLite the
        flush takes ``_write_lock``: the database has one writer at a time whatever cove
        does, and the process lock queues without spinning in SQLite's busy handler)."""
        b = self._beats
        with b.lock:
            b.pending[node_id] = at or now_iso()
            if b.flushing:
                return
            b.flushing = True
        for turn in range(3):  # bounded: this caller's own agent waits for the answer
            with b.lock:
                batch, b.pending = b.pending, {}
                if not batch or turn == 2:  # what is left goes with the next heartbeat
                    b.pending = {**batch, **b.pending}
                    b.flushing = False
                    return
                b.inflight = batch
            try:
                self._write_heartbeats(batch)
            except BaseException:
                with b.lock:  # the next heartbeat's flush retries them
                    b.pending = {**batch, **b.pending}
                    b.inflight = {}
                    b.flushing = False
                raise
            with b.lock:
                b.inflight = {}

    def received_heartbeat(self, node_id: str, stored: str | None) -> str | None:
        """The newer of *stored* (what the database says) and a heartbeat this process has
        received but not written yet: a flush waiting for the write lock on a busy server
        must not make a node look late."""
        b = self._beats
        with b.lock:
            seen = [x for x in (stored, b.pending.get(node_id), b.inflight.get(node_id)) if x]
        return max(seen) if seen else None

    def _write_heartbeats(self, batch: dict[str, str]) -> None:
        rows = [{"node_id": n, "at": at} for n, at in sorted(batch.items())]
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            pq = pg_insert(t.node_heartbeats).values(rows)
            stmt: sa.Executable = pq.on_conflict_do_update(
                index_elements=["node_id"], set_={"at": pq.excluded.at}
            )
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            sq = sqlite_insert(t.node_heartbeats).values(rows)
            stmt = sq.on_conflict_do_update(index_elements=["node_id"], set_={"at": sq.excluded.at})
        lock = self._write_lock if self.dialect == "sqlite" else contextlib.nullcontext()
        try:
            with lock, self.engine.connect().execution_options(cove_write=True) as conn:
                with conn.begin():
                    conn.execute(stmt)
        except OperationalError as exc:
            raise errors.Transient(
                "the database is busy or unreachable", hint="retry in a moment"
            ) from exc
        except DBAPIError as exc:
            raise errors.Transient("database error", hint="retry in a moment") from exc

    def last_heartbeats(self, node_ids: Iterable[str] | None = None) -> dict[str, str]:
        """When each node last reported, by node ID (one query)."""
        with self.read() as conn:
            return last_heartbeats(conn, node_ids)

    # -- transactions -------------------------------------------------------------------------

    def fenced(self, setting: str, value: str) -> Store:
        """A view of this store (same engine and locks) whose writes happen only while the
        setting *setting* still holds *value*: checked inside each write transaction, after
        the write lock is taken, so a writer that bumped the setting (a new controller
        leader: ``control.lease``) shuts every older view out at once."""
        view = copy.copy(self)
        view._fence = (setting, value)
        return view

    @contextmanager
    def write(self) -> Iterator[Tx]:
        with self._write_lock:
            try:
                with self.engine.connect().execution_options(cove_write=True) as conn:
                    with conn.begin():
                        tx = Tx(conn)
                        if self._fence is not None:
                            key, want = self._fence
                            now = conn.execute(
                                sa.select(t.cluster_settings.c.value).where(
                                    t.cluster_settings.c.key == key
                                )
                            ).scalar()
                            if now != want:
                                raise errors.Transient(
                                    f"fenced: {key} is {now!r} now, not {want!r}",
                                    hint="another replica took over the controllers",
                                    code="fenced",
                                )
                        yield tx
                        if tx.last_revision and self.dialect == "postgresql":
                            # other replicas' watchers wake on commit (see listen)
                            conn.execute(
                                sa.text("SELECT pg_notify(:ch, :rev)"),
                                {"ch": NOTIFY_CHANNEL, "rev": str(tx.last_revision)},
                            )
            except OperationalError as exc:
                raise errors.Transient(
                    "the database is busy or unreachable", hint="retry in a moment"
                ) from exc
            except DBAPIError as exc:
                if isinstance(exc, IntegrityError):
                    raise errors.Conflict("that conflicts with existing data") from exc
                raise errors.Transient("database error", hint="retry in a moment") from exc
        if tx.last_revision:
            for fn in self._listeners:
                fn(tx.last_revision)

    def write_each(
        self, fns: builtins.list[Callable[[Tx], Any]]
    ) -> builtins.list[tuple[Any, Exception | None]]:
        """Each of *fns* in one write transaction (group commit: ``api.batch`` writes what
        many agents report this way), each in a savepoint of its own, so one that raises
        fails alone and leaves nothing: (result, error) for each, in order. When the
        transaction itself fails, every one fails with it."""
        out: builtins.list[tuple[Any, Exception | None]] = []
        try:
            with self.write() as tx:
                for fn in fns:
                    try:
                        with tx.conn.begin_nested():
                            out.append((fn(tx), None))
                    except Exception as exc:
                        out.append((None, exc))
        except Exception as exc:
            return [(None, exc) for _ in fns]
        return out

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except OperationalError as exc:
            raise errors.Transient(
                "the database is busy or unreachable", hint="retry in a moment"
            ) from exc

    def listen(self, callback: Callable[[int], None], stop: threading.Event) -> None:
        """PostgreSQL only, blocking (run it in a thread): call *callback(revision)* for every
        write committed by any replica, until *stop* is set. Reconnects after an error."""
        import psycopg

        url = sa.engine.make_url(self.url).set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        delay = 0.5
        while not stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    delay = 0.5
                    while not stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            with contextlib.suppress(ValueError):
                                callback(int(n.payload))
            except psycopg.Error as exc:
                log.warning("LISTEN %s failed (%s); retrying in %.1fs", NOTIFY_CHANNEL, exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)

    # -- reads ---------------------------------------------------------------------------------

    def head_revision(self) -> int:
        with self.read() as conn:
            return int(conn.execute(_HEAD_REVISION).scalar_one())

    def get(self, rid: str, scope: Scope | None = None) -> dict[str, Any]:
        """One resource, as the API shows it (a node with its last heartbeat)."""
        with self.read() as conn:
            row = conn.execute(_BY_ID, {"b_id": rid}).mappings().first()
            if row is None or (scope is not None and not scope.allows(row["org_id"])):
                raise errors.NotFound(f"no resource {rid}", hint="check the ID with a list command")
            out = resource_from_row(row)
            _overlay_heartbeats(conn, [out])
        return out

    def get_row(self, rid: str) -> RowMapping | None:
        with self.read() as conn:
            return conn.execute(_BY_ID, {"b_id": rid}).mappings().first()

    def find(self, kind: str, parent_id: str | None, name: str) -> dict[str, Any] | None:
        with self.read() as conn:
            params = {"b_kind": kind, "b_parent": parent_id or "", "b_name": name}
            row = conn.execute(_BY_NAME, params).mappings().first()
            if row is None:
                return None
            out = resource_from_row(row)
            _overlay_heartbeats(conn, [out])
        return out

    def list(
        self,
        kind: str,
        scope: Scope,
        *,
        parent_id: str | None = None,
        ancestors: dict[str, str] | None = None,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        after: str | None = None,
        limit: int = 100,
        include_deleting: bool = True,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of resources of one kind, oldest first. Returns (items, next cursor)."""
        c = t.resources.c
        q = sa.select(t.resources).where(c.kind == kind, scope.clause(c.org_id))
        if parent_id is not None:
            q = q.where(c.parent_id == parent_id)
        for akind, aid in (ancestors or {}).items():
            q = q.where(getattr(c, _ANCESTOR_COLS[akind]) == aid)
        if name is not None:
            q = q.where(c.name == name)
        for key, value in (labels or {}).items():
            q = q.where(c.labels[key].as_string() == value)
        if after is not None:
            q = q.where(c.id > after)
        if not include_deleting:
            q = q.where(c.deleting.is_(False))
        q = q.order_by(c.id).limit(limit + 1)
        with self.read() as conn:
            rows = list(conn.execute(q).mappings())
            items = [resource_from_row(r) for r in rows[:limit]]
            _overlay_heartbeats(conn, items)
        nxt = items[-1]["id"] if len(rows) > limit and items else None
        return items, nxt

    def count(self, kind: str, *, ancestors: dict[str, str] | None = None) -> int:
        c = t.resources.c
        q = sa.select(sa.func.count()).select_from(t.resources).where(c.kind == kind)
        for akind, aid in (ancestors or {}).items():
            q = q.where(getattr(c, _ANCESTOR_COLS[akind]) == aid)
        with self.read() as conn:
            return int(conn.execute(q).scalar_one())

    def changes_since(self, revision: int, limit: int = 1000) -> builtins.list[dict[str, Any]]:
        """Resources written after *revision*, in revision order (controllers' watch), with
        what controllers filter their wake-ups on: whether it is being deleted, and an
        instance's node, desired state and state (``None`` for other kinds)."""
        c = t.resources.c
        q = (
            sa.select(
                c.id,
                c.kind,
                c.parent_id,
                c.revision,
                c.deleting,
                c.spec["node"].as_string().label("node"),
                c.spec["desired"].as_string().label("desired"),
                c.status["state"].as_string().label("state"),
            )
            .where(c.revision > revision)
            .order_by(c.revision)
            .limit(limit)
        )
        with self.read() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def ids_of_kind(self, kind: str) -> builtins.list[str]:
        with self.read() as conn:
            return [
                str(r[0])
                for r in conn.execute(sa.select(t.resources.c.id).where(t.resources.c.kind == kind))
            ]

    def events(
        self,
        scope: Scope,
        *,
        since: int = 0,
        object_id: str | None = None,
        ancestors: dict[str, str] | None = None,
        limit: int = 500,
    ) -> builtins.list[dict[str, Any]]:
        """Events with revision > *since*, oldest first."""
        c = t.events.c
        q = sa.select(t.events).where(c.revision > since, scope.clause(c.org_id))
        if object_id is not None:
            q = q.where(c.object_id == object_id)
        for akind, aid in (ancestors or {}).items():
            q = q.where(getattr(c, _ANCESTOR_COLS[akind]) == aid)
        q = q.order_by(c.revision).limit(limit)
        with self.read() as conn:
            return [event_from_row(r) for r in conn.execute(q).mappings()]

    def event(self, eid: str, scope: Scope) -> dict[str, Any]:
        with self.read() as conn:
            row = conn.execute(sa.select(t.events).where(t.events.c.id == eid)).mappings().first()
        if row is None or not scope.allows(row["org_id"]):
            raise errors.NotFound(f"no event {eid}")
        return event_from_row(row)

    def setting(self, key: str) -> str | None:
        with self.read() as conn:
            v = conn.execute(
                sa.select(t.cluster_settings.c.value).where(t.cluster_settings.c.key == key)
            ).scalar()
        return None if v is None else str(v)
