"""Rendering. Under ``-o json`` / ``-o yaml`` stdout carries exactly one document and
nothing else; progress and notices always go to stderr."""

from __future__ import annotations

import enum
import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cove.model.kinds import kind_by_name

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOpt = Annotated[
    Format,
    typer.Option(
        "--output", "-o", help="table for people; json or yaml for scripts (one document)"
    ),
]


def document(doc: Any, fmt: Format) -> None:
    if fmt is Format.json:
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    sys.stdout.flush()


def notice(msg: str) -> None:
    err.print(msg)


def age(ts: str | None) -> str:
    if not ts:
        return "-"
    try:
        then = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    except ValueError:
        return ts
    s = max(0, int((datetime.now(UTC) - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _cond(res: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in res.get("status", {}).get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None


def ready_text(res: dict[str, Any]) -> Text:
    c = _cond(res, "Ready")
    if c is None:
        return Text("pending", style="yellow")
    style = {"true": "green", "false": "red"}.get(c["status"], "yellow")
    if c["status"] == "false" and c.get("reason") in ("WaitingForNode", "NothingDeployed"):
        style = "yellow"
    word = {"true": "yes", "false": "no"}.get(c["status"], "unknown")
    return Text(f"{word} ({c.get('reason', '')})", style=style)


def caught_up(res: dict[str, Any]) -> bool:
    return bool(res.get("status", {}).get("observed_generation") == res["metadata"]["generation"])


def _cell(res: dict[str, Any], col: str) -> Text | str:
    if col == "ready":
        return ready_text(res)
    if col == "age":
        return age(res["metadata"]["created_at"])
    if col == "caught_up":
        return Text("yes", style="green") if caught_up(res) else Text("no", style="yellow")
    if col == "release":
        want = res["spec"].get("release") or "-"
        have = res["status"].get("release") or "-"
        return want if want == have else f"{have} -> {want}"
    if col == "state":
        return str(res["status"].get("state") or "-")
    if col == "version":
        return str(res["spec"].get("release_name") or res["spec"].get("number") or "-")
    if col == "health":
        h = str(res["status"].get("health") or "-")
        return Text(h, style={"passing": "green", "failing": "red"}.get(h, "yellow"))
    if col == "restarts":
        return str(res["status"].get("restart_count", 0))
    if col == "node":
        return str(res["status"].get("node_name") or res["spec"].get("node") or "-")
    if col == "protocol":
        pp = res["spec"].get("proxy_protocol")
        return str(res["spec"].get("protocol", "-")) + (" +proxy-v2" if pp == "v2" else "")
    if col in ("ipv6", "ipv4"):
        addr = (res["status"].get("addresses") or {}).get(col)
        if col == "ipv4" and res["spec"].get("ipv4") and not addr:
            return "(pending)"
        return str(addr or "-")
    if col == "ports":
        return ",".join(
            f"{p['port']}->{p['workload']}:{p['target_port']}" for p in res["spec"].get("ports", [])
        )
    if col == "image":
        return str(res["spec"].get("image") or "-")
    if col == "reason":
        return str(res["spec"].get("reason") or "-")
    if col == "driver":
        return str(res["status"].get("driver") or "-")
    if col == "region":  # a node's region; the region an environment is pinned to
        return str(res["spec"].get("region") or "-")
    if col == "action":
        return str(res["spec"].get("action", "-"))
    if col == "target":
        t = res["spec"].get("target") or {}
        return f"{t.get('kind', '?')}/{t.get('name', '?')}"
    if col == "last_seen":
        return age(res["status"].get("last_seen"))
    if col in ("type", "reason", "message"):
        v = str(res["spec"].get(col, ""))
        if col == "type" and v == "Warning":
            return Text(v, style="red")
        return v
    if col == "object":
        p = res.get("parent") or {}
        return f"{p.get('kind', '?')}/{p.get('name') or p.get('id')}"
    if col == "count":
        return str(res["status"].get("count", 1))
    value = res.get(col)
    return "-" if value is None else str(value)


def resources(kind: str, items: list[dict[str, Any]], fmt: Format) -> None:
    if fmt is not Format.table:
        document(items, fmt)
        return
    k = kind_by_name(kind)
    cols = k.columns if k else ("name", "id", "age")
    if not items:
        err.print(f"no {k.plural if k else kind} found")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for c in cols:
        table.add_column(c.replace("_", " ").upper(), overflow="fold")
    for r in items:
        table.add_row(*[_plain(_cell(r, c)) for c in cols])
    out.print(table)


def events(items: list[dict[str, Any]], fmt: Format) -> None:
    resources("event", items, fmt)


def event_line(ev: dict[str, Any], stream: Console | None = None) -> None:
    p = ev.get("parent") or {}
    style = "red" if ev["spec"]["type"] == "Warning" else "cyan"
    count = ev["status"].get("count", 1)
    times = f" (x{count})" if count > 1 else ""
    ts = ev["status"]["last_seen"][11:19]
    (stream or out).print(
        Text.assemble(
            (f"{ts} ", "dim"),
            (f"{ev['spec']['reason']:<18}", style),
            f" {p.get('kind')}/{p.get('name') or p.get('id')}: {ev['spec']['message']}{times}",
        )
    )


def _plain(value: Text | str) -> Text:
    """A cell as literal text: values come from the server and users ("listening on
    [fd12::1]"), and rich would take a bracketed word for markup and drop it."""
    return value if isinstance(value, Text) else Text(value)


def _kv(table: Table, key: str, value: Any) -> None:
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True) if value else "-"
    table.add_row(
        Text(key, style="bold"), Text("-" if value is None or value == "" else str(value))
    )


def describe(res: dict[str, Any], fmt: Format, recent: list[dict[str, Any]] | None = None) -> None:
    if fmt is not Format.table:
        document(res, fmt)
        return
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    _kv(t, "Kind", res["kind"])
    _kv(t, "Name", res["name"])
    _kv(t, "ID", res["id"])
    p = res.get("parent")
    _kv(t, "Parent", f"{p['kind']}/{p.get('name') or p['id']} ({p['id']})" if p else "-")
    if res.get("labels"):
        _kv(t, "Labels", ", ".join(f"{k}={v}" for k, v in res["labels"].items()))
    md = res["metadata"]
    gen, obs = md["generation"], res["status"].get("observed_generation")
    sync = "caught up" if obs == gen else f"catching up (status describes generation {obs})"
    _kv(t, "Generation", f"{gen}  ({sync})")
    _kv(t, "Revision", md["revision"])
    _kv(t, "Created", f"{md['created_at']} ({age(md['created_at'])} ago)")
    _kv(t, "Updated", md["updated_at"])
    if md.get("deleting"):
        _kv(t, "Deleting", "yes")
    out.print(t)
    out.print(Text("\nDesired (spec)", style="bold underline"))
    _tree(res["spec"])
    out.print(Text("\nCurrent (status)", style="bold underline"))
    _tree({k: v for k, v in res["status"].items() if k != "conditions"})
    conds = res["status"].get("conditions") or []
    if conds:
        out.print(Text("\nConditions", style="bold underline"))
        ct = Table(box=None, pad_edge=False, header_style="bold")
        for c in ("TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"):
            ct.add_column(c, overflow="fold")
        for c in conds:
            ct.add_row(
                *(
                    Text(str(v))
                    for v in (
                        c["type"],
                        c["status"],
                        c["reason"],
                        age(c.get("last_transition")),
                        c.get("message", ""),
                    )
                )
            )
        out.print(ct)
    if recent:
        out.print(Text("\nRecent events", style="bold underline"))
        for ev in recent[-10:]:
            event_line(ev)


def _tree(doc: dict[str, Any], indent: int = 2) -> None:
    if not doc:
        out.print(" " * indent + "-")
        return
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out.print(" " * indent + f"{k}:", markup=False)
            _tree(v, indent + 2)
        else:
            shown = json.dumps(v) if isinstance(v, list | dict) or v is None else str(v)
            out.print(" " * indent + f"{k}: {shown}", markup=False)


def receipt(rec: dict[str, Any], fmt: Format) -> None:
    if fmt is not Format.table:
        document(rec, fmt)
        return
    r = rec["resource"]
    out.print(
        f"[green]accepted[/green]: {rec['action']} {r['kind']} [bold]{r['name']}[/bold] ({r['id']})"
    )
    out.print(
        f"  operation {rec['operation']}  generation {rec['generation']}"
        f"  revision {rec['revision']}"
    )
    out.print(
        f"  follow it: cove wait {rec['operation']}   cove events --for {r['kind']}/{r['name']}"
    )
