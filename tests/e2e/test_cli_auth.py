"""Who may see what, through the CLI: another org's resources look exactly like missing
ones; API tokens work for their org and stop working once revoked; sign-out is real."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from cove.ids import new_id

from .helpers import (
    PASSWORD,
    Api,
    Result,
    User,
    assert_clean_error,
    first_node,
    run_cove,
    run_many,
    uniq,
)


@pytest.fixture(scope="module")
def bob(make_user: Callable[..., User]) -> User:
    return make_user("bob")


@pytest.fixture
def alice_app(alice: User, alice_api: Api) -> dict[str, str]:
    name = uniq("app")
    rec = alice_api.create("apps", name, **alice.scope())
    return {"name": name, "id": rec["resource"]["id"]}


def _shape(err: str, ident: str) -> str:
    return re.sub(re.escape(ident), "<ID>", " ".join(err.split()))


@pytest.mark.timeout(60)
def test_another_orgs_app_looks_like_a_missing_one(
    bob: User, alice: User, alice_app: dict[str, str]
) -> None:
    theirs = bob.cove("apps", "describe", alice_app["id"])
    assert_clean_error(theirs, 4, "no app")
    missing_id = new_id("app")
    missing = bob.cove("apps", "describe", missing_id)
    assert_clean_error(missing, 4)
    # the same words: nothing tells bob that the ID exists
    assert _shape(theirs.err, alice_app["id"]) == _shape(missing.err, missing_id)


@pytest.mark.timeout(60)
def test_another_orgs_resources_are_out_of_reach(
    bob: User, alice: User, alice_app: dict[str, str], alice_api: Api
) -> None:
    cases = [
        (["apps", "delete", alice_app["id"], "--yes"], 4),
        (["wait", alice_app["id"], "--timeout", "2s"], 4),
        (["events", "--for", alice_app["id"]], 4),
        (["apps", "list", "--org", alice.org], 4),
        (["projects", "describe", str(alice.project), "--org", alice.org], 4),
        (["orgs", "members", "list", "--org", alice.org], 4),
    ]
    results = run_many({i: (lambda a=args: bob.cove(*a)) for i, (args, _) in enumerate(cases)})
    for i, (_, code) in enumerate(cases):
        assert_clean_error(results[i], code)
    r = bob.cove("orgs", "list", "-o", "json")
    assert r.code == 0, str(r)
    assert [o["name"] for o in r.json()] == [bob.org]
    # and alice's app is untouched
    app = alice_api.call("GET", f"/v1/apps/{alice_app['id']}")
    assert app["metadata"]["deleting"] is False


@pytest.mark.timeout(60)
def test_only_the_operator_changes_nodes(bob: User, alice_api: Api) -> None:
    node = first_node(alice_api)
    r = bob.cove("nodes", "cordon", node["name"])
    assert_clean_error(r, 1, "operator")
    again = alice_api.call("GET", f"/v1/nodes/{node['id']}")
    assert again["spec"]["cordoned"] is False
    assert again["metadata"]["generation"] == node["metadata"]["generation"]


@pytest.mark.timeout(60)
def test_api_token_reads_its_org_until_revoked(
    alice: User, alice_app: dict[str, str], tmp_path: Path
) -> None:
    r = alice.cove("tokens", "create", uniq("ci"), "-o", "json")
    assert r.code == 0, str(r)
    tok = r.json()
    assert tok["token"] and tok["id"].startswith("tok_") and tok["org_name"] == alice.org

    # a blank machine: only the URL and the token
    ci: dict[str, str | None] = {"COVE_API_URL": alice.server.url, "COVE_TOKEN": tok["token"]}
    home = tmp_path / "ci"

    def as_ci(*args: str) -> Result:
        return run_cove(list(args), home=home, env=ci)

    r = as_ci("apps", "list", "--org", alice.org, "--project", str(alice.project), "-o", "json")
    assert r.code == 0, str(r)
    assert alice_app["name"] in [a["name"] for a in r.json()]
    r = as_ci("auth", "whoami", "-o", "json")
    assert r.json()["token"]["kind"] == "api"

    # never the secret again
    r = alice.cove("tokens", "list", "-o", "json")
    listed = {t["id"]: t for t in r.json()}
    assert tok["id"] in listed and "token" not in listed[tok["id"]]

    r = alice.cove("tokens", "revoke", tok["id"])
    assert r.code == 0, str(r)
    assert f"revoked {tok['id']}" in r.out
    r = as_ci("apps", "list", "--org", alice.org, "--project", str(alice.project))
    assert_clean_error(r, 1, "not valid", "sign in")


@pytest.mark.timeout(60)
def test_api_token_is_scoped_to_one_org(alice: User, alice_api: Api, tmp_path: Path) -> None:
    other = uniq("org")
    alice_api.create("orgs", other)
    tok = alice_api.call("POST", "/v1/tokens", {"name": uniq("ci"), "org": alice.org})
    env: dict[str, str | None] = {"COVE_API_URL": alice.server.url, "COVE_TOKEN": tok["token"]}
    r = run_cove(["orgs", "list", "-o", "json"], home=tmp_path, env=env)
    assert r.code == 0, str(r)
    assert [o["name"] for o in r.json()] == [alice.org]
    r = run_cove(["orgs", "describe", other], home=tmp_path, env=env)
    assert_clean_error(r, 4, f"no org named '{other}'")
    r = run_cove(["orgs", "create", uniq("org")], home=tmp_path, env=env)
    assert_clean_error(r, 1, "can't create orgs", "cove auth login")


@pytest.mark.timeout(60)
def test_logout_is_real(alice: User, tmp_path: Path) -> None:
    # a second session of alice's, in a home of its own: her main session stays signed in
    home = alice.clone_home(tmp_path / "laptop", token=None)
    env: dict[str, str | None] = {"COVE_API_URL": alice.server.url}
    r = run_cove(
        ["auth", "login", "--email", alice.email, "--password", PASSWORD], home=home, env=env
    )
    assert r.code == 0, str(r)
    session = (home / "config.json").read_text()
    token = json.loads(session)["token"]

    r = run_cove(["auth", "logout"], home=home, env=env)
    assert r.code == 0 and "signed out" in r.out, str(r)
    r = run_cove(["auth", "whoami"], home=home, env=env)
    assert_clean_error(r, 1, "not signed in", "cove auth login")
    # the server forgot the token too: it is not just deleted from config.json
    r = run_cove(["auth", "whoami"], home=home, env={**env, "COVE_TOKEN": token})
    assert_clean_error(r, 1, "not valid", "sign in")
    # signing out twice is harmless
    r = run_cove(["auth", "logout"], home=home, env=env)
    assert r.code == 0 and "not signed in" in r.err, str(r)
    # alice's own session was never touched
    assert alice.cove("auth", "whoami").code == 0


@pytest.mark.timeout(60)
def test_signup_conflicts(alice: User, tmp_path: Path) -> None:
    env: dict[str, str | None] = {"COVE_API_URL": alice.server.url}
    r = run_cove(
        ["auth", "signup", "--email", alice.email, "--password", PASSWORD, "--org", uniq("o")],
        home=tmp_path,
        env=env,
    )
    assert_clean_error(r, 5)
    r = run_cove(
        [
            "auth",
            "signup",
            "--email",
            f"{uniq('x')}@example.com",
            "--password",
            PASSWORD,
            "--org",
            alice.org,
        ],
        home=tmp_path,
        env=env,
    )
    assert_clean_error(r, 5, "taken")
    assert not (tmp_path / "config.json").exists(), "a failed signup must not save anything"
