"""Property: whatever sequence of starts, stops, scales and volume changes happens, at
whatever times, the metered spans equal an independent model of who was billable when,
priced lines add up, and usage over two adjacent windows equals usage over their union."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.api import billing
from cove.model import pricing
from cove.model.pricing import PriceList
from cove.model.workload import SIZES
from cove.store import Store, meter

START = 1_790_000_000_000
STATES = ("pending", "starting", "running", "stopping", "stopped", "failed", "backoff")

op = st.one_of(
    st.tuples(st.just("state"), st.integers(0, 5), st.sampled_from(STATES)),
    st.tuples(st.just("scale"), st.integers(0, 6), st.sampled_from(sorted(SIZES))),
    st.tuples(st.just("advance"), st.integers(1, 10_000_000), st.just("")),
    st.tuples(st.just("volume"), st.integers(1, 500), st.just("")),
    st.tuples(st.just("unvolume"), st.integers(0, 3), st.just("")),
)


class Clock:
    def __init__(self) -> None:
        self.ms = START

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    c = Clock()
    monkeypatch.setattr(meter, "clock", c)
    yield c


def _tree(store: Store) -> tuple[str, str]:
    with store.write() as tx:
        org = tx.create("org", "acme")
        prj = tx.create("project", "shop", parent=org["id"])
        app = tx.create("app", "web", parent=prj["id"])
        env = tx.create("environment", "prod", parent=app["id"], spec={"scale": {}})
        wl = tx.create("workload", "web", parent=env["id"])
    return env["id"], wl["id"]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=40), cut=st.floats(0.0, 1.0))
def test_spans_match_a_model_and_prices_add_up(
    sqlite_store: Store, clock: Clock, ops: list[tuple[str, int, str]], cut: float
) -> None:
    store = sqlite_store
    clock.ms = START
    env_id, wl_id = _tree(store)
    try:
        _play(store, clock, env_id, wl_id, ops, cut)
    finally:
        with store.write() as tx:  # the next example starts from an empty store
            for kind in ("instance", "volume", "workload", "environment", "app", "project", "org"):
                for rid in store.ids_of_kind(kind):
                    tx.delete(rid)
            tx.conn.exec_driver_sql("DELETE FROM meter_intervals")


def _play(
    store: Store,
    clock: Clock,
    env_id: str,
    wl_id: str,
    ops: list[tuple[str, int, str]],
    cut: float,
) -> None:
    # the model: per subject, billable since (or None), and the ms billed so far
    since: dict[str, int | None] = {}
    billed: dict[str, int] = {}
    rate: dict[str, tuple[str, str, int]] = {}  # id -> (meter, size, quantity)
    instances: list[str] = []
    volumes: list[str] = []

    def turn(rid: str, on: bool) -> None:
        was = since.get(rid)
        if on and was is None:
            since[rid] = clock.ms
        elif not on and was is not None:
            billed[rid] = billed.get(rid, 0) + clock.ms - was
            since[rid] = None

    for kind, n, arg in ops:
        with store.write() as tx:
            if kind == "advance":
                clock.ms += n
            elif kind == "state" and instances:
                rid = instances[n % len(instances)]
                cur = tx.get(rid)
                assert cur is not None
                tx.update(rid, status=dict(cur["status"], state=arg))
                turn(rid, arg in ("running", "stopping"))
            elif kind == "scale":
                while len(instances) < n:
                    cpu, mem = SIZES[arg]
                    spec = {"size": arg, "cpu_millis": cpu, "memory_mb": mem}
                    ins = tx.create("instance", None, parent=wl_id, spec=spec)
                    instances.append(ins["id"])
                    rate[ins["id"]] = ("instance", arg, cpu)
                while len(instances) > n:
                    rid = instances.pop()
                    tx.delete(rid)
                    turn(rid, False)
            elif kind == "volume":
                vol = tx.create("volume", None, parent=env_id, spec={"size_gb": n})
                volumes.append(vol["id"])
                rate[vol["id"]] = ("volume", "", n)
                turn(vol["id"], True)
            elif kind == "unvolume" and volumes:
                rid = volumes.pop(n % len(volumes))
                tx.update(rid, deleting=True)
                turn(rid, False)
    end = clock.ms + 1
    for rid in list(since):
        if since[rid] is not None:
            billed[rid] = billed.get(rid, 0) + clock.ms - since[rid]  # type: ignore[operator]

    with store.read() as conn:
        spans = list(meter.spans(conn, START, end))
        # adjacent windows add up to their union
        mid = START + int((end - START) * cut)
        left = list(meter.spans(conn, START, mid))
        right = list(meter.spans(conn, mid, end))
    got: dict[str, int] = {}
    for s in spans:
        got[s.subject_id] = got.get(s.subject_id, 0) + s.ms
    assert got == {k: v for k, v in billed.items() if v > 0}

    per = billing.periods([], PriceList())
    bill = billing.price_usage(spans, [], per)
    halves = [billing.price_usage(x, [], per) for x in (left, right)]
    assert bill.total() == sum((ln.amount for ln in bill.lines.values()), Decimal(0))
    for key, line in bill.lines.items():
        assert line.amount == pricing.money(line.quantity * line.unit_price)
        assert line.base == sum(h.lines[key].base for h in halves if key in h.lines)
    # and the priced base is what the model says
    want: dict[tuple[str, str], int] = {}
    for rid, ms in billed.items():
        m, size, qty = rate[rid]
        k = (m, size)
        want[k] = want.get(k, 0) + (ms * qty if m == "volume" else ms)
    have: dict[tuple[str, str], int] = {}
    for line in bill.lines.values():
        k = (line.meter, line.size)
        have[k] = have.get(k, 0) + line.base
    assert have == {k: v for k, v in want.items() if v > 0}
