"""Metering, pricing, invoices and quotas against the real API, controllers and store (both
backends). A fake metering clock plays known schedules; nodes are played through the API
the agents use (status reports, edge reports)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from cove.api import create_app
from cove.control.controllers import NODE_GRACE
from cove.model.pricing import PriceList
from cove.model.resource import get_condition
from cove.store import Store, meter
from cove.store import schema as t
from tests.fixtures.images import benign_layer, write_oci_layout
from tests.integration.helpers import (
    User,
    create,
    get,
    ok,
    problem,
    set_join_token,
    settle,
    signup,
    snapshot,
)

pytestmark = pytest.mark.timeout(120)
SCOPE = {"project": "shop", "app": "web", "env": "prod"}
T0 = int(datetime(2026, 11, 10, tzinfo=UTC).timestamp() * 1000)
P = PriceList()


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


class World:
    def __init__(self, api: TestClient, store: Store, user: User, image: str) -> None:
        self.api, self.store, self.user, self.image = api, store, user, image
        token = set_join_token(store)
        reg = ok(
            api.post(
                "/v1/nodes/register",
                json={
                    "name": "n1",
                    "join_token": token,
                    "capacity": {"vcpu": 64, "memory_mb": 262_144},
                    "driver": "sandbox",
                },
            ),
            201,
        )
        self.node_id = reg["node"]["id"]
        self.node = {"Authorization": f"Bearer {reg['token']}"}
        self.beat()

    def beat(self) -> None:
        ok(self.api.post(f"/v1/nodes/{self.node_id}/heartbeat", json={}, headers=self.node))

    def deploy(self, count: int = 1, size: str = "small", **extra: Any) -> Any:
        body = {"image": self.image, "workloads": {"web": {"count": count, "size": size}}}
        return self.api.post(
            "/v1/deploys", json={**body, **SCOPE, **extra}, headers=self.user.headers
        )

    def instances(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = get(self.api, self.user, "/v1/instances", **SCOPE)["items"]
        return [i for i in items if i["spec"].get("desired") == "running"]

    def report(self, ins: dict[str, Any], state: str) -> None:
        body = {"state": state, "health": "passing", "ready": state == "running"}
        r = self.api.put(f"/v1/instances/{ins['id']}/status", json=body, headers=self.node)
        ok(r)

    def run_all(self) -> None:
        settle(self.store)
        for ins in self.instances():
            if ins["spec"].get("node") and ins["status"].get("state") != "running":
                self.report(ins, "running")
        settle(self.store)

    def stop_unwanted(self) -> None:
        """What the agent does with instances no longer wanted: stop them, say so."""
        items = get(self.api, self.user, "/v1/instances", **SCOPE)["items"]
        for ins in items:
            if ins["spec"].get("desired") != "running" and ins["status"].get("state") not in (
                "stopped",
                "destroyed",
            ):
                self.report(ins, "stopped")
        settle(self.store)

    def scale(self, n: int) -> Any:
        env = get(self.api, self.user, "/v1/environments/prod", **SCOPE)
        return self.api.patch(
            f"/v1/environments/{env['id']}",
            json={"spec": {"scale": {"web": n}}},
            headers=self.user.headers,
        )

    def edge_report(self, ep_id: str, epoch: str, bytes_out: int) -> None:
        body = {"epoch": epoch, "endpoints": {ep_id: {"counters": {"bytes_out": bytes_out}}}}
        ok(self.api.put(f"/v1/nodes/{self.node_id}/edge", json=body, headers=self.node))

    def invoice(self, month: str = "2026-11") -> dict[str, Any]:
        doc: dict[str, Any] = get(self.api, self.user, f"/v1/invoices/{month}")
        return doc


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(T0)
    monkeypatch.setattr(meter, "clock", c)
    return c


@pytest.fixture
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    img = write_oci_layout(tmp_path_factory.mktemp("img") / "img", [benign_layer()], tag="v1")
    return f"oci:{img.layout}:v1"


@pytest.fixture
def world(
    store: Store, image: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    monkeypatch.setenv("COVE_LOCAL_IMAGES", "1")
    with TestClient(create_app(store)) as api:
        u = signup(api, "acme")
        quotas = {
            "instances": 4,
            "vcpu": 2,
            "memory_mb": 1000,
            "volume_gb": 20,
            "dedicated_ipv4": 1,
        }
        create(api, u, "projects", {"name": "shop", "spec": {"quotas": quotas}})
        create(api, u, "apps", {"name": "web", "project": "shop"})
        settle(store)
        yield World(api, store, u, image)


def lines_by_item(inv: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {ln["item"]: ln for ln in inv["lines"]}


def test_a_known_schedule_is_priced_exactly(world: World, clock: Clock) -> None:
    w = world
    ok(w.deploy(count=1, size="small"), 202)
    create(w.api, w.user, "volumes", {"name": "data", **SCOPE, "spec": {"size_gb": 10}})
    port = {"port": 80, "workload": "web", "target_port": 8080}
    ep = create(
        w.api,
        w.user,
        "endpoints",
        {"name": "pub", **SCOPE, "spec": {"ipv4": True, "ports": [port]}},
    )
    ep_id = ep["resource"]["id"]
    w.run_all()  # running at T0
    clock.advance(3600)
    w.edge_report(ep_id, "a", 2_000_000_000)
    w.edge_report(ep_id, "a", 2_000_000_000)  # the same report again adds nothing
    w.edge_report(ep_id, "b", 500_000_000)  # the edge restarted: its counter from 0
    ok(w.scale(0), 202)
    settle(w.store)
    w.stop_unwanted()  # stopped at T0 + 1 h
    ok(w.api.delete("/v1/volumes/data", params=SCOPE, headers=w.user.headers), 202)
    ok(w.api.delete(f"/v1/endpoints/{ep_id}", headers=w.user.headers), 202)
    settle(w.store)
    clock.advance(3600)  # an hour later: nothing more is billed

    inv = w.invoice()
    lines = lines_by_item(inv)
    assert set(lines) == {"instance small", "volume", "dedicated IPv4", "egress"}, inv
    small = lines["instance small"]
    assert (small["quantity"], small["unit"]) == ("3600.000000", "second")
    assert Decimal(small["amount"]) == Decimal(3600) * P.instance_per_second["small"]
    vol = Decimal(10 * 3_600_000) / (730 * 3_600_000)  # GB-months
    assert Decimal(lines["volume"]["amount"]) == (vol * P.volume_gb_month).quantize(
        Decimal("0.000001")
    )
    ipv4 = Decimal(1) / 730
    assert Decimal(lines["dedicated IPv4"]["amount"]) == (ipv4 * P.ipv4_month).quantize(
        Decimal("0.000001")
    )
    assert (lines["egress"]["quantity"], lines["egress"]["amount"]) == ("2.500000", "0.050000")
    total = sum(Decimal(ln["amount"]) for ln in inv["lines"])
    assert Decimal(inv["total"]) == total  # the lines add up
    assert inv["due"] == str(total.quantize(Decimal("0.01")))
    assert inv["state"] == "open" and Decimal(inv["estimate"]["total"]) == total  # nothing runs

    # usage for the app, by resource, over the first half hour only
    half = get(
        w.api,
        w.user,
        "/v1/usage",
        project="shop",
        app="web",
        by="resource",
        **{"from": "2026-11-10T00:00:00Z", "to": "2026-11-10T00:30:00Z"},
    )
    [ins_line] = [i for i in half["items"] if i["item"] == "instance small"]
    assert ins_line["quantity"] == "1800.000000" and ins_line["resource"].startswith("web-")

    # a month before anything ran is empty; a month to come is refused
    assert w.invoice("2026-10")["lines"] == []
    problem(w.api.get("/v1/invoices/2027-01", headers=w.user.headers), 422)
    problem(w.api.get("/v1/invoices/2026-13", headers=w.user.headers), 422)


def test_the_current_month_has_a_running_estimate(world: World, clock: Clock) -> None:
    w = world
    ok(w.deploy(count=2, size="nano"), 202)
    w.run_all()
    clock.advance(600)
    inv = w.invoice("current")
    assert inv["month"] == "2026-11" and inv["state"] == "open"
    [line] = inv["lines"]
    assert line["quantity"] == "1200.000000" and line["ongoing"] is True
    rest_ms = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() * 1000) - clock.ms
    projected = Decimal(2 * rest_ms) / 1000 * P.instance_per_second["nano"]
    want = Decimal(inv["total"]) + projected.quantize(Decimal("0.000001"))
    assert Decimal(inv["estimate"]["total"]) == want
    # describe shows what an instance costs per month
    ins = get(w.api, w.user, f"/v1/instances/{w.instances()[0]['id']}")
    assert ins["status"]["cost"]["per_month"] == str(P.instance_month("nano"))


def test_restarts_and_lost_nodes_neither_lose_nor_repeat_usage(
    store: Store, world: World, clock: Clock
) -> None:
    w = world
    ok(w.deploy(count=1), 202)
    w.run_all()
    [ins] = w.instances()
    clock.advance(100)
    # the agent restarts and re-adopts: it reports the same state again
    w.report(ins, "running")
    # the server restarts: a new API process on the same database
    with TestClient(create_app(store)) as api2:
        r = api2.put(
            f"/v1/instances/{ins['id']}/status",
            json={"state": "running", "health": "passing", "ready": True},
            headers=w.node,
        )
        ok(r)
    clock.advance(100)
    with store.read() as conn:
        rows = conn.execute(sa.select(t.meter_intervals)).mappings().all()
    assert len(rows) == 1 and rows[0]["open"] == 1, rows

    # the node goes silent: its instance is billed until the node's last heartbeat
    node = get(w.api, w.user, f"/v1/nodes/{w.node_id}")
    last = meter.ms_of(node["status"]["last_heartbeat"])
    assert last is not None
    past = datetime.fromtimestamp(last / 1000 - NODE_GRACE - 5, UTC)
    store.heartbeat(w.node_id, at=past.isoformat().replace("+00:00", "Z"))
    settle(store)
    with store.read() as conn:
        rows = conn.execute(sa.select(t.meter_intervals)).mappings().all()
    assert len(rows) == 1 and rows[0]["open"] is None, rows
    assert rows[0]["ended_ms"] == max(T0, meter.ms_of(past.isoformat()) or 0)
    # it reports again: billing resumes from then, in a new span
    w.beat()
    settle(store)
    with store.read() as conn:
        rows = conn.execute(sa.select(t.meter_intervals).order_by("id")).mappings().all()
    assert [r["open"] for r in rows] == [None, 1], rows


def test_a_quota_refusal_for_each_dimension_creates_nothing(world: World) -> None:
    w = world
    cases = [
        (lambda: w.deploy(count=5, size="nano"), "instances"),  # 5 > 4
        (lambda: w.deploy(count=3, size="medium"), "vcpu"),  # 3 x 1 vCPU > 2
        (lambda: w.deploy(count=1, size="xlarge"), "vcpu"),  # 4 vCPU > 2
        (lambda: w.deploy(count=4, size="small"), "memory_mb"),  # 2 vCPU, but 1024 MiB > 1000
    ]
    for attempt, dim in cases:
        before = snapshot(w.store)
        doc = problem(attempt(), 422, "quota_exceeded")
        assert doc["quota"]["dimension"] == dim, doc
        assert "cove projects quotas shop --set" in doc["hint"], doc
        assert snapshot(w.store) == before, f"a refused deploy ({dim}) wrote something"

    before = snapshot(w.store)
    doc = problem(
        w.api.post(
            "/v1/volumes",
            json={"name": "big", **SCOPE, "spec": {"size_gb": 21}},
            headers=w.user.headers,
        ),
        422,
        "quota_exceeded",
    )
    assert doc["quota"] == {"dimension": "volume_gb", "limit": 20, "in_use": 0, "requested": 21}
    assert snapshot(w.store) == before

    ok(w.deploy(count=1), 202)
    settle(w.store)
    before = snapshot(w.store)
    doc = problem(w.scale(5), 422, "quota_exceeded")
    assert doc["quota"]["dimension"] == "instances" and doc["quota"]["in_use"] == 1
    assert snapshot(w.store) == before

    port = {"port": 80, "workload": "web", "target_port": 8080}
    create(
        w.api, w.user, "endpoints", {"name": "a", **SCOPE, "spec": {"ipv4": True, "ports": [port]}}
    )
    before = snapshot(w.store)
    doc = problem(
        w.api.post(
            "/v1/endpoints",
            json={"name": "b", **SCOPE, "spec": {"ipv4": True, "ports": [port]}},
            headers=w.user.headers,
        ),
        422,
        "quota_exceeded",
    )
    assert doc["quota"]["dimension"] == "dedicated_ipv4"
    assert snapshot(w.store) == before


def test_quotas_are_read_by_members_changed_by_owners_and_bind_the_scheduler(
    world: World,
) -> None:
    w = world
    ok(w.deploy(count=2), 202)
    w.run_all()
    doc = get(w.api, w.user, "/v1/projects/shop/quotas")
    use = {q["dimension"]: q for q in doc["quotas"]}
    assert use["instances"]["in_use"] == 2 and use["vcpu"]["in_use"] == 1.0, doc
    assert use["memory_mb"] == {"dimension": "memory_mb", "limit": 1000, "in_use": 512, "free": 488}

    # a member who is not an owner reads them but cannot change them
    bob = signup(w.api, "bobs", email="bob@example.com")
    ok(
        w.api.post(
            "/v1/orgs/acme/members", json={"email": "bob@example.com"}, headers=w.user.headers
        ),
        201,
    )
    assert get(w.api, bob, "/v1/projects/shop/quotas", org="acme")["project"] == "shop"
    r = w.api.put("/v1/projects/shop/quotas", params={"org": "acme"}, json={"instances": 9},
                  headers=bob.headers)  # fmt: skip
    problem(r, 403)
    problem(w.api.put("/v1/projects/shop/quotas", json={}, headers=w.user.headers), 422)
    problem(
        w.api.put("/v1/projects/shop/quotas", json={"instances": -1}, headers=w.user.headers), 422
    )
    problem(w.api.put("/v1/projects/shop/quotas", json={"gpus": 1}, headers=w.user.headers), 422)

    # lowered below the use: what runs keeps running, a new release places only what fits
    doc = ok(w.api.put("/v1/projects/shop/quotas", json={"instances": 1}, headers=w.user.headers))
    assert {q["dimension"]: q["limit"] for q in doc["quotas"]}["instances"] == 1
    ok(w.deploy(count=2), 202)  # no growth (2 -> 2): accepted although over the quota
    settle(w.store)
    fresh = [i for i in w.instances() if i["spec"]["release_name"] == "v2"]
    placed = [i for i in fresh if i["spec"].get("node")]
    waiting = [i for i in fresh if not i["spec"].get("node")]
    assert len(placed) == 1 and len(waiting) == 1, fresh
    cond = get_condition(waiting[0]["status"], "Scheduled")
    assert cond is not None and cond["reason"] == "QuotaExceeded", waiting[0]["status"]
    assert "instances quota is 1" in cond["message"]


def test_the_price_list_in_force_prices_each_span(store: Store, clock: Clock) -> None:
    """A price change mid-month splits the line: each part at its own price."""
    cheap = PriceList()
    dear = PriceList.model_validate({**cheap.to_doc(), "ipv4_month": "7.30"})
    with TestClient(create_app(store, prices=cheap)) as api:
        u = signup(api, "acme")
        create(api, u, "projects", {"name": "shop"})
        create(api, u, "apps", {"name": "web", "project": "shop"})
        port = {"port": 80, "workload": "web", "target_port": 80}
        spec = {"ipv4": True, "ports": [port]}
        ep = create(api, u, "endpoints", {"name": "pub", **SCOPE, "spec": spec})
        assert ok(api.get("/v1/pricing"))["ipv4_month"] == "2.00"
    clock.advance(3600)
    with TestClient(create_app(store, prices=dear)) as api:  # the server restarts, new prices
        doc = ok(api.get("/v1/pricing"))
        assert (doc["ipv4_month"], doc["effective_from"]) == ("7.30", "2026-11-10T01:00:00.000Z")
        clock.advance(3600)
        ok(api.delete(f"/v1/endpoints/{ep['resource']['id']}", headers=u.headers), 202)
        settle(store)
        inv = get(api, u, "/v1/invoices/2026-11")
    amounts = sorted((ln["unit_price"], ln["amount"]) for ln in inv["lines"])
    assert amounts == [("2.00", "0.002740"), ("7.30", "0.010000")], inv


def test_a_wrong_price_list_is_refused_clearly(tmp_path: Path) -> None:
    from cove import errors
    from cove.model import pricing

    bad = tmp_path / "prices.toml"
    for text, words in [
        ("ipv4_month = 2.5\n", "write prices as strings"),
        ('ipv4_month = "-1"\n', "not negative"),
        ('egress_gb = "lots"\n', "not a decimal"),
        ('[instance_per_second]\nhuge = "1"\n', "unknown size"),
        ("ipv4_month = \n", "not valid TOML"),
        ('colour = "red"\n', "colour"),
    ]:
        bad.write_text(text)
        with pytest.raises(errors.UserError) as exc:
            pricing.load(bad)
        assert words in exc.value.detail, (text, exc.value.detail)
    bad.write_text('currency = "EUR"\negress_gb = "0.05"\n')
    assert pricing.load(bad).egress_gb == Decimal("0.05")
