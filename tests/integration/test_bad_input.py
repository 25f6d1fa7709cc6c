"""What a confused or hostile client sends, the clear error it gets, and that nothing at
all was written: after every refused request the store's revision, and the tables that
change without one (users, memberships, tokens, settings), are exactly as before."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cove import deferred, security
from cove.api.app import MAX_BODY
from cove.store import Store
from tests.integration.helpers import User, create, get, problem, settle, signup, snapshot

pytestmark = pytest.mark.timeout(60)

SCOPE = {"project": "shop", "app": "web"}


@dataclass
class Ctx:
    client: TestClient
    store: Store
    user: User
    env_id: str
    prj_id: str

    def refused(
        self,
        method: str,
        path: str,
        *,
        status: int | tuple[int, ...],
        code: str | None = None,
        token: bool = True,
        **kw: Any,
    ) -> dict[str, Any]:
        """Send a request that must be refused; check the problem and that nothing moved."""
        before = snapshot(self.store)
        headers = dict(kw.pop("headers", {}))
        if token:
            headers.update(self.user.headers)
        r = self.client.request(method, path, headers=headers, **kw)
        statuses = (status,) if isinstance(status, int) else status
        assert r.status_code in statuses, f"{method} {path}: {r.status_code} {r.text[:300]}"
        doc = problem(r, r.status_code, code)
        after = snapshot(self.store)
        assert after == before, f"{method} {path} wrote something: {before} -> {after}"
        return doc


@pytest.fixture
def ctx(client: TestClient, store: Store) -> Ctx:
    user = signup(client, "acme")
    prj = create(client, user, "projects", {"name": "shop"})
    create(client, user, "apps", {"name": "web", "project": "shop"})
    settle(store)
    env = get(client, user, "/v1/environments/prod", **SCOPE)
    return Ctx(client, store, user, env["id"], prj["resource"]["id"])


JSON = {"content-type": "application/json"}
MALFORMED = [
    b"{bad",
    b'{"name": "x",}',
    b'{"name": "x"} trailing',
    b"\xff\xfe\x00{",
    b'{"name": "x"',
    b"{'name': 'x'}",
]


def _body_routes(c: Ctx) -> list[tuple[str, str, bool]]:
    """(method, path, needs token) of routes that take a JSON body."""
    return [
        ("POST", "/v1/projects", True),
        ("PATCH", f"/v1/projects/{c.prj_id}", True),
        ("POST", "/v1/apps", True),
        ("PATCH", f"/v1/environments/{c.env_id}", True),
        ("POST", "/v1/endpoints", True),
        ("POST", "/v1/tokens", True),
        ("POST", "/v1/orgs/acme/members", True),
        ("POST", "/v1/auth/signup", False),
        ("POST", "/v1/auth/login", False),
        ("POST", "/v1/nodes/register", False),
    ]


def test_malformed_json_is_bad_json(ctx: Ctx) -> None:
    for method, path, token in _body_routes(ctx):
        for body in MALFORMED:
            doc = ctx.refused(
                method, path, status=400, code="bad_json", token=token, content=body, headers=JSON
            )
            assert "JSON" in doc["detail"] and doc["hint"]


WRONG = [
    # (method, path or None for the project, body, fields named in `errors`)
    ("POST", "/v1/projects", {"name": 5}, {"name"}),
    ("POST", "/v1/projects", {"name": "x", "labels": "a=b"}, {"labels"}),
    (
        "POST",
        "/v1/projects",
        {"name": "x", "spec": {"quotas": {"instances": "many"}}},
        {"spec.quotas.instances"},
    ),
    ("POST", "/v1/projects", {"name": "x", "spec": {"quotas": {"vcpu": -1}}}, {"spec.quotas.vcpu"}),
    (
        "POST",
        "/v1/projects",
        {"name": "x", "spec": {"description": "d" * 501}},
        {"spec.description"},
    ),
    ("POST", "/v1/projects", {"name": "x", "colour": "red"}, {"colour"}),
    ("POST", "/v1/projects", {"name": "x", "spec": {"colour": "red"}}, {"spec.colour"}),
    ("POST", "/v1/projects", {"name": "x", "spec": {"quotas": {"gpus": 1}}}, {"spec.quotas.gpus"}),
    ("POST", "/v1/projects", {"name": "x", "labels": {"Bad Key": "v"}}, {"labels"}),
    ("POST", "/v1/projects", {"name": "x", "labels": {"k": "v" * 64}}, {"labels"}),
    (
        "POST",
        "/v1/projects",
        {"name": "x", "labels": {f"k{i}": "v" for i in range(65)}},
        {"labels"},
    ),
    ("POST", "/v1/projects", {}, {"name"}),
    ("POST", "/v1/projects", [], {"body"}),
    ("POST", "/v1/projects", "shop", {"body"}),
    ("POST", "/v1/projects", None, {"body"}),
    ("PATCH", None, {"revision": "latest"}, {"revision"}),
    ("PATCH", None, {"revision": -1}, {"revision"}),
    ("PATCH", None, {"spec": {"quotas": None}}, {"spec.quotas"}),
    ("PATCH", None, {"spec": {"quotas": {"instances": 10_001}}}, {"spec.quotas.instances"}),
    ("PATCH", None, {"labels": ["a"]}, {"labels"}),
    ("PATCH", None, {"name": "renamed"}, {"name"}),
    (
        "POST",
        "/v1/endpoints",
        {"name": "e", **SCOPE, "env": "prod", "spec": {"ports": []}},
        {"spec.ports"},
    ),
    (
        "POST",
        "/v1/endpoints",
        {
            "name": "e",
            **SCOPE,
            "env": "prod",
            "spec": {"ports": [{"port": 70000, "workload": "web", "target_port": 80}]},
        },
        {"spec.ports.0.port"},
    ),
    (
        "POST",
        "/v1/endpoints",
        {
            "name": "e",
            **SCOPE,
            "env": "prod",
            "spec": {
                "protocol": "sctp",
                "ports": [{"port": 80, "workload": "web", "target_port": 80}],
            },
        },
        {"spec.protocol"},
    ),
    (
        "POST",
        "/v1/endpoints",
        {
            "name": "e",
            **SCOPE,
            "env": "prod",
            "spec": {"ports": [{"port": 80, "workload": "web", "target_port": 80}] * 2},
        },
        {"spec"},
    ),
    (
        "POST",
        "/v1/volumes",
        {"name": "v", **SCOPE, "env": "prod", "spec": {"size_gb": 0}},
        {"spec.size_gb"},
    ),
    ("POST", "/v1/volumes", {"name": "v", **SCOPE, "env": "prod"}, {"spec"}),
    (
        "POST",
        "/v1/auth/signup",
        {"email": "not-an-email", "password": "long enough", "org": "o"},
        {"email"},
    ),
    (
        "POST",
        "/v1/auth/signup",
        {"email": "a@b.example", "password": "short", "org": "o"},
        {"password"},
    ),
    ("POST", "/v1/tokens", {"name": "t", "expires_in_days": 0}, {"expires_in_days"}),
    (
        "POST",
        "/v1/nodes/register",
        {"name": "n", "join_token": "x" * 10, "capacity": {"a": "b"}},
        {"capacity.a"},
    ),
]


def test_wrong_types_and_unknown_fields_name_each_problem(ctx: Ctx) -> None:
    for method, path, body, fields in WRONG:
        path = path or f"/v1/projects/{ctx.prj_id}"
        token = not path.startswith(("/v1/auth/", "/v1/nodes/register"))
        doc = ctx.refused(method, path, status=422, code="invalid", token=token, json=body)
        assert isinstance(doc["errors"], list) and doc["errors"], doc
        named = {e["field"] for e in doc["errors"]}
        assert all(isinstance(e["problem"], str) and e["problem"] for e in doc["errors"])
        assert fields <= named or any(n.startswith(f) for f in fields for n in named), (
            f"{method} {path} {body!r}: {named}"
        )
        for e in doc["errors"]:
            if e["field"] in UNKNOWN or (method == "PATCH" and e["field"] == "name"):
                assert e["problem"] == "unknown field", doc


UNKNOWN = {"colour", "spec.colour", "spec.quotas.gpus"}

BAD_NAMES = [
    "Upper",
    "a" * 41,
    "1abc",
    "ünïcode",
    "\uff57\uff45\uff42",  # full-width "web"
    "",
    "../x",
    "..",
    ".",
    "a/b",
    "-a",
    "a-",
    "a b",
    "a_b",
    "a\x00b",
    "a\nb",
    "web;drop table projects",
    "web' or '1'='1",
    "%2e%2e%2fx",
]


def test_invalid_names_are_refused_everywhere(ctx: Ctx) -> None:
    for name in BAD_NAMES:
        ctx.refused("POST", "/v1/projects", status=422, json={"name": name})
        ctx.refused("POST", "/v1/apps", status=422, json={"name": name, "project": "shop"})
        ctx.refused("POST", "/v1/tokens", status=422, json={"name": name})
        ctx.refused(
            "POST",
            "/v1/auth/signup",
            status=422,
            token=False,
            json={"email": "new@x.example", "password": "long enough", "org": name},
        )
        if name:
            ctx.refused("GET", "/v1/apps", status=(404, 422), params={"project": name})
            ctx.refused("GET", "/v1/apps/web", status=(404, 422), params={"project": name})
            # in the path, every byte percent-encoded so that no client tidies it up
            path = "/v1/projects/" + "".join(f"%{b:02X}" for b in name.encode())
            ctx.refused("GET", path, status=(404, 422))
            ctx.refused("PATCH", path, status=(404, 422), json={"labels": {}})
            ctx.refused("DELETE", path, status=(404, 422))


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    yield b'{"name": "x", "spec": {"description": "'
    while sent < total:
        yield b"a" * size
        sent += size
    yield b'"}}'


def test_oversized_bodies_are_413(ctx: Ctx) -> None:
    big = b'{"name": "x", "spec": {"description": "' + b"a" * MAX_BODY + b'"}}'
    for method, path, token in _body_routes(ctx):
        doc = ctx.refused(
            method, path, status=413, code="too_large", token=token, content=big, headers=JSON
        )
        assert doc["hint"]
        # without a Content-Length: the body arrives in chunks and is cut off on the way
        r_headers = dict(JSON)
        doc = ctx.refused(
            method,
            path,
            status=413,
            code="too_large",
            token=token,
            content=_chunks(MAX_BODY + 1),
            headers=r_headers,
        )
    # a body right at the limit is read (and then judged on its content)
    at_limit = b'{"name": "x", "spec": {"description": "'
    at_limit += b"a" * (MAX_BODY - len(at_limit) - 3) + b'"}}'
    assert len(at_limit) == MAX_BODY
    doc = ctx.refused("POST", "/v1/projects", status=422, content=at_limit, headers=JSON)
    assert doc["errors"][0]["field"] == "spec.description"


def test_missing_and_forged_tokens_are_401(ctx: Ctx) -> None:
    body = {"name": "sneaky"}
    for headers in (
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": "Bearer " + security.new_token("session")},
        {"Authorization": "Token " + ctx.user.token},
        {"Authorization": "Bearer " + ctx.user.token[:-2]},
        {"Authorization": "Bearer " + ctx.user.token + "x" * 300},
    ):
        doc = ctx.refused(
            "POST",
            "/v1/projects",
            status=401,
            code="unauthenticated",
            token=False,
            json=body,
            headers=headers,
        )
        assert doc["hint"]
        ctx.refused(
            "PATCH",
            f"/v1/projects/{ctx.prj_id}",
            status=401,
            token=False,
            json={"labels": {"a": "b"}},
            headers=headers,
        )
        ctx.refused(
            "DELETE", f"/v1/projects/{ctx.prj_id}", status=401, token=False, headers=headers
        )
    ctx.refused(
        "POST",
        "/v1/nodes/register",
        status=401,
        token=False,
        json={"name": "n1", "join_token": "not-the-join-token"},
    )
    ctx.refused(
        "POST",
        "/v1/auth/login",
        status=401,
        token=False,
        json={"email": ctx.user.email, "password": "wrong password"},
    )


def test_deferred_fields_are_explained_not_ignored(ctx: Ctx) -> None:
    ports = [{"port": 80, "workload": "web", "target_port": 8080}]
    doc = ctx.refused(
        "POST",
        "/v1/endpoints",
        status=400,
        code="not_in_v1",
        json={
            "name": "front",
            **SCOPE,
            "env": "prod",
            "spec": {"ports": ports, "hostname": "shop.example.com"},
        },
    )
    assert doc["feature"] == "hostname-routing"
    assert doc["instead"] == deferred.BY_KEY["hostname-routing"].instead
    assert "spec.hostname" in doc["detail"]
    doc = ctx.refused(
        "PATCH",
        f"/v1/environments/{ctx.env_id}",
        status=400,
        code="not_in_v1",
        json={"spec": {"autoscale": {"min": 1, "max": 5}}},
    )
    assert doc["feature"] == "autoscaling"
    assert doc["instead"] and doc["hint"] == doc["instead"]
    doc = ctx.refused(
        "PATCH",
        f"/v1/environments/{ctx.env_id}",
        status=400,
        code="not_in_v1",
        json={"spec": {"scale": {"web": 2}, "canary": {"percent": 10}}},
    )
    assert doc["feature"] == "deploy-strategies"


def test_deferred_routes_are_explained(ctx: Ctx) -> None:
    for route in ("/v1/addons", "/v1/databases", "/v1/audit", "/v1/auth/sso"):
        key = deferred.for_route(route)
        assert key is not None
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            for path in (route, route + "/anything"):
                for token in (True, False):
                    doc = ctx.refused(
                        method,
                        path,
                        status=400,
                        code="not_in_v1",
                        token=token,
                        json={"name": "x"} if method != "GET" else None,
                    )
                    assert doc["feature"] == key.key, (method, path)
                    assert doc["instead"]


def test_bad_query_parameters(ctx: Ctx) -> None:
    prj = f"/v1/projects/{ctx.prj_id}"
    cases: list[tuple[str, str, dict[str, Any], int, str | None]] = [
        ("GET", prj + "/wait", {"timeout": "soon"}, 422, "invalid"),
        ("GET", prj + "/wait", {"timeout": "11m"}, 422, "invalid"),
        ("GET", prj + "/wait", {"timeout": "-1s"}, 422, "invalid"),
        ("GET", prj + "/wait", {"for": "happy"}, 422, "invalid"),
        ("GET", prj + "/wait", {"for": "x" * 81}, 422, "invalid"),
        ("GET", "/v1/projects", {"limit": 0}, 422, "invalid"),
        ("GET", "/v1/projects", {"limit": 1001}, 422, "invalid"),
        ("GET", "/v1/projects", {"limit": "ten"}, 422, "invalid"),
        ("GET", "/v1/projects", {"label": "novalue"}, 422, "invalid"),
        ("GET", "/v1/projects", {"label": "=v"}, 422, "invalid"),
        ("GET", "/v1/projects", {"org": "o" * 65}, 422, "invalid"),
        ("GET", "/v1/events/stream", {"since": -1, "follow": "false"}, 422, "invalid"),
        ("GET", "/v1/events/stream", {"timeout": "later", "follow": "false"}, 422, "invalid"),
        ("GET", "/v1/events/stream", {"for": "nothing/x", "follow": "false"}, 422, "invalid"),
        ("GET", "/v1/events/stream", {"follow": "perhaps"}, 422, "invalid"),
        ("GET", prj + "/events", {"since": "yesterday"}, 422, "invalid"),
        ("GET", "/v1/apps", {"app": "web"}, 422, "project_required"),
        ("GET", "/v1/status", {}, 422, "project_required"),
    ]
    for method, path, params, status, code in cases:
        ctx.refused(method, path, status=status, code=code, params=params)
    ctx.refused("PATCH", prj, status=422, json={}, headers={"If-Match": "abc"})
    ctx.refused("DELETE", prj, status=409, code="stale_revision", headers={"If-Match": "1"})
    ctx.refused("GET", "/v1/nowhere", status=404, code="not_found")
    ctx.refused("PUT", prj, status=405, code="method_not_allowed", json={})


def test_conflicts_write_nothing(ctx: Ctx) -> None:
    ctx.refused("POST", "/v1/projects", status=409, code="already_exists", json={"name": "shop"})
    ctx.refused(
        "POST",
        "/v1/apps",
        status=409,
        code="already_exists",
        json={"name": "web", "project": "shop"},
    )
    ctx.refused("POST", "/v1/orgs", status=409, code="already_exists", json={"name": "acme"})
    ctx.refused(
        "POST",
        "/v1/auth/signup",
        status=409,
        code="already_exists",
        token=False,
        json={"email": ctx.user.email.upper(), "password": "long enough", "org": "new"},
    )
    ctx.refused(
        "POST",
        "/v1/auth/signup",
        status=409,
        code="already_exists",
        token=False,
        json={"email": "someone@else.example", "password": "long enough", "org": "acme"},
    )
    ctx.refused(
        "POST",
        "/v1/orgs/acme/members",
        status=409,
        code="already_exists",
        json={"email": ctx.user.email},
    )
    ctx.refused(
        "POST",
        "/v1/orgs/acme/members",
        status=404,
        code="not_found",
        json={"email": "nobody@x.example"},
    )
