"""``cove pricing``, ``cove usage``, ``cove billing invoice`` and ``cove projects quotas``."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cove import errors
from cove.cli import output
from cove.cli.common import ApiUrlOpt, AppOpt, OrgOpt, ProjectOpt, session
from cove.cli.output import Format, OutputOpt
from cove.model.specs import Quotas

QUOTA_DIMENSIONS = tuple(Quotas.model_fields)  # the project spec's quota fields


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left")
    return t


def _lines(items: list[dict[str, Any]], currency: str, *, resource: bool = False) -> Table:
    cols = ["PROJECT", "APP"] + (["RESOURCE"] if resource else [])
    t = _table(*cols, "ITEM", "QUANTITY", "UNIT", "UNIT PRICE", f"AMOUNT ({currency})",
               right=("QUANTITY", "UNIT PRICE", f"AMOUNT ({currency})"))  # fmt: skip
    for ln in items:
        row = [ln["project"] or "-", ln["app"] or "-"]
        if resource:
            row.append(ln.get("resource") or "-")
        item = ln["item"] + (" (ongoing)" if ln.get("ongoing") else "")
        t.add_row(*(Text(c) for c in [*row, item, ln["quantity"], ln["unit"], ln["unit_price"],
                                      ln["amount"]]))  # fmt: skip
    return t


def _parse_sets(sets: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in sets:
        m = re.fullmatch(r"([a-z_0-9]+)=(\d{1,9})", s.strip())
        if m is None:
            raise errors.UserError(
                f"invalid --set {s!r}",
                hint="DIMENSION=NUMBER, e.g. --set instances=40 (dimensions: "
                + ", ".join(QUOTA_DIMENSIONS)
                + ")",
                code="usage",
            )
        if m[1] not in QUOTA_DIMENSIONS:
            raise errors.UserError(
                f"no quota named {m[1]!r}",
                hint="the dimensions are " + ", ".join(QUOTA_DIMENSIONS),
                code="usage",
            )
        out[m[1]] = int(m[2])
    return out


def project_verbs(g: typer.Typer) -> None:
    @g.command(
        "quotas",
        help="A project's quotas and use; org owners change them with --set DIM=N.",
    )
    def quotas(
        name: Annotated[
            str | None, typer.Argument(help="project name or ID (default: `cove use`)")
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                help="DIMENSION=NUMBER (repeatable): instances, vcpu, memory_mb, volume_gb, "
                "dedicated_ipv4",
            ),
        ] = None,
        org: OrgOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        change = _parse_sets(set_ or [])
        client, ctx = session(api_url=api_url)
        project = name or ctx.project
        if not project:
            raise errors.UserError(
                "which project?", hint="cove projects quotas NAME (or `cove use ORG/PROJECT`)"
            )
        path = f"/v1/projects/{project}/quotas"
        if change:
            doc = client.put(path, change, org=org or ctx.org)
        else:
            doc = client.get(path, org=org or ctx.org)
        if fmt is not Format.table:
            output.document(doc, fmt)
            return
        t = _table("QUOTA", "LIMIT", "IN USE", "FREE", right=("LIMIT", "IN USE", "FREE"))
        for q in doc["quotas"]:
            full = q["in_use"] >= q["limit"]
            t.add_row(
                q["dimension"],
                str(q["limit"]),
                Text(f"{q['in_use']:g}", style="yellow" if full else ""),
                f"{q['free']:g}",
            )
        output.out.print(f"project {doc['project']}", markup=False)
        output.out.print(t)
        if change:
            output.notice("changed: " + ", ".join(f"{k}={v}" for k, v in change.items()))


def register(app: typer.Typer) -> None:
    @app.command("pricing", help="The price list in force: what each thing costs.")
    def pricing(fmt: OutputOpt = Format.table, api_url: ApiUrlOpt = None) -> None:
        client, _ = session(api_url=api_url, auth=False)
        doc = client.get("/v1/pricing")
        if fmt is not Format.table:
            output.document(doc, fmt)
            return
        cur = doc["currency"]
        t = _table("ITEM", "DETAIL", "UNIT", f"PRICE ({cur})", f"PER MONTH ({cur})",
                   right=(f"PRICE ({cur})", f"PER MONTH ({cur})"))  # fmt: skip
        for row in doc["items"]:
            t.add_row(*(Text(row[k]) for k in ("item", "detail", "unit", "price", "per_month")))
        output.out.print(t)
        since = doc.get("effective_from") or "the first start of this server"
        output.out.print(
            f"in force since {since}; a month is {doc['hours_per_month']} hours; instances are "
            "billed per second while running or stopping",
            markup=False,
        )

    @app.command(
        "usage", help="What was used (and what it costs) in a window; default: this month."
    )
    def usage(
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        from_: Annotated[
            str | None,
            typer.Option(
                "--from", help="YYYY-MM-DD or an ISO date-time (UTC); default: month start"
            ),
        ] = None,
        to: Annotated[str | None, typer.Option("--to", help="same forms, or now (default)")] = None,
        by: Annotated[
            str, typer.Option("--by", help="app (default) or resource: one line per resource")
        ] = "app",
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        if by not in ("app", "resource"):
            raise errors.UserError(f"--by {by!r}?", hint="--by app or --by resource", code="usage")
        client, ctx = session(api_url=api_url)
        params = {"org": org or ctx.org, "project": project, "app": app_, "by": by}
        if app_ and not project:
            params["project"] = ctx.project
        params.update({"from": from_, "to": to})
        doc = client.get("/v1/usage", **params)
        if fmt is not Format.table:
            output.document(doc, fmt)
            return
        where = "/".join(x for x in (doc["org"], doc.get("project"), doc.get("app")) if x)
        output.out.print(f"usage of {where} from {doc['from']} to {doc['to']}", markup=False)
        if not doc["items"]:
            output.out.print("nothing used in this window", markup=False)
            return
        output.out.print(_lines(doc["items"], doc["currency"], resource=by == "resource"))
        output.out.print(f"total {doc['total']} {doc['currency']}", markup=False)

    billing = typer.Typer(help="Billing: invoices per org and month.", no_args_is_help=True)
    app.add_typer(billing, name="billing")

    @billing.command("invoice", help="An org's invoice for a month (default: this month, to date).")
    def invoice(
        month: Annotated[
            str, typer.Option("--month", help="YYYY-MM (default: the current month)")
        ] = "current",
        org: OrgOpt = None,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        if month != "current" and re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month) is None:
            raise errors.UserError(
                f"--month {month!r} is not a month", hint="YYYY-MM, e.g. 2026-11", code="usage"
            )
        client, ctx = session(api_url=api_url)
        doc = client.get(f"/v1/invoices/{month}", org=org or ctx.org)
        if fmt is not Format.table:
            output.document(doc, fmt)
            return
        state = doc["state"] + (f", to {doc['to_date']}" if doc.get("to_date") else "")
        output.out.print(f"invoice {doc['org']} {doc['month']} ({state})", markup=False)
        if doc["lines"]:
            output.out.print(_lines(doc["lines"], doc["currency"]))
        else:
            output.out.print("no usage this month", markup=False)
        output.out.print(
            f"total {doc['total']} {doc['currency']}, due {doc['due']} {doc['currency']}",
            markup=False,
        )
        est = doc.get("estimate")
        if est:
            output.out.print(
                f"estimate for the whole month: {est['due']} {doc['currency']} ({est['note']})",
                markup=False,
            )
