"""The registry of kinds (ARCHITECTURE §2). Everything generic (routes, CLI verbs, tests)
walks this table, so adding a kind adds it everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from cove.model import specs


@dataclass(frozen=True)
class Kind:
    name: str
    prefix: str
    plural: str
    parents: tuple[str, ...]  # kinds that may own one; () means top level
    spec_model: type[BaseModel]
    summary: str
    scope: str = "org"  # "org": belongs to an org; "cluster": shared infrastructure
    creatable: bool = False  # created through the generic API create route
    mutable: bool = False  # spec can be changed through the generic API update route
    deletable: bool = False
    aliases: tuple[str, ...] = field(default_factory=tuple)
    columns: tuple[str, ...] = ("name", "id", "ready", "age")

    @property
    def title(self) -> str:
        return self.name.replace("_", " ")


KINDS: tuple[Kind, ...] = (
    Kind(
        "org",
        "org",
        "orgs",
        (),
        specs.OrgSpec,
        "an organisation: members, API tokens and projects",
        creatable=True,
        mutable=True,
        deletable=True,
    ),
    Kind(
        "project",
        "prj",
        "projects",
        ("org",),
        specs.ProjectSpec,
        "a project in an org: apps and quotas",
        creatable=True,
        mutable=True,
        deletable=True,
    ),
    Kind(
        "app",
        "app",
        "apps",
        ("project",),
        specs.AppSpec,
        "an application; created with environments prod, staging and dev",
        creatable=True,
        mutable=True,
        deletable=True,
    ),
    Kind(
        "environment",
        "env",
        "environments",
        ("app",),
        specs.EnvironmentSpec,
        "an app's environment: desired release and scale",
        mutable=True,
        aliases=("envs", "env"),
        columns=("name", "id", "release", "region", "ready", "caught_up", "age"),
    ),
    Kind(
        "release",
        "rel",
        "releases",
        ("environment",),
        specs.EmptySpec,
        "an immutable release: image digest, workloads, env vars, secrets version",
        columns=("name", "id", "reason", "image", "state", "age"),
    ),
    Kind(
        "workload",
        "wl",
        "workloads",
        ("environment",),
        specs.EmptySpec,
        "a process group (web, worker) with a desired count",
    ),
    Kind(
        "instance",
        "ins",
        "instances",
        ("workload",),
        specs.EmptySpec,
        "one isolated unit on one node",
        columns=("name", "id", "version", "node", "state", "health", "restarts", "ready", "age"),
    ),
    Kind(
        "endpoint",
        "ep",
        "endpoints",
        ("environment",),
        specs.EndpointSpec,
        "an L4 endpoint: ports to a workload, IPv6 always, dedicated IPv4 as an add-on",
        creatable=True,
        mutable=True,
        deletable=True,
        columns=("name", "id", "protocol", "ipv6", "ipv4", "ports", "ready", "age"),
    ),
    Kind(
        "volume",
        "vol",
        "volumes",
        ("environment",),
        specs.VolumeSpec,
        "a persistent volume on one node",
        creatable=True,
        deletable=True,
    ),
    Kind(
        "secret",
        "sec",
        "secrets",
        ("environment",),
        specs.EmptySpec,
        "a versioned secret bundle (values never listed in clear)",
    ),
    Kind(
        "node",
        "node",
        "nodes",
        (),
        specs.NodeSpec,
        "a host running a cove agent",
        scope="cluster",
        mutable=True,
        columns=("name", "id", "region", "driver", "ready", "age"),
    ),
    Kind(
        "operation",
        "op",
        "operations",
        (),  # parent is the resource it acted on, of any kind
        specs.EmptySpec,
        "the receipt of a mutation: its progress and outcome",
        aliases=("ops",),
        columns=("id", "action", "target", "state", "age"),
    ),
    Kind(
        "event",
        "evt",
        "events",
        (),
        specs.EmptySpec,
        "something that happened to a resource (deduplicated: count, first and last seen)",
        columns=("last_seen", "type", "reason", "object", "count", "message"),
    ),
)

_BY_NAME = {k.name: k for k in KINDS}
_BY_PLURAL = {k.plural: k for k in KINDS}
_BY_PREFIX = {k.prefix: k for k in KINDS}
_BY_ALIAS = {a: k for k in KINDS for a in (k.name, k.plural, *k.aliases)}


def kind_by_name(name: str) -> Kind | None:
    return _BY_ALIAS.get(name)


def kind_by_plural(plural: str) -> Kind | None:
    return _BY_PLURAL.get(plural)


def kind_by_prefix(prefix: str) -> Kind | None:
    return _BY_PREFIX.get(prefix)


def get_kind(name: str) -> Kind:
    k = _BY_NAME.get(name)
    if k is None:
        raise KeyError(name)
    return k
