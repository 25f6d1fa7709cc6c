"""Store and transactions.

Every write allocates the next value of one global revision counter in the same
transaction (``UPDATE revision_counter ... RETURNING``). The row lock that update takes is
held until commit, so writers are serialised and commits become visible in revision order:
a reader that resumes "after revision N" never misses a write numbered below one it saw.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
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

log = logging.getLogger("cove.store")
NOTIFY_CHANNEL = "cove_revision"

# kinds whose writes open and close spans of billable use (store/meter.py)
METERED = ("instance", "volume")
METERED_PREFIXES = ("ins", "vol")

_ANCESTOR_COLS = {
    "org": "org_id",
    "project": "project_id",
    "app": "app_id",
    "environment": "env_id",
}


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


def event_from_row(row: RowMapping) -> dict[str, Any]:
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
        value = self.conn.execute(
            sa.update(t.revision_counter)
            .where(t.revision_counter.c.id == 1)
            .values(value=t.revision_counter.c.value + 1)
            .returning(t.revision_counter.c.value)
        ).scalar_one()
        self.last_revision = int(value)
        return self.last_revision

    # -- resources -------------------------------------------------------------------------

    def get(self, rid: str, *, for_update: bool = False) -> dict[str, Any] | None:
        q = sa.select(t.resources).where(t.resources.c.id == rid)
        if for_update and self.conn.dialect.name == "postgresql":
            q = q.with_for_update()
        row = self.conn.execute(q).mappings().first()
        return resource_from_row(row) if row else None

    def row(self, rid: str) -> RowMapping | None:
        return (
            self.conn.execute(sa.select(t.resources).where(t.resources.c.id == rid))
            .mappings()
            .first()
        )

    def find(self, kind: str, parent_id: str | None, name: str) -> dict[str, Any] | None:
        row = (
            self.conn.execute(
                sa.select(t.resources).where(
                    t.resources.c.kind == kind,
                    t.resources.c.parent_key == (parent_id or ""),
                    t.resources.c.name == name,
                )
            )
            .mappings()
            .first()
        )
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
            self.conn.execute(sa.insert(t.resources).values(**values))
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
        res = self.conn.execute(
            sa.update(t.resources)
            .where(t.resources.c.id == rid, t.resources.c.revision == cur["metadata"]["revision"])
            .values(**values)
        )
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
        row = self.row(obj["id"])
        anc = {c: (row[c] if row else None) for c in _ANCESTOR_COLS.values()}
        key = hashlib.sha256("\x00".join((obj["id"], etype, reason, message)).encode()).hexdigest()
        rev = self.next_revision()
        now = now_iso()
        existing = (
            self.conn.execute(sa.select(t.events).where(t.events.c.dedup_key == key))
            .mappings()
            .first()
        )
        if existing:
            self.conn.execute(
                sa.update(t.events)
                .where(t.events.c.id == existing["id"])
                .values(count=existing["count"] + 1, last_seen=now, revision=rev)
            )
            eid = existing["id"]
        else:
            eid = new_id("evt")
            self.conn.execute(
                sa.insert(t.events).values(
                    id=eid,
                    dedup_key=key,
                    object_kind=obj["kind"],
                    object_id=obj["id"],
                    object_name=obj["name"],
                    **anc,
                    type=etype,
                    reason=reason,
                    message=message[:4000],
                    count=1,
                    first_seen=now,
                    last_seen=now,
                    revision=rev,
                )
            )
        out = self.conn.execute(sa.select(t.events).where(t.events.c.id == eid)).mappings().one()
        return event_from_row(out)

    # -- settings ----------------------------------------------------------------------------

    def set_setting(self, key: str, value: str) -> None:
        self.conn.execute(sa.delete(t.cluster_settings).where(t.cluster_settings.c.key == key))
        self.conn.execute(sa.insert(t.cluster_settings).values(key=key, value=value))


class Store:
    """Entry point to the database. Thread-safe; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = sa.engine.make_url(url).get_backend_name()
        self._write_lock = threading.RLock()
        self._listeners: list[Callable[[int], None]] = []
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
                pool_size=8,
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
            return sa.create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)
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

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Tx]:
        with self._write_lock:
            try:
                with self.engine.connect().execution_options(cove_write=True) as conn:
                    with conn.begin():
                        tx = Tx(conn)
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
            return int(
                conn.execute(
                    sa.select(t.revision_counter.c.value).where(t.revision_counter.c.id == 1)
                ).scalar_one()
            )

    def get(self, rid: str, scope: Scope | None = None) -> dict[str, Any]:
        with self.read() as conn:
            row = (
                conn.execute(sa.select(t.resources).where(t.resources.c.id == rid))
                .mappings()
                .first()
            )
        if row is None or (scope is not None and not scope.allows(row["org_id"])):
            raise errors.NotFound(f"no resource {rid}", hint="check the ID with a list command")
        return resource_from_row(row)

    def get_row(self, rid: str) -> RowMapping | None:
        with self.read() as conn:
            return (
                conn.execute(sa.select(t.resources).where(t.resources.c.id == rid))
                .mappings()
                .first()
            )

    def find(self, kind: str, parent_id: str | None, name: str) -> dict[str, Any] | None:
        with self.read() as conn:
            row = (
                conn.execute(
                    sa.select(t.resources).where(
                        t.resources.c.kind == kind,
                        t.resources.c.parent_key == (parent_id or ""),
                        t.resources.c.name == name,
                    )
                )
                .mappings()
                .first()
            )
        return resource_from_row(row) if row else None

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
        """Resources written after *revision*, in revision order (controllers' watch)."""
        c = t.resources.c
        q = (
            sa.select(c.id, c.kind, c.parent_id, c.revision)
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
