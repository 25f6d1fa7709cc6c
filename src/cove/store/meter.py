"""Metering: what was used, when, recorded in the transaction that changed it.

A span of use opens and closes in the same transaction as the write that starts or ends
the use (``Tx.create/update/delete`` call :func:`observe`), so no restart of a server or
an agent can lose one or count one twice: the database holds either both the change and
the span, or neither. Spans are idempotent (at most one open per subject).

- instance: billable from the moment its node reports it ``running`` until it is no longer
  running or stopping (exited, failed, stopped, destroyed), or until its node stops
  reporting (closed at the node's last heartbeat: nobody pays for a lost node's time);
  rate: its size (vCPU, memory).
- volume: from creation until its deletion is asked; rate: provisioned GB.
- ipv4: a dedicated IPv4 address, from allocation to release.
- egress: the bytes each node's edge sent to clients, per endpoint and hour, from the
  edge's cumulative counters (see :func:`record_egress`).

Times are integer milliseconds since the epoch (UTC).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cove.model.workload import SIZES
from cove.store import schema as t

if TYPE_CHECKING:
    from cove.store.db import Tx

BILLABLE_STATES = ("running", "stopping")
ANCESTRY = ("org_id", "project_id", "app_id", "env_id")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


clock: Callable[[], int] = _wall_ms  # tests replace it to play a known schedule


def now_ms() -> int:
    return clock()


def ms_of(iso: str | None) -> int | None:
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def size_of(spec: dict[str, Any]) -> str:
    """An instance's size name (older instances carry only cpu/memory)."""
    size = spec.get("size")
    if isinstance(size, str) and size in SIZES:
        return size
    pair = (int(spec.get("cpu_millis", 500)), int(spec.get("memory_mb", 256)))
    return next((k for k, v in SIZES.items() if v == pair), "small")


def instance_billable(res: dict[str, Any] | None) -> bool:
    if res is None:
        return False
    st = res["status"]
    return st.get("state") in BILLABLE_STATES and not st.get("unreachable_since")


def volume_billable(res: dict[str, Any] | None) -> bool:
    return res is not None and not res["metadata"]["deleting"]


# -- spans ------------------------------------------------------------------------------


def open_span(
    tx: Tx,
    meter: str,
    subject_id: str,
    subject_name: str,
    ancestry: dict[str, Any],
    *,
    size: str = "",
    quantity: int = 1,
    memory_mb: int = 0,
    at: int | None = None,
) -> None:
    if _open(tx.conn, subject_id) is not None:
        return
    tx.conn.execute(
        _INSERT_SPAN,
        {
            "meter": meter,
            "subject_id": subject_id,
            "subject_name": subject_name[:80],
            **{c: ancestry.get(c) for c in ANCESTRY},
            "size": size,
            "quantity": quantity,
            "memory_mb": memory_mb,
            "started_ms": now_ms() if at is None else at,
            "ended_ms": None,
            "open": 1,
        },
    )


def close_span(tx: Tx, subject_id: str, *, at: int | None = None) -> None:
    row = _open(tx.conn, subject_id)
    if row is None:
        return
    end = now_ms() if at is None else at
    end = max(int(row.started_ms), end)  # a span never ends before it began
    tx.conn.execute(_CLOSE_SPAN, {"b_id": row.id, "ended_ms": end, "open": None})


_M = t.meter_intervals.c
# built once: see the write path's statements in store.db
_OPEN = sa.select(_M.id, _M.started_ms).where(
    _M.subject_id == sa.bindparam("b_subject"), _M.open == 1
)
_INSERT_SPAN = sa.insert(t.meter_intervals)
_CLOSE_SPAN = sa.update(t.meter_intervals).where(_M.id == sa.bindparam("b_id"))


def _open(conn: Connection, subject_id: str) -> Any:
    return conn.execute(_OPEN, {"b_subject": subject_id}).first()


def observe(tx: Tx, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    """Called by every resource write (same transaction): open or close the span of an
    instance or a volume when its billable state changes."""
    res = after or before
    if res is None:
        return
    kind = res["kind"]
    if kind == "instance":
        was, now = instance_billable(before), instance_billable(after)
        if was == now:
            return
        if now:
            assert after is not None
            spec = after["spec"]
            open_span(
                tx,
                "instance",
                after["id"],
                after["name"],
                _ancestry(tx, after["id"]),
                size=size_of(spec),
                quantity=int(spec.get("cpu_millis", 500)),
                memory_mb=int(spec.get("memory_mb", 256)),
            )
        else:
            lost = ms_of(((after or {}).get("status") or {}).get("unreachable_since"))
            close_span(tx, res["id"], at=lost)
    elif kind == "volume":
        was, now = volume_billable(before), volume_billable(after)
        if was == now:
            return
        if now:
            assert after is not None
            open_span(
                tx,
                "volume",
                after["id"],
                after["name"],
                _ancestry(tx, after["id"]),
                quantity=int(after["spec"].get("size_gb", 1)),
            )
        else:
            close_span(tx, res["id"])


def _ancestry(tx: Tx, rid: str) -> dict[str, Any]:
    row = tx.row(rid)
    return {c: (row[c] if row is not None else None) for c in ANCESTRY}


# -- egress -----------------------------------------------------------------------------


def hour_of(ms: int) -> int:
    return ms - ms % 3_600_000


def record_egress(
    tx: Tx, node_id: str, endpoint_id: str, epoch: str, bytes_out: int, *, at: int | None = None
) -> int:
    """Add what a node's edge sent for an endpoint since its last report; returns the bytes
    added. The counter is cumulative since the edge started (``epoch``): the same report
    twice adds nothing; a new epoch (the edge restarted, its counters from 0) adds all of
    its value; a counter that went backwards in one epoch is taken as a restart too."""
    c = t.meter_counters.c
    key = (c.node_id == node_id, c.endpoint_id == endpoint_id)
    row = tx.conn.execute(sa.select(c.epoch, c.bytes_out).where(*key)).first()
    if row is None:
        delta = bytes_out
        tx.conn.execute(
            sa.insert(t.meter_counters).values(
                node_id=node_id, endpoint_id=endpoint_id, epoch=epoch, bytes_out=bytes_out
            )
        )
    else:
        same = row.epoch == epoch and bytes_out >= int(row.bytes_out)
        delta = bytes_out - int(row.bytes_out) if same else bytes_out
        if row.epoch != epoch or int(row.bytes_out) != bytes_out:
            tx.conn.execute(
                sa.update(t.meter_counters).where(*key).values(epoch=epoch, bytes_out=bytes_out)
            )
    if delta <= 0:
        return 0
    hour = hour_of(now_ms() if at is None else at)
    e = t.meter_egress
    where = (e.c.node_id == node_id, e.c.endpoint_id == endpoint_id, e.c.hour_ms == hour)
    done = tx.conn.execute(sa.update(e).where(*where).values(bytes=e.c.bytes + delta))
    if done.rowcount == 0:
        tx.conn.execute(
            sa.insert(e).values(
                node_id=node_id,
                endpoint_id=endpoint_id,
                hour_ms=hour,
                **_ancestry(tx, endpoint_id),
                bytes=delta,
            )
        )
    return delta


# -- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A span of use clipped to a window; ``ms`` is how long it lasted inside it."""

    meter: str
    subject_id: str
    subject_name: str
    org_id: str | None
    project_id: str | None
    app_id: str | None
    env_id: str | None
    size: str
    quantity: int
    memory_mb: int
    start_ms: int
    end_ms: int
    running: bool  # still open (its end is the window's end or now)

    @property
    def ms(self) -> int:
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class Egress:
    endpoint_id: str
    org_id: str | None
    project_id: str | None
    app_id: str | None
    env_id: str | None
    hour_ms: int
    bytes: int


def _filters(table: sa.Table, where: dict[str, str | None]) -> list[sa.ColumnElement[bool]]:
    return [table.c[k] == v for k, v in where.items() if v is not None]


def spans(
    conn: Connection, start_ms: int, end_ms: int, *, now: int | None = None, **where: str | None
) -> Iterator[Span]:
    """Spans overlapping [start_ms, end_ms), clipped to it (an open span runs until now)."""
    m = t.meter_intervals
    now = now_ms() if now is None else now
    q = sa.select(m).where(
        m.c.started_ms < end_ms,
        sa.or_(m.c.ended_ms.is_(None), m.c.ended_ms > start_ms),
        *_filters(m, where),
    )
    for r in conn.execute(q.order_by(m.c.started_ms, m.c.id)).mappings():
        stop = int(r["ended_ms"]) if r["ended_ms"] is not None else min(now, end_ms)
        lo, hi = max(int(r["started_ms"]), start_ms), min(stop, end_ms)
        if hi <= lo:
            continue
        yield Span(
            meter=r["meter"],
            subject_id=r["subject_id"],
            subject_name=r["subject_name"],
            org_id=r["org_id"],
            project_id=r["project_id"],
            app_id=r["app_id"],
            env_id=r["env_id"],
            size=r["size"],
            quantity=int(r["quantity"]),
            memory_mb=int(r["memory_mb"]),
            start_ms=lo,
            end_ms=hi,
            running=r["ended_ms"] is None,
        )


def egress(conn: Connection, start_ms: int, end_ms: int, **where: str | None) -> Iterator[Egress]:
    """Egress per endpoint and hour, hours starting in [start_ms, end_ms)."""
    e = t.meter_egress
    q = (
        sa.select(
            e.c.endpoint_id,
            e.c.org_id,
            e.c.project_id,
            e.c.app_id,
            e.c.env_id,
            e.c.hour_ms,
            sa.func.sum(e.c.bytes).label("bytes"),
        )
        .where(e.c.hour_ms >= hour_of(start_ms), e.c.hour_ms < end_ms, *_filters(e, where))
        .group_by(e.c.endpoint_id, e.c.org_id, e.c.project_id, e.c.app_id, e.c.env_id, e.c.hour_ms)
        .order_by(e.c.hour_ms, e.c.endpoint_id)
    )
    for r in conn.execute(q).mappings():
        yield Egress(
            endpoint_id=r["endpoint_id"],
            org_id=r["org_id"],
            project_id=r["project_id"],
            app_id=r["app_id"],
            env_id=r["env_id"],
            hour_ms=int(r["hour_ms"]),
            bytes=int(r["bytes"]),
        )


# -- price lists ------------------------------------------------------------------------


def put_price_list(tx: Tx, doc: dict[str, Any], digest: str, *, at: int | None = None) -> bool:
    """Record *doc* as the price list in force from now, unless it already is. True when
    it was new."""
    p = t.price_lists
    last = tx.conn.execute(sa.select(p.c.digest).order_by(p.c.id.desc()).limit(1)).first()
    if last is not None and last.digest == digest:
        return False
    tx.conn.execute(
        sa.insert(p).values(effective_ms=now_ms() if at is None else at, digest=digest, doc=doc)
    )
    return True


def price_lists(conn: Connection) -> list[tuple[int, dict[str, Any]]]:
    """(effective from, doc), oldest first."""
    p = t.price_lists
    return [
        (int(r.effective_ms), dict(r.doc))
        for r in conn.execute(sa.select(p.c.effective_ms, p.c.doc).order_by(p.c.id))
    ]
