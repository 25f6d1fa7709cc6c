"""Pydantic models for every kind: the one resource shape, specs, statuses, conditions."""

from cove.model.kinds import KINDS, Kind, kind_by_name, kind_by_plural, kind_by_prefix
from cove.model.resource import (
    Condition,
    Metadata,
    Ref,
    Resource,
    condition,
    get_condition,
    is_caught_up,
    set_condition,
)
from cove.model.specs import (
    NAME_RE,
    EndpointPort,
    EndpointSpec,
    Quotas,
    validate_name,
)

__all__ = [
    "KINDS",
    "NAME_RE",
    "Condition",
    "EndpointPort",
    "EndpointSpec",
    "Kind",
    "Metadata",
    "Quotas",
    "Ref",
    "Resource",
    "condition",
    "get_condition",
    "is_caught_up",
    "kind_by_name",
    "kind_by_plural",
    "kind_by_prefix",
    "set_condition",
    "validate_name",
]
