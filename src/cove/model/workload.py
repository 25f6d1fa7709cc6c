"""What an app's ``cove.toml`` (and a release) says about its workloads: command, size,
count, env, checks, restart policy, mounts and ports. Unknown keys are refused."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cove.model.specs import NAME_RE

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

# name -> (vCPU in millicores, memory MiB)
SIZES: dict[str, tuple[int, int]] = {
    "nano": (250, 128),
    "small": (500, 256),
    "medium": (1000, 512),
    "large": (2000, 1024),
    "xlarge": (4000, 2048),
}


def seconds(value: str) -> float:
    m = DURATION_RE.match(value)
    if not m:
        raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 5s, 2m")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]


Duration = Annotated[str, Field(pattern=DURATION_RE.pattern, max_length=16)]
Name = Annotated[str, Field(pattern=NAME_RE.pattern, max_length=40)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Check(_Strict):
    type: Literal["tcp", "http", "exec"]
    port: int | None = Field(default=None, ge=1, le=65535)
    path: str = Field(default="/", max_length=1024)
    command: list[str] | None = Field(default=None, max_length=64)
    interval: Duration = "5s"
    timeout: Duration = "2s"
    grace: Duration = "0s"
    healthy_threshold: int = Field(default=1, ge=1, le=100)
    unhealthy_threshold: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _shape(self) -> Check:
        if self.type in ("tcp", "http") and self.port is None:
            raise ValueError(f"a {self.type} check needs a port")
        if self.type == "exec" and not self.command:
            raise ValueError("an exec check needs a command")
        if self.type == "http" and not self.path.startswith("/"):
            raise ValueError("an http check path starts with '/'")
        if seconds(self.timeout) > seconds(self.interval):
            raise ValueError("a check's timeout can't be longer than its interval")
        return self


class Restart(_Strict):
    policy: Literal["always", "on-failure", "never"] = "always"
    backoff: Duration = "1s"
    max_backoff: Duration = "60s"


class Mount(_Strict):
    volume: Name
    path: str = Field(pattern=r"^/", max_length=255)

    @field_validator("path")
    @classmethod
    def _no_dots(cls, v: str) -> str:
        if "\x00" in v or any(part in ("..", ".") for part in v.split("/")):
            raise ValueError("mount paths are absolute, without '.' or '..'")
        reserved = ("/proc", "/dev", "/sys", "/tmp", "/run/cove")
        if v == "/" or any(v == r or v.startswith(r + "/") for r in reserved):
            raise ValueError(f"can't mount a volume on {v}: / and {', '.join(reserved)} are taken")
        return v


class WorkloadTemplate(_Strict):
    command: list[str] | None = Field(default=None, max_length=256)
    size: Literal["nano", "small", "medium", "large", "xlarge"] = "small"
    count: int = Field(default=1, ge=0, le=100)
    env: dict[str, Annotated[str, Field(max_length=32768)]] = Field(default_factory=dict)
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list, max_length=32)
    checks: list[Check] = Field(default_factory=list, max_length=8)
    restart: Restart = Field(default_factory=Restart)
    mounts: list[Mount] = Field(default_factory=list, max_length=8)
    deadline: Duration = Field(default="120s", description="how long a rollout waits for health")

    @field_validator("env")
    @classmethod
    def _env_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not ENV_KEY_RE.match(k):
                raise ValueError(f"invalid environment variable name {k!r}")
        return v

    @model_validator(mode="after")
    def _one_instance_per_volume(self) -> WorkloadTemplate:
        if self.mounts and self.count > 1:
            raise ValueError("a workload that mounts a volume runs one instance (count = 1)")
        return self

    @property
    def cpu_millis(self) -> int:
        return SIZES[self.size][0]

    @property
    def memory_mb(self) -> int:
        return SIZES[self.size][1]
