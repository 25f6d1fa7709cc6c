"""The one resource shape every kind shares (ARCHITECTURE §2)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ConditionStatus = Literal["true", "false", "unknown"]


class Ref(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    id: str
    name: str | None = None


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition: str


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation: int
    revision: int
    created_at: str
    updated_at: str
    deleting: bool = False


class Resource(BaseModel):
    """``{kind, id, name, parent, labels, spec, status, metadata}``."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    id: str
    name: str
    parent: Ref | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict)
    status: dict[str, Any] = Field(default_factory=dict)
    metadata: Metadata


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def get_condition(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in status.get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == ctype:
            return c
    return None


def condition(ctype: str, status: ConditionStatus, reason: str, message: str = "") -> Condition:
    return Condition(
        type=ctype, status=status, reason=reason, message=message, last_transition=now_iso()
    )


def set_condition(
    status: dict[str, Any],
    ctype: str,
    cstatus: ConditionStatus,
    reason: str,
    message: str = "",
) -> bool:
    """Set a condition in *status* (in place). ``last_transition`` moves only when the
    status value changes. Returns True when anything changed."""
    conds: list[dict[str, Any]] = list(status.get("conditions") or [])
    for i, c in enumerate(conds):
        if c.get("type") == ctype:
            if (
                c.get("status") == cstatus
                and c.get("reason") == reason
                and c.get("message") == message
            ):
                return False
            new = dict(c, status=cstatus, reason=reason, message=message)
            if c.get("status") != cstatus:
                new["last_transition"] = now_iso()
            conds[i] = new
            status["conditions"] = conds
            return True
    conds.append(condition(ctype, cstatus, reason, message).model_dump())
    status["conditions"] = conds
    return True


def is_caught_up(resource: dict[str, Any]) -> bool:
    """Status describes the current spec (``observed_generation == generation``)."""
    gen = resource.get("metadata", {}).get("generation")
    return bool(resource.get("status", {}).get("observed_generation") == gen)
