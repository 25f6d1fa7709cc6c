"""``cove deploy``, ``rollback``, ``logs``, ``secrets set|unset|list``, ``registry login``."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cove import errors
from cove.cli import config, output
from cove.cli.common import (
    ApiUrlOpt,
    AppOpt,
    EnvOpt,
    OrgOpt,
    ProjectOpt,
    TimeoutOpt,
    parse_duration,
    parse_port,
    session,
)
from cove.cli.output import Format, OutputOpt
from cove.client import Client

DetachOpt = Annotated[
    bool, typer.Option("--detach", "-d", help="return the receipt at once instead of waiting")
]


def _scope(
    ctx: config.Context, org: str | None, project: str | None, app: str | None, env: str | None
) -> dict[str, str | None]:
    return {
        "org": org or ctx.org,
        "project": project or ctx.project,
        "app": app or ctx.app,
        "env": env or ctx.env or "prod",
    }


def load_workloads(image: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(image, workloads, variables) from flags and ``cove.toml``."""
    image, workloads, variables, _ = load_app(image)
    return image, workloads, variables


def load_app(
    image: str | None,
) -> tuple[str, dict[str, Any], dict[str, str], dict[str, Any]]:
    """(image, workloads, variables, endpoints) from flags and ``cove.toml``."""
    doc = config.app_toml()
    _deferred_keys("cove.toml", doc)
    for wname, w in (doc.get("workloads") or {}).items():
        if isinstance(w, dict):
            _deferred_keys(f"cove.toml [workloads.{wname}]", w)
    known = {
        "app",
        "org",
        "project",
        "env",
        "image",
        "workloads",
        "variables",
        "endpoints",
        "region",
    }
    unknown = sorted(set(doc) - known)
    if unknown:
        raise errors.UserError(
            f"cove.toml: unknown key(s) {', '.join(unknown)}",
            hint=f"top-level keys are {', '.join(sorted(known))}",
        )
    image = image or doc.get("image")
    if not image:
        raise errors.UserError(
            "which image?", hint='pass --image REF or set image = "..." in cove.toml', code="usage"
        )
    workloads = doc.get("workloads") or {"web": {}}
    if not isinstance(workloads, dict):
        raise errors.UserError("cove.toml: [workloads.NAME] tables expected")
    variables = doc.get("variables") or {}
    if not isinstance(variables, dict):
        raise errors.UserError("cove.toml: [variables] is a table of strings")
    endpoints = _endpoints(doc.get("endpoints") or {})
    return str(image), workloads, {str(k): str(v) for k, v in variables.items()}, endpoints


def _endpoints(table: Any) -> dict[str, Any]:
    """``[endpoints.NAME]`` tables: ports as "PUBLIC:WORKLOAD:TARGET" strings (or tables with
    port, workload, target_port), protocol, ipv4, proxy_protocol. The server checks the rest."""
    from cove import deferred

    if not isinstance(table, dict):
        raise errors.UserError("cove.toml: [endpoints.NAME] tables expected")
    out: dict[str, Any] = {}
    for name, ep in table.items():
        where = f"cove.toml [endpoints.{name}]"
        if not isinstance(ep, dict):
            raise errors.UserError(f"{where}: a table expected", hint='ports = ["443:web:8080"]')
        for key in ep:
            d = deferred.for_field("endpoint", f"spec.{key}")
            if d is not None:
                raise d.error(f"{where}: {key}")
        ports = ep.get("ports")
        if not isinstance(ports, list) or not ports:
            raise errors.UserError(
                f"{where}: ports is a non-empty list", hint='ports = ["443:web:8080"]'
            )
        spec = dict(ep)
        spec["ports"] = [parse_port(p, f"{where} port") if isinstance(p, str) else p for p in ports]
        out[str(name)] = spec
    return out


def _deferred_keys(where: str, table: dict[str, Any]) -> None:
    """A cove.toml key that reaches for something v1 does not do gets the explanation."""
    from cove import deferred

    for key in table:
        d = deferred.for_field("environment", f"spec.{key}")
        if d is not None:
            raise d.error(f"{where}: {key}")


def follow_operation(
    client: Client,
    rec: dict[str, Any],
    scope: dict[str, str | None],
    timeout: float,
    fmt: Format,
) -> dict[str, Any]:
    """Stream the environment's events until the operation settles; raise on failure."""
    cursor = int(rec.get("_since") or max(0, int(rec["revision"]) - 5))
    deadline = time.monotonic() + timeout
    params = {k: v for k, v in scope.items() if v}
    seen: set[tuple[str, int]] = set()

    def show_new_events() -> None:
        nonlocal cursor
        for ev in client.stream_lines(
            "/v1/events/stream", params=dict(params, since=cursor, follow=False)
        ):
            cursor = max(cursor, int(ev["metadata"]["revision"]))
            key = (ev["id"], int(ev["status"]["count"]))
            if key in seen:
                continue
            seen.add(key)
            if fmt is Format.table:
                output.event_line(ev, stream=output.err)

    while True:
        show_new_events()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.WaitTimeout(
                f"{rec['operation']} did not finish within {timeout:g}s",
                hint=f"it goes on: `cove wait {rec['operation']}`, `cove status`",
            )
        try:
            op: dict[str, Any] = client.request(
                "GET",
                f"/v1/operations/{rec['operation']}/wait",
                params={"for": "done", "timeout": f"{min(1.0, remaining):.2f}s"},
                timeout=40,
            )
        except errors.WaitTimeout:
            continue
        except errors.WaitFailed:
            show_new_events()  # what went wrong, before the error itself
            raise
        show_new_events()  # the last events (Healthy, RolledOut) come with the outcome
        return op


def register(app: typer.Typer, secrets_group: typer.Typer) -> None:
    @app.command("deploy", help="Deploy an image (pinned to its digest) as a new release.")
    def deploy(
        image: Annotated[
            str | None,
            typer.Option("--image", "-i", help="host/repo:tag, …@sha256:…, oci:DIR[:tag], …"),
        ] = None,
        description: Annotated[str, typer.Option("--description", help="why")] = "",
        region: Annotated[
            str | None,
            typer.Option(
                "--region",
                help="pin the environment to this region (or region = ... in cove.toml; "
                "'' unpins); one region, chosen explicitly",
            ),
        ] = None,
        detach: DetachOpt = False,
        timeout: TimeoutOpt = "10m",
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        ref, workloads, variables, endpoints = load_app(image)
        client, ctx = session(api_url=api_url)
        sc = _scope(ctx, org, project, app_, env)
        if fmt is Format.table:
            output.notice(f"resolving {ref} ...")
        since = _head(client)
        body = dict(sc, image=ref, workloads=workloads, variables=variables)
        body.update(description=description, endpoints=endpoints)
        pin = region if region is not None else config.app_toml().get("region")
        if pin is not None:
            if not isinstance(pin, str):
                raise errors.UserError('cove.toml: region is a string, e.g. region = "eu"')
            body["region"] = pin
        rec = client.post("/v1/deploys", body)
        rec["_since"] = since
        _after(client, rec, sc, detach, timeout, fmt)

    @app.command("rollback", help="Roll back to a prior release (default: the one before).")
    def rollback(
        to: Annotated[str | None, typer.Argument(help="v3 or rel_…")] = None,
        detach: DetachOpt = False,
        timeout: TimeoutOpt = "10m",
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        sc = _scope(ctx, org, project, app_, env)
        since = _head(client)
        rec = client.post("/v1/rollbacks", dict(sc, to=to))
        rec["_since"] = since
        _after(client, rec, sc, detach, timeout, fmt)

    @app.command("logs", help="Logs of an environment's instances, merged (-f to follow).")
    def logs(
        follow: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming")] = False,
        since: Annotated[str | None, typer.Option("--since", help="e.g. 10m, 1h")] = None,
        workload: Annotated[str | None, typer.Option("--workload", help="one workload")] = None,
        instance: Annotated[str | None, typer.Option("--instance", help="one instance")] = None,
        tail: Annotated[int, typer.Option("--tail", help="lines of history")] = 200,
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        if fmt is Format.yaml and follow:
            raise errors.UserError("-f streams JSON lines; use -o json or -o table", code="usage")
        if since:
            parse_duration(since)
        client, ctx = session(api_url=api_url)
        params: dict[str, Any] = dict(
            _scope(ctx, org, project, app_, env),
            since=since,
            workload=workload,
            instance=instance,
            follow=follow,
            tail=tail,
        )
        lines = client.stream_lines("/v1/logs", params=params)
        if fmt is not Format.table and not follow:
            output.document(list(lines), fmt)
            return
        colors = ["cyan", "magenta", "green", "yellow", "blue", "red"]
        names: dict[str, str] = {}
        for ln in lines:
            if fmt is Format.json:
                sys.stdout.write(json.dumps(ln) + "\n")
                sys.stdout.flush()
                continue
            color = names.setdefault(ln["instance"], colors[len(names) % len(colors)])
            label = f"{ln['workload']}/{ln['instance'][-6:]}"
            style = "red" if ln["stream"] == "stderr" else ""
            output.out.print(
                Text.assemble(
                    (ln["ts"][11:23] + " ", "dim"), (f"{label} ", color), (ln["line"], style)
                )
            )

    @secrets_group.command("set", help="Set secrets: KEY=VALUE ... (makes a new release).")
    def secrets_set(
        pairs: Annotated[list[str], typer.Argument(help="KEY=VALUE (or KEY=- to read stdin)")],
        detach: DetachOpt = False,
        timeout: TimeoutOpt = "10m",
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        values: dict[str, str] = {}
        for p in pairs:
            k, sep, v = p.partition("=")
            if not sep or not k:
                raise errors.UserError(f"invalid {p!r}", hint="use KEY=VALUE", code="usage")
            values[k] = sys.stdin.read().rstrip("\n") if v == "-" else v
        client, ctx = session(api_url=api_url)
        sc = _scope(ctx, org, project, app_, env)
        since = _head(client)
        rec = client.post(f"/v1/environments/{sc.pop('env')}/secrets", dict(sc, set=values))
        rec["_since"] = since
        _after(client, rec, dict(sc, env=env or ctx.env or "prod"), detach, timeout, fmt)

    @secrets_group.command("unset", help="Remove secrets by name (makes a new release).")
    def secrets_unset(
        keys: Annotated[list[str], typer.Argument(help="KEY ...")],
        detach: DetachOpt = False,
        timeout: TimeoutOpt = "10m",
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        sc = _scope(ctx, org, project, app_, env)
        since = _head(client)
        rec = client.post(f"/v1/environments/{sc.pop('env')}/secrets", dict(sc, unset=keys))
        rec["_since"] = since
        _after(client, rec, dict(sc, env=env or ctx.env or "prod"), detach, timeout, fmt)

    @secrets_group.command("list", help="Secret names, versions and digests (never values).")
    def secrets_list(
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        sc = _scope(ctx, org, project, app_, env)
        items = client.list_all("/v1/secrets", **sc)
        if fmt is not Format.table:
            output.document(items, fmt)
            return
        keys = items[0]["spec"].get("keys", []) if items else []
        if not keys:
            output.notice("no secrets: cove secrets set KEY=VALUE")
            return
        t = Table(box=None, pad_edge=False, header_style="bold")
        for c in ("NAME", "VERSION", "DIGEST"):
            t.add_column(c)
        for k in keys:
            t.add_row(k["name"], str(k["version"]), k["digest"])
        output.out.print(t)
        output.notice(f"bundle version {items[0]['spec'].get('version')}")

    registry = typer.Typer(
        help="Private registry logins (encrypted at rest).", no_args_is_help=True
    )
    app.add_typer(registry, name="registry")

    @registry.command("login", help="Store credentials for a private registry HOST.")
    def registry_login(
        host: Annotated[str, typer.Argument(help="registry host[:port]")],
        username: Annotated[str, typer.Option("--username", "-u")],
        password: Annotated[
            str | None, typer.Option("--password", help="or --password-stdin")
        ] = None,
        password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
        org: OrgOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        if password_stdin:
            password = sys.stdin.read().rstrip("\n")
        if not password:
            raise errors.UserError(
                "no password", hint="--password or --password-stdin", code="usage"
            )
        client, ctx = session(api_url=api_url)
        res = client.post(
            "/v1/registries",
            {"org": org or ctx.org, "host": host, "username": username, "password": password},
        )
        if fmt is Format.table:
            output.out.print(f"stored credentials for {res['host']} (org {res['org']})")
        else:
            output.document(res, fmt)

    @registry.command("list", help="Registries with stored logins.")
    def registry_list(
        org: OrgOpt = None, fmt: OutputOpt = Format.table, api_url: ApiUrlOpt = None
    ) -> None:
        client, ctx = session(api_url=api_url)
        items = client.get("/v1/registries", org=org or ctx.org)
        if fmt is not Format.table:
            output.document(items, fmt)
            return
        for r in items:
            output.out.print(f"{r['host']}  {r['username']}  {r['created_at']}")


def _head(client: Client) -> int:
    """The store's revision now: progress shows only what happens after it."""
    return int(client.get("/healthz").get("revision", 0))


def _after(
    client: Client,
    rec: dict[str, Any],
    scope: dict[str, str | None],
    detach: bool,
    timeout: str,
    fmt: Format,
) -> None:
    since = rec.pop("_since", None)
    if detach:
        output.receipt(rec, fmt)
        return
    rec_follow = dict(rec, _since=since)
    if fmt is Format.table:
        rel = rec.get("release")
        what = f"release {rel['name']}" if rel else rec["resource"]["name"]
        output.notice(
            f"{what}: operation {rec['operation']} (Ctrl-C stops watching, not the deploy)"
        )
    op = follow_operation(client, rec_follow, scope, parse_duration(timeout), fmt)
    if fmt is Format.table:
        output.out.print(f"[green]done[/green]: {escape(op['status'].get('message', ''))}")
    else:
        output.document(dict(rec, state=op["status"]["state"], operation_status=op["status"]), fmt)
