"""The price list and the arithmetic of money.

Money is ``Decimal``, never float. Usage is measured in milliseconds and bytes (integers);
quantities are exact decimals of those (seconds = ms / 1000, GB = bytes / 10^9); a line's
amount is quantity x unit price, rounded once to ``AMOUNT_STEP`` (a millionth of the
currency unit, half-even). An invoice's total is the exact sum of its lines; the amount due
is that total rounded to cents (half-up).

Monthly prices (volumes per GB-month, dedicated IPv4 per month) are charged per hour
at 1/730 of the monthly price: a month is 730 hours (365 x 24 / 12), the convention the
large clouds use, so a resource kept a whole month costs about its monthly price whatever
the month's length.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cove import errors
from cove.model.workload import SIZES

AMOUNT_STEP = Decimal("0.000001")
CENT = Decimal("0.01")
HOURS_PER_MONTH = 730
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600
MS_PER_HOUR = 3_600_000
BYTES_PER_GB = 1_000_000_000

# per second, by size: ~USD 2.10 (nano) to ~33.64 (xlarge) for a month of 730 hours
DEFAULT_INSTANCE_PER_SECOND: dict[str, str] = {
    "nano": "0.0000008",
    "small": "0.0000016",
    "medium": "0.0000032",
    "large": "0.0000064",
    "xlarge": "0.0000128",
}


def _price(value: Any) -> Decimal:
    """A price from config: a decimal string or an integer (floats refused: they are
    binary approximations, and money is exact)."""
    if isinstance(value, (bool, float)):
        raise ValueError(f'write prices as strings, e.g. "0.15" (got {value!r})')
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"{value!r}: prices are finite and not negative")
    if d >= 1_000_000_000:
        raise ValueError(f"{value!r}: prices are below 1,000,000,000")
    if d.normalize().as_tuple().exponent < -12:  # type: ignore[operator]
        raise ValueError(f"{value!r}: at most 12 decimal places")
    return d


class PriceList(BaseModel):
    """What cove charges; server config (``prices.toml``), defaults below."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    instance_per_second: dict[str, Decimal] = Field(
        default_factory=lambda: {k: Decimal(v) for k, v in DEFAULT_INSTANCE_PER_SECOND.items()},
        description="price of one second of a running instance, by size",
    )
    volume_gb_month: Decimal = Field(default=Decimal("0.15"))
    ipv4_month: Decimal = Field(default=Decimal("2.00"))
    egress_gb: Decimal = Field(default=Decimal("0.02"))

    @field_validator("instance_per_second", mode="before")
    @classmethod
    def _sizes(cls, v: Any) -> dict[str, Decimal]:
        if not isinstance(v, dict):
            raise ValueError("instance_per_second is a table of size = price")
        unknown = sorted(set(v) - set(SIZES))
        if unknown:
            raise ValueError(f"unknown size(s) {unknown}: sizes are {', '.join(SIZES)}")
        missing = sorted(set(SIZES) - set(v))
        if missing:
            raise ValueError(f"no price for size(s) {missing}")
        return {k: _price(v[k]) for k in SIZES}

    @field_validator("volume_gb_month", "ipv4_month", "egress_gb", mode="before")
    @classmethod
    def _money(cls, v: Any) -> Decimal:
        return _price(v)

    def to_doc(self) -> dict[str, Any]:
        """JSON-safe: every price as a decimal string."""
        return {
            "currency": self.currency,
            "instance_per_second": {k: text(v) for k, v in self.instance_per_second.items()},
            "volume_gb_month": text(self.volume_gb_month),
            "ipv4_month": text(self.ipv4_month),
            "egress_gb": text(self.egress_gb),
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_doc(), sort_keys=True).encode()).hexdigest()

    # -- what a resource costs per month (describe) ---------------------------------------

    def instance_month(self, size: str) -> Decimal:
        return money(self.instance_per_second[size] * SECONDS_PER_MONTH)

    def volume_month(self, size_gb: int) -> Decimal:
        return money(self.volume_gb_month * size_gb)

    def table(self) -> list[dict[str, str]]:
        """The price list as rows: what, unit, price, per month."""
        rows = []
        for size, p in self.instance_per_second.items():
            cpu, mem = SIZES[size]
            rows.append(
                {
                    "item": f"instance {size}",
                    "detail": f"{cpu / 1000:g} vCPU, {mem} MiB",
                    "unit": "second",
                    "price": text(p),
                    "per_month": text(self.instance_month(size)),
                }
            )
        rows.append(
            {
                "item": "volume",
                "detail": "per GB provisioned",
                "unit": "GB-month",
                "price": text(self.volume_gb_month),
                "per_month": text(self.volume_gb_month),
            }
        )
        rows.append(
            {
                "item": "dedicated IPv4",
                "detail": "per address",
                "unit": "month",
                "price": text(self.ipv4_month),
                "per_month": text(self.ipv4_month),
            }
        )
        rows.append(
            {
                "item": "egress",
                "detail": "sent to clients, 10^9 bytes",
                "unit": "GB",
                "price": text(self.egress_gb),
                "per_month": "",
            }
        )
        return rows


def text(value: Decimal) -> str:
    """A price as plain decimal text (never exponent notation: 0.0000008, not 8E-7)."""
    return format(value, "f")


def money(value: Decimal) -> Decimal:
    """A line amount: exact to a millionth (half-even)."""
    return value.quantize(AMOUNT_STEP, rounding=ROUND_HALF_EVEN)


def due(total: Decimal) -> Decimal:
    """What is charged: the total in cents (half-up)."""
    return total.quantize(CENT, rounding=ROUND_HALF_UP)


def load(path: Path) -> PriceList:
    """A price list from TOML; a clear error (file and field) when it is wrong."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise errors.UserError(f"can't read the price list {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise errors.UserError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return PriceList.model_validate(doc)
    except ValueError as exc:
        raise errors.UserError(
            f"{path}: {exc}".splitlines()[0] + " " + " ".join(str(exc).splitlines()[1:3]),
            hint="see docs/billing.md for the price list's fields",
        ) from exc


def from_doc(doc: dict[str, Any]) -> PriceList:
    return PriceList.model_validate(doc)


def configured(data_dir: Path, path: Path | None = None) -> PriceList:
    """The flag first, then COVE_PRICE_LIST, then DATA/prices.toml, then the defaults."""
    import os

    env = os.environ.get("COVE_PRICE_LIST")
    chosen = path or (Path(env) if env else None)
    if chosen is not None:
        return load(chosen)
    default = data_dir / "prices.toml"
    return load(default) if default.exists() else PriceList()
