"""The price list and money arithmetic: exact decimals, one rounding per line."""

from __future__ import annotations

from decimal import Decimal

import pytest

from cove.api import billing
from cove.model import pricing
from cove.model.pricing import PriceList
from cove.store.meter import Egress, Span


def span(meter: str, ms: int, *, size: str = "small", qty: int = 500, start: int = 0) -> Span:
    return Span(
        meter=meter,
        subject_id=f"{meter}-1",
        subject_name="x",
        org_id="org_1",
        project_id="prj_1",
        app_id="app_1",
        env_id="env_1",
        size=size,
        quantity=qty,
        memory_mb=256,
        start_ms=start,
        end_ms=start + ms,
        running=False,
    )


def test_defaults_are_documented_values_and_print_without_exponents() -> None:
    p = PriceList()
    doc = p.to_doc()
    assert doc["instance_per_second"]["nano"] == "0.0000008"  # not 8E-7
    assert doc["volume_gb_month"] == "0.15" and doc["ipv4_month"] == "2.00"
    assert p.instance_month("small") == Decimal("4.204800")  # 730 h x 3600 s x 0.0000016
    assert [r["item"] for r in p.table()][-3:] == ["volume", "dedicated IPv4", "egress"]


def test_a_price_list_round_trips_and_its_digest_follows_its_content() -> None:
    p = PriceList()
    assert pricing.from_doc(p.to_doc()) == p
    q = PriceList.model_validate({**p.to_doc(), "egress_gb": "0.03"})
    assert q.digest() != p.digest() and PriceList().digest() == p.digest()


@pytest.mark.parametrize(
    "doc",
    [
        {"egress_gb": 0.1},  # a float: refused, money is exact
        {"egress_gb": "-1"},
        {"egress_gb": "NaN"},
        {"egress_gb": "1e400000"},
        {"egress_gb": "0.0000000000001"},  # 13 places
        {"instance_per_second": {"small": "1"}},  # every size needs a price
        {"instance_per_second": "cheap"},
        {"currency": "usd"},
        {"surprise": "1"},
    ],
)
def test_bad_price_lists_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PriceList.model_validate(doc)


def test_lines_are_priced_once_and_totals_are_the_sum_of_lines() -> None:
    per = billing.periods([], PriceList())
    spans = [
        span("instance", 1_001, size="nano"),  # 1.001 s
        span("instance", 2_002, size="nano", start=5_000),
        span("volume", 3_600_000, qty=7),  # 7 GB for an hour
        span("ipv4", 3_600_000 * 730),  # a whole month
    ]
    egress = [Egress("ep_1", "org_1", "prj_1", "app_1", "env_1", 0, 1_234_567_891)]
    bill = billing.price_usage(spans, egress, per)
    lines = {ln.item: ln for ln in bill.lines.values()}
    nano = lines["instance nano"]
    assert nano.base == 3_003 and nano.quantity == Decimal("3.003")
    assert nano.amount == Decimal("0.000002")  # 3.003 x 0.0000008 = 0.0000024024, once
    assert lines["dedicated IPv4"].amount == Decimal("2.000000")
    vol = Decimal(7 * 3_600_000) / (730 * 3_600_000) * Decimal("0.15")
    assert lines["volume"].amount == vol.quantize(pricing.AMOUNT_STEP)
    assert lines["egress"].amount == Decimal("0.024691")  # 1.234567891 GB x 0.02
    assert bill.total() == sum((ln.amount for ln in bill.lines.values()), Decimal(0))
    assert pricing.due(Decimal("2.005")) == Decimal("2.01")  # cents, half-up


def test_a_price_change_splits_a_span_at_the_moment_it_took_effect() -> None:
    cheap, dear = PriceList(), PriceList.model_validate({**PriceList().to_doc(), "ipv4_month": "4"})
    per = billing.periods([(0, cheap.to_doc()), (1000, dear.to_doc())], cheap)
    bill = billing.price_usage([span("ipv4", 3000)], [], per)
    bases = sorted((str(ln.unit_price), ln.base) for ln in bill.lines.values())
    assert bases == [("2.00", 1000), ("4", 2000)]


def test_month_windows_are_utc_calendar_months() -> None:
    start, end = billing.month_window("2024-02")
    assert (end - start) == 29 * 24 * 3_600_000  # a leap February
    s12, e12 = billing.month_window("2026-12")
    assert billing.iso_ms(s12) == "2026-12-01T00:00:00.000Z"
    assert billing.iso_ms(e12) == "2027-01-01T00:00:00.000Z"
