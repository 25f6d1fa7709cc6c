"""Receipts and waiting: every mutation answers with a receipt; --wait and `cove wait`
return once the change has settled, and give up with exit 3 when it never does."""

from __future__ import annotations

import pytest
import yaml

from cove.ids import new_id

from .helpers import RECEIPT_KEYS, RESOURCE_KEYS, Api, User, assert_clean_error, uniq


@pytest.mark.timeout(60)
def test_receipt_json_and_yaml(alice: User, alice_api: Api) -> None:
    name = uniq("app")
    r = alice.cove("apps", "create", name, "-o", "json")
    assert r.code == 0, str(r)
    rec = r.json()
    assert set(rec) >= RECEIPT_KEYS, sorted(rec)
    assert rec["operation"].startswith("op_")
    assert rec["action"] == "create"
    assert rec["resource"]["kind"] == "app" and rec["resource"]["name"] == name
    assert rec["resource"]["id"].startswith("app_")
    assert rec["generation"] == 1 and rec["revision"] > 0
    assert set(rec["links"]) >= {"operation", "wait", "resource", "events"}
    assert rec["links"]["resource"] == f"/v1/apps/{rec['resource']['id']}"
    # the links lead somewhere real
    op = alice_api.call("GET", rec["links"]["operation"])
    assert op["kind"] == "operation" and op["id"] == rec["operation"]

    r = alice.cove("apps", "create", uniq("app"), "-o", "yaml")
    assert r.code == 0, str(r)
    assert set(yaml.safe_load(r.out)) >= RECEIPT_KEYS


@pytest.mark.timeout(60)
def test_receipt_table_says_how_to_follow_it(alice: User) -> None:
    name = uniq("app")
    r = alice.cove("apps", "create", name)
    assert r.code == 0, str(r)
    assert f"accepted: create app {name}" in r.out
    assert "cove wait op_" in r.out and f"cove events --for app/{name}" in r.out


@pytest.mark.timeout(60)
def test_wait_flag_returns_once_settled(alice: User) -> None:
    name = uniq("app")
    r = alice.cove("apps", "create", name, "--wait", "-o", "json")
    assert r.code == 0, str(r)
    doc = r.json()
    assert set(doc) >= RECEIPT_KEYS
    assert doc["state"] == "succeeded" and doc["operation_status"]["state"] == "succeeded"
    # settled means: the status describes this generation, and it is Ready
    r = alice.cove("apps", "describe", name, "-o", "json")
    app = r.json()
    assert app["status"]["observed_generation"] == app["metadata"]["generation"]
    ready = {c["type"]: c for c in app["status"]["conditions"]}["Ready"]
    assert ready["status"] == "true"


@pytest.mark.timeout(60)
def test_wait_for_an_operation(alice: User, alice_api: Api) -> None:
    rec = alice_api.call(
        "POST", "/v1/apps", {"name": uniq("app"), "org": alice.org, "project": alice.project}
    )
    r = alice.cove("wait", rec["operation"], "-o", "json")
    assert r.code == 0, str(r)
    op = r.json()
    assert set(op) == RESOURCE_KEYS
    assert op["id"] == rec["operation"] and op["status"]["state"] == "succeeded"

    r = alice.cove("wait", rec["operation"])
    assert r.code == 0, str(r)
    assert "is done" in r.out and "waiting up to" in r.err


@pytest.mark.timeout(60)
def test_wait_for_ready(alice: User, app_name: str) -> None:
    r = alice.cove("wait", f"app/{app_name}", "--for", "ready", "--timeout", "10s")
    assert r.code == 0, str(r)
    assert f"app {app_name} is ready" in r.out


@pytest.mark.timeout(60)
def test_wait_for_what_never_happens_times_out_with_3(
    alice: User, app_name: str, alice_api: Api
) -> None:
    # an endpoint is accepted but stays WaitingForNode: no agent allocates addresses in v1
    ep = uniq("ep")
    alice_api.create(
        "endpoints",
        ep,
        spec={"ports": [{"port": 443, "workload": "web", "target_port": 8443}]},
        app=app_name,
        env="prod",
        **alice.scope(),
    )
    r = alice.cove(
        "wait", f"endpoint/{ep}", "--for", "ready", "--timeout", "2s", "-a", app_name, "-e", "prod"
    )
    assert_clean_error(r, 3, "did not become ready within 2s", "cove endpoints events")
    assert 2 <= r.seconds < 15, str(r)


@pytest.mark.timeout(60)
def test_wait_errors(alice: User, app_name: str) -> None:
    r = alice.cove("wait", "app/no-such-app", "--timeout", "2s")
    assert_clean_error(r, 4, "no app named 'no-such-app'")
    r = alice.cove("wait", new_id("op"), "--timeout", "2s")
    assert_clean_error(r, 4, "no operation")
    r = alice.cove("wait", f"app/{app_name}", "--for", "sunshine", "--timeout", "2s")
    assert_clean_error(r, 1, "unknown condition 'sunshine'", "condition=TYPE")


@pytest.mark.timeout(60)
def test_delete_with_wait_and_scale(alice: User, app_name: str) -> None:
    # nothing is deployed: there is no workload to scale, and nothing changes
    r = alice.cove("scale", "web=2", "-a", app_name, "-e", "staging", "--wait", "-o", "json")
    assert_clean_error(r, 1, "no workload 'web'", "nothing is deployed yet")
    r = alice.cove("environments", "describe", "staging", "-a", app_name, "-o", "json")
    env = r.json()
    assert env["spec"]["scale"] == {}
    assert env["metadata"]["generation"] == 1 == env["status"]["observed_generation"]

    r = alice.cove("apps", "delete", app_name, "--yes", "--wait", "--timeout", "30s")
    assert r.code == 0, str(r)
    assert "done" in r.err
    r = alice.cove("apps", "describe", app_name)
    assert_clean_error(r, 4, f"no app named '{app_name}'")
