"""Every command but ``up``/``down``/``server``/``agent``: one Typer group per noun,
one function per verb. Each kind in the registry gets list, describe and events."""

from __future__ import annotations

import getpass
import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cove import deferred, errors
from cove.cli import config, output
from cove.cli.common import (
    ApiUrlOpt,
    AppOpt,
    EnvOpt,
    OrgOpt,
    ProjectOpt,
    TimeoutOpt,
    WaitOpt,
    YesOpt,
    parse_duration,
    parse_port,
    session,
    wait_for,
    wait_receipt,
)
from cove.cli.output import Format, OutputOpt
from cove.ids import looks_like_id
from cove.model.kinds import KINDS, Kind, kind_by_name, kind_by_prefix
from cove.model.resource import get_condition

# how deep the saved context goes for each kind's lookups (flags always pass through)
_DEPTH = {
    "org": 0,
    "project": 1,
    "app": 2,
    "environment": 3,
    "node": 0,
    "operation": 1,
    "event": 1,
}
_LEVELS = ("org", "project", "app", "env")


def scope_for(
    kind: str, ctx: config.Context, flags: dict[str, str | None]
) -> dict[str, str | None]:
    depth = _DEPTH.get(kind, 4)
    out: dict[str, str | None] = {}
    for i, level in enumerate(_LEVELS):
        if flags.get(level):
            out[level] = flags[level]
        elif i < depth:
            out[level] = getattr(ctx, level)
    return out


def _interactive(fmt: Format, yes: bool = False) -> bool:
    return sys.stdin.isatty() and fmt is Format.table and not yes


def _confirm(what: str, fmt: Format, yes: bool) -> None:
    if yes:
        return
    if not _interactive(fmt):
        raise errors.UserError(
            f"refusing to {what} without confirmation",
            hint="pass --yes to confirm from a script",
            code="usage",
        )
    if not typer.confirm(f"{what}?", default=False):
        raise typer.Abort()


def _finish(client: Any, rec: dict[str, Any], fmt: Format, wait: bool, timeout: str) -> None:
    if not wait:
        output.receipt(rec, fmt)
        return
    if fmt is Format.table:
        output.receipt(rec, fmt)
    op = wait_receipt(client, rec, parse_duration(timeout), fmt)
    if fmt is not Format.table:
        output.document(dict(rec, state=op["status"]["state"], operation_status=op["status"]), fmt)


# --------------------------------------------------------------------------- generic verbs


def _add_generic(group: typer.Typer, kind: Kind) -> None:
    plural = kind.plural

    @group.command("list", help=f"List {plural}.")
    def list_cmd(
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app: AppOpt = None,
        env: EnvOpt = None,
        label: Annotated[list[str] | None, typer.Option("--label", "-l", help="key=value")] = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        scope = scope_for(kind.name, ctx, {"org": org, "project": project, "app": app, "env": env})
        items = client.list_all(f"/v1/{plural}", **scope, label=label or None)
        output.resources(kind.name, items, fmt)

    @group.command(
        "describe",
        help=f"Describe one {kind.title}: desired vs current, conditions, recent events.",
    )
    def describe_cmd(
        ref: Annotated[str, typer.Argument(help="name or ID")],
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        scope = scope_for(kind.name, ctx, {"org": org, "project": project, "app": app, "env": env})
        res = client.get(f"/v1/{plural}/{ref}", **scope)
        recent = None
        if fmt is Format.table and kind.name != "event":
            recent = client.get(f"/v1/{plural}/{res['id']}/events")["items"]
        output.describe(res, fmt, recent)

    @group.command("events", help=f"Events about one {kind.title} (-f to follow).")
    def events_cmd(
        ref: Annotated[str, typer.Argument(help="name or ID")],
        follow: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming")] = False,
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        scope = scope_for(kind.name, ctx, {"org": org, "project": project, "app": app, "env": env})
        if kind.name == "event":
            client.get(f"/v1/events/{ref}")
            output.events([], fmt)
            return
        res = client.get(f"/v1/{plural}/{ref}", **scope)
        _show_events(client, fmt, follow, {"for": res["id"]})


def _show_events(
    client: Any, fmt: Format, follow: bool, params: dict[str, Any], since: int = 0
) -> None:
    if not follow:
        items = list(
            client.stream_lines("/v1/events/stream", params=dict(params, since=since, follow=False))
        )
        if fmt is Format.table:
            if not items:
                output.notice("no events")
            for ev in items:
                output.event_line(ev)
        else:
            output.document(items, fmt)
        return
    if fmt is Format.yaml:
        raise errors.UserError("-f streams JSON lines; use -o json or -o table", code="usage")
    for ev in client.stream_lines(
        "/v1/events/stream", params=dict(params, since=since, follow=True)
    ):
        if fmt is Format.table:
            output.event_line(ev)
        else:
            import json

            sys.stdout.write(json.dumps(ev) + "\n")
            sys.stdout.flush()


# --------------------------------------------------------------------------- auth


def _auth_group() -> typer.Typer:
    g = typer.Typer(help="Sign up, sign in, sign out, who am I.", no_args_is_help=True)

    @g.command("signup", help="Create an account and its first org, and sign in.")
    def signup(
        email: Annotated[
            str | None, typer.Option("--email", help="email address of the new account")
        ] = None,
        password: Annotated[
            str | None,
            typer.Option("--password", help="prompted when omitted on a TTY; or COVE_PASSWORD"),
        ] = None,
        org: Annotated[str | None, typer.Option("--org", help="name of your first org")] = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        email, password = _credentials(email, password, fmt, confirm=True)
        if not org:
            if not _interactive(fmt):
                raise errors.UserError("--org is required", hint="e.g. --org acme", code="usage")
            org = typer.prompt("Org name")
        client, ctx = session(api_url=api_url, auth=False)
        rec = client.post("/v1/auth/signup", {"email": email, "password": password, "org": org})
        config.update(
            api_url=ctx.api_url,
            token=rec["token"],
            email=rec["user"]["email"],
            org=rec["org"]["name"],
            project=None,
            app=None,
            env=None,
        )
        if fmt is Format.table:
            output.out.print(
                f"signed up as [bold]{rec['user']['email']}[/bold]; org [bold]{org}[/bold] is yours"
            )
            output.out.print("next: cove projects create NAME   (then `cove use ORG/NAME`)")
        else:
            output.document({k: v for k, v in rec.items() if k != "token"}, fmt)

    @g.command("login", help="Sign in with email and password (SSO is not in v1).")
    def login(
        email: Annotated[str | None, typer.Option("--email", help="your account's email")] = None,
        password: Annotated[
            str | None,
            typer.Option("--password", help="prompted when omitted on a TTY; or COVE_PASSWORD"),
        ] = None,
        sso: Annotated[bool, typer.Option("--sso", help="not in v1", hidden=True)] = False,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        if sso:
            raise deferred.for_cli("auth login --sso").error("--sso")
        email, password = _credentials(email, password, fmt, confirm=False)
        client, ctx = session(api_url=api_url, auth=False)
        res = client.post("/v1/auth/login", {"email": email, "password": password})
        orgs = res["orgs"]
        saved = config.load()
        keep = saved.get("org") if any(o["name"] == saved.get("org") for o in orgs) else None
        config.update(
            api_url=ctx.api_url,
            token=res["token"],
            email=res["user"]["email"],
            org=keep or (orgs[0]["name"] if orgs else None),
        )
        if fmt is Format.table:
            output.out.print(f"signed in as [bold]{res['user']['email']}[/bold]")
        else:
            output.document({k: v for k, v in res.items() if k != "token"}, fmt)

    @g.command("logout", help="Sign out: revoke this session's token.")
    def logout(fmt: OutputOpt = Format.table, api_url: ApiUrlOpt = None) -> None:
        saved = config.load()
        if not saved.get("token"):
            output.notice("not signed in")
            if fmt is not Format.table:
                output.document({"signed_out": False}, fmt)
            return
        client, _ = session(api_url=api_url)
        try:
            client.post("/v1/auth/logout")
        except errors.Unauthenticated:
            pass
        config.update(token=None)
        if fmt is Format.table:
            output.out.print("signed out")
        else:
            output.document({"signed_out": True}, fmt)

    @g.command("whoami", help="Who the saved token belongs to, and its orgs.")
    def whoami(fmt: OutputOpt = Format.table, api_url: ApiUrlOpt = None) -> None:
        client, ctx = session(api_url=api_url)
        me = client.get("/v1/auth/whoami")
        if fmt is not Format.table:
            output.document(me, fmt)
            return
        if me["kind"] == "node":
            output.out.print(f"node {me['node']}")
            return
        output.out.print(
            f"[bold]{me['user']['email']}[/bold] ({me['user']['id']}), {me['token']['kind']} token"
        )
        for o in me["orgs"]:
            mark = "*" if o["name"] == ctx.org else " "
            output.out.print(f" {mark} {o['name']}  ({o['role']})")
        where = "/".join(x for x in (ctx.org, ctx.project) if x) or "-"
        output.out.print(
            f"context: {where}  app={ctx.app or '-'}  env={ctx.env or '-'}  api={ctx.api_url}"
        )

    return g


def _credentials(
    email: str | None, password: str | None, fmt: Format, *, confirm: bool
) -> tuple[str, str]:
    import os

    password = password or os.environ.get("COVE_PASSWORD")
    if not email:
        if not _interactive(fmt):
            raise errors.UserError(
                "--email is required", code="usage", hint="pass --email and --password"
            )
        email = typer.prompt("Email")
    if not password:
        if not _interactive(fmt):
            raise errors.UserError(
                "--password is required when not on a terminal",
                code="usage",
                hint="pass --password or set COVE_PASSWORD",
            )
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Again: ") != password:
            raise errors.UserError("the passwords differ", code="usage")
    return email, password


# --------------------------------------------------------------------------- tokens


def _tokens_group() -> typer.Typer:
    g = typer.Typer(help="API tokens, each scoped to one org.", no_args_is_help=True)

    @g.command("create", help="Create an API token for the current org (shown once).")
    def create(
        name: Annotated[str, typer.Argument(help="a name to recognise it by")],
        org: OrgOpt = None,
        expires_in_days: Annotated[
            int | None,
            typer.Option("--expires-in-days", help="days until it expires (default: never)"),
        ] = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        tok = client.post(
            "/v1/tokens", {"name": name, "org": org or ctx.org, "expires_in_days": expires_in_days}
        )
        if fmt is Format.table:
            output.out.print(
                f"token [bold]{tok['name']}[/bold] ({tok['id']}) for org {tok['org_name']}:"
            )
            output.out.print(tok["token"])
            output.notice("store it now: it is not shown again. Use it as COVE_TOKEN=...")
        else:
            output.document(tok, fmt)

    @g.command("list", help="Your tokens (never their secrets).")
    def list_(fmt: OutputOpt = Format.table, api_url: ApiUrlOpt = None) -> None:
        client, _ = session(api_url=api_url)
        toks = client.get("/v1/tokens")
        if fmt is not Format.table:
            output.document(toks, fmt)
            return
        t = Table(box=None, pad_edge=False, header_style="bold")
        for c in ("ID", "NAME", "KIND", "ORG", "CREATED", "LAST USED", "EXPIRES"):
            t.add_column(c)
        for x in toks:
            t.add_row(
                x["id"],
                x["name"],
                x["kind"],
                x["org"] or "(all yours)",
                output.age(x["created_at"]),
                output.age(x["last_used_at"]),
                x["expires_at"] or "-",
            )
        output.out.print(t)

    @g.command("revoke", help="Revoke a token by ID.")
    def revoke(
        token_id: Annotated[str, typer.Argument(help="token ID (tok_...): see `cove tokens list`")],
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, _ = session(api_url=api_url)
        res = client.delete(f"/v1/tokens/{token_id}")
        if fmt is Format.table:
            output.out.print(f"revoked {res['revoked']}")
        else:
            output.document(res, fmt)

    return g


# --------------------------------------------------------------------------- kind-specific verbs


def _org_verbs(g: typer.Typer) -> None:
    @g.command("create", help="Create an org (you become its owner).")
    def create(
        name: Annotated[str, typer.Argument(help="name of the new org")],
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "60s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, _ = session(api_url=api_url)
        _finish(client, client.post("/v1/orgs", {"name": name}), fmt, wait, timeout)

    @g.command("delete", help="Delete an org and everything in it.")
    def delete(
        ref: Annotated[str, typer.Argument(help="org name or ID")],
        yes: YesOpt = False,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "120s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, _ = session(api_url=api_url)
        res = client.get(f"/v1/orgs/{ref}")
        _confirm(f"delete org {res['name']} and all its projects", fmt, yes)
        _finish(client, client.delete(f"/v1/orgs/{res['id']}"), fmt, wait, timeout)

    members = typer.Typer(help="Org members (owner or member).", no_args_is_help=True)
    g.add_typer(members, name="members")

    @members.command("list", help="Members of an org.")
    def mlist(org: OrgOpt = None, fmt: OutputOpt = Format.table, api_url: ApiUrlOpt = None) -> None:
        client, ctx = session(api_url=api_url)
        ms = client.get(f"/v1/orgs/{org or ctx.org}/members")
        if fmt is not Format.table:
            output.document(ms, fmt)
            return
        t = Table(box=None, pad_edge=False, header_style="bold")
        for c in ("EMAIL", "ROLE", "SINCE"):
            t.add_column(c)
        for m in ms:
            t.add_row(m["email"], m["role"], output.age(m["since"]))
        output.out.print(t)

    @members.command("add", help="Add an account to the org.")
    def madd(
        email: Annotated[str, typer.Argument(help="email of an existing account")],
        role: Annotated[
            str, typer.Option("--role", help="owner or member (other roles: not in v1)")
        ] = "member",
        org: OrgOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        if role not in ("owner", "member"):
            raise deferred.for_cli("orgs members add --role").error(f"--role {role}")
        client, ctx = session(api_url=api_url)
        res = client.post(f"/v1/orgs/{org or ctx.org}/members", {"email": email, "role": role})
        if fmt is Format.table:
            output.out.print(f"{res['email']} is now {res['role']} of {res['org']}")
        else:
            output.document(res, fmt)


def _project_verbs(g: typer.Typer) -> None:
    from cove.cli import billing as billing_cmds

    billing_cmds.project_verbs(g)

    @g.command("create", help="Create a project in the current org.")
    def create(
        name: Annotated[str, typer.Argument(help="name of the new project")],
        description: Annotated[str, typer.Option("--description", help="what it is for")] = "",
        org: OrgOpt = None,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "60s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        rec = client.post(
            "/v1/projects",
            {"name": name, "org": org or ctx.org, "spec": {"description": description}},
        )
        if not config.load().get("project"):
            config.update(project=name)
            output.notice(f"current project is now {name} (change it with `cove use ORG/PROJECT`)")
        _finish(client, rec, fmt, wait, timeout)

    @g.command("delete", help="Delete a project and everything in it.")
    def delete(
        ref: Annotated[str, typer.Argument(help="project name or ID")],
        org: OrgOpt = None,
        yes: YesOpt = False,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "120s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        res = client.get(f"/v1/projects/{ref}", org=org or ctx.org)
        _confirm(f"delete project {res['name']} and all its apps", fmt, yes)
        _finish(client, client.delete(f"/v1/projects/{res['id']}"), fmt, wait, timeout)


def _app_verbs(g: typer.Typer) -> None:
    @g.command("create", help="Create an app (with environments prod, staging and dev).")
    def create(
        name: Annotated[str, typer.Argument(help="name of the new app")],
        description: Annotated[str, typer.Option("--description", help="what it is for")] = "",
        org: OrgOpt = None,
        project: ProjectOpt = None,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "60s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        rec = client.post(
            "/v1/apps",
            {
                "name": name,
                "org": org or ctx.org,
                "project": project or ctx.project,
                "spec": {"description": description},
            },
        )
        _finish(client, rec, fmt, wait, timeout)

    @g.command("delete", help="Delete an app, its environments and everything in them.")
    def delete(
        ref: Annotated[str, typer.Argument(help="app name or ID")],
        org: OrgOpt = None,
        project: ProjectOpt = None,
        yes: YesOpt = False,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "120s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        res = client.get(f"/v1/apps/{ref}", org=org or ctx.org, project=project or ctx.project)
        _confirm(f"delete app {res['name']} and all its environments", fmt, yes)
        _finish(client, client.delete(f"/v1/apps/{res['id']}"), fmt, wait, timeout)


def _endpoint_verbs(g: typer.Typer) -> None:
    @g.command("create", help="Create an L4 endpoint: --port PUBLIC:WORKLOAD:TARGET (repeatable).")
    def create(
        name: Annotated[str, typer.Argument(help="name of the new endpoint")],
        port: Annotated[list[str], typer.Option("--port", help="PUBLIC:WORKLOAD:TARGET")],
        udp: Annotated[bool, typer.Option("--udp", help="UDP instead of TCP")] = False,
        ipv4: Annotated[
            bool, typer.Option("--ipv4", help="dedicated IPv4 address (paid add-on)")
        ] = False,
        proxy_protocol: Annotated[
            str, typer.Option("--proxy-protocol", help="none or v2")
        ] = "none",
        hostname: Annotated[str | None, typer.Option("--hostname", help="not in v1")] = None,
        shared: Annotated[bool, typer.Option("--shared", help="not in v1")] = False,
        tls: Annotated[bool, typer.Option("--tls", help="not in v1")] = False,
        http: Annotated[bool, typer.Option("--http", help="not in v1")] = False,
        header: Annotated[list[str] | None, typer.Option("--header", help="not in v1")] = None,
        waf: Annotated[bool, typer.Option("--waf", help="not in v1")] = False,
        anycast: Annotated[bool, typer.Option("--anycast", help="not in v1")] = False,
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app: AppOpt = None,
        env: EnvOpt = None,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "60s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        for flag, used in (
            ("hostname", hostname),
            ("shared", shared),
            ("tls", tls),
            ("http", http),
            ("header", header),
            ("waf", waf),
            ("anycast", anycast),
        ):
            if used:
                raise deferred.for_cli(f"endpoints create --{flag}").error(f"--{flag}")
        spec = {
            "protocol": "udp" if udp else "tcp",
            "ports": [parse_port(p) for p in port],
            "ipv4": ipv4,
            "proxy_protocol": proxy_protocol,
        }
        client, ctx = session(api_url=api_url)
        sc = scope_for("endpoint", ctx, {"org": org, "project": project, "app": app, "env": env})
        _finish(
            client, client.post("/v1/endpoints", dict(sc, name=name, spec=spec)), fmt, wait, timeout
        )

    @g.command(
        "update",
        help="Change an endpoint: its ports, the IPv4 add-on, PROXY protocol. Addresses stay.",
    )
    def update(
        ref: Annotated[str, typer.Argument(help="name or ID")],
        port: Annotated[
            list[str] | None,
            typer.Option("--port", help="PUBLIC:WORKLOAD:TARGET (repeatable; replaces all)"),
        ] = None,
        ipv4: Annotated[
            bool | None,
            typer.Option("--ipv4/--no-ipv4", help="add or give back the dedicated IPv4 address"),
        ] = None,
        proxy_protocol: Annotated[
            str | None, typer.Option("--proxy-protocol", help="none or v2")
        ] = None,
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app: AppOpt = None,
        env: EnvOpt = None,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "60s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        spec: dict[str, Any] = {}
        if port:
            spec["ports"] = [parse_port(p) for p in port]
        if ipv4 is not None:
            spec["ipv4"] = ipv4
        if proxy_protocol is not None:
            spec["proxy_protocol"] = proxy_protocol
        if not spec:
            raise errors.UserError(
                "nothing to change",
                hint="--port, --ipv4/--no-ipv4 or --proxy-protocol",
                code="usage",
            )
        client, ctx = session(api_url=api_url)
        sc = scope_for("endpoint", ctx, {"org": org, "project": project, "app": app, "env": env})
        res = client.get(f"/v1/endpoints/{ref}", **sc)
        rec = client.patch(f"/v1/endpoints/{res['id']}", {"spec": spec})
        _finish(client, rec, fmt, wait, timeout)

    _destroy_verb(g, "endpoint")


def _volume_verbs(g: typer.Typer) -> None:
    @g.command("create", help="Create a volume: --size 1GB.")
    def create(
        name: Annotated[str, typer.Argument(help="name of the new volume")],
        size: Annotated[str, typer.Option("--size", help="e.g. 1GB, 10GB")],
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app: AppOpt = None,
        env: EnvOpt = None,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "60s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        import re

        m = re.fullmatch(r"(\d+)\s*(GB|G|GiB)?", size.strip(), re.IGNORECASE)
        if not m:
            raise errors.UserError(
                f"invalid --size {size!r}", hint="whole gigabytes, e.g. 1GB", code="usage"
            )
        client, ctx = session(api_url=api_url)
        sc = scope_for("volume", ctx, {"org": org, "project": project, "app": app, "env": env})
        rec = client.post("/v1/volumes", dict(sc, name=name, spec={"size_gb": int(m.group(1))}))
        _finish(client, rec, fmt, wait, timeout)

    _destroy_verb(g, "volume")


def _destroy_verb(g: typer.Typer, kname: str) -> None:
    plural = kind_by_name(kname).plural  # type: ignore[union-attr]

    @g.command("destroy", help=f"Destroy one {kname} (asks first; --yes for scripts).")
    def destroy(
        ref: Annotated[str, typer.Argument(help="name or ID")],
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app: AppOpt = None,
        env: EnvOpt = None,
        yes: YesOpt = False,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "60s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        sc = scope_for(kname, ctx, {"org": org, "project": project, "app": app, "env": env})
        res = client.get(f"/v1/{plural}/{ref}", **sc)
        _confirm(f"destroy {kname} {res['name']}", fmt, yes)
        _finish(client, client.delete(f"/v1/{plural}/{res['id']}"), fmt, wait, timeout)


def _node_verbs(g: typer.Typer) -> None:
    for verb, value in (("cordon", True), ("uncordon", False)):

        def make(verb: str = verb, value: bool = value) -> None:
            @g.command(
                verb,
                help=f"{verb.capitalize()} a node ({'no' if value else 'allow'} new placements"
                + ("" if value else "; ends a drain")
                + ").",
            )
            def cmd(
                ref: Annotated[str, typer.Argument(help="node name or ID")],
                wait: WaitOpt = False,
                timeout: TimeoutOpt = "60s",
                fmt: OutputOpt = Format.table,
                api_url: ApiUrlOpt = None,
            ) -> None:
                client, _ = session(api_url=api_url)
                spec: dict[str, Any] = {"cordoned": value}
                if not value:
                    spec["draining"] = False
                rec = client.patch(f"/v1/nodes/{ref}", {"spec": spec})
                _finish(client, rec, fmt, wait, timeout)

        make()

    @g.command(
        "drain",
        help="Cordon a node and move its instances to other nodes: each gets a replacement "
        "first, and stops once the replacement is Ready. Instances bound to a volume on the "
        "node cannot move; they are listed. `uncordon` ends the drain.",
    )
    def drain(
        ref: Annotated[str, typer.Argument(help="node name or ID")],
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "300s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, _ = session(api_url=api_url)
        rec = client.patch(f"/v1/nodes/{ref}", {"spec": {"cordoned": True, "draining": True}})
        if not wait:
            output.receipt(rec, fmt)
            return
        if fmt is Format.table:
            output.receipt(rec, fmt)
            output.notice(f"waiting up to {timeout} for node {ref} to be empty ...")
        deadline = time.monotonic() + parse_duration(timeout)
        while True:
            node = client.get(f"/v1/nodes/{ref}")
            cond = get_condition(node["status"], "Drained")
            if cond is not None and cond["status"] == "true":
                break
            if cond is not None and cond["reason"] == "VolumeBound":
                raise errors.Conflict(
                    f"node {node['name']} cannot be emptied: {cond['message']}",
                    hint="destroy or move those volumes' workloads, or bring them back with "
                    f"`cove nodes uncordon {node['name']}`",
                    code="drain_blocked",
                )
            if time.monotonic() > deadline:
                left = (node["status"].get("drain") or {}).get("left", "?")
                raise errors.WaitTimeout(
                    f"node {node['name']} still has {left} instance(s) after {timeout}",
                    hint=f"`cove nodes events {node['name']}` and `cove events` show why",
                )
            time.sleep(0.5)
        if fmt is Format.table:
            output.out.print(f"node {node['name']} is drained", markup=False)
        else:
            output.document(node, fmt)


# --------------------------------------------------------------------------- top-level verbs


def register(app: typer.Typer) -> None:
    app.add_typer(_auth_group(), name="auth")
    app.add_typer(_tokens_group(), name="tokens")

    extra = {
        "org": _org_verbs,
        "project": _project_verbs,
        "app": _app_verbs,
        "endpoint": _endpoint_verbs,
        "volume": _volume_verbs,
        "node": _node_verbs,
    }
    for kind in KINDS:
        g = typer.Typer(
            help=f"{kind.plural.capitalize()}: {kind.summary}.",
            no_args_is_help=kind.name != "event",
        )
        _add_generic(g, kind)
        if kind.name in extra:
            extra[kind.name](g)
        if kind.name == "event":
            events_group = g  # `cove events` alone streams; see its callback below
        if kind.name == "secret":
            secrets_group = g
        app.add_typer(g, name=kind.plural)
        for alias in kind.aliases:
            app.add_typer(g, name=alias, hidden=True)

    from cove.cli import deploy as deploy_cmds

    deploy_cmds.register(app, secrets_group)
    from cove.cli import exec as exec_cmds

    exec_cmds.register(app)
    from cove.cli import billing as billing_cmds

    billing_cmds.register(app)

    @app.command("cluster", help="The control plane: which server replica runs the controllers.")
    def cluster(fmt: OutputOpt = Format.table, api_url: ApiUrlOpt = None) -> None:
        client, _ = session(api_url=api_url)
        doc = client.get("/v1/cluster")
        if fmt is not Format.table:
            output.document(doc, fmt)
            return
        lead, this = doc.get("leader"), doc["this_replica"]
        if lead:
            output.out.print(
                f"controllers: replica {lead['id']} ({lead.get('url') or '-'}) since "
                f"{lead.get('since', '-')}",
                markup=False,
            )
        else:
            output.out.print("controllers: no replica has led yet", markup=False)
        role = "runs the controllers" if this.get("leading") else "serves the API"
        output.out.print(
            f"this replica: {this.get('id', '-')} ({this.get('url') or '-'}), {role}; "
            f"store {this['store']}",
            markup=False,
        )

    @app.command("use", help="Set the current org/project (and optionally app and env).")
    def use(
        target: Annotated[str, typer.Argument(help="ORG or ORG/PROJECT")],
        app_: Annotated[str | None, typer.Option("--app", "-a", help="app name or ID")] = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        org, _, project = target.partition("/")
        client, _ctx = session(api_url=api_url)
        o = client.get(f"/v1/orgs/{org}")
        if project:
            client.get(f"/v1/projects/{project}", org=o["name"])
        if app_:
            client.get(f"/v1/apps/{app_}", org=o["name"], project=project or None)
        doc = config.update(org=o["name"], project=project or None, app=app_, env=env)
        cur = {k: doc.get(k) for k in ("org", "project", "app", "env")}
        if fmt is Format.table:
            output.out.print("now using " + "  ".join(f"{k}={v}" for k, v in cur.items() if v))
        else:
            output.document(cur, fmt)

    @events_group.callback(
        invoke_without_command=True,
        help="Events across what you can see (-f to follow, --for to narrow); "
        "or list/describe/events of single events.",
    )
    def events(
        tctx: typer.Context,
        follow: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming")] = False,
        for_: Annotated[str | None, typer.Option("--for", help="KIND/NAME or an ID")] = None,
        since: Annotated[int, typer.Option("--since", help="resume after this revision")] = 0,
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        if tctx.invoked_subcommand is not None:
            return
        client, ctx = session(api_url=api_url)
        params: dict[str, Any] = {
            "org": org or ctx.org,
            "project": project,
            "app": app_,
            "env": env,
        }
        if for_:
            kname, _, _ref = for_.partition("/")
            k = kind_by_name(kname)
            if k is None and not looks_like_id(for_):
                raise errors.UserError(
                    f"can't tell what {for_!r} is",
                    hint="use KIND/NAME such as app/web, or an ID",
                    code="usage",
                )
            params = {"for": f"{k.name}/{_ref}" if k else for_}
            if k is not None:
                params.update(
                    scope_for(
                        k.name, ctx, {"org": org, "project": project, "app": app_, "env": env}
                    )
                )
        _show_events(client, fmt, follow, params, since)

    @app.command("wait", help="Wait for an operation (op_...) or KIND/NAME to reach a condition.")
    def wait(
        target: Annotated[str, typer.Argument(help="op_… receipt, an ID, or KIND/NAME")],
        for_: Annotated[
            str | None,
            typer.Option(
                "--for",
                help="ready, done, deleted, caught-up or condition=TYPE[=true|false] "
                "(default: done for operations, ready for the rest)",
            ),
        ] = None,
        timeout: TimeoutOpt = "60s",
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        if looks_like_id(target):
            k = kind_by_prefix(target.split("_", 1)[0])
            ref = target
        else:
            kname, sep, ref = target.partition("/")
            k = kind_by_name(kname) if sep else None
        if k is None or not ref:
            raise errors.UserError(
                f"can't tell what {target!r} is",
                hint="use op_…, an ID, or KIND/NAME such as app/web",
                code="usage",
            )
        cond = for_ or ("done" if k.name == "operation" else "ready")
        sc = scope_for(k.name, ctx, {"org": org, "project": project, "app": app_, "env": env})
        if fmt is Format.table:
            output.notice(f"waiting up to {timeout} for {k.name} {ref} to be {cond} ...")
        res = wait_for(client, k.plural, ref, cond, parse_duration(timeout), sc)
        if fmt is Format.table:
            output.out.print(f"[green]{k.name} {res['name'] if res else ref} is {cond}[/green]")
        else:
            output.document(res, fmt)

    @app.command("status", help="Desired vs current for the current project (or --app / --env).")
    def status(
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        doc = client.get(
            "/v1/status",
            org=org or ctx.org,
            project=project or ctx.project,
            app=app_ or ctx.app,
            env=env or (ctx.env if (app_ or ctx.app) else None),
        )
        if fmt is not Format.table:
            output.document(doc, fmt)
            return
        output.out.print(
            f"[bold]{doc['org']['name']}/{doc['project']['name']}[/bold]"
            f"  (revision {doc['revision']})"
        )
        if not doc["apps"]:
            output.out.print("no apps yet: cove apps create NAME")
        for a in doc["apps"]:
            t = Table(
                title=f"app {a['app']['name']}",
                title_justify="left",
                box=None,
                pad_edge=False,
                header_style="bold",
            )
            for c in (
                "ENV",
                "DESIRED RELEASE",
                "CURRENT RELEASE",
                "WORKLOADS (ready/desired)",
                "CAUGHT UP",
                "READY",
            ):
                t.add_column(c)
            for e in a["environments"]:
                wls = e["current"]["workloads"]
                wtxt = ", ".join(f"{n} {w['ready']}/{w['desired']}" for n, w in wls.items()) or "-"
                r = e.get("ready") or {}
                rt = Text(
                    f"{r.get('status', '?')} ({r.get('reason', 'pending')})",
                    style="green" if r.get("status") == "true" else "yellow",
                )
                t.add_row(
                    e["environment"]["name"],
                    e["desired"].get("release_name") or e["desired"]["release"] or "-",
                    e["current"].get("release_name") or e["current"]["release"] or "-",
                    wtxt,
                    Text("yes", style="green") if e["caught_up"] else Text("no", style="yellow"),
                    rt,
                )
            output.out.print(t)

    @app.command("scale", help="Set desired counts: cove scale web=3 worker=1.")
    def scale(
        counts: Annotated[list[str], typer.Argument(help="WORKLOAD=COUNT ...")],
        auto: Annotated[bool, typer.Option("--auto", help="not in v1")] = False,
        schedule: Annotated[str | None, typer.Option("--schedule", help="not in v1")] = None,
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        wait: WaitOpt = False,
        timeout: TimeoutOpt = "60s",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        if auto:
            raise deferred.for_cli("scale --auto").error("--auto")
        if schedule:
            raise deferred.for_cli("scale --schedule").error("--schedule")
        want: dict[str, int] = {}
        for c in counts:
            name, sep, n = c.partition("=")
            if not sep or not n.isdigit():
                raise errors.UserError(
                    f"invalid {c!r}", hint="use WORKLOAD=COUNT, e.g. web=3", code="usage"
                )
            want[name] = int(n)
        client, ctx = session(api_url=api_url)
        sc = scope_for("environment", ctx, {"org": org, "project": project, "app": app_})
        envname = env or ctx.env or "prod"
        cur = client.get(f"/v1/environments/{envname}", **sc)
        scale_now = dict(cur["spec"].get("scale") or {}, **want)
        rec = client.patch(
            f"/v1/environments/{cur['id']}",
            {"spec": {"scale": scale_now}, "revision": cur["metadata"]["revision"]},
        )
        _finish(client, rec, fmt, wait, timeout)

    @app.command("deferred", help="What v1 deliberately does not do, and what to do instead.")
    def deferred_cmd(fmt: OutputOpt = Format.table) -> None:
        items = [d.as_dict() for d in deferred.REGISTRY]
        if fmt is not Format.table:
            output.document(items, fmt)
            return
        for d in deferred.REGISTRY:
            output.out.print(f"[bold]{d.feature}[/bold] [dim]({d.key})[/dim]")
            output.out.print(f"  why: {d.why}")
            output.out.print(f"  instead: {d.instead}")

    for noun, verb in (("databases", "create"), ("addons", "create"), ("audit", "export")):

        def make(noun: str = noun, verb: str = verb) -> None:
            g = typer.Typer(help="Not in v1 (`cove deferred` explains).", no_args_is_help=True)

            @g.command(
                verb,
                help="Not in v1.",
                context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
            )
            def cmd(ctx: typer.Context) -> None:
                raise deferred.for_cli(f"{noun} {verb}").error(f"cove {noun} {verb}")

            app.add_typer(g, name=noun, hidden=True)

        make()
