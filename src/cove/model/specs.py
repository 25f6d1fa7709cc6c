"""Spec models: what a user may ask for, per kind. Unknown fields are refused."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_RE = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
NAME_RULE = (
    "names are 1-40 characters: lower-case letters, digits and '-', "
    "starting with a letter and not ending with '-'"
)
LABEL_KEY_RE = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")


def validate_name(value: str) -> str:
    if not isinstance(value, str) or NAME_RE.match(value) is None:
        raise ValueError(f"invalid name {value!r}: {NAME_RULE}")
    return value


Name = Annotated[str, Field(pattern=NAME_RE.pattern, min_length=1, max_length=40)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrgSpec(_Spec):
    description: str = Field(default="", max_length=500)


class Quotas(_Spec):
    instances: int = Field(default=20, ge=0, le=10_000)
    vcpu: int = Field(default=16, ge=0, le=10_000)
    memory_mb: int = Field(default=32_768, ge=0, le=10_000_000)
    volume_gb: int = Field(default=100, ge=0, le=1_000_000)
    dedicated_ipv4: int = Field(default=1, ge=0, le=1_000)


class ProjectSpec(_Spec):
    description: str = Field(default="", max_length=500)
    quotas: Quotas = Field(default_factory=Quotas)


class AppSpec(_Spec):
    description: str = Field(default="", max_length=500)


class EnvironmentSpec(_Spec):
    """Desired state of an environment: which release runs and at what scale."""

    release: str | None = Field(default=None, max_length=64)
    scale: dict[Name, Annotated[int, Field(ge=0, le=100)]] = Field(default_factory=dict)
    region: str | None = Field(default=None, max_length=40)


class EndpointPort(_Spec):
    port: int = Field(ge=1, le=65535, description="public port on the endpoint address")
    workload: Name
    target_port: int = Field(ge=1, le=65535, description="port the workload listens on")


class EndpointSpec(_Spec):
    protocol: Literal["tcp", "udp"] = "tcp"
    ports: list[EndpointPort] = Field(min_length=1, max_length=64)
    ipv4: bool = Field(default=False, description="dedicated IPv4 address: a paid add-on")
    proxy_protocol: Literal["none", "v2"] = "none"

    @model_validator(mode="after")
    def _unique_ports(self) -> EndpointSpec:
        seen: set[int] = set()
        for p in self.ports:
            if p.port in seen:
                raise ValueError(f"public port {p.port} is listed twice")
            seen.add(p.port)
        return self


class VolumeSpec(_Spec):
    size_gb: int = Field(ge=1, le=16_384)


class NodeSpec(_Spec):
    cordoned: bool = False
    draining: bool = False  # move its instances elsewhere (`cove nodes drain`)
    region: str = Field(default="local", max_length=40)


class EmptySpec(_Spec):
    pass
