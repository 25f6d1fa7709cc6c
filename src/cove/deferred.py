"""What v1 deliberately does not do, in one registry.

Every entry names where a user could reach for it (an API field or route, a CLI flag or
command) and answers ``not_in_v1`` with why and what to do instead: never a silent
ignore, never a stack trace. ``cove deferred`` and ``GET /v1/deferred`` list them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cove import errors

_DEDICATED = (
    "create a dedicated endpoint (it gets its own IPv6 address; add --ipv4 for the paid "
    "IPv4 add-on if clients need IPv4) and terminate HTTP/TLS in your app"
)


@dataclass(frozen=True)
class Deferred:
    key: str
    feature: str
    why: str
    instead: str
    # where a user reaches for it
    api_fields: tuple[str, ...] = field(default_factory=tuple)  # "endpoint.spec.hostname"
    api_routes: tuple[str, ...] = field(default_factory=tuple)  # "/v1/addons"
    cli: tuple[str, ...] = field(default_factory=tuple)  # "endpoints create --hostname"

    def error(self, where: str | None = None) -> errors.NotInV1:
        at = f" ({where})" if where else ""
        return errors.NotInV1(
            f"{self.feature} is not in v1{at}: {self.why}",
            hint=self.instead,
            extra={"feature": self.key, "instead": self.instead},
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


REGISTRY: tuple[Deferred, ...] = (
    Deferred(
        "hostname-routing",
        "Hostname-based HTTP routing",
        "v1 ingress is L4: an endpoint forwards TCP/UDP ports and never reads HTTP Host headers",
        _DEDICATED,
        api_fields=("endpoint.spec.hostname", "endpoint.spec.hostnames", "endpoint.spec.host"),
        cli=("endpoints create --hostname",),
    ),
    Deferred(
        "shared-443",
        "A shared port 443 across many apps",
        "every endpoint owns its addresses; ports are never shared between apps in v1",
        _DEDICATED,
        api_fields=("endpoint.spec.shared",),
        cli=("endpoints create --shared",),
    ),
    Deferred(
        "managed-tls",
        "Managed TLS termination at the platform edge",
        "the edge forwards bytes; it holds no certificates in v1",
        "terminate TLS in your app (for example with a Let's Encrypt client in the image) "
        "behind a TCP endpoint; use --proxy-protocol v2 to keep the client address",
        api_fields=("endpoint.spec.tls", "endpoint.spec.certificate"),
        cli=("endpoints create --tls",),
    ),
    Deferred(
        "http-middleware",
        "HTTP middleware (rewrites, WAF, header manipulation)",
        "the edge is L4 and does not parse HTTP in v1",
        "run a reverse proxy (nginx, Caddy, HAProxy) as a workload in front of your app",
        api_fields=(
            "endpoint.spec.http",
            "endpoint.spec.headers",
            "endpoint.spec.rewrites",
            "endpoint.spec.waf",
        ),
        cli=("endpoints create --http", "endpoints create --header", "endpoints create --waf"),
    ),
    Deferred(
        "autoscaling",
        "Request-based autoscaling",
        "v1 scales manually so that deploys stay deterministic",
        "set the count yourself with `cove scale web=N` (scripts can call it from your metrics)",
        api_fields=("environment.spec.autoscale", "environment.spec.autoscaling"),
        cli=("scale --auto",),
    ),
    Deferred(
        "scheduled-scaling",
        "Scheduled scaling",
        "v1 scales manually so that deploys stay deterministic",
        "run `cove scale` from your own scheduler (cron, CI) with an API token",
        api_fields=("environment.spec.scale_schedule", "environment.spec.schedule"),
        cli=("scale --schedule",),
    ),
    Deferred(
        "deploy-strategies",
        "Canary and blue-green deployments",
        "v1 has one deterministic rolling replace: start new, wait healthy, stop old",
        "deploy to the staging environment first, then to prod; `cove rollback` restores the "
        "previous release",
        api_fields=("environment.spec.strategy", "environment.spec.canary"),
    ),
    Deferred(
        "managed-databases",
        "Managed databases and queues (Postgres, Redis, ...)",
        "v1 runs your workloads; it does not operate data services for you",
        "run the database as a workload with a volume (`cove volumes create`), or use a "
        "provider you already trust and keep its URL in `cove secrets set`",
        api_routes=("/v1/databases",),
        cli=("databases create",),
    ),
    Deferred(
        "add-ons",
        "One-click add-ons marketplace",
        "v1 has no add-on marketplace",
        "run the service yourself as a workload, or use an external provider with its "
        "credentials in `cove secrets set`",
        api_routes=("/v1/addons",),
        cli=("addons create",),
    ),
    Deferred(
        "multi-region",
        "Automatic multi-region placement",
        "v1 places an environment in one region that you choose explicitly",
        "pick one region per environment; for another region, create another app or "
        "environment and deploy to it explicitly",
        api_fields=("environment.spec.regions",),
    ),
    Deferred(
        "failover",
        "Cross-region failover orchestration",
        "v1 does not move workloads between regions",
        "run an environment per region and switch clients with your DNS provider",
        api_fields=("environment.spec.failover",),
    ),
    Deferred(
        "anycast",
        "Global anycast addresses",
        "v1 endpoints have per-region unicast addresses",
        "use one endpoint per region and a DNS provider with geo routing",
        api_fields=("endpoint.spec.anycast",),
        cli=("endpoints create --anycast",),
    ),
    Deferred(
        "advanced-rbac",
        "Advanced RBAC and policies",
        "v1 has two roles per org: owner and member",
        "split work that needs separate permissions into separate orgs, and use org-scoped "
        "API tokens (`cove tokens create`) for automation",
        api_fields=("member.role",),
        api_routes=("/v1/roles", "/v1/policies"),
        cli=("orgs members add --role",),
    ),
    Deferred(
        "sso",
        "SSO (SAML, OIDC) sign-in",
        "v1 has basic email and password login plus API tokens",
        "sign in with `cove auth login`; give automation an API token",
        api_routes=("/v1/auth/sso",),
        cli=("auth login --sso",),
    ),
    Deferred(
        "audit-export",
        "Audit exports and compliance tooling",
        "v1 keeps events per resource but has no audit export",
        "stream `cove events -f -o json` into your own log store",
        api_routes=("/v1/audit",),
        cli=("audit export",),
    ),
)

BY_KEY = {d.key: d for d in REGISTRY}
_BY_FIELD = {f: d for d in REGISTRY for f in d.api_fields}
_BY_ROUTE = {r: d for d in REGISTRY for r in d.api_routes}
_BY_CLI = {c: d for d in REGISTRY for c in d.cli}


def for_field(kind: str, path: str) -> Deferred | None:
    """The entry for an API field such as ``("endpoint", "spec.hostname")``."""
    return _BY_FIELD.get(f"{kind}.{path}")


def for_route(path: str) -> Deferred | None:
    for route, d in _BY_ROUTE.items():
        if path == route or path.startswith(route + "/"):
            return d
    return None


def for_cli(command: str) -> Deferred:
    """The entry for a CLI flag or command (``"endpoints create --hostname"``)."""
    return _BY_CLI[command]
