"""Shared options and helpers for every command (one constructor per shared flag)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.markup import escape

from cove import errors
from cove.cli import config
from cove.cli.output import Format, notice
from cove.client import Client

OrgOpt = Annotated[str | None, typer.Option("--org", help="org name or ID (default: `cove use`)")]
ProjectOpt = Annotated[str | None, typer.Option("--project", "-p", help="project name or ID")]
AppOpt = Annotated[str | None, typer.Option("--app", "-a", help="app name or ID")]
EnvOpt = Annotated[
    str | None, typer.Option("--env", "-e", help="environment: prod, staging or dev")
]
WaitOpt = Annotated[bool, typer.Option("--wait", "-w", help="wait until the change has settled")]
TimeoutOpt = Annotated[str, typer.Option("--timeout", help="how long to wait: 30s, 5m, 1h")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="don't ask for confirmation")]
ApiUrlOpt = Annotated[str | None, typer.Option("--api-url", help="cove API URL", envvar=None)]


def session(
    *,
    org: str | None = None,
    project: str | None = None,
    app: str | None = None,
    env: str | None = None,
    api_url: str | None = None,
    auth: bool = True,
) -> tuple[Client, config.Context]:
    ctx = config.resolve(api_url=api_url, org=org, project=project, app=app, env=env)
    if auth and not ctx.token:
        raise errors.Unauthenticated(
            "you are not signed in", hint="run `cove auth login` (or `cove auth signup`)"
        )
    return Client(ctx.api_url, ctx.token), ctx


def parse_duration(value: str) -> float:
    import re

    m = re.match(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$", value.strip())
    if not m:
        raise errors.UserError(f"invalid duration {value!r}", hint="use 30s, 5m, 1h", code="usage")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def wait_for(
    client: Client,
    plural: str,
    ref: str,
    cond: str,
    timeout: float,
    scope: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Long-poll the API until *cond* holds; the server caps one call, so loop."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        step = max(0.1, min(remaining, 300.0))
        try:
            res: dict[str, Any] = client.request(
                "GET",
                f"/v1/{plural}/{ref}/wait",
                params={"for": cond, "timeout": f"{step:.3f}s", **(scope or {})},
                timeout=step + 30,
            )
            return res
        except errors.WaitTimeout:
            if time.monotonic() >= deadline:
                raise


def wait_receipt(
    client: Client, rec: dict[str, Any], timeout: float, fmt: Format
) -> dict[str, Any]:
    if fmt is Format.table:
        notice(f"waiting for {rec['operation']} ...")
    op = wait_for(client, "operations", rec["operation"], "done", timeout)
    if fmt is Format.table:
        notice(f"[green]done[/green]: {escape(op['status'].get('message', ''))}")
    return op


def parse_port(value: str, where: str = "--port") -> dict[str, Any]:
    """``PUBLIC:WORKLOAD:TARGET`` (``443:web:8443``) as an endpoint port mapping."""
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 3:
        raise errors.UserError(
            f"invalid {where} {value!r}",
            hint="use PUBLIC:WORKLOAD:TARGET, e.g. 443:web:8443",
            code="usage",
        )
    pub, wl, target = parts
    try:
        ports = (int(pub), int(target))
    except ValueError as exc:
        raise errors.UserError(
            f"invalid {where} {value!r}: ports are numbers", hint="e.g. 443:web:8443", code="usage"
        ) from exc
    if not all(1 <= p <= 65535 for p in ports):
        raise errors.UserError(
            f"invalid {where} {value!r}: ports are 1-65535", hint="e.g. 443:web:8443", code="usage"
        )
    return {"port": ports[0], "workload": wl, "target_port": ports[1]}
