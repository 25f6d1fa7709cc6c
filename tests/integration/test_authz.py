"""Authorization on both backends.

The matrix walks every route in ``app.routes``: user B (another org) fills each path and
query parameter with user A's real IDs and names, and gets exactly the answer a
nonexistent ID or name gets (same status, code and detail once the values B typed are
masked), and A's data is unchanged afterwards. A route the matrix does not know fails the
test, so a new route has to be classified here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Route

from cove import deferred, security
from cove.ids import new_id
from cove.model import KINDS
from cove.model.kinds import Kind, get_kind
from cove.store import Store
from cove.store import schema as t
from tests.integration.helpers import (
    PASSWORD,
    User,
    create,
    get,
    ok,
    problem,
    set_join_token,
    settle,
    signup,
)

pytestmark = pytest.mark.timeout(120)

# Routes anyone may call without a token (and why).
PUBLIC = {
    "/openapi.json": "the API description",
    "/docs": "API docs page",
    "/docs/oauth2-redirect": "API docs page",
    "/redoc": "API docs page",
    "/healthz": "liveness probe",
    "/v1/deferred": "the list of what v1 does not do",
    "/v1/pricing": "the price list (what anyone would pay)",
    "/v1/auth/signup": "how an account starts",
    "/v1/auth/login": "how a session starts",
    "/v1/nodes/register": "agents authenticate with the join token in the body",
    # the web console: sign-in happens in its terminal, through /v1/auth/login; its
    # WebSocket (/console/ws, not an HTTP route) is refused without a valid token, see
    # tests/integration/test_console_pty.py and tests/e2e/test_console.py
    "/console": "the web console's page",
    "/console/assets/{name}": "the web console's static files",
}
DEFERRED_ROUTES = {r for d in deferred.REGISTRY for r in d.api_routes}
# Shared infrastructure, not any org's: every signed-in user sees nodes (only the
# cluster operator changes them, see test_only_the_operator_changes_nodes).
CLUSTER_KINDS = {"node"}
# Kinds found by ID only.
ID_ONLY = {"operation", "event"}


def _routes(app: FastAPI) -> Iterator[tuple[str, str]]:
    for route in app.routes:
        if isinstance(route, Route) and route.methods:
            for method in sorted(route.methods - {"HEAD"}):
                yield method, route.path


def _is_public(path: str) -> bool:
    return path in PUBLIC or path in DEFERRED_ROUTES


# ----------------------------------------------------------------------------- the world


@dataclass
class Side:
    """Values one side of the comparison fills requests with: user A's real ones, or
    fakes of the same form that exist nowhere."""

    ids: dict[str, str]
    names: dict[str, str]
    token_id: str
    masks: list[tuple[str, str]] = field(default_factory=list)

    def id(self, kind: str) -> str:
        return self.ids[kind]

    def name(self, kind: str) -> str:
        return self.names[kind]

    def scope(self, kind: str, *, own_org: str | None = None) -> dict[str, str]:
        """Query parameters that locate a *kind* by name (A's org and ancestors)."""
        k = get_kind(kind)
        chain = []
        p = k.parents[0] if k.parents else None
        while p:
            chain.append(p)
            pk = get_kind(p)
            p = pk.parents[0] if pk.parents else None
        if kind == "instance":
            chain = ["environment", "app", "project", "org"]
        params = {}
        keys = {"org": "org", "project": "project", "app": "app", "environment": "env"}
        for anc in chain:
            params[keys[anc]] = self.name(anc)
        if own_org is not None and "org" in params:
            params["org"] = own_org
        return params

    def mask(self, text: str) -> str:
        for value, placeholder in self.masks:
            text = text.replace(value, placeholder)
        return text


@dataclass
class World:
    client: TestClient
    store: Store
    app: FastAPI
    a: User
    b: User
    a_side: Side
    fake: Side
    a_ids: set[str]  # every ID of A's that B must never see
    node_id: str


def _seed_deep_kinds(store: Store, env_id: str) -> dict[str, dict[str, Any]]:
    """Kinds the API cannot create yet (deploys come later) are seeded in the store."""
    with store.write() as tx:
        rel = tx.create("release", "alpha-rel", parent=env_id, status={"number": 1})
        wl = tx.create("workload", "alpha-wl", parent=env_id, status={"running": 1})
        ins = tx.create("instance", "alpha-ins", parent=wl["id"], status={"state": "running"})
        sec = tx.create("secret", "alpha-sec", parent=env_id, status={"version": 1})
        for r in (rel, wl, ins, sec):
            tx.event(r, "Normal", "Seeded", f"{r['kind']} seeded for the test")
    return {"release": rel, "workload": wl, "instance": ins, "secret": sec}


@pytest.fixture
def world(client: TestClient, store: Store, app: FastAPI) -> World:
    a = signup(client, "alpha-org", "alpha@alpha.example")
    create(client, a, "projects", {"name": "alpha-prj", "labels": {"owner": "alpha"}})
    create(client, a, "apps", {"name": "alpha-app", "project": "alpha-prj"})
    scope = {"project": "alpha-prj", "app": "alpha-app", "env": "prod"}
    port = {"port": 80, "workload": "alpha-wl", "target_port": 8080}
    create(client, a, "endpoints", {"name": "alpha-ep", **scope, "spec": {"ports": [port]}})
    create(client, a, "volumes", {"name": "alpha-vol", **scope, "spec": {"size_gb": 1}})
    tok = ok(client.post("/v1/tokens", json={"name": "alpha-tok"}, headers=a.headers), 201)
    join = set_join_token(store)
    node = ok(client.post("/v1/nodes/register", json={"name": "node-1", "join_token": join}), 201)
    prj = get(client, a, "/v1/projects/alpha-prj")
    app_ = get(client, a, "/v1/apps/alpha-app", project="alpha-prj")
    env = get(client, a, "/v1/environments/prod", project="alpha-prj", app="alpha-app")
    seeded = _seed_deep_kinds(store, env["id"])
    settle(store)
    b = signup(client, "bravo-org", "bravo@bravo.example")
    create(client, b, "projects", {"name": "bravo-prj"})
    create(client, b, "apps", {"name": "bravo-app", "project": "bravo-prj"})
    settle(store)

    res = {
        "org": get(client, a, f"/v1/orgs/{a.org['id']}"),
        "project": prj,
        "app": app_,
        "environment": env,
        "endpoint": get(client, a, "/v1/endpoints/alpha-ep", **scope),
        "volume": get(client, a, "/v1/volumes/alpha-vol", **scope),
        **seeded,
    }
    res["operation"] = get(client, a, "/v1/operations", parent=prj["id"])["items"][0]
    res["event"] = get(client, a, f"/v1/projects/{prj['id']}/events")["items"][0]
    ids = {k: v["id"] for k, v in res.items()}
    names = {k: v["name"] for k, v in res.items() if k not in ID_ONLY}
    fake_ids = {k: new_id(get_kind(k).prefix) for k in ids}
    fake_names = {k: f"nosuch-{k}" for k in names}
    fake_token = new_id("tok")

    def masks(ids_: dict[str, str], names_: dict[str, str], tok_id: str) -> list[tuple[str, str]]:
        pairs = [(v, f"<{k}-id>") for k, v in ids_.items()] + [(tok_id, "<token-id>")]
        pairs += [(v, f"<{k}-name>") for k, v in names_.items()]
        return sorted(pairs, key=lambda p: -len(p[0]))  # longest first

    a_side = Side(ids, names, tok["id"], masks(ids, names, tok["id"]))
    fake = Side(fake_ids, fake_names, fake_token, masks(fake_ids, fake_names, fake_token))
    with store.read() as conn:
        a_ids = {
            r[0]
            for r in conn.execute(
                sa.select(t.resources.c.id).where(t.resources.c.org_id == a.org["id"])
            )
        }
        a_ids |= {
            r[0]
            for r in conn.execute(sa.select(t.events.c.id).where(t.events.c.org_id == a.org["id"]))
        }
        a_ids |= {
            r[0]
            for r in conn.execute(sa.select(t.tokens.c.id).where(t.tokens.c.user_id == a.user_id))
        }
    a_ids.add(a.user_id)
    return World(client, store, app, a, b, a_side, fake, a_ids, node["node"]["id"])


def _a_state(w: World) -> dict[str, Any]:
    """Everything of A's that B might change."""
    org = w.a.org["id"]
    with w.store.read() as conn:
        resources = [
            dict(r)
            for r in conn.execute(
                sa.select(t.resources).where(t.resources.c.org_id == org).order_by(t.resources.c.id)
            ).mappings()
        ]
        events = [
            dict(r)
            for r in conn.execute(
                sa.select(t.events).where(t.events.c.org_id == org).order_by(t.events.c.id)
            ).mappings()
        ]
        members = [
            tuple(r)
            for r in conn.execute(sa.select(t.memberships).where(t.memberships.c.org_id == org))
        ]
        tokens = [
            (r.id, r.revoked_at, r.org_id)
            for r in conn.execute(
                sa.select(t.tokens).where(t.tokens.c.user_id == w.a.user_id).order_by(t.tokens.c.id)
            )
        ]
    return {"resources": resources, "events": events, "members": members, "tokens": tokens}


# ----------------------------------------------------------------------------- requests


@dataclass
class Req:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    body: Any = None

    def send(self, client: TestClient, headers: dict[str, str]) -> httpx.Response:
        return client.request(
            self.method, self.path, params=self.params, json=self.body, headers=headers
        )


Builder = Callable[[Side], Req]
GENERIC = re.compile(r"^/v1/(?P<plural>[a-z_]+)(?P<one>/\{ref\}(?P<sub>/events|/wait)?)?$")


def _create_body(kind: str, side: Side, *, by_id: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "made-by-b"}
    if by_id:  # ancestors by ID; below the org level, B's only org is implied
        params = side.scope(kind)
        key = {"org": "org", "project": "project", "app": "app", "env": "environment"}
        for p in params:
            body[p] = side.id(key[p])
        if len(params) > 1:
            del body["org"]
    else:
        body.update(side.scope(kind))
    if kind == "endpoint":
        body["spec"] = {"ports": [{"port": 81, "workload": "web", "target_port": 80}]}
    if kind == "volume":
        body["spec"] = {"size_gb": 1}
    return body


def _builders(method: str, path: str, b_org: str) -> list[tuple[str, Builder]]:
    """Requests for one route, written once and filled by either side."""
    m = GENERIC.match(path)
    if path == "/v1/events/stream":
        out: list[tuple[str, Builder]] = []
        for kind in sorted({k.name for k in KINDS} - CLUSTER_KINDS):
            out.append(
                (
                    f"for={kind}-id",
                    lambda s, k=kind: Req(method, path, {"follow": "false", "for": s.id(k)}),
                )
            )
            if kind not in ID_ONLY:
                out.append(
                    (
                        f"for={kind}/name",
                        lambda s, k=kind: Req(
                            method,
                            path,
                            {"follow": "false", "for": f"{k}/{s.name(k)}", **s.scope(k)},
                        ),
                    )
                )
        out.append(("org", lambda s: Req(method, path, {"follow": "false", "org": s.name("org")})))
        out.append(
            ("scope", lambda s: Req(method, path, {"follow": "false", **s.scope("endpoint")}))
        )
        return out
    if path == "/v1/status":
        return [
            ("names", lambda s: Req(method, path, s.scope("app") | {"app": s.name("app")})),
            ("ids", lambda s: Req(method, path, {"org": s.id("org"), "project": s.id("project")})),
            ("own-org", lambda s: Req(method, path, {"project": s.name("project")})),
        ]
    if path == "/v1/orgs/{ref}/members":
        body = {"email": "bravo@bravo.example", "role": "owner"} if method == "POST" else None
        return [
            ("name", lambda s: Req(method, f"/v1/orgs/{s.name('org')}/members", body=body)),
            ("id", lambda s: Req(method, f"/v1/orgs/{s.id('org')}/members", body=body)),
        ]
    if path == "/v1/tokens" and method == "POST":
        return [
            ("org-name", lambda s: Req(method, path, body={"name": "b-tok", "org": s.name("org")})),
            ("org-id", lambda s: Req(method, path, body={"name": "b-tok", "org": s.id("org")})),
        ]
    if path == "/v1/tokens/{token_id}":
        return [("id", lambda s: Req(method, f"/v1/tokens/{s.token_id}"))]
    if path == "/v1/nodes/{node_id}/heartbeat":
        # cluster-scoped: a user is refused for any node; tested against A's project ID
        return [("id", lambda s: Req(method, f"/v1/nodes/{s.id('project')}/heartbeat", body={}))]
    deploy_body = {"image": "127.0.0.1:9/x:1", "workloads": {"web": {}}}
    if path in ("/v1/deploys", "/v1/rollbacks"):
        extra = deploy_body if path == "/v1/deploys" else {}

        def by_ids(s: Side) -> dict[str, str]:
            return {"project": s.id("project"), "app": s.id("app"), "env": s.id("environment")}

        return [
            ("names", lambda s: Req(method, path, body={**extra, **s.scope("endpoint")})),
            ("ids", lambda s: Req(method, path, body={**extra, **by_ids(s)})),
        ]
    if path == "/v1/environments/{ref}/secrets":
        body = {"set": {"KEY": "value"}}
        return [
            (
                "name",
                lambda s: Req(
                    method,
                    f"/v1/environments/{s.name('environment')}/secrets",
                    body={**body, **s.scope("environment")},
                ),
            ),
            (
                "id",
                lambda s: Req(method, f"/v1/environments/{s.id('environment')}/secrets", body=body),
            ),
        ]
    if path == "/v1/registries":
        if method == "GET":
            return [("org", lambda s: Req(method, path, {"org": s.name("org")}))]
        creds = {"host": "127.0.0.1:5000", "username": "u", "password": "p"}
        return [
            ("org-name", lambda s: Req(method, path, body={**creds, "org": s.name("org")})),
            ("org-id", lambda s: Req(method, path, body={**creds, "org": s.id("org")})),
        ]
    if path == "/v1/logs":
        return [
            ("scope", lambda s: Req(method, path, s.scope("endpoint"))),
            ("instance", lambda s: Req(method, path, {"instance": s.id("instance")})),
        ]
    if path == "/v1/nodes/{node_id}/assignments":
        # node-only: a user is refused for any node; tried with A's project ID
        return [("id", lambda s: Req(method, f"/v1/nodes/{s.id('project')}/assignments"))]
    if path == "/v1/nodes/{node_id}/edge":
        # node-only: a user is refused for any node; tried with A's project ID
        body = {"endpoints": {}} if method == "PUT" else None
        return [("id", lambda s: Req(method, f"/v1/nodes/{s.id('project')}/edge", body=body))]
    if path == "/v1/nodes/{node_id}/reports":
        # node-only: a user is refused for any node, whatever instances the body names
        def reports(s: Side) -> Req:
            return Req(
                method,
                f"/v1/nodes/{s.id('project')}/reports",
                body={
                    "statuses": {s.id("instance"): {"state": "running"}},
                    "events": [{"instance": s.id("instance"), "type": "Normal", "reason": "X"}],
                },
            )

        return [("id", reports)]
    if path == "/v1/volumes/{vol_id}/released":
        # node-only: users are refused whatever the volume
        return [("id", lambda s: Req(method, f"/v1/volumes/{s.id('volume')}/released"))]
    if path.startswith("/v1/instances/{ins_id}/"):
        # node-only: users are refused whatever the instance
        sub = path.rsplit("/", 1)[1]
        body = {
            "status": {"state": "running"},
            "events": {"type": "Normal", "reason": "X", "message": "m"},
            "logs": {"lines": []},
        }.get(sub)
        return [("id", lambda s: Req(method, f"/v1/instances/{s.id('instance')}/{sub}", body=body))]
    if path == "/v1/usage":
        return [
            ("org", lambda s: Req(method, path, {"org": s.name("org")})),
            ("org-id", lambda s: Req(method, path, {"org": s.id("org")})),
            ("app", lambda s: Req(method, path, s.scope("environment"))),
            ("app-id", lambda s: Req(method, path, {"app": s.id("app")})),
        ]
    if path == "/v1/invoices/{month}":
        return [
            ("org", lambda s: Req(method, "/v1/invoices/current", {"org": s.name("org")})),
            ("org-id", lambda s: Req(method, "/v1/invoices/current", {"org": s.id("org")})),
        ]
    if path == "/v1/projects/{ref}/quotas":
        quota = {"instances": 3} if method == "PUT" else None

        def quotas_of(s: Side, ref: str) -> Req:
            return Req(method, f"/v1/projects/{ref}/quotas", {"org": s.name("org")}, body=quota)

        return [
            ("name", lambda s: quotas_of(s, s.name("project"))),
            ("id", lambda s: quotas_of(s, s.id("project"))),
        ]
    if m is None:
        raise LookupError(f"the authz matrix does not know {method} {path}")
    kind: Kind = next(k for k in KINDS if k.plural == m["plural"])
    if kind.name in CLUSTER_KINDS:
        return []  # shared infrastructure: see CLUSTER_KINDS
    if not m["one"]:
        if method == "GET":
            out = [
                ("org-name", lambda s: Req(method, path, {"org": s.name("org")})),
                ("org-id", lambda s: Req(method, path, {"org": s.id("org")})),
            ]
            # operations and events hang off any kind: try A's project as their parent
            parent = kind.parents[0] if kind.parents else "project"
            if kind.name != "org":
                out.append(("parent-id", lambda s: Req(method, path, {"parent": s.id(parent)})))
            if kind.name not in ID_ONLY and kind.name != "org":
                out.append(
                    (
                        "scope",
                        lambda s: Req(
                            method, path, s.scope(kind.name) | {"name": s.name(kind.name)}
                        ),
                    )
                )
                out.append(
                    (
                        "scope-own-org",
                        lambda s: Req(method, path, s.scope(kind.name, own_org=b_org)),
                    )
                )
            return out
        assert method == "POST", (method, path)
        if kind.name == "org":
            return []  # org names are one global namespace: see test_org_names_are_global
        return [
            ("names", lambda s: Req(method, path, body=_create_body(kind.name, s, by_id=False))),
            ("ids", lambda s: Req(method, path, body=_create_body(kind.name, s, by_id=True))),
        ]
    sub = m["sub"] or ""
    params: dict[str, Any] = {}
    body: Any = None
    if sub == "/wait":
        params = {"for": "ready", "timeout": "100ms"}
    if method == "PATCH":
        body = {"labels": {"owned": "by-b"}}
    out = [
        (
            "id",
            lambda s: Req(
                method, f"{path.split('{')[0]}{s.id(kind.name)}{sub}", dict(params), body
            ),
        )
    ]
    if sub == "/wait":
        out.append(
            (
                "id-deleted",
                lambda s: Req(
                    method,
                    f"/v1/{kind.plural}/{s.id(kind.name)}/wait",
                    {"for": "deleted", "timeout": "100ms"},
                ),
            )
        )
    if kind.name not in ID_ONLY:
        out.append(
            (
                "name",
                lambda s: Req(
                    method,
                    f"/v1/{kind.plural}/{s.name(kind.name)}{sub}",
                    params | s.scope(kind.name),
                    body,
                ),
            )
        )
        if kind.name != "org":
            out.append(
                (
                    "name-own-org",
                    lambda s: Req(
                        method,
                        f"/v1/{kind.plural}/{s.name(kind.name)}{sub}",
                        params | s.scope(kind.name, own_org=b_org),
                        body,
                    ),
                )
            )
    return out


def _norm(r: httpx.Response, side: Side) -> tuple[int, str, Any]:
    text = side.mask(r.text)
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = [json.loads(line) for line in text.splitlines() if line.strip()]
    return r.status_code, r.headers.get("content-type", ""), body


def _leaks(w: World, text: str) -> list[str]:
    return sorted(x for x in (*w.a_ids, "alpha") if x in text)


# ----------------------------------------------------------------------------- the matrix


def test_other_orgs_resources_are_invisible_on_every_route(world: World) -> None:
    w = world
    c = w.client
    before = _a_state(w)
    head = w.store.head_revision()
    b_org = w.b.org["name"]
    covered: set[tuple[str, str]] = set()
    failures: list[str] = []
    n = 0
    for method, path in _routes(w.app):
        if _is_public(path):
            continue
        if (method, path) in NO_REFERENCE:
            covered.add((method, path))  # refers to nothing: see the listings leak test
            continue
        for label, build in _builders(method, path, b_org):
            covered.add((method, path))
            real, fake = build(w.a_side), build(w.fake)
            r_real = real.send(c, w.b.headers)
            r_fake = fake.send(c, w.b.headers)
            n += 1
            where = f"{method} {path} [{label}]"
            got, want = _norm(r_real, w.a_side), _norm(r_fake, w.fake)
            if got != want:
                failures.append(f"{where}: A's answers {got}\n   nonexistent answers {want}")
                continue
            if r_real.status_code >= 400:
                doc = r_real.json()
                expected = {"not_found", "forbidden"}
                if path == "/v1/events/{ref}/wait":
                    expected = {"invalid"}  # events have no conditions, whoever asks
                if doc.get("code") not in expected:
                    failures.append(f"{where}: unexpected {doc}")
            elif method != "GET":
                failures.append(f"{where}: B's {method} succeeded: {r_real.text}")
            leaks = _leaks(w, w.a_side.mask(r_real.text))
            if leaks:
                failures.append(f"{where}: leaks {leaks}: {r_real.text[:300]}")
    assert not failures, f"{len(failures)} of {n} requests differ:\n" + "\n".join(failures)
    # every route was either exercised or deliberately classified
    for method, path in _routes(w.app):
        kind_route = GENERIC.match(path)
        cluster = kind_route and kind_route["plural"] in {get_kind(k).plural for k in CLUSTER_KINDS}
        org_create = (method, path) == ("POST", "/v1/orgs")
        if not (_is_public(path) or cluster or org_create):
            assert (method, path) in covered, f"{method} {path} is not in the matrix"
    assert n > 150
    assert _a_state(w) == before
    assert w.store.head_revision() == head  # B's attempts wrote nothing at all
    # A still works as before
    assert get(c, w.a, "/v1/projects/alpha-prj")["labels"] == {"owner": "alpha"}


def test_listings_of_another_user_never_mention_the_other_org(world: World) -> None:
    w = world
    c, b = w.client, w.b
    texts = {}
    for kind in KINDS:
        texts[kind.plural] = c.get(
            f"/v1/{kind.plural}", params={"limit": 1000}, headers=b.headers
        ).text
    texts["whoami"] = c.get("/v1/auth/whoami", headers=b.headers).text
    texts["tokens"] = c.get("/v1/tokens", headers=b.headers).text
    texts["stream"] = c.get("/v1/events/stream", params={"follow": "false"}, headers=b.headers).text
    texts["status"] = c.get("/v1/status", params={"project": "bravo-prj"}, headers=b.headers).text
    texts["members"] = c.get(f"/v1/orgs/{b.org['id']}/members", headers=b.headers).text
    for what, text in texts.items():
        assert _leaks(w, text) == [], f"{what}: {text[:500]}"
    # ... while B sees its own things, so the listings above were not simply empty
    assert "bravo-prj" in texts["projects"]
    assert "bravo-app" in texts["stream"]
    assert len(json.loads(texts["environments"])["items"]) == 3
    assert json.loads(texts["nodes"])["items"][0]["id"] == w.node_id  # shared infrastructure
    # and A sees A's
    assert "alpha-prj" in c.get("/v1/projects", headers=w.a.headers).text
    assert (
        "bravo"
        not in c.get("/v1/events/stream", params={"follow": "false"}, headers=w.a.headers).text
    )


def test_org_names_are_global(world: World) -> None:
    """Org names are one namespace, so taking a name shows that it is taken: the one
    thing another user learns, and without the org's ID or anything in it."""
    c, b = world.client, world.b
    before = _a_state(world)
    doc = problem(
        c.post("/v1/orgs", json={"name": "alpha-org"}, headers=b.headers), 409, "already_exists"
    )
    assert _leaks(world, doc["detail"].replace("alpha-org", "")) == []
    assert _a_state(world) == before
    # a fresh name is B's own new org, with B as its owner
    create(c, b, "projects", {"name": "x", "org": "bravo-org"})
    rec = create(c, b, "orgs", {"name": "bravo-two"})
    assert get(c, b, f"/v1/orgs/{rec['resource']['id']}/members")[0]["role"] == "owner"


def test_login_does_not_tell_which_accounts_exist(world: World) -> None:
    c = world.client
    wrong = problem(
        c.post(
            "/v1/auth/login", json={"email": "alpha@alpha.example", "password": "not-it-at-all"}
        ),
        401,
    )
    absent = problem(
        c.post(
            "/v1/auth/login", json={"email": "nobody@alpha.example", "password": "not-it-at-all"}
        ),
        401,
    )
    assert wrong == absent
    ok(c.post("/v1/auth/login", json={"email": "ALPHA@alpha.example", "password": PASSWORD}))


def test_only_the_operator_changes_nodes(world: World) -> None:
    """Nodes are shared: every user sees them, only the cluster operator (the first
    account) cordons them."""
    c, a, b = world.client, world.a, world.b
    url = f"/v1/nodes/{world.node_id}"
    node = get(c, b, url)
    problem(c.patch(url, json={"spec": {"cordoned": True}}, headers=b.headers), 403, "forbidden")
    assert get(c, b, url) == node
    rec = ok(c.patch(url, json={"spec": {"cordoned": True}}, headers=a.headers), 202)
    assert get(c, a, url)["spec"]["cordoned"] is True
    assert rec["generation"] == node["metadata"]["generation"] + 1


def test_members_see_the_org_and_only_owners_delete(world: World) -> None:
    c, a, b = world.client, world.a, world.b
    prj = world.a_side.id("project")
    problem(c.get(f"/v1/projects/{prj}", headers=b.headers), 404)
    ok(c.post("/v1/orgs/alpha-org/members", json={"email": b.email}, headers=a.headers), 201)
    # B is now in two orgs: names need the org, IDs do not
    assert get(c, b, f"/v1/projects/{prj}")["name"] == "alpha-prj"
    problem(c.get("/v1/projects/alpha-prj", headers=b.headers), 422, "org_required")
    assert get(c, b, "/v1/projects/alpha-prj", org="alpha-org")["id"] == prj
    ok(c.patch(f"/v1/projects/{prj}", json={"labels": {"by": "b"}}, headers=b.headers), 202)
    problem(c.delete(f"/v1/projects/{prj}", headers=b.headers), 403, "forbidden")
    problem(c.delete("/v1/orgs/alpha-org", headers=b.headers), 403, "forbidden")
    problem(
        c.post(
            "/v1/orgs/alpha-org/members",
            json={"email": b.email, "role": "owner"},
            headers=b.headers,
        ),
        403,
        "forbidden",
    )
    assert get(c, a, f"/v1/projects/{prj}")["metadata"]["deleting"] is False


# ----------------------------------------------------------------------------- tokens


NO_REFERENCE = {
    ("POST", "/v1/auth/logout"),
    ("GET", "/v1/auth/whoami"),
    ("GET", "/v1/tokens"),
    ("GET", "/v1/cluster"),  # the control plane, any signed-in principal (no org's data)
}


def _protected_requests(w: World) -> Iterator[tuple[str, Req]]:
    """One request per protected route, filled with A's real values."""
    for method, path in _routes(w.app):
        if _is_public(path):
            continue
        builders = [] if (method, path) in NO_REFERENCE else _builders(method, path, "x")
        if builders:
            yield f"{method} {path}", builders[0][1](w.a_side)
        else:
            m = GENERIC.match(path)
            concrete = path
            if m and m["one"]:
                kind = next(k for k in KINDS if k.plural == m["plural"])
                concrete = path.replace(
                    "{ref}", w.node_id if kind.name == "node" else w.a_side.id(kind.name)
                )
            body = {} if method in ("POST", "PATCH") else None
            if (method, path) == ("POST", "/v1/orgs"):
                body = {"name": "made-anonymously"}
            yield f"{method} {path}", Req(method, concrete, body=body)


BAD_TOKENS = {
    "garbage": "Bearer garbage",
    "forged-session": "Bearer " + security.new_token("session"),
    "tampered": None,  # A's real token with one character changed
    "not-bearer": None,  # A's real token under another scheme
    "empty-bearer": "Bearer ",
    "huge": "Bearer " + "x" * 5000,
}


def test_every_protected_route_needs_a_valid_token(world: World) -> None:
    w = world
    tampered = w.a.token[:-1] + ("A" if w.a.token[-1] != "A" else "B")
    bad = dict(BAD_TOKENS, tampered=f"Bearer {tampered}", **{"not-bearer": f"Basic {w.a.token}"})
    head = w.store.head_revision()
    before = _a_state(w)
    failures = []
    n = 0
    for where, req in _protected_requests(w):
        for label, header in [("missing", None), *bad.items()]:
            r = req.send(w.client, {} if header is None else {"Authorization": header})
            n += 1
            if r.status_code != 401 or r.json().get("code") != "unauthenticated":
                failures.append(f"{where} [{label}]: {r.status_code} {r.text[:200]}")
            elif not r.headers["content-type"].startswith("application/problem+json"):
                failures.append(f"{where} [{label}]: content-type {r.headers['content-type']}")
            elif r.headers.get("www-authenticate") != "Bearer":
                failures.append(f"{where} [{label}]: no WWW-Authenticate")
    assert not failures, "\n".join(failures)
    assert n >= 70 * 7
    assert w.store.head_revision() == head
    assert _a_state(w) == before


def test_revoked_tokens_stop_working(world: World) -> None:
    c, a = world.client, world.a
    tok = ok(c.post("/v1/tokens", json={"name": "ci"}, headers=a.headers), 201)
    api = {"Authorization": f"Bearer {tok['token']}"}
    assert ok(c.get("/v1/auth/whoami", headers=api))["token"]["kind"] == "api"
    assert tok["id"] in [x["id"] for x in get(c, a, "/v1/tokens")]
    assert ok(c.delete(f"/v1/tokens/{tok['id']}", headers=a.headers)) == {"revoked": tok["id"]}
    problem(c.get("/v1/auth/whoami", headers=api), 401, "unauthenticated")
    problem(c.get("/v1/projects", headers=api), 401, "unauthenticated")
    assert tok["id"] not in [x["id"] for x in get(c, a, "/v1/tokens")]

    # logout revokes exactly the session it is sent with
    login = ok(c.post("/v1/auth/login", json={"email": a.email, "password": PASSWORD}))
    session = {"Authorization": f"Bearer {login['token']}"}
    assert ok(c.get("/v1/auth/whoami", headers=session))["token"]["id"] == login["token_id"]
    assert ok(c.post("/v1/auth/logout", headers=session)) == {"revoked": login["token_id"]}
    problem(c.get("/v1/auth/whoami", headers=session), 401, "unauthenticated")
    problem(c.post("/v1/auth/logout", headers=session), 401, "unauthenticated")
    ok(c.get("/v1/auth/whoami", headers=a.headers))  # the other session still works


def test_expired_tokens_stop_working(world: World) -> None:
    c, a, store = world.client, world.a, world.store
    tok = ok(
        c.post("/v1/tokens", json={"name": "short", "expires_in_days": 1}, headers=a.headers), 201
    )
    hdr = {"Authorization": f"Bearer {tok['token']}"}
    ok(c.get("/v1/auth/whoami", headers=hdr))
    with store.write() as tx:
        tx.conn.execute(
            sa.update(t.tokens)
            .where(t.tokens.c.id == tok["id"])
            .values(expires_at="2001-01-01T00:00:00Z")
        )
    problem(c.get("/v1/auth/whoami", headers=hdr), 401, "unauthenticated")


def test_deleting_an_org_revokes_its_api_tokens(world: World) -> None:
    c, b, store = world.client, world.b, world.store
    org2 = create(c, b, "orgs", {"name": "bravo-two"})
    tok = ok(c.post("/v1/tokens", json={"name": "ci", "org": "bravo-two"}, headers=b.headers), 201)
    hdr = {"Authorization": f"Bearer {tok['token']}"}
    ok(c.get("/v1/projects", headers=hdr))
    ok(c.delete(org2["links"]["resource"], headers=b.headers), 202)
    settle(store)
    problem(c.get("/v1/projects", headers=hdr), 401, "unauthenticated")
    ok(c.get("/v1/projects", headers=b.headers))


def test_an_org_scoped_token_sees_only_its_org(world: World) -> None:
    c, a = world.client, world.a
    create(c, a, "orgs", {"name": "alpha-two"})
    create(c, a, "projects", {"name": "second", "org": "alpha-two"})
    two_prj = get(c, a, "/v1/projects/second", org="alpha-two")
    # the session sees both orgs (and must say which one for names)
    assert sorted(p["name"] for p in get(c, a, "/v1/projects")["items"]) == ["alpha-prj", "second"]
    problem(c.post("/v1/tokens", json={"name": "ci"}, headers=a.headers), 422, "org_required")
    tok = ok(c.post("/v1/tokens", json={"name": "ci", "org": "alpha-org"}, headers=a.headers), 201)
    assert tok["org"] == a.org["id"]
    api = User(a.email, "", tok["token"], tok["id"], a.user_id, a.org, {})
    assert [p["name"] for p in get(c, api, "/v1/projects")["items"]] == ["alpha-prj"]
    assert get(c, api, "/v1/projects/alpha-prj")["id"] == world.a_side.id("project")  # one org
    problem(c.get(f"/v1/projects/{two_prj['id']}", headers=api.headers), 404, "not_found")
    problem(c.get("/v1/projects/second", params={"org": "alpha-two"}, headers=api.headers), 404)
    problem(
        c.post("/v1/projects", json={"name": "x", "org": "alpha-two"}, headers=api.headers), 404
    )
    problem(
        c.patch(f"/v1/projects/{two_prj['id']}", json={"labels": {"a": "b"}}, headers=api.headers),
        404,
    )
    problem(c.post("/v1/orgs", json={"name": "alpha-three"}, headers=api.headers), 403)
    problem(c.post("/v1/tokens", json={"name": "x", "org": "alpha-two"}, headers=api.headers), 404)
    who = ok(c.get("/v1/auth/whoami", headers=api.headers))
    assert [o["name"] for o in who["orgs"]] == ["alpha-org"]
    assert [o["name"] for o in ok(c.get("/v1/auth/whoami", headers=a.headers))["orgs"]] == [
        "alpha-org",
        "alpha-two",
    ]
    evs = c.get("/v1/events/stream", params={"follow": "false"}, headers=api.headers).text
    assert "alpha-two" not in evs and two_prj["id"] not in evs
    assert {x["org"] for x in get(c, api, "/v1/tokens")} == {a.org["id"]}


# ----------------------------------------------------------------------------- at rest


def test_passwords_and_tokens_are_not_stored_in_clear(world: World) -> None:
    w = world
    c, store = w.client, w.store
    login = ok(c.post("/v1/auth/login", json={"email": w.a.email, "password": PASSWORD}))
    api = ok(c.post("/v1/tokens", json={"name": "ci"}, headers=w.a.headers), 201)
    node = ok(
        c.post(
            "/v1/nodes/register",
            json={"name": "node-2", "join_token": (join := set_join_token(store))},
        ),
        201,
    )
    secrets = {
        "password": PASSWORD,
        "session": w.a.token,
        "login": login["token"],
        "api": api["token"],
        "node": node["token"],
        "join": join,
        "b-session": w.b.token,
    }
    # the random part alone must not appear either
    secrets |= {
        f"{k}-body": v.split("_", 2)[-1] for k, v in secrets.items() if v.startswith("cove_")
    }
    dump = []
    with store.read() as conn:
        for name, table in t.metadata.tables.items():
            for row in conn.execute(sa.select(table)):
                dump.append(f"{name}: {tuple(row)!r}")
        hashes = {r.id: r.token_hash for r in conn.execute(sa.select(t.tokens))}
        pw = conn.execute(
            sa.select(t.users.c.password_hash).where(t.users.c.email == w.a.email)
        ).scalar_one()
    text = "\n".join(dump)
    for what, value in secrets.items():
        assert value not in text, f"{what} is stored in clear"
    # ... and what is stored is what authentication checks against
    assert security.verify_password(PASSWORD, pw)
    assert hashes[api["id"]] == security.hash_token(api["token"])
    assert hashes[login["token_id"]] == security.hash_token(login["token"])
    if store.dialect == "sqlite":  # the raw files too (WAL included), not just the rows
        db = Path(str(sa.engine.make_url(store.url).database))
        raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert len(raw) > 10_000
        for what, value in secrets.items():
            assert value.encode() not in raw, f"{what} is in the database file"
