"""Pay for what you use: the price list, usage, invoices and project quotas.

GET  /v1/pricing                      the price list in force (no sign-in needed)
GET  /v1/usage?org=&project=&app=&from=&to=&by=    usage in a window, priced
GET  /v1/invoices/{month}?org=        an org's invoice for YYYY-MM (the current month:
                                      to date, with an estimate for the whole month)
GET  /v1/projects/{ref}/quotas        a project's quotas and what it uses
PUT  /v1/projects/{ref}/quotas        change them (org owners)

Usage comes from the spans and egress counters of ``store/meter.py``; each span is priced
with the price list in force at the time (a list change mid-month splits the line).
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from cove import errors
from cove.api import auth
from cove.model import pricing
from cove.model.pricing import PriceList
from cove.model.specs import Quotas
from cove.store import Store, Tx, meter, quotas

MONTH_MS = pricing.SECONDS_PER_MONTH * 1000
MONTH_RE = r"^(\d{4}-(0[1-9]|1[0-2])|current)$"

# what one unit of a line is, per meter: (unit, base units per unit)
#   instance: base = ms           -> seconds
#   volume:   base = GB x ms      -> GB-months (730 h)
#   ipv4:     base = ms           -> months (730 h)
#   egress:   base = bytes        -> GB (10^9 bytes)
UNITS: dict[str, tuple[str, int]] = {
    "instance": ("second", 1000),
    "volume": ("GB-month", MONTH_MS),
    "ipv4": ("month", MONTH_MS),
    "egress": ("GB", pricing.BYTES_PER_GB),
}


def iso_ms(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_time(value: str, what: str) -> int:
    """``YYYY-MM-DD``, an ISO 8601 date-time (UTC unless it says), or ``now``: ms."""
    if value == "now":
        return meter.now_ms()
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise errors.UserError(
            f"{what}={value!r} is not a date", hint="YYYY-MM-DD, 2026-11-28T12:00:00Z or now"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def month_window(month: str) -> tuple[int, int]:
    """[first ms of the month, first ms of the next) in UTC."""
    year, mon = int(month[:4]), int(month[5:7])
    if not 1970 <= year <= 9998:
        raise errors.UserError(f"{month}: no usage is recorded then", hint="YYYY-MM, e.g. 2026-11")
    start = datetime(year, mon, 1, tzinfo=UTC)
    end = datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def current_month(now_ms: int) -> str:
    return datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y-%m")


# -- pricing usage ----------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    start_ms: int  # the first list applies to anything before it too
    end_ms: int | None
    prices: PriceList


def periods(lists: list[tuple[int, dict[str, Any]]], fallback: PriceList) -> list[Period]:
    if not lists:
        return [Period(0, None, fallback)]
    out = []
    for i, (eff, doc) in enumerate(lists):
        nxt = lists[i + 1][0] if i + 1 < len(lists) else None
        out.append(Period(0 if i == 0 else eff, nxt, pricing.from_doc(doc)))
    return out


def _split(per: list[Period], start: int, end: int) -> Iterable[tuple[Period, int, int]]:
    for p in per:
        lo = max(start, p.start_ms)
        hi = end if p.end_ms is None else min(end, p.end_ms)
        if hi > lo:
            yield p, lo, hi


@dataclass
class Line:
    """Usage of one item under one price, summed exactly in base units."""

    project_id: str | None
    app_id: str | None
    subject: str  # a resource's name when grouped by resource, else ""
    meter: str
    size: str
    unit_price: Decimal
    base: int = 0  # ms, GB x ms, or bytes (see UNITS)
    running: bool = False  # includes use that is still going on

    @property
    def item(self) -> str:
        return {
            "instance": f"instance {self.size}",
            "volume": "volume",
            "ipv4": "dedicated IPv4",
            "egress": "egress",
        }[self.meter]

    @property
    def unit(self) -> str:
        return UNITS[self.meter][0]

    @property
    def quantity(self) -> Decimal:
        return Decimal(self.base) / UNITS[self.meter][1]

    @property
    def amount(self) -> Decimal:
        return pricing.money(self.quantity * self.unit_price)


def _price_of(p: PriceList, m: str, size: str) -> Decimal:
    if m == "instance":
        return p.instance_per_second[size if size in p.instance_per_second else "small"]
    if m == "volume":
        return p.volume_gb_month
    if m == "ipv4":
        return p.ipv4_month
    return p.egress_gb


@dataclass
class Bill:
    lines: dict[tuple[Any, ...], Line] = field(default_factory=dict)

    def add(
        self,
        *,
        project_id: str | None,
        app_id: str | None,
        subject: str,
        m: str,
        size: str,
        price: Decimal,
        base: int,
        running: bool = False,
    ) -> None:
        key = (project_id, app_id, subject, m, size, price)
        line = self.lines.get(key)
        if line is None:
            line = self.lines[key] = Line(project_id, app_id, subject, m, size, price)
        line.base += base
        line.running = line.running or running

    def total(self) -> Decimal:
        """The exact sum of the lines (each already exact to a millionth)."""
        return pricing.money(sum((line.amount for line in self.lines.values()), Decimal(0)))


def price_usage(
    spans: Iterable[meter.Span],
    egress: Iterable[meter.Egress],
    per: list[Period],
    *,
    by_resource: bool = False,
) -> Bill:
    """Price spans and egress with the list in force at each moment."""
    bill = Bill()
    for s in spans:
        for p, lo, hi in _split(per, s.start_ms, s.end_ms):
            ms = hi - lo
            base = ms * s.quantity if s.meter == "volume" else ms
            bill.add(
                project_id=s.project_id,
                app_id=s.app_id,
                subject=s.subject_name if by_resource else "",
                m=s.meter,
                size=s.size,
                price=_price_of(p.prices, s.meter, s.size),
                base=base,
                running=s.running,
            )
    for e in egress:
        p = next(x for x, _, _ in _split(per, e.hour_ms, e.hour_ms + 1))
        bill.add(
            project_id=e.project_id,
            app_id=e.app_id,
            subject=e.endpoint_id if by_resource else "",
            m="egress",
            size="",
            price=p.prices.egress_gb,
            base=e.bytes,
        )
    return bill


def projection(spans: Iterable[meter.Span], prices: PriceList, now: int, end: int) -> Decimal:
    """What the use still going on at *now* adds until *end*, at today's prices."""
    extra = Decimal(0)
    rest = max(0, end - now)
    for s in spans:
        if not s.running:
            continue
        base = rest * s.quantity if s.meter == "volume" else rest
        q = Decimal(base) / UNITS[s.meter][1]
        extra += q * _price_of(prices, s.meter, s.size)
    return pricing.money(extra)


# -- routes -----------------------------------------------------------------------------


class QuotasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: int | None = Field(default=None, ge=0, le=10_000)
    vcpu: int | None = Field(default=None, ge=0, le=10_000)
    memory_mb: int | None = Field(default=None, ge=0, le=10_000_000)
    volume_gb: int | None = Field(default=None, ge=0, le=1_000_000)
    dedicated_ipv4: int | None = Field(default=None, ge=0, le=1_000)


def register(app: FastAPI, api: Any, prices: PriceList) -> None:
    store: Store = api.store

    async def principal(authorization: Annotated[str | None, Header()] = None) -> auth.Principal:
        p: auth.Principal = await run_in_threadpool(api.principal, authorization)
        api.require_user(p)
        return p

    User = Annotated[auth.Principal, Depends(principal)]
    Q64 = Annotated[str | None, Query(max_length=64)]

    def record_prices() -> None:
        with store.write() as tx:
            meter.put_price_list(tx, prices.to_doc(), prices.digest())

    @app.on_event("startup")
    async def _prices() -> None:
        await run_in_threadpool(record_prices)

    def price_periods() -> list[Period]:
        with store.read() as conn:
            return periods(meter.price_lists(conn), prices)

    def names(ids: Iterable[str | None]) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in {x for x in ids if x}:
            row = store.get_row(i)
            out[i] = str(row["name"]) if row is not None else f"{i} (deleted)"
        return out

    def rows(bill: Bill) -> list[dict[str, Any]]:
        lines = sorted(
            bill.lines.values(),
            key=lambda ln: (ln.project_id or "", ln.app_id or "", ln.subject, ln.item),
        )
        named = names([x for ln in lines for x in (ln.project_id, ln.app_id)])
        return [
            {
                "project": named.get(ln.project_id or "", ""),
                "app": named.get(ln.app_id or "", ""),
                **({"resource": ln.subject} if ln.subject else {}),
                "item": ln.item,
                "quantity": pricing.text(ln.quantity.quantize(pricing.AMOUNT_STEP)),
                "unit": ln.unit,
                "unit_price": pricing.text(ln.unit_price),
                "amount": pricing.text(ln.amount),
                "ongoing": ln.running,
            }
            for ln in lines
        ]

    @app.get("/v1/pricing", tags=["billing"], summary="The price list in force")
    async def get_pricing() -> dict[str, Any]:
        """What cove charges (server config; docs/billing.md). Money is exact decimal."""

        def run() -> dict[str, Any]:
            with store.read() as conn:
                lists = meter.price_lists(conn)
            cur = periods(lists, prices)[-1]
            return {
                **cur.prices.to_doc(),
                "effective_from": iso_ms(lists[-1][0]) if lists else None,
                "hours_per_month": pricing.HOURS_PER_MONTH,
                "items": cur.prices.table(),
            }

        return await run_in_threadpool(run)

    @app.get("/v1/usage", tags=["billing"], summary="Usage in a window, priced")
    async def usage(
        who: User,
        org: Q64 = None,
        project: Q64 = None,
        app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
        from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
        to: Annotated[str | None, Query(max_length=40)] = None,
        by: Annotated[str, Query(pattern="^(app|resource)$")] = "app",
    ) -> dict[str, Any]:
        """Defaults: from the start of the current month (UTC) until now."""

        def run() -> dict[str, Any]:
            ctx = api.context(who, org, project, app_, None, need="org")
            now = meter.now_ms()
            start = parse_time(from_, "from") if from_ else month_window(current_month(now))[0]
            end = parse_time(to, "to") if to else now
            if end <= start:
                raise errors.UserError(
                    f"the window is empty: to ({iso_ms(end)}) is not after from ({iso_ms(start)})",
                    hint="--from must be before --to",
                )
            where = {
                "org_id": ctx.org["id"],
                "project_id": ctx.project["id"] if ctx.project else None,
                "app_id": ctx.app["id"] if ctx.app else None,
            }
            with store.read() as conn:
                sp = list(meter.spans(conn, start, min(end, now), now=now, **where))
                eg = list(meter.egress(conn, start, min(end, now), **where))
            per = price_periods()
            bill = price_usage(sp, eg, per, by_resource=by == "resource")
            return {
                "org": ctx.org["name"],
                "project": ctx.project["name"] if ctx.project else None,
                "app": ctx.app["name"] if ctx.app else None,
                "from": iso_ms(start),
                "to": iso_ms(end),
                "currency": per[-1].prices.currency,
                "items": rows(bill),
                "total": pricing.text(bill.total()),
            }

        return await run_in_threadpool(run)

    @app.get("/v1/invoices/{month}", tags=["billing"], summary="An org's invoice for a month")
    async def invoice(
        who: User,
        month: Annotated[str, Path(pattern=MONTH_RE, description="YYYY-MM or 'current'")],
        org: Q64 = None,
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            ctx = api.context(who, org, None, None, None, need="org")
            now = meter.now_ms()
            month_ = current_month(now) if month == "current" else month
            start, end = month_window(month_)
            if start > now:
                raise errors.UserError(
                    f"{month_} has not begun", hint=f"the current month is {current_month(now)}"
                )
            with store.read() as conn:
                sp = list(meter.spans(conn, start, end, now=now, org_id=ctx.org["id"]))
                eg = list(meter.egress(conn, start, end, org_id=ctx.org["id"]))
            per = price_periods()
            bill = price_usage(sp, eg, per)
            total = bill.total()
            doc: dict[str, Any] = {
                "org": ctx.org["name"],
                "month": month_,
                "from": iso_ms(start),
                "to": iso_ms(end),
                "currency": per[-1].prices.currency,
                "state": "closed" if end <= now else "open",
                "lines": rows(bill),
                "total": pricing.text(total),
                "due": pricing.text(pricing.due(total)),
            }
            if end > now:
                extra = projection(sp, per[-1].prices, now, end)
                doc["to_date"] = iso_ms(now)
                doc["estimate"] = {
                    "total": pricing.text(total + extra),
                    "due": pricing.text(pricing.due(total + extra)),
                    "note": "if everything running now keeps running until the month ends, "
                    "at today's prices; egress counted to date only",
                }
            return doc

        return await run_in_threadpool(run)

    def project_ctx(who: auth.Principal, ref: str, org: str | None) -> Any:
        return api.context(who, org, ref, None, None, need="project")

    def quota_doc(project_id: str) -> dict[str, Any]:
        with store.read() as conn:
            tx = Tx(conn)  # reads only: the transaction helpers on a read connection
            project = tx.get(project_id)
            assert project is not None
            use = quotas.project_use(tx, project_id)
            limit = quotas.limits(project)
        return {
            "project": project["name"],
            "quotas": [
                {
                    "dimension": d,
                    "limit": limit[d],
                    "in_use": use.as_dict()[d],
                    "free": max(0, limit[d] - use.as_dict()[d]),
                }
                for d in quotas.DIMENSIONS
            ],
        }

    @app.get("/v1/projects/{ref}/quotas", tags=["projects"], summary="Quotas and use")
    async def get_quotas(
        who: User, ref: Annotated[str, Path(max_length=64)], org: Q64 = None
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            ctx = project_ctx(who, ref, org)
            return quota_doc(ctx.project["id"])

        return await run_in_threadpool(run)

    @app.put("/v1/projects/{ref}/quotas", tags=["projects"], summary="Change quotas (owners)")
    async def put_quotas(
        who: User, body: QuotasBody, ref: Annotated[str, Path(max_length=64)], org: Q64 = None
    ) -> dict[str, Any]:
        """Only the given dimensions change. A limit below the current use is accepted:
        nothing running stops, but nothing may grow until the use is under it."""

        def run() -> dict[str, Any]:
            ctx = project_ctx(who, ref, org)
            api.require_member(who, ctx.org["id"], owner=True)
            change = body.model_dump(exclude_none=True)
            if not change:
                raise errors.UserError(
                    "nothing to change", hint="e.g. --set instances=40 --set vcpu=32"
                )
            with store.write() as tx:
                project = tx.get(ctx.project["id"], for_update=True)
                assert project is not None
                before = quotas.limits(project)
                new = Quotas.model_validate({**before, **change}).model_dump()
                if new != before:
                    spec = dict(project["spec"], quotas=new)
                    project = tx.update(project["id"], spec=spec)
                    moved = ", ".join(f"{k} {before[k]} -> {new[k]}" for k in change)
                    tx.event(project, "Normal", "QuotasChanged", f"{moved} by {who.email}")
            return quota_doc(ctx.project["id"])

        return await run_in_threadpool(run)


def monthly_cost(prices: PriceList, res: dict[str, Any]) -> dict[str, Any] | None:
    """What a resource costs per month at today's prices (describe shows it)."""
    kind, spec = res["kind"], res["spec"]
    if kind == "instance":
        size = meter.size_of(spec)
        return {
            "per_month": pricing.text(prices.instance_month(size)),
            "currency": prices.currency,
            "basis": f"size {size} for {pricing.HOURS_PER_MONTH} h at "
            f"{pricing.text(prices.instance_per_second[size])}/s, billed per second while it runs",
        }
    if kind == "volume":
        gb = int(spec.get("size_gb", 0))
        return {
            "per_month": pricing.text(prices.volume_month(gb)),
            "currency": prices.currency,
            "basis": f"{gb} GB provisioned at {pricing.text(prices.volume_gb_month)}/GB-month",
        }
    if kind == "endpoint":
        ipv4 = bool(spec.get("ipv4"))
        fixed = prices.ipv4_month if ipv4 else Decimal(0)
        return {
            "per_month": pricing.text(pricing.money(fixed)),
            "currency": prices.currency,
            "basis": (
                f"dedicated IPv4 at {pricing.text(prices.ipv4_month)}/month; " if ipv4 else ""
            )
            + f"plus egress at {pricing.text(prices.egress_gb)}/GB",
        }
    return None
