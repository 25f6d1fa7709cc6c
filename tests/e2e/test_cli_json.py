"""Under ``-o json`` and ``-o yaml`` stdout holds exactly one document, for EVERY command that
takes ``-o``. The commands are walked from the Typer app itself, and each needs an example
below: a new command without one fails ``test_every_output_command_has_an_example``.

Each example runs once per format, against resources made for it (a delete gets its own
victim per format). The runs go in parallel, in copies of alice's CLI config, and the
parametrised tests then judge each run on its own."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import typer
import yaml

from cove.cli.main import build
from cove.model.kinds import kind_by_name
from tests.fixtures.images import benign_layer, write_oci_layout

from .helpers import (
    PASSWORD,
    RESOURCE_KEYS,
    Api,
    Result,
    User,
    first_node,
    run_cove,
    run_many,
    uniq,
)

FORMATS = ("json", "yaml")

# ----------------------------------------------------------------------------- the walk


def _takes_output(cmd: Any) -> bool:
    return any("-o" in getattr(p, "opts", ()) for p in cmd.params)


def _walk(
    cmd: Any, path: tuple[str, ...], hidden: bool
) -> Iterator[tuple[tuple[str, ...], Any, bool]]:
    hidden = hidden or bool(getattr(cmd, "hidden", False))
    if path and _takes_output(cmd):
        yield path, cmd, hidden
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        yield from _walk(sub, (*path, name), hidden)


def output_commands() -> list[tuple[str, ...]]:
    """Every command path that takes -o, aliases (hidden copies of a group) counted once."""
    root = typer.main.get_command(build())
    found = sorted(_walk(root, (), False), key=lambda t: (t[2], t[0]))  # visible first
    seen: set[Any] = set()
    paths = []
    for path, cmd, _hidden in found:
        cb = getattr(cmd.callback, "__wrapped__", cmd.callback)
        if cb in seen:
            continue
        seen.add(cb)
        paths.append(path)
    return sorted(paths)


COMMANDS = output_commands()

# ----------------------------------------------------------------------------- the examples


@dataclass(frozen=True)
class Ex:
    args: tuple[str, ...] = ()
    code: int = 0  # 4: not found (instances: nothing is running)
    home: str = "copy"  # copy of alice's config | "empty": no config | "session": fresh login
    serial: int = 0  # >0: run after the parallel batch, in this order (node cordon/uncordon)
    toml: str = ""  # a cove.toml in the directory the command runs in


def ex(*args: str, **kw: Any) -> Ex:
    return Ex(tuple(args), **kw)


ENV = ("-a", "{app}", "-e", "prod")
NOTHING = ("nothing", *ENV)  # an instance that does not exist
REL = ("-a", "{rollback_app}", "-e", "prod")
NOTHING_RUNS = "[workloads.web]\ncount = 0\n"

EXAMPLES: dict[tuple[str, ...], Ex] = {
    ("use",): ex("{org}/{project}"),
    ("events",): ex(),
    ("events", "list"): ex(),
    ("events", "describe"): ex("{evt}"),
    ("events", "events"): ex("{evt}"),
    ("wait",): ex("{op}"),
    ("status",): ex(),
    ("scale",): ex("web=0", "-a", "{scale_app}", "-e", "{scale_env}"),
    ("deferred",): ex(),
    ("auth", "signup"): ex(
        "--email", "{signup_email}", "--password", PASSWORD, "--org", "{signup_org}", home="empty"
    ),
    ("auth", "login"): ex("--email", "{email}", "--password", PASSWORD),
    ("auth", "logout"): ex(home="session"),
    ("auth", "whoami"): ex(),
    ("cluster",): ex(),
    ("console",): ex("--no-open"),
    ("tokens", "create"): ex("{new_tok}"),
    ("tokens", "list"): ex(),
    ("tokens", "revoke"): ex("{del_tok}"),
    ("orgs", "list"): ex(),
    ("orgs", "describe"): ex("{org}"),
    ("orgs", "events"): ex("{org}"),
    ("orgs", "create"): ex("{new_org}"),
    ("orgs", "delete"): ex("{del_org}", "--yes"),
    ("orgs", "members", "list"): ex(),
    ("orgs", "members", "add"): ex("{member_email}"),
    ("projects", "list"): ex(),
    ("projects", "describe"): ex("{project}"),
    ("projects", "events"): ex("{project}"),
    ("projects", "create"): ex("{new_prj}"),
    ("projects", "delete"): ex("{del_prj}", "--yes"),
    ("apps", "list"): ex(),
    ("apps", "describe"): ex("{app}"),
    ("apps", "events"): ex("{app}"),
    ("apps", "create"): ex("{new_app}"),
    ("apps", "delete"): ex("{del_app}", "--yes"),
    ("environments", "list"): ex("-a", "{app}"),
    ("environments", "describe"): ex("prod", "-a", "{app}"),
    ("environments", "events"): ex("prod", "-a", "{app}"),
    # the rollback app has release v1 (workload web, count 0), the unset app a secret bundle
    ("releases", "list"): ex(*REL),
    ("releases", "describe"): ex("v1", *REL),
    ("releases", "events"): ex("v1", *REL),
    ("workloads", "list"): ex(*REL),
    ("workloads", "describe"): ex("web", *REL),
    ("workloads", "events"): ex("web", *REL),
    ("instances", "list"): ex(*REL),
    ("instances", "describe"): ex(*NOTHING, code=4),  # nothing runs: count 0
    ("instances", "events"): ex(*NOTHING, code=4),
    ("secrets", "list"): ex("-a", "{unset_app}", "-e", "prod"),
    ("secrets", "describe"): ex("secrets", "-a", "{unset_app}", "-e", "prod"),
    ("secrets", "events"): ex("secrets", "-a", "{unset_app}", "-e", "prod"),
    ("endpoints", "list"): ex(*ENV),
    ("endpoints", "describe"): ex("{ep}", *ENV),
    ("endpoints", "events"): ex("{ep}", *ENV),
    ("endpoints", "create"): ex("{new_ep}", "--port", "443:web:8443", *ENV),
    ("endpoints", "destroy"): ex("{del_ep}", "--yes", *ENV),
    ("endpoints", "update"): ex("{ep}", "--port", "443:web:9443", *ENV),
    ("volumes", "list"): ex(*ENV),
    ("volumes", "describe"): ex("{vol}", *ENV),
    ("volumes", "events"): ex("{vol}", *ENV),
    ("volumes", "create"): ex("{new_vol}", "--size", "1GB", *ENV),
    ("volumes", "destroy"): ex("{del_vol}", "--yes", *ENV),
    ("nodes", "list"): ex(),
    ("nodes", "describe"): ex("{node}"),
    ("nodes", "events"): ex("{node}"),
    ("nodes", "cordon"): ex("{node}", serial=1),
    ("nodes", "drain"): ex("{node}", serial=2),  # one node: nothing can move, nothing stops
    ("nodes", "uncordon"): ex("{node}", serial=3),
    ("operations", "list"): ex(),
    ("operations", "describe"): ex("{op}"),
    ("operations", "events"): ex("{op}"),
    # releases: an image in a local OCI layout, workloads at count 0 so nothing is placed
    ("deploy",): ex("--image", "{image}", "-a", "{deploy_app}", toml=NOTHING_RUNS),
    ("rollback",): ex("v1", "--detach", "-a", "{rollback_app}"),
    ("secrets", "set"): ex("TOKEN=s3cret", "--detach", "-a", "{secrets_app}"),
    ("secrets", "unset"): ex("OLD", "--detach", "-a", "{unset_app}"),
    ("logs",): ex(*ENV),
    ("registry", "login"): ex("{registry}", "-u", "ci", "--password", "pw"),
    ("registry", "list"): ex(),
    ("pricing",): ex(home="empty"),  # the price list needs no sign-in
    ("usage",): ex("--by", "resource"),
    ("billing", "invoice"): ex(),
    ("projects", "quotas"): ex("{project}"),
}

CASES = [(p, f) for p in COMMANDS if p in EXAMPLES for f in FORMATS]


def test_every_output_command_has_an_example() -> None:
    missing = [" ".join(p) for p in COMMANDS if p not in EXAMPLES]
    assert not missing, f"commands taking -o without an example in EXAMPLES (add one): {missing}"
    stale = [" ".join(p) for p in EXAMPLES if p not in COMMANDS]
    assert not stale, f"EXAMPLES for commands that no longer exist or take no -o: {stale}"


def test_the_walk_sees_the_commands() -> None:
    """Guard the walker itself: it must reach nested groups and group callbacks."""
    assert ("orgs", "members", "add") in COMMANDS
    assert ("apps", "list") in COMMANDS
    assert ("up",) not in COMMANDS  # takes no -o
    assert len(COMMANDS) >= 60


# ----------------------------------------------------------------------------- running them


def _values(alice: User, api: Api, fmt: str, image: str) -> dict[str, str]:
    """Per-format victims and fresh names: a delete needs its own target per format."""
    scope = {"org": alice.org, "project": alice.project}
    del_app = uniq("del-app")
    api.create("apps", del_app, wait=False, **scope)
    del_prj = uniq("del-prj")
    api.create("projects", del_prj, wait=False, org=alice.org)
    del_org = uniq("del-org")
    api.create("orgs", del_org, wait=False)
    del_tok = api.call("POST", "/v1/tokens", {"name": uniq("tok"), "org": alice.org})["id"]
    member = f"{uniq('member')}@example.com"
    anon = Api(alice.server.url)
    anon.call("POST", "/v1/auth/signup", {"email": member, "password": PASSWORD, "org": uniq("m")})
    anon.close()
    return {
        "new_org": uniq("org"),
        "del_org": del_org,
        "new_prj": uniq("prj"),
        "del_prj": del_prj,
        "new_app": uniq("app"),
        "del_app": del_app,
        "new_ep": uniq("ep"),
        "new_vol": uniq("vol"),
        "new_tok": uniq("tok"),
        "del_tok": del_tok,
        "member_email": member,
        "scale_env": {"json": "staging", "yaml": "dev"}[fmt],
        "signup_email": f"{uniq('signup')}@example.com",
        "signup_org": uniq("signup"),
        "registry": f"{uniq('reg')}.example.com:5000",
        **_release_values(alice, api, image),
    }


def _release_values(alice: User, api: Api, image: str) -> dict[str, str]:
    """Apps for the commands that make releases: one each, so none waits on another."""
    scope = {"org": alice.org, "project": alice.project}
    out = {}
    for what in ("deploy", "rollback", "secrets", "unset", "scale"):
        out[f"{what}_app"] = name = uniq(what)
        api.create("apps", name, **scope)
    one = {"web": {"count": 0}}
    # scale needs a deployed workload: one environment per output format, so the two
    # cases never race on the same environment
    for app, env in (("rollback", "prod"), ("scale", "staging"), ("scale", "dev")):
        rec = api.call(
            "POST",
            "/v1/deploys",
            dict(scope, app=out[f"{app}_app"], env=env, image=image, workloads=one),
        )
        api.wait_op(rec)
    rec = api.call(
        "POST", "/v1/environments/prod/secrets", dict(scope, app=out["unset_app"], set={"OLD": "x"})
    )
    api.wait_op(rec)
    return out


@pytest.fixture(scope="module")
def walk(
    alice: User, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[tuple[str, ...], str], Result]:
    api = alice.api()
    scope = {"org": alice.org, "project": alice.project}
    # a one-layer image in a local OCI layout: deploys need no registry
    image = write_oci_layout(tmp_path_factory.mktemp("image") / "layout", [benign_layer()]).ref
    app = uniq("walk")
    rec = api.create("apps", app, **scope)
    ep, vol = uniq("ep"), uniq("vol")
    api.create(
        "endpoints",
        ep,
        spec={"ports": [{"port": 443, "workload": "web", "target_port": 8443}]},
        app=app,
        env="prod",
        **scope,
    )
    api.create("volumes", vol, spec={"size_gb": 1}, app=app, env="prod", **scope)
    common = {
        "org": alice.org,
        "project": str(alice.project),
        "app": app,
        "op": rec["operation"],
        "ep": ep,
        "vol": vol,
        "email": alice.email,
        "node": first_node(api)["name"],
        "image": image,
        "evt": api.call("GET", "/v1/events", org=alice.org, limit=1)["items"][0]["id"],
    }
    values = {f: dict(common, **_values(alice, api, f, image)) for f in FORMATS}
    # the per-format delete victims and endpoints need their environments
    for f in FORMATS:
        api.create(
            "endpoints",
            values[f].setdefault("del_ep", uniq("del-ep")),
            wait=False,
            spec={"ports": [{"port": 443, "workload": "web", "target_port": 8443}]},
            app=app,
            env="prod",
            **scope,
        )
        api.create(
            "volumes",
            values[f].setdefault("del_vol", uniq("del-vol")),
            wait=False,
            spec={"size_gb": 1},
            app=app,
            env="prod",
            **scope,
        )
    session = api.call("POST", "/v1/auth/login", {"email": alice.email, "password": PASSWORD})
    api.close()

    base = tmp_path_factory.mktemp("walk")
    url_env: dict[str, str | None] = {"COVE_API_URL": alice.server.url}

    def run(path: tuple[str, ...], fmt: str) -> Result:
        e = EXAMPLES[path]
        home = base / f"{'-'.join(path)}-{fmt}"
        if e.home == "empty":
            home.mkdir()
        elif e.home == "session":
            alice.clone_home(home, token=session["token"])
        else:
            alice.clone_home(home)
        if e.toml:
            (home / "cove.toml").write_text(e.toml)
        args = [*path, *(a.format(**values[fmt]) for a in e.args), "-o", fmt]
        return run_cove(args, home=home, env=url_env, timeout=90)

    parallel = [(p, f) for p, f in CASES if EXAMPLES[p].serial == 0]
    serial = sorted(
        ((p, f) for p, f in CASES if EXAMPLES[p].serial), key=lambda c: EXAMPLES[c[0]].serial
    )
    results = run_many({c: (lambda c=c: run(*c)) for c in parallel})
    for p, f in serial:
        results[(p, f)] = run(p, f)
    return results


def _load(out: str, fmt: str) -> Any:
    if fmt == "json":
        return json.loads(out)
    docs = list(yaml.safe_load_all(out))
    assert len(docs) == 1, f"{len(docs)} YAML documents on stdout"
    return docs[0]


def _shape(doc: Any) -> Any:
    if isinstance(doc, dict):
        return ("dict", tuple(sorted(doc)))
    if isinstance(doc, list):
        return ("list", _shape(doc[0]) if doc else None)
    return type(doc).__name__


def _one_list_empty(a: Any, b: Any) -> bool:
    return isinstance(a, list) and isinstance(b, list) and (not a) != (not b)


def _resource_docs(path: tuple[str, ...], doc: Any) -> list[Any]:
    """The resources a generic verb printed: lists and event lists, or one describe."""
    k = kind_by_name(path[0])
    if k is None or len(path) > 2 or path[-1] not in ("list", "describe", "events"):
        return []
    if path == ("events",) or isinstance(doc, list):
        return list(doc)
    return [doc]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path, fmt", CASES, ids=[f"{'-'.join(p)}-{f}" for p, f in CASES])
def test_stdout_is_one_document(
    walk: dict[tuple[tuple[str, ...], str], Result], path: tuple[str, ...], fmt: str
) -> None:
    r = walk[(path, fmt)]
    expected = EXAMPLES[path].code
    assert "Traceback" not in r.err, str(r)
    assert r.code == expected, str(r)
    if expected != 0:
        # a failure prints no partial document: stdout stays empty, the error is on stderr
        assert r.out == "", str(r)
        assert "error" in r.err, str(r)
        return
    doc = _load(r.out, fmt)
    assert isinstance(doc, dict | list), f"not a document: {doc!r}\n{r}"
    if fmt == "json":
        assert r.out.lstrip()[0] in "[{", str(r)
    else:
        # the same command under -o json printed a document of the same shape (a list the
        # parallel walk filled in between - `registry login` beside `registry list` - may be
        # empty in one of them: an empty list has every item shape)
        twin = walk[(path, "json")]
        if twin.code == 0 and not _one_list_empty(doc, json.loads(twin.out)):
            assert _shape(doc) == _shape(json.loads(twin.out)), str(r)
    for res in _resource_docs(path, doc):
        assert set(res) == RESOURCE_KEYS, f"not the one resource shape: {sorted(res)}\n{r}"


# ----------------------------------------------------------------------------- notices


@pytest.mark.timeout(60)
def test_progress_and_notices_go_to_stderr(make_user: Callable[..., User]) -> None:
    """Commands that talk while they work (a new current project, --wait) keep stdout clean."""
    u = make_user("notice", project=False)
    prj = uniq("prj")
    r = u.cove("projects", "create", prj, "-o", "yaml")
    assert r.code == 0, str(r)
    assert "current project is now" in r.err
    assert _load(r.out, "yaml")["resource"]["name"] == prj

    r = u.cove("apps", "create", uniq("app"), "--wait", "-o", "json")
    assert r.code == 0, str(r)
    assert _load(r.out, "json")["state"] == "succeeded", str(r)

    # the same --wait for people: the receipt on stdout, the progress on stderr
    r = u.cove("apps", "create", uniq("app"), "--wait")
    assert r.code == 0, str(r)
    assert "accepted" in r.out and "waiting for op_" in r.err and "done" in r.err, str(r)
