"""Every entry of the deferred registry, reached for through the API, answers not_in_v1
with that entry's key, why and what to do instead; and nothing is written.

CLI flags (``Deferred.cli``) are covered by the CLI's own end-to-end tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cove import deferred
from cove.api import create_app
from cove.model.kinds import get_kind
from cove.store import Store
from tests.integration.helpers import User, create, get, problem, settle, signup, snapshot

pytestmark = pytest.mark.timeout(60)

SCOPE = {"project": "shop", "app": "web", "env": "prod"}
PORTS = [{"port": 80, "workload": "web", "target_port": 8080}]
# a valid create body per creatable kind, so the deferred field is the only thing wrong
VALID_CREATE: dict[str, dict[str, Any]] = {
    "org": {"name": "neworg"},
    "project": {"name": "newprj"},
    "app": {"name": "newapp", "project": "shop"},
    "endpoint": {"name": "newep", **SCOPE, "spec": {"ports": PORTS}},
    "volume": {"name": "newvol", **SCOPE, "spec": {"size_gb": 1}},
}
FIELDS = [(d, f) for d in deferred.REGISTRY for f in d.api_fields]
ROUTES = [(d, r) for d in deferred.REGISTRY for r in d.api_routes]


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One store for the module: every test here asserts it wrote nothing."""
    s = Store(f"sqlite:///{tmp_path_factory.mktemp('deferred')}/cove.db")
    s.migrate()
    yield s
    s.close()


@pytest.fixture(scope="module")
def sqlite_client(module_store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(module_store)) as c:
        yield c


@pytest.fixture(scope="module")
def user(sqlite_client: TestClient, module_store: Store) -> User:
    u = signup(sqlite_client, "acme")
    create(sqlite_client, u, "projects", {"name": "shop"})
    create(sqlite_client, u, "apps", {"name": "web", "project": "shop"})
    settle(module_store)
    return u


def _check(doc: dict[str, Any], d: deferred.Deferred) -> None:
    assert doc["code"] == "not_in_v1"
    assert doc["feature"] == d.key
    assert doc["instead"] == d.instead
    assert doc["hint"] == d.instead
    assert d.why in doc["detail"]


def test_every_registry_entry_is_reachable_somewhere() -> None:
    for d in deferred.REGISTRY:
        assert d.api_fields or d.api_routes or d.cli, d.key


@pytest.mark.parametrize(("entry", "field"), FIELDS, ids=[f for _, f in FIELDS])
def test_deferred_field(
    entry: deferred.Deferred,
    field: str,
    sqlite_client: TestClient,
    module_store: Store,
    user: User,
) -> None:
    c = sqlite_client
    kind, _, path = field.partition(".")
    before = snapshot(module_store)
    value: Any = {"example": True}
    if kind == "member":  # a role beyond owner and member
        assert path == "role"
        r = c.post(
            "/v1/orgs/acme/members",
            json={"email": user.email, "role": "admin"},
            headers=user.headers,
        )
    else:
        section, _, key = path.partition(".")
        assert section == "spec", field
        k = get_kind(kind)
        if k.creatable:
            body = {**VALID_CREATE[kind]}
            body["spec"] = {**body.get("spec", {}), key: value}
            r = c.post(f"/v1/{k.plural}", json=body, headers=user.headers)
        elif k.mutable and kind == "environment":
            env = get(c, user, "/v1/environments/prod", **{x: SCOPE[x] for x in ("project", "app")})
            r = c.patch(
                f"/v1/environments/{env['id']}", json={"spec": {key: value}}, headers=user.headers
            )
        else:  # pragma: no cover - a new place to reach: teach this test how
            raise AssertionError(f"no API request reaches {field}")
    doc = problem(r, 400, "not_in_v1")
    _check(doc, entry)
    assert snapshot(module_store) == before


@pytest.mark.parametrize(("entry", "route"), ROUTES, ids=[r for _, r in ROUTES])
def test_deferred_route(
    entry: deferred.Deferred,
    route: str,
    sqlite_client: TestClient,
    module_store: Store,
    user: User,
) -> None:
    before = snapshot(module_store)
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        for path in (route, f"{route}/some-name", f"{route}/some-name/deeper"):
            for headers in (user.headers, {}):
                r = sqlite_client.request(
                    method, path, headers=headers, json=None if method == "GET" else {"name": "x"}
                )
                doc = problem(r, 400, "not_in_v1")
                _check(doc, entry)
                assert route in doc["detail"]
    assert snapshot(module_store) == before


def test_the_registry_is_served(sqlite_client: TestClient) -> None:
    r = sqlite_client.get("/v1/deferred")
    assert r.status_code == 200
    served = {d["key"]: d for d in r.json()}
    assert set(served) == {d.key for d in deferred.REGISTRY}
    for d in deferred.REGISTRY:
        assert served[d.key]["instead"] == d.instead
        assert served[d.key]["api_fields"] == list(d.api_fields)
