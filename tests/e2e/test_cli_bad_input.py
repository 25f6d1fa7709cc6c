"""What a confused or hostile user types, and the clear error they get: the right exit
code, a message (and hint) on stderr, no traceback, nothing on stdout, nothing written."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .helpers import PASSWORD, Api, Result, User, assert_clean_error, run_cove, run_many, uniq


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    needles: tuple[str, ...]


def case(code: int, needles: str | tuple[str, ...], *args: str) -> Case:
    return Case(args, code, (needles,) if isinstance(needles, str) else needles)


@pytest.fixture(scope="module")
def mallory(make_user: Callable[..., User]) -> dict[str, Any]:
    """A user of her own with one app: every bad create below must leave it as it is."""
    u = make_user("mallory")
    api = u.api()
    app = uniq("app")
    api.create("apps", app, **u.scope())
    api.close()
    return {"user": u, "app": app}


def _written(u: User, app: str) -> dict[str, Any]:
    api = u.api()
    scope = dict(u.scope(), app=app, env="prod")
    snap = {
        "apps": sorted(a["name"] for a in api.call("GET", "/v1/apps", **u.scope())["items"]),
        "endpoints": api.call("GET", "/v1/endpoints", **scope)["items"],
        "volumes": api.call("GET", "/v1/volumes", **scope)["items"],
        "prod": api.call("GET", "/v1/environments/prod", app=app, **u.scope())["spec"],
    }
    api.close()
    return snap


APP = ("-a", "{app}", "-e", "prod")
PORT_SYNTAX = ("PUBLIC:WORKLOAD:TARGET", "443:web:8443")

BAD: dict[str, Case] = {
    # names
    # the message quotes the rule ('^[a-z]...'): it must survive the terminal's markup
    "name-upper": case(
        1, ("name", "^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$"), "apps", "create", "Bad_Name"
    ),
    "name-space": case(1, "name", "apps", "create", "has space"),
    "name-trailing-dash": case(1, "name", "apps", "create", "trailing-"),
    "name-dash-first": case(1, "name", "apps", "create", "--", "-leading"),
    "name-unicode": case(1, "name", "apps", "create", "café"),
    "name-too-long": case(1, "at most 40", "apps", "create", "a" * 41),
    "describe-invalid-name": case(
        1, ("neither an ID nor a valid name", "lower-case"), "apps", "describe", "Bad_Name"
    ),
    "describe-path-traversal": case(1, "invalid name or ID", "apps", "describe", "../orgs"),
    "describe-query-injection": case(1, "invalid name or ID", "apps", "describe", "x?org=y"),
    # --port syntax: usage errors, caught before anything is sent
    "port-one-part": case(2, PORT_SYNTAX, "endpoints", "create", "e", "--port", "443", *APP),
    "port-four-parts": case(
        2, PORT_SYNTAX, "endpoints", "create", "e", "--port", "443:web:80:1", *APP
    ),
    "port-words": case(
        2,
        ("ports are numbers", "443:web:8443"),
        "endpoints",
        "create",
        "e",
        "--port",
        "https:web:http",
        *APP,
    ),
    "port-empty": case(2, PORT_SYNTAX, "endpoints", "create", "e", "--port", "", *APP),
    # ports out of range
    "port-zero": case(2, "1-65535", "endpoints", "create", "e", "--port", "0:web:80", *APP),
    "port-too-big": case(2, "1-65535", "endpoints", "create", "e", "--port", "65536:web:80", *APP),
    "target-too-big": case(
        2, "1-65535", "endpoints", "create", "e", "--port", "443:web:70000", *APP
    ),
    # what only the API can judge: still a clear error
    "port-bad-workload": case(
        1, "workload", "endpoints", "create", "e", "--port", "443:Web:80", *APP
    ),
    "port-twice": case(
        1,
        "listed twice",
        "endpoints",
        "create",
        "e",
        "--port",
        "443:web:80",
        "--port",
        "443:web:81",
        *APP,
    ),
    "proxy-protocol": case(
        1,
        "proxy_protocol",
        "endpoints",
        "create",
        "e",
        "--port",
        "443:web:80",
        "--proxy-protocol",
        "v3",
        *APP,
    ),
    "volume-size-words": case(2, "--size", "volumes", "create", "v", "--size", "big", *APP),
    "volume-size-zero": case(1, "size_gb", "volumes", "create", "v", "--size", "0", *APP),
    "scale-no-count": case(2, "WORKLOAD=COUNT", "scale", "web", *APP),
    "scale-too-many": case(1, "less than or equal to 100", "scale", "web=101", *APP),
    "scale-bad-workload": case(1, "scale", "scale", "Web=1", *APP),
    # unknown kinds and targets
    "unknown-kind-command": case(2, "No such command", "widgets", "list"),
    "unknown-kind-wait": case(2, ("can't tell what", "app/web"), "wait", "widget/x"),
    "wait-bare-word": case(2, "can't tell what", "wait", "something"),
    "unknown-kind-events": case(2, "can't tell what", "events", "--for", "widget/x"),
    "bad-label-filter": case(1, "label", "apps", "list", "--label", "nokey"),
    "bad-since": case(1, "since", "events", "--since", "-1"),
    "use-missing-org": case(4, "no org named", "use", "no-such-org/x"),
    # billing and quotas
    "usage-bad-from": case(1, ("from='last week'", "YYYY-MM-DD"), "usage", "--from", "last week"),
    "usage-empty-window": case(
        1, "the window is empty", "usage", "--from", "2026-11-02", "--to", "2026-11-01"
    ),
    "usage-bad-by": case(2, "--by app or --by resource", "usage", "--by", "node"),
    "invoice-bad-month": case(2, ("not a month", "YYYY-MM"), "billing", "invoice", "--month", "13"),
    "invoice-month-to-come": case(1, "has not begun", "billing", "invoice", "--month", "9998-12"),
    "invoice-year-zero": case(
        1, "no usage is recorded then", "billing", "invoice", "--month", "0000-01"
    ),
    "quotas-unknown": case(2, "no quota named 'gpus'", "projects", "quotas", "--set", "gpus=1"),
    "quotas-negative": case(2, "DIMENSION=NUMBER", "projects", "quotas", "--set", "vcpu=-1"),
    "quotas-no-project": case(4, "no project", "projects", "quotas", "no-such-project"),
}


TOKENS = {
    "garbage": "garbage",
    "well-formed-unknown": "cove_s_" + "A" * 43,
    "non-ascii": "tökén",
    "newline": "two\nlines",
}
URLS = {
    "closed-port": ("closed", ("can't reach the cove API", "cove up")),
    "no-scheme": ("localhost:8470", ("can't reach the cove API", "cove up")),
    "garbage-url": ("::::", ("not a valid cove API URL", "http://")),
    "bad-address": ("http://256.0.0.1:80", ("not a valid cove API URL", "http://")),
}
CONFIRM = {
    "org": ("orgs", "delete", "{org}"),
    "project": ("projects", "delete", "{project}"),
    "app": ("apps", "delete", "{app}"),
    "endpoint": ("endpoints", "destroy", "{endpoint}", "-a", "{parent}", "-e", "prod"),
    "volume": ("volumes", "destroy", "{volume}", "-a", "{parent}", "-e", "prod"),
}
CONFIRM_CASES = [(k, "table") for k in CONFIRM] + [("app", "json")]
CREDENTIALS = {
    "signup-no-password": (
        ("auth", "signup", "--email", "x@example.com", "--org", "x"),
        "--password",
    ),
    "signup-no-org": (
        ("auth", "signup", "--email", "x@example.com", "--password", PASSWORD),
        "--org",
    ),
    "login-nothing": (("auth", "login"), "--email"),
}


@pytest.fixture(scope="module")
def victims(mallory: dict[str, Any]) -> dict[str, str]:
    """One of each deletable thing, which the commands below must NOT delete."""
    u: User = mallory["user"]
    api = u.api()
    scope = dict(u.scope(), app=mallory["app"], env="prod")
    names = {
        "org": uniq("org"),
        "project": uniq("prj"),
        "app": uniq("app"),
        "endpoint": uniq("ep"),
        "volume": uniq("vol"),
    }
    api.create("orgs", names["org"])
    api.create("projects", names["project"], org=u.org)
    api.create("apps", names["app"], **u.scope())
    api.create(
        "endpoints",
        names["endpoint"],
        spec={"ports": [{"port": 443, "workload": "web", "target_port": 8443}]},
        **scope,
    )
    api.create("volumes", names["volume"], spec={"size_gb": 1}, **scope)
    api.close()
    return names


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def batch(
    mallory: dict[str, Any],
    victims: dict[str, str],
    server: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Every bad command of this module, run side by side (each is a Python start-up);
    what mallory's org holds is read before and after."""
    u: User = mallory["user"]
    app = mallory["app"]
    jobs: dict[Any, Callable[[], Result]] = {}

    def blank(tag: str) -> Path:
        return tmp_path_factory.mktemp(tag)

    url_env: dict[str, str | None] = {"COVE_API_URL": server.url}
    for name, c in BAD.items():
        args = [a.replace("{app}", app) for a in c.args]
        jobs[("bad", name)] = lambda args=args: u.cove(*args)
    for name, token in TOKENS.items():
        jobs[("token", name)] = lambda t=token: u.cove("apps", "list", env={"COVE_TOKEN": t})
    for name, (url, _) in URLS.items():
        real = f"http://127.0.0.1:{_closed_port()}" if url == "closed" else url
        env = {"COVE_API_URL": real, "COVE_TOKEN": "cove_s_" + "A" * 43}
        jobs[("url", name)] = lambda e=env, h=blank("url"): run_cove(
            ["apps", "list"], home=h, env=e, timeout=30
        )
    values = dict(victims, parent=app)
    for kind, fmt in CONFIRM_CASES:
        args = [a.format(**values) for a in CONFIRM[kind]]
        jobs[("confirm", kind, fmt)] = lambda a=args, f=fmt: u.cove(*a, "-o", f, timeout=20)
    for name, (args, _) in CREDENTIALS.items():
        jobs[("cred", name)] = lambda a=args, h=blank("cred"): run_cove(
            list(a), home=h, env=url_env, timeout=20
        )
    corrupt = blank("corrupt")
    (corrupt / "config.json").write_text("{not json")
    jobs[("corrupt",)] = lambda: run_cove(["apps", "list"], home=corrupt, env=url_env)
    jobs[("no-api",)] = lambda h=blank("no-api"): run_cove(["apps", "list"], home=h)
    jobs[("signed-out",)] = lambda h=blank("out"): run_cove(["apps", "list"], home=h, env=url_env)

    before = _written(u, app)
    results = run_many(jobs)
    return {"results": results, "before": before, "after": _written(u, app)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused_clearly(batch: dict[str, Any], name: str) -> None:
    c = BAD[name]
    assert_clean_error(batch["results"][("bad", name)], c.code, *c.needles)


@pytest.mark.timeout(120)
def test_refused_commands_wrote_nothing(batch: dict[str, Any]) -> None:
    assert batch["after"] == batch["before"]


# ----------------------------------------------------------------------------- credentials


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(TOKENS))
def test_garbage_token(batch: dict[str, Any], name: str) -> None:
    assert_clean_error(batch["results"][("token", name)], 1, "sign in")


@pytest.mark.timeout(120)
def test_not_signed_in(batch: dict[str, Any]) -> None:
    assert_clean_error(batch["results"][("signed-out",)], 1, "not signed in", "cove auth login")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(URLS))
def test_api_unreachable(batch: dict[str, Any], name: str) -> None:
    r = batch["results"][("url", name)]
    assert_clean_error(r, 1, *URLS[name][1])
    assert r.seconds < 20, "an unreachable API must fail fast"


@pytest.mark.timeout(120)
def test_no_api_at_all(batch: dict[str, Any]) -> None:
    assert_clean_error(batch["results"][("no-api",)], 1, "no cove API", "cove up")


@pytest.mark.timeout(120)
def test_corrupt_config(batch: dict[str, Any]) -> None:
    assert_clean_error(batch["results"][("corrupt",)], 1, "can't read", "config.json")


# ----------------------------------------------------------------------------- no prompts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, fmt", CONFIRM_CASES, ids=[f"{k}-{f}" for k, f in CONFIRM_CASES])
def test_no_prompt_without_a_tty(
    batch: dict[str, Any], mallory: dict[str, Any], victims: dict[str, str], kind: str, fmt: str
) -> None:
    """stdin is not a TTY: refuse at once, with exit 2 and a hint about --yes; never hang."""
    r = batch["results"][("confirm", kind, fmt)]
    assert_clean_error(r, 2, "without confirmation", "--yes")
    u: User = mallory["user"]
    api = u.api()
    plural = {"org": "orgs", "project": "projects", "app": "apps"}.get(kind, kind + "s")
    scope = {
        "org": {},
        "project": {"org": u.org},
        "app": u.scope(),
    }.get(kind, dict(u.scope(), app=mallory["app"], env="prod"))
    res = api.call("GET", f"/v1/{plural}/{victims[kind]}", **scope)
    api.close()
    assert res["metadata"]["deleting"] is False, f"{kind} {victims[kind]} is being deleted"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CREDENTIALS))
def test_no_credential_prompts_without_a_tty(batch: dict[str, Any], name: str) -> None:
    r = batch["results"][("cred", name)]
    assert_clean_error(r, 2, CREDENTIALS[name][1])


@pytest.mark.timeout(60)
def test_typing_a_password_is_never_needed(server: Any, tmp_path: Path) -> None:
    """COVE_PASSWORD stands in for --password, for scripts that keep it out of argv."""
    env: dict[str, str | None] = {"COVE_API_URL": server.url, "COVE_PASSWORD": PASSWORD}
    email, org = f"{uniq('env')}@example.com", uniq("env")
    r = run_cove(["auth", "signup", "--email", email, "--org", org], home=tmp_path, env=env)
    assert r.code == 0, str(r)
    api = Api(server.url)
    assert api.call("POST", "/v1/auth/login", {"email": email, "password": PASSWORD})["token"]
    api.close()
