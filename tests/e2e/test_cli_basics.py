"""The scripting contract: start cove, sign up, create, list, describe, stop it again;
and the exit codes a script branches on."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cove.ids import new_id

from .helpers import (
    PASSWORD,
    RESOURCE_KEYS,
    User,
    assert_clean_error,
    run_cove,
    run_many,
    stop,
    uniq,
)


def _procs_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            found.append(int(entry))
    return found


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(120)
def test_up_detach_is_idempotent_and_down_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    try:
        first = run_cove(["up", "--detach", "--port", "0"], home=home, timeout=90)
        assert first.code == 0, str(first)
        # stdout is the URL and nothing else, so `URL=$(cove up -d)` works
        assert first.out.count("\n") == 1, str(first)
        url = first.out.strip()
        assert url.startswith("http://127.0.0.1:"), str(first)
        assert _answers(url), "cove up --detach returned before the API answered"
        assert (home / "run" / "api.url").read_text().strip() == url
        pid = int((home / "run" / "up.pid").read_text().strip())
        assert _procs_in_group(pid), "nothing runs in cove's process group"

        again = run_cove(["up", "--detach", "--port", "0"], home=home)
        assert again.code == 0, str(again)
        assert again.out.strip() == url, "a second `cove up -d` must print the same URL"
        assert "already running" in again.err
        assert int((home / "run" / "up.pid").read_text().strip()) == pid

        down = run_cove(["down"], home=home)
        assert down.code == 0, str(down)
        assert "stopped" in down.err
        # the supervisor, the server and the agent are all gone
        assert _procs_in_group(pid) == []
        assert not _answers(url)
        assert not (home / "run" / "up.pid").exists()
        assert not (home / "run" / "api.url").exists()

        twice = run_cove(["down"], home=home)
        assert twice.code == 0, str(twice)
        assert "not running" in twice.err
        assert "Traceback" not in twice.err

        # and the CLI says what to do, instead of hanging or crashing
        r = run_cove(["apps", "list"], home=home, env={"COVE_TOKEN": "x" * 20})
        assert_clean_error(r, 1, "cove up")
    finally:
        stop(home)


@pytest.mark.timeout(60)
def test_signup_create_use_list_describe(make_user: Callable[..., User]) -> None:
    """The non-interactive path a script takes, end to end."""
    u = make_user(
        "contract", project=False, cli=True
    )  # `cove auth signup --email --password --org`
    assert u.config["org"] == u.org and u.config["token"]
    r = u.cove("auth", "whoami", "-o", "json")
    assert r.code == 0 and r.json()["user"]["email"] == u.email, str(r)

    project, app = uniq("prj"), uniq("app")
    r = u.cove("projects", "create", project)
    assert r.code == 0, str(r)
    assert f"create project {project}" in r.out
    assert "current project is now" in r.err  # a notice: stderr

    r = u.cove("use", f"{u.org}/{project}")
    assert r.code == 0, str(r)
    assert u.config["project"] == project

    r = u.cove("apps", "create", app, "--wait")
    assert r.code == 0, str(r)
    assert f"create app {app}" in r.out

    r = u.cove("apps", "list", "-o", "json")
    assert r.code == 0, str(r)
    items = r.json()
    assert isinstance(items, list) and [i["name"] for i in items] == [app]
    listed = items[0]
    assert set(listed) == RESOURCE_KEYS
    assert listed["kind"] == "app" and listed["id"].startswith("app_")
    assert listed["parent"]["kind"] == "project" and listed["parent"]["name"] == project

    r = u.cove("apps", "describe", app, "-o", "json")
    assert r.code == 0, str(r)
    doc = r.json()
    assert set(doc) == RESOURCE_KEYS
    assert doc["id"] == listed["id"]
    assert doc["metadata"]["generation"] == 1
    assert doc["status"]["observed_generation"] == 1

    # describe by ID gives the same resource
    r = u.cove("apps", "describe", listed["id"], "-o", "json")
    assert r.code == 0 and r.json()["name"] == app, str(r)

    # the people-facing forms carry the same facts
    r = u.cove("apps", "list")
    assert r.code == 0 and app in r.out and listed["id"] in r.out, str(r)
    r = u.cove("apps", "describe", app)
    assert r.code == 0, str(r)
    for part in ("Desired (spec)", "Current (status)", "Conditions", "caught up", app):
        assert part in r.out, f"{part!r} missing\n{r}"

    # the app came with its three environments
    r = u.cove("environments", "list", "--app", app, "-o", "json")
    assert r.code == 0, str(r)
    assert sorted(e["name"] for e in r.json()) == ["dev", "prod", "staging"]


# ----------------------------------------------------------------------------- exit codes

# id -> (args, exit code, what stderr says); {app} is an app that exists
EXIT_CASES: dict[str, tuple[tuple[str, ...], int, tuple[str, ...]]] = {
    "0-ok": (("auth", "whoami"), 0, ()),
    "1-wrong-password": (
        ("auth", "login", "--email", "{email}", "--password", PASSWORD + "-wrong"),
        1,
        ("wrong email or password",),
    ),
    "2-bad-flag": (("apps", "list", "--no-such-flag"), 2, ("No such option",)),
    "2-missing-arg": (("apps", "describe"), 2, ("Missing argument",)),
    "2-unknown-command": (("no-such-command",), 2, ("No such command",)),
    "2-bad-choice": (("apps", "list", "-o", "xml"), 2, ("--output",)),
    "2-bad-duration": (("wait", "app/web", "--timeout", "soon"), 2, ("invalid duration",)),
    "2-missing-option": (("endpoints", "create", "web"), 2, ("--port",)),
    "3-timeout": (
        ("wait", "app/{app}", "--for", "condition=Nope", "--timeout", "1s"),
        3,
        ("did not become condition=Nope within 1s",),
    ),
    "4-not-found-name": (
        ("apps", "describe", "no-such-app"),
        4,
        ("no app named 'no-such-app'", "cove apps list"),
    ),
    "4-not-found-id": (("apps", "describe", "{missing_id}"), 4, ("no app app_",)),
    "5-conflict": (("apps", "create", "{app}"), 5, ("named '{app}' already exists",)),
    "6-not-in-v1": (
        ("databases", "create", "main"),
        6,
        ("not in v1", "hint: run the database as a workload"),
    ),
}


@pytest.fixture(scope="module")
def exits(alice: User) -> dict[str, Any]:
    """Every case, run side by side."""
    api = alice.api()
    app = uniq("app")
    api.create("apps", app, **alice.scope())
    values = {"app": app, "email": alice.email, "missing_id": new_id("app")}
    jobs = {
        key: (lambda a=tuple(x.format(**values) for x in args): alice.cove(*a))
        for key, (args, _, _) in EXIT_CASES.items()
    }
    results = run_many(jobs)
    after = {
        "apps": api.call("GET", "/v1/apps", name=app, **alice.scope())["items"],
    }
    api.close()
    return {"results": results, "values": values, "after": after}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(EXIT_CASES))
def test_exit_code(exits: dict[str, Any], case: str) -> None:
    _args, code, needles = EXIT_CASES[case]
    r = exits["results"][case]
    if code == 0:
        assert r.code == 0 and "Traceback" not in r.err, str(r)
        return
    assert_clean_error(r, code, *(n.format(**exits["values"]) for n in needles))
    if code == 3:
        assert r.seconds < 15, "a 1s wait must give up quickly"


@pytest.mark.timeout(120)
def test_failed_commands_changed_nothing(exits: dict[str, Any], alice: User) -> None:
    # the second create (exit 5) wrote nothing; the failed login (exit 1) kept the session
    assert len(exits["after"]["apps"]) == 1
    assert alice.cove("auth", "whoami").code == 0
