"""Schemathesis over the app's own OpenAPI document (SQLite).

Generated requests, carrying a valid bearer token so that they get past authentication,
must never make the server fail (no 5xx), every answer must match the schema the API
publishes for its status (``response_schema_conformance``: 2xx bodies and the 422
problem documents), every status must be one the API means to give, and every error
must be problem+json.

FastAPI publishes OpenAPI 3.1, which schemathesis 3.x only reads when told to treat it
as 3.0 (``force_schema_version``); the schema uses nothing 3.1-only that matters here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from cove.api import create_app
from cove.store import Store
from tests.integration.helpers import create, settle, signup

pytestmark = pytest.mark.timeout(300)

# what the API answers on purpose (anything else, a 5xx above all, is a bug)
EXPECTED_STATUSES = {200, 201, 202, 400, 401, 403, 404, 405, 408, 409, 413, 422}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str]]:
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('schemathesis')}/cove.db")
    store.migrate()
    app = create_app(store)
    with TestClient(app) as c:  # something to find: an org, a project, an app
        user = signup(c, "acme")
        create(c, user, "projects", {"name": "shop"})
        create(c, user, "apps", {"name": "web", "project": "shop"})
        settle(store)
    yield app, user.token
    store.close()


@pytest.fixture(scope="module")
def api_schema(api: tuple[FastAPI, str]) -> Any:
    app, _ = api
    return schemathesis.from_asgi("/openapi.json", app, force_schema_version="30")


schema = schemathesis.from_pytest_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api(case: Any, api: tuple[FastAPI, str]) -> None:
    _, token = api
    if case.path.endswith("/wait") or case.path == "/v1/events/stream":
        # long polls: keep each one short (their own timeouts are tested elsewhere)
        case.query = dict(case.query or {}, timeout="100ms")
        if case.path == "/v1/events/stream":
            case.query["follow"] = "false"
    response = case.call(headers={"Authorization": f"Bearer {token}"})
    case.validate_response(response, checks=(not_a_server_error, response_schema_conformance))
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code in EXPECTED_STATUSES, where
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json"), where
        doc = response.json()
        assert doc["status"] == response.status_code and doc["code"] and doc["detail"], where


def test_openapi_describes_errors_as_problems(api: tuple[FastAPI, str]) -> None:
    app, _ = api
    doc = app.openapi()
    assert "HTTPValidationError" not in str(doc)
    seen = 0
    for item in doc["paths"].values():
        for op in item.values():
            if "422" in op["responses"]:
                seen += 1
                assert list(op["responses"]["422"]["content"]) == ["application/problem+json"]
    assert seen > 20
