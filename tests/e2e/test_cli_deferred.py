"""Every CLI form of every deferred feature (cove.deferred.REGISTRY) answers exit 6, says
'not in v1', why, and what to do instead, and writes nothing. The forms are mapped to
runnable commands from the registry itself: an entry whose form can't be mapped fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import typer

from cove import deferred
from cove.cli.main import build

from .helpers import PASSWORD, Api, Result, User, assert_clean_error, normalise, run_many, uniq

FORMS = [(d, form) for d in deferred.REGISTRY for form in d.cli]

# what each command needs besides the deferred flag, so that the flag is the only problem
BASE_ARGS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("endpoints", "create"): ("web", "--port", "443:web:8443", "-a", "{app}", "-e", "prod"),
    ("scale",): ("web=2", "-a", "{app}", "-e", "prod"),
    ("orgs", "members", "add"): ("{member}",),
    ("auth", "login"): ("--email", "{email}", "--password", PASSWORD),
    ("databases", "create"): ("main",),
    ("addons", "create"): ("redis",),
    ("audit", "export"): (),
}
# values for deferred flags that take one
FLAG_VALUES = {
    "--hostname": "app.example.com",
    "--header": "X-Frame-Options: DENY",
    "--schedule": "0 9 * * 1-5",
    "--role": "admin",
}


def to_argv(form: str) -> tuple[tuple[str, ...], list[str]]:
    """``"endpoints create --hostname"`` -> (command path, the deferred flag with a value)."""
    words = form.split()
    path = tuple(w for w in words if not w.startswith("-"))
    flags = [w for w in words if w.startswith("-")]
    cmd: Any = typer.main.get_command(build())
    for w in path:
        subs = getattr(cmd, "commands", None) or {}
        assert w in subs, f"deferred CLI form {form!r}: no command {w!r} (path {path})"
        cmd = subs[w]
    assert not getattr(cmd, "commands", None), f"{form!r} names a group, not a command"
    assert path in BASE_ARGS, f"{form!r}: add the arguments `cove {' '.join(path)}` needs"
    argv: list[str] = []
    for flag in flags:
        params = [p for p in cmd.params if flag in getattr(p, "opts", ())]
        assert params, f"deferred CLI form {form!r}: `cove {' '.join(path)}` has no {flag}"
        if getattr(params[0], "is_flag", False):
            argv.append(flag)
        else:
            assert flag in FLAG_VALUES, f"{form!r}: {flag} takes a value; add it to FLAG_VALUES"
            argv += [flag, FLAG_VALUES[flag]]
    return path, argv


def test_every_registry_entry_with_cli_forms_is_covered() -> None:
    assert FORMS, "the registry names no CLI forms?"
    keys = {d.key for d, _ in FORMS}
    assert keys == {d.key for d in deferred.REGISTRY if d.cli}
    for _, form in FORMS:
        to_argv(form)  # each one maps to a runnable command


@pytest.fixture(scope="module")
def dana(make_user: Callable[..., User]) -> dict[str, Any]:
    """A user of her own with an app, and another account she could add as a member."""
    u = make_user("dana")
    api = u.api()
    app = uniq("app")
    api.create("apps", app, **u.scope())
    member = f"{uniq('member')}@example.com"
    anon = Api(u.server.url)
    anon.call("POST", "/v1/auth/signup", {"email": member, "password": PASSWORD, "org": uniq("m")})
    anon.close()
    api.close()
    return {"user": u, "app": app, "member": member}


def _snapshot(u: User, app: str) -> dict[str, Any]:
    """What a deferred command could have written, read through the API."""
    api = u.api()
    scope = dict(u.scope(), app=app, env="prod")
    snap = {
        "events": [e["id"] for e in api.call("GET", "/v1/events", org=u.org, limit=1000)["items"]],
        "endpoints": api.call("GET", "/v1/endpoints", **scope)["items"],
        "prod": api.call("GET", "/v1/environments/prod", app=app, **u.scope())["metadata"],
        "members": api.call("GET", f"/v1/orgs/{u.org}/members"),
        "tokens": [t["id"] for t in api.call("GET", "/v1/tokens")],
    }
    api.close()
    return snap


@pytest.fixture(scope="module")
def batch(dana: dict[str, Any]) -> dict[str, Any]:
    """Every form, run side by side; what dana's org holds is read before and after."""
    u: User = dana["user"]
    values = {"app": dana["app"], "member": dana["member"], "email": u.email}
    jobs: dict[Any, Callable[[], Result]] = {}
    for _, form in FORMS:
        path, flag_args = to_argv(form)
        args = [*path, *(a.format(**values) for a in BASE_ARGS[path]), *flag_args]
        jobs[form] = lambda args=args: u.cove(*args)
    before = _snapshot(u, dana["app"])
    results = run_many(jobs)
    return {"results": results, "before": before, "after": _snapshot(u, dana["app"])}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "entry, form", FORMS, ids=[f"{d.key}:{form.replace(' ', '_')}" for d, form in FORMS]
)
def test_deferred_cli_form_exits_6(
    batch: dict[str, Any], entry: deferred.Deferred, form: str
) -> None:
    r = batch["results"][form]
    assert_clean_error(r, 6, "not in v1")
    err = normalise(r.err)
    assert entry.feature in err, str(r)  # what
    assert normalise(entry.why) in err, str(r)  # why
    assert normalise(entry.instead) in err, str(r)  # what to do instead


@pytest.mark.timeout(120)
def test_deferred_forms_wrote_nothing(batch: dict[str, Any]) -> None:
    assert batch["after"] == batch["before"]


@pytest.mark.timeout(60)
def test_nothing_was_created_by_the_endpoint_forms(dana: dict[str, Any]) -> None:
    """The way a user would check: the endpoint list is still empty."""
    u: User = dana["user"]
    r = u.cove(
        "endpoints",
        "create",
        "web",
        "--port",
        "443:web:8443",
        "--hostname",
        "app.example.com",
        "-a",
        dana["app"],
        "-e",
        "prod",
        "-o",
        "json",
    )
    assert_clean_error(r, 6, "hostname")
    r = u.cove("endpoints", "list", "-a", dana["app"], "-e", "prod", "-o", "json")
    assert r.code == 0 and r.json() == [], str(r)


@pytest.mark.timeout(60)
def test_deferred_lists_the_registry(alice: User) -> None:
    r = alice.cove("deferred", "-o", "json")
    assert r.code == 0, str(r)
    assert [d["key"] for d in r.json()] == [d.key for d in deferred.REGISTRY]
    r = alice.cove("deferred")
    assert r.code == 0, str(r)
    for d in deferred.REGISTRY:
        assert d.feature in r.out
