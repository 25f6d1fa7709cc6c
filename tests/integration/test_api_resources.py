"""Resources through the API on both backends: receipts, listing, describing, events,
waiting, optimistic concurrency, generations and cascading deletes."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cove.ids import new_id
from cove.model import Resource
from cove.store import Store
from tests.integration.helpers import User, create, get, ok, problem, settle, signup

pytestmark = pytest.mark.timeout(60)


@dataclass
class World:
    client: TestClient
    store: Store
    user: User
    project: dict[str, Any]  # receipt
    app: dict[str, Any]  # receipt


@pytest.fixture
def world(client: TestClient, store: Store) -> World:
    user = signup(client, "acme")
    project = create(client, user, "projects", {"name": "shop"})
    app = create(client, user, "apps", {"name": "web", "project": "shop"})
    return World(client, store, user, project, app)


def _events(client: TestClient, user: User, plural: str, rid: str) -> list[dict[str, Any]]:
    return list(get(client, user, f"/v1/{plural}/{rid}/events")["items"])


def _stream(client: TestClient, user: User, **params: Any) -> list[dict[str, Any]]:
    r = client.get("/v1/events/stream", params={"follow": "false", **params}, headers=user.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- receipts


def _check_receipt(
    client: TestClient, user: User, r_body: dict[str, Any], kind: str, name: str, store: Store
) -> None:
    assert r_body["operation"].startswith("op_")
    assert r_body["action"] == "create"
    assert r_body["state"] == "pending"
    assert r_body["resource"]["kind"] == kind
    assert r_body["resource"]["name"] == name
    assert r_body["generation"] == 1
    assert 0 < r_body["revision"] <= store.head_revision()
    links = r_body["links"]
    assert set(links) >= {"operation", "wait", "resource", "events"}
    res = get(client, user, links["resource"])
    Resource.model_validate(res)
    assert res["id"] == r_body["resource"]["id"]
    assert res["metadata"]["revision"] <= r_body["revision"]
    op = get(client, user, links["operation"])
    assert op["kind"] == "operation"
    assert op["spec"]["action"] == "create"
    assert op["spec"]["target"]["id"] == res["id"]
    assert op["parent"]["id"] == res["id"]
    assert get(client, user, links["events"])["items"][0]["spec"]["reason"] == "Created"
    assert links["wait"].startswith(links["operation"] + "/wait")


def test_signup_and_creates_answer_202_with_a_receipt(client: TestClient, store: Store) -> None:
    r = client.post(
        "/v1/auth/signup",
        json={"email": "Ann@Example.org", "password": "long enough", "org": "acme"},
    )
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == body["links"]["operation"]
    assert body["user"]["email"] == "ann@example.org"
    user = User(
        "ann@example.org",
        "long enough",
        body["token"],
        body["token_id"],
        body["user"]["id"],
        body["org"],
        body,
    )
    _check_receipt(client, user, body, "org", "acme", store)

    r = client.post("/v1/projects", json={"name": "shop"}, headers=user.headers)
    assert r.status_code == 202
    assert r.headers["location"] == r.json()["links"]["operation"]
    _check_receipt(client, user, r.json(), "project", "shop", store)

    r = client.post("/v1/apps", json={"name": "web", "project": "shop"}, headers=user.headers)
    assert r.status_code == 202
    _check_receipt(client, user, r.json(), "app", "web", store)


def test_creating_an_app_creates_prod_staging_and_dev(world: World) -> None:
    c, u = world.client, world.user
    app_id = world.app["resource"]["id"]
    envs = get(c, u, "/v1/environments", project="shop", app="web")["items"]
    assert sorted(e["name"] for e in envs) == ["dev", "prod", "staging"]
    for e in envs:
        assert e["parent"] == {"kind": "app", "id": app_id, "name": "web"}
        assert e["id"].startswith("env_")
    by_parent = get(c, u, "/v1/environments", parent=app_id)["items"]
    assert {e["id"] for e in by_parent} == {e["id"] for e in envs}
    # a second app has its own three
    create(c, u, "apps", {"name": "api", "project": "shop"})
    assert len(get(c, u, "/v1/environments", project="shop", app="api")["items"]) == 3
    assert len(get(c, u, "/v1/environments", project="shop")["items"]) == 6


def test_an_app_whose_environment_vanished_gets_it_back(world: World) -> None:
    """The status controller restores prod, staging and dev if one goes missing."""
    c, u, store = world.client, world.user, world.store
    staging = get(c, u, "/v1/environments/staging", project="shop", app="web")
    with store.write() as tx:
        tx.delete(staging["id"])
    settle(store)
    envs = get(c, u, "/v1/environments", project="shop", app="web")["items"]
    assert sorted(e["name"] for e in envs) == ["dev", "prod", "staging"]


# ----------------------------------------------------------------------------- listing


def test_list_filters(world: World) -> None:
    c, u = world.client, world.user
    create(c, u, "projects", {"name": "lab", "labels": {"tier": "web", "team": "a"}})
    create(c, u, "projects", {"name": "ops", "labels": {"tier": "web", "team": "b"}})
    create(c, u, "projects", {"name": "misc", "labels": {"tier": "batch"}})
    create(c, u, "apps", {"name": "web", "project": "lab"})
    ep = {"ports": [{"port": 80, "workload": "web", "target_port": 8080}]}
    scope = {"project": "shop", "app": "web"}
    create(c, u, "endpoints", {"name": "front", "env": "prod", "spec": ep, **scope})
    create(c, u, "endpoints", {"name": "front", "env": "staging", "spec": ep, **scope})

    def names(plural: str, **params: Any) -> list[str]:
        return sorted(i["name"] for i in get(c, u, f"/v1/{plural}", **params)["items"])

    assert names("projects") == ["lab", "misc", "ops", "shop"]
    assert names("projects", name="ops") == ["ops"]
    assert names("projects", name="nope") == []
    assert names("projects", label="tier=web") == ["lab", "ops"]
    assert names("projects", label=["tier=web", "team=b"]) == ["ops"]
    assert names("projects", label="tier=nothing") == []
    assert names("projects", org="acme") == names("projects")
    assert names("projects", org=u.org["id"]) == names("projects")
    # scoping: the same app name in two projects
    assert len(get(c, u, "/v1/apps", name="web")["items"]) == 2
    apps_in_lab = get(c, u, "/v1/apps", project="lab")["items"]
    assert [a["parent"]["name"] for a in apps_in_lab] == ["lab"]
    shop_id = world.project["resource"]["id"]
    assert [a["id"] for a in get(c, u, "/v1/apps", parent=shop_id)["items"]] == [
        world.app["resource"]["id"]
    ]
    assert names("environments", project="lab", app="web") == ["dev", "prod", "staging"]
    assert len(get(c, u, "/v1/environments", project="shop", app="web", env="prod")["items"]) == 1
    # endpoints by environment
    assert names("endpoints", project="shop", app="web") == ["front", "front"]
    prod_eps = get(c, u, "/v1/endpoints", project="shop", app="web", env="prod")["items"]
    assert len(prod_eps) == 1 and prod_eps[0]["parent"]["name"] == "prod"
    assert names("endpoints", project="lab") == []
    # a scope that does not exist is a 404, not an empty list
    problem(c.get("/v1/apps", params={"project": "nope"}, headers=u.headers), 404, "not_found")


def test_pagination_has_no_duplicates_or_gaps(world: World) -> None:
    c, u = world.client, world.user
    for i in range(9):
        create(c, u, "projects", {"name": f"p{i}"})
    everything = get(c, u, "/v1/projects", limit=1000)
    assert everything["next"] is None
    all_ids = [p["id"] for p in everything["items"]]
    assert len(all_ids) == 10
    assert all_ids == sorted(all_ids)  # oldest first: IDs sort by creation time

    for limit in (1, 3, 4, 10):
        seen: list[str] = []
        after = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": limit}
            if after:
                params["after"] = after
            page = get(c, u, "/v1/projects", **params)
            pages += 1
            assert len(page["items"]) <= limit
            seen += [p["id"] for p in page["items"]]
            after = page["next"]
            if after is None:
                break
            assert after == page["items"][-1]["id"]
        assert seen == all_ids, f"limit={limit}"
        assert pages == -(-10 // limit)  # no empty trailing page

    # a page boundary does not lose an item created while paging
    first = get(c, u, "/v1/projects", limit=5)
    create(c, u, "projects", {"name": "late"})
    rest = get(c, u, "/v1/projects", limit=1000, after=first["next"])
    got = [p["id"] for p in first["items"] + rest["items"]]
    assert len(got) == len(set(got)) == 11


def test_event_pages_resume_by_revision(world: World) -> None:
    c, u = world.client, world.user
    for i in range(6):
        create(c, u, "projects", {"name": f"p{i}"})
    everything = get(c, u, "/v1/events", limit=1000)["items"]
    assert len(everything) > 10
    seen: list[str] = []
    after = None
    while True:
        page = get(c, u, "/v1/events", limit=4, **({"after": after} if after else {}))
        seen += [e["id"] for e in page["items"]]
        after = page["next"]
        if after is None:
            break
        assert after == str(page["items"][-1]["metadata"]["revision"])
    assert seen == [e["id"] for e in everything]


def test_describe_by_id_and_by_name(world: World) -> None:
    c, u = world.client, world.user
    prj_id = world.project["resource"]["id"]
    app_id = world.app["resource"]["id"]
    assert get(c, u, f"/v1/projects/{prj_id}")["name"] == "shop"
    assert get(c, u, "/v1/projects/shop")["id"] == prj_id
    assert get(c, u, "/v1/projects/shop", org="acme")["id"] == prj_id
    assert get(c, u, "/v1/apps/web", project="shop")["id"] == app_id
    assert get(c, u, "/v1/apps/web", project=prj_id)["id"] == app_id
    assert get(c, u, f"/v1/apps/{app_id}")["parent"]["id"] == prj_id
    prod = get(c, u, "/v1/environments/prod", project="shop", app="web")
    assert prod["parent"]["id"] == app_id
    assert get(c, u, f"/v1/environments/{prod['id']}")["name"] == "prod"
    assert get(c, u, "/v1/orgs/acme")["id"] == u.org["id"]
    # what does not exist, by name and by ID, and an ID of another kind
    problem(c.get("/v1/projects/nope", headers=u.headers), 404, "not_found")
    problem(c.get(f"/v1/projects/{new_id('prj')}", headers=u.headers), 404, "not_found")
    problem(c.get(f"/v1/projects/{app_id}", headers=u.headers), 404, "not_found")
    problem(c.get("/v1/apps/web", headers=u.headers), 422, "project_required")
    problem(c.get("/v1/operations/create-thing", headers=u.headers), 404, "not_found")


# ----------------------------------------------------------------------------- events


def test_repeated_events_are_folded_into_one_with_a_count(world: World) -> None:
    c, u = world.client, world.user
    prj_id = world.project["resource"]["id"]
    for _ in range(2):  # the same change twice: same reason, same message
        ok(c.patch(f"/v1/projects/{prj_id}", json={}, headers=u.headers), 202)
        time.sleep(0.005)
    evs = [e for e in _events(c, u, "projects", prj_id) if e["spec"]["reason"] == "Updated"]
    assert len(evs) == 1, evs
    ev = evs[0]
    Resource.model_validate(ev)
    assert ev["status"]["count"] == 2
    assert ev["spec"]["message"] == f"nothing changed by {u.email}"
    assert ev["status"]["first_seen"] < ev["status"]["last_seen"]
    assert ev["parent"]["id"] == prj_id
    # a different message is a different event
    ok(c.patch(f"/v1/projects/{prj_id}", json={"labels": {"a": "b"}}, headers=u.headers), 202)
    evs = [e for e in _events(c, u, "projects", prj_id) if e["spec"]["reason"] == "Updated"]
    assert sorted(e["status"]["count"] for e in evs) == [1, 2]


def test_store_folds_repeats_and_moves_the_revision(store: Store) -> None:
    with store.write() as tx:
        org = tx.create("org", "acme")
        first = tx.event(org, "Warning", "Flapping", "went down")
    with store.write() as tx:
        second = tx.event(org, "Warning", "Flapping", "went down")
        other_type = tx.event(org, "Normal", "Flapping", "went down")
    assert second["id"] == first["id"]
    assert second["status"]["count"] == 2
    assert second["status"]["first_seen"] == first["status"]["first_seen"]
    assert second["metadata"]["revision"] > first["metadata"]["revision"]
    assert other_type["id"] != first["id"]


def test_event_stream_resumes_from_a_revision(world: World) -> None:
    c, u = world.client, world.user
    mark = world.store.head_revision()
    create(c, u, "apps", {"name": "api", "project": "shop"})
    settle(world.store)

    everything = _stream(c, u)
    revs = [e["metadata"]["revision"] for e in everything]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    for e in everything:
        Resource.model_validate(e)
    after = _stream(c, u, since=mark)
    assert after == [e for e in everything if e["metadata"]["revision"] > mark]
    assert any(e["spec"]["message"].startswith("app api created") for e in after)
    assert not any(e["spec"]["message"].startswith("app web created") for e in after)
    # resuming from the last one seen gives nothing new; so does the head revision
    assert _stream(c, u, since=revs[-1]) == []
    assert _stream(c, u, since=world.store.head_revision()) == []
    # resuming in the middle gives exactly the tail
    middle = revs[len(revs) // 2]
    assert _stream(c, u, since=middle) == [
        e for e in everything if e["metadata"]["revision"] > middle
    ]
    # filtered to one object
    app_id = world.app["resource"]["id"]
    only_app = _stream(c, u, **{"for": f"app/{app_id}"})
    assert only_app and all(e["parent"]["id"] == app_id for e in only_app)
    assert _stream(c, u, **{"for": "app/web", "project": "shop"}) == only_app


def test_event_stream_follow_delivers_new_events(world: World) -> None:
    """With follow, the stream stays open and delivers what happens after it started
    (the test client buffers the body, so the stream ends at its timeout)."""
    c, u = world.client, world.user
    mark = world.store.head_revision()

    def follow() -> list[dict[str, Any]]:
        out = []
        with c.stream(
            "GET",
            "/v1/events/stream",
            params={"since": mark, "follow": "true", "timeout": "1500ms"},
            headers=u.headers,
        ) as r:
            for line in r.iter_lines():
                if line.strip():
                    out.append(json.loads(line))
                    if out[-1]["spec"]["message"].startswith("project late created"):
                        return out
        return out

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(follow)
        time.sleep(0.2)
        create(c, u, "projects", {"name": "late"})
        got = fut.result(timeout=10)
    assert got and got[-1]["spec"]["message"].startswith("project late created")


# ----------------------------------------------------------------------------- waiting


def test_wait_for_done_succeeds_once_controllers_settle(world: World) -> None:
    c, u = world.client, world.user
    wait = world.project["links"]["wait"]
    # nothing has reconciled yet: a short wait times out
    problem(c.get(wait + "&timeout=200ms", headers=u.headers), 408, "timeout")
    settle(world.store)
    op = ok(c.get(wait + "&timeout=5s", headers=u.headers))
    Resource.model_validate(op)
    assert op["status"]["state"] == "succeeded"
    proj = get(c, u, world.project["links"]["resource"])
    assert proj["status"]["observed_generation"] == proj["metadata"]["generation"]
    ready = [x for x in proj["status"]["conditions"] if x["type"] == "Ready"]
    assert ready and ready[0]["status"] == "true"
    assert (
        ok(
            c.get(
                world.project["links"]["resource"] + "/wait?for=ready&timeout=1s", headers=u.headers
            )
        )["id"]
        == proj["id"]
    )


def test_a_waiting_request_returns_when_the_operation_settles(world: World) -> None:
    c, u = world.client, world.user
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        fut = pool.submit(c.get, world.app["links"]["wait"] + "&timeout=20s", headers=u.headers)
        time.sleep(0.3)
        assert not fut.done()
        settle(world.store)
        r = fut.result(timeout=15)
    assert r.status_code == 200, r.text
    assert r.json()["status"]["state"] == "succeeded"
    assert time.monotonic() - t0 < 10


def test_wait_for_something_that_never_happens_times_out(world: World) -> None:
    c, u = world.client, world.user
    settle(world.store)
    prj = world.project["links"]["resource"]
    t0 = time.monotonic()
    doc = problem(
        c.get(
            prj + "/wait",
            params={"for": "condition=Migrated", "timeout": "500ms"},
            headers=u.headers,
        ),
        408,
        "timeout",
    )
    elapsed = time.monotonic() - t0
    assert 0.4 < elapsed < 5
    assert doc["hint"]
    assert doc["resource"]["id"] == world.project["resource"]["id"]
    # an endpoint waits for a node agent that this cluster does not have
    ep = create(
        c,
        u,
        "endpoints",
        {
            "name": "front",
            "project": "shop",
            "app": "web",
            "env": "prod",
            "spec": {"ports": [{"port": 80, "workload": "web", "target_port": 8080}]},
        },
    )
    settle(world.store)
    problem(
        c.get(ep["links"]["resource"] + "/wait?for=ready&timeout=300ms", headers=u.headers),
        408,
        "timeout",
    )
    # ... but its receipt settles: accepted and recorded
    assert (
        ok(c.get(ep["links"]["wait"] + "&timeout=2s", headers=u.headers))["status"]["state"]
        == "succeeded"
    )


def test_wait_on_a_failed_operation_is_a_409(world: World) -> None:
    c, u = world.client, world.user
    created = create(c, u, "projects", {"name": "brief"})
    # deleted before it ever settled: its create operation fails for good
    ok(c.delete(created["links"]["resource"], headers=u.headers), 202)
    settle(world.store)
    op = get(c, u, created["links"]["operation"])
    assert op["status"]["state"] == "failed"
    doc = problem(
        c.get(created["links"]["wait"] + "&timeout=5s", headers=u.headers), 409, "wait_failed"
    )
    assert "failed" in doc["detail"]
    assert doc["resource"]["id"] == created["operation"]
    assert doc["hint"]


def test_wait_for_deleted(world: World) -> None:
    c, u = world.client, world.user
    settle(world.store)
    rec = create(c, u, "projects", {"name": "doomed"})
    url = rec["links"]["resource"] + "/wait?for=deleted&timeout=20s"
    problem(
        c.get(rec["links"]["resource"] + "/wait?for=deleted&timeout=200ms", headers=u.headers),
        408,
        "timeout",
    )
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.get, url, headers=u.headers)
        time.sleep(0.2)
        ok(c.delete(rec["links"]["resource"], headers=u.headers), 202)
        time.sleep(0.2)
        assert not fut.done()  # marked deleting, not gone yet
        settle(world.store)
        r = fut.result(timeout=15)
    assert r.status_code == 200, r.text
    # once it is gone, waiting for its deletion answers at once
    assert c.get(url, headers=u.headers).status_code == 200


# ----------------------------------------------------------------------------- concurrency


def test_stale_revision_is_refused_and_changes_nothing(world: World) -> None:
    c, u, store = world.client, world.user, world.store
    url = world.project["links"]["resource"]
    before = get(c, u, url)
    rev0 = before["metadata"]["revision"]
    rec = ok(
        c.patch(url, json={"revision": rev0, "spec": {"description": "v2"}}, headers=u.headers), 202
    )
    assert rec["generation"] == before["metadata"]["generation"] + 1
    current = get(c, u, url)
    head = store.head_revision()

    for req in (
        {"json": {"revision": rev0, "spec": {"description": "v3"}}},
        {"json": {"revision": rev0, "labels": {"x": "y"}}},
        {"json": {"spec": {"description": "v3"}}, "headers": {"If-Match": f'"{rev0}"'}},
    ):
        headers = {**u.headers, **req.get("headers", {})}
        doc = problem(c.patch(url, json=req["json"], headers=headers), 409, "stale_revision")
        assert doc["current_revision"] == current["metadata"]["revision"]
        assert doc["hint"]
        assert get(c, u, url) == current
        assert store.head_revision() == head

    problem(c.delete(url, headers={**u.headers, "If-Match": str(rev0)}), 409, "stale_revision")
    assert get(c, u, url) == current
    assert store.head_revision() == head


def test_generation_bumps_only_on_spec_change(world: World) -> None:
    c, u, store = world.client, world.user, world.store
    url = world.project["links"]["resource"]
    settle(store)
    p = get(c, u, url)
    assert p["metadata"]["generation"] == 1
    assert p["status"]["observed_generation"] == 1

    def patch(body: dict[str, Any]) -> dict[str, Any]:
        return dict(ok(c.patch(url, json=body, headers=u.headers), 202))

    assert patch({"labels": {"team": "a"}})["generation"] == 1
    assert patch({"spec": {"description": ""}})["generation"] == 1  # same value: no change
    assert patch({})["generation"] == 1
    assert get(c, u, url)["metadata"]["generation"] == 1

    rec = patch({"spec": {"description": "the shop"}})
    assert rec["generation"] == 2
    p = get(c, u, url)
    assert p["spec"]["description"] == "the shop"
    assert p["spec"]["quotas"]["instances"] == 20  # a partial spec keeps the rest
    assert p["labels"] == {"team": "a"}
    assert p["status"]["observed_generation"] == 1  # status has not caught up yet
    problem(c.get(url + "/wait?for=caught-up&timeout=100ms", headers=u.headers), 408)

    patch({"spec": {"quotas": {"instances": 5}}})
    settle(store)
    p = get(c, u, url)
    assert p["metadata"]["generation"] == 3
    assert p["status"]["observed_generation"] == 3
    assert p["spec"]["quotas"]["instances"] == 5
    assert ok(c.get(url + "/wait?for=caught-up&timeout=1s", headers=u.headers))["id"] == p["id"]
    assert (
        ok(c.get(rec["links"]["wait"] + "&timeout=1s", headers=u.headers))["status"]["state"]
        == "succeeded"
    )


# ----------------------------------------------------------------------------- deleting


def test_deleting_a_project_cascades(world: World) -> None:
    c, u, store = world.client, world.user, world.store
    create(c, u, "apps", {"name": "api", "project": "shop"})
    create(
        c,
        u,
        "endpoints",
        {
            "name": "front",
            "project": "shop",
            "app": "web",
            "env": "prod",
            "spec": {"ports": [{"port": 80, "workload": "web", "target_port": 8080}]},
        },
    )
    create(
        c,
        u,
        "volumes",
        {"name": "data", "project": "shop", "app": "api", "env": "dev", "spec": {"size_gb": 1}},
    )
    create(c, u, "projects", {"name": "keep"})
    create(c, u, "apps", {"name": "web", "project": "keep"})
    settle(store)
    prj_id = world.project["resource"]["id"]
    doomed = [
        r["id"]
        for plural in ("apps", "environments", "endpoints", "volumes")
        for r in get(c, u, f"/v1/{plural}", project="shop", limit=1000)["items"]
    ]
    assert len(doomed) == 2 + 6 + 1 + 1
    kept = [r["id"] for r in get(c, u, "/v1/environments", project="keep")["items"]]

    rec = ok(c.delete(f"/v1/projects/{prj_id}", headers=u.headers), 202)
    assert rec["action"] == "delete"
    assert rec["resource"]["id"] == prj_id
    p = get(c, u, f"/v1/projects/{prj_id}")
    assert p["metadata"]["deleting"] is True
    # nothing new goes into something being deleted; nor can it change
    problem(c.post("/v1/apps", json={"name": "new", "project": "shop"}, headers=u.headers), 409)
    problem(c.patch(f"/v1/projects/{prj_id}", json={"labels": {"a": "b"}}, headers=u.headers), 409)

    settle(store)
    problem(c.get(f"/v1/projects/{prj_id}", headers=u.headers), 404, "not_found")
    for rid in doomed:
        assert store.get_row(rid) is None, rid
    assert get(c, u, "/v1/apps", name="api")["items"] == []
    for rid in kept:
        assert store.get_row(rid) is not None
    op = ok(c.get(rec["links"]["wait"] + "&timeout=5s", headers=u.headers))
    assert op["status"]["state"] == "succeeded"
    reasons = [e["spec"]["reason"] for e in get(c, u, f"/v1/operations/{op['id']}/events")["items"]]
    assert "Succeeded" in reasons
    # the name is free again
    create(c, u, "projects", {"name": "shop"})
