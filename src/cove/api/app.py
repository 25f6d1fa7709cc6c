"""Routes. Every kind gets the same generic routes from the kinds registry:

GET    /v1/{plural}                    list (filters, pagination)
GET    /v1/{plural}/{ref}              describe (ref: ID, or name within the scope)
GET    /v1/{plural}/{ref}/events       events about it (deduplicated)
GET    /v1/{plural}/{ref}/wait         long-poll for a condition (408 on timeout)
POST   /v1/{plural}                    create   -> 202 + receipt   (creatable kinds)
PATCH  /v1/{plural}/{ref}              update   -> 202 + receipt   (mutable kinds, CAS)
DELETE /v1/{plural}/{ref}              delete   -> 202 + receipt   (deletable kinds)
"""

import asyncio
import json
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from anyio import CapacityLimiter, to_thread
from fastapi import Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import cove.control.endpoints as endpoints
from cove import __version__, console, deferred, errors
from cove.api import auth, billing, deploys, problems, service
from cove.api import edge as edge_routes
from cove.api import exec as exec_relay
from cove.ids import looks_like_id
from cove.model.kinds import KINDS, Kind, get_kind, kind_by_name, kind_by_prefix
from cove.model.pricing import PriceList
from cove.model.resource import Resource, get_condition, is_caught_up
from cove.model.specs import LABEL_KEY_RE, NAME_RE, NAME_RULE
from cove.net.pools import Pools, default_pools
from cove.store import Store, quotas
from cove.store.crypto import MasterKey
from cove.store.db import Scope as StoreScope
from cove.store.notify import RevisionNotifier

MAX_BODY = 1 << 20  # 1 MiB
MAX_WAIT = 600.0

# ----------------------------------------------------------------------------- body limit


class BodyLimit:
    """Refuse bodies over MAX_BODY (413) whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > MAX_BODY
                except ValueError:
                    too_big = True
                if too_big:
                    await _send_413(send)
                    return
        seen = 0
        exceeded = False
        started = False

        async def limited() -> Message:
            nonlocal seen, exceeded
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > MAX_BODY:
                    exceeded = True
                    raise _TooLarge()
            return msg

        async def guarded(msg: Message) -> None:
            nonlocal started
            if exceeded:  # the app's answer to a body we refused (FastAPI turns our
                return  # exception into a 400 while reading the body): drop it
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _send_413(send)


class _TooLarge(Exception):
    pass


async def _send_413(send: Send) -> None:
    err = errors.TooLarge(
        f"the request body is larger than {MAX_BODY // 1024} KiB",
        hint="send less; no single cove object needs that much",
    )
    body = json.dumps(err.problem()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", problems.PROBLEM.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- models


def _check_labels(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is None:  # PATCH: labels left as they are
        return v
    if len(v) > 64:
        raise ValueError("at most 64 labels")
    for key, value in v.items():
        if not LABEL_KEY_RE.match(key):
            raise ValueError(f"invalid label key {key!r}")
        if len(value) > 63:
            raise ValueError(f"label {key!r}: values are at most 63 characters")
    return v


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Receipt(BaseModel):
    operation: str
    action: str
    state: str
    resource: dict[str, Any]
    generation: int
    revision: int
    links: dict[str, str]


class Page(BaseModel):
    items: list[Resource]
    next: str | None = Field(description="cursor for the next page (pass as after=)")
    revision: int = Field(description="the store's revision when the page was read")


class SignupBody(_Body):
    email: str = Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    password: str = Field(min_length=8, max_length=200)
    org: str = Field(pattern=NAME_RE.pattern, max_length=40)


class LoginBody(_Body):
    email: str = Field(min_length=3, max_length=254)
    password: str = Field(min_length=1, max_length=200)


class TokenBody(_Body):
    name: str = Field(pattern=NAME_RE.pattern, max_length=40)
    org: str | None = Field(default=None, max_length=64)
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class MemberBody(_Body):
    email: str = Field(min_length=3, max_length=254)
    role: str = Field(default="member", max_length=32)


class NodeNetworkBody(_Body):
    """The instance subnets the agent proposes and the address other nodes reach it at."""

    ipv4: str = Field(max_length=64, description="IPv4 instance subnet, e.g. 10.213.20.0/24")
    ipv6: str = Field(max_length=64, description="IPv6 instance subnet, e.g. fd00:c0e:14::/64")
    fixed: bool = Field(
        default=False,
        description="the operator chose these subnets (--pool4/--pool6): refuse rather than "
        "replace them when another node has them",
    )
    address: str | None = Field(
        default=None, max_length=64, description="this node's address for the other nodes"
    )

    @field_validator("address")
    @classmethod
    def _unicast(cls, v: str | None) -> str | None:
        if v is None:
            return None
        import ipaddress

        try:
            ip = ipaddress.ip_address(v.strip())
        except ValueError as exc:
            raise ValueError(f"not an IP address: {v!r}") from exc
        if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
            raise ValueError(f"{v} can't be a node address (loopback, multicast or link-local)")
        return str(ip)


class RegisterNodeBody(_Body):
    name: str = Field(pattern=NAME_RE.pattern, max_length=40)
    join_token: str = Field(min_length=8, max_length=200)
    region: str = Field(default="local", max_length=40)
    labels: dict[str, str] = Field(default_factory=dict)
    capacity: dict[str, float] = Field(default_factory=dict)
    driver: str = Field(default="none", max_length=40)
    driver_detail: str = Field(default="", max_length=500)
    accel: str | None = Field(default=None, pattern=r"^(kvm|tcg)$")
    version: str = Field(default="", max_length=40)
    network: NodeNetworkBody | None = None

    _labels = field_validator("labels")(_check_labels)


class HeartbeatBody(_Body):
    capacity: dict[str, float] = Field(default_factory=dict)
    allocatable: dict[str, float] = Field(default_factory=dict)
    driver: str | None = Field(default=None, max_length=40)
    driver_detail: str | None = Field(default=None, max_length=500)


def _create_model(kind: Kind) -> type[BaseModel]:
    fields: dict[str, Any] = {
        "name": (str, Field(pattern=NAME_RE.pattern, max_length=40, description=NAME_RULE)),
        "labels": (dict[str, str], Field(default_factory=dict)),
        "spec": (
            kind.spec_model,
            Field(default_factory=kind.spec_model) if _all_default(kind.spec_model) else ...,
        ),
    }
    for scope_key in ("org", "project", "app", "env"):
        fields[scope_key] = (str | None, Field(default=None, max_length=64))
    model: type[BaseModel] = create_model(
        f"Create{kind.name.title().replace('_', '')}",
        __base__=_Body,
        __validators__={"_labels": field_validator("labels")(_check_labels)},
        **fields,
    )
    return model


def _update_model(kind: Kind) -> type[BaseModel]:
    # a spec with required fields (an endpoint's ports) is patched field by field: the
    # merged result is validated in the handler
    spec_type: Any = (kind.spec_model if _all_default(kind.spec_model) else dict[str, Any]) | None
    model: type[BaseModel] = create_model(
        f"Update{kind.name.title().replace('_', '')}",
        __base__=_Body,
        __validators__={"_labels": field_validator("labels")(_check_labels)},
        labels=(dict[str, str] | None, None),
        spec=(spec_type, None),
        revision=(int | None, Field(default=None, ge=0, description="compare-and-swap")),
    )
    return model


def _all_default(model: type[BaseModel]) -> bool:
    return all(not f.is_required() for f in model.model_fields.values())


# ----------------------------------------------------------------------------- context


@dataclass
class Ctx:
    org: dict[str, Any] | None = None
    project: dict[str, Any] | None = None
    app: dict[str, Any] | None = None
    env: dict[str, Any] | None = None

    def ancestors(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, kname in (
            ("org", "org"),
            ("project", "project"),
            ("app", "app"),
            ("env", "environment"),
        ):
            r = getattr(self, key)
            if r is not None:
                out[kname] = r["id"]
        return out


DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")


def parse_duration(value: str | None, default: float) -> float:
    if value is None or value == "":
        return default
    m = DURATION_RE.match(value.strip())
    if not m:
        raise errors.UserError(
            f"invalid duration {value!r}", hint="use seconds or a unit: 500ms, 30s, 5m, 1h"
        )
    n = float(m.group(1))
    unit = m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


class Api:
    """Holds the store and notifier for route handlers."""

    def __init__(self, store: Store, notifier: RevisionNotifier, pools: Pools) -> None:
        self.store = store
        self.notifier = notifier
        self.pools = pools
        self.prices = PriceList()  # the price list in force (server config)
        self.node_tokens = auth.NodeTokens()  # node tokens checked in the last seconds

    # -- principal -------------------------------------------------------------------------

    def principal(self, authorization: str | None) -> auth.Principal:
        return auth.authenticate(self.store, authorization, self.node_tokens)

    # -- lookups ----------------------------------------------------------------------------

    def _by_ref(
        self, kind: str, ref: str, scope: StoreScope, parent: dict[str, Any] | None, label: str
    ) -> dict[str, Any]:
        k = get_kind(kind)
        if looks_like_id(ref):
            try:
                res = self.store.get(ref, scope)
            except errors.NotFound:
                res = None
            if res is None or res["kind"] != kind:
                raise errors.NotFound(
                    f"no {k.title} {ref}", hint=f"`cove {k.plural} list` shows what exists"
                )
            return res
        if not NAME_RE.match(ref):
            raise errors.UserError(f"{ref!r} is neither an ID nor a valid name", hint=NAME_RULE)
        found = self.store.find(kind, parent["id"] if parent else None, ref)
        if found is None or not scope.allows(_org_of(found, parent)):
            raise errors.NotFound(
                f"no {k.title} named {ref!r}{label}",
                hint=f"`cove {k.plural} list` shows what exists",
            )
        return found

    def context(
        self,
        who: auth.Principal,
        org: str | None,
        project: str | None,
        app: str | None,
        env: str | None,
        *,
        need: str | None = None,
    ) -> Ctx:
        """Resolve the scope names/IDs a request gives, as deep as given (or as *need*)."""
        scope = who.scope()
        ctx = Ctx()
        levels = ["org", "project", "app", "env"]
        given = {"org": org, "project": project, "app": app, "env": env}
        depth = max([levels.index(k) for k, v in given.items() if v] + [-1])
        if need is not None:
            depth = max(depth, levels.index(need))
        if depth < 0:
            return ctx
        kinds = {"project": "project", "app": "app", "env": "environment"}
        deepest = given[levels[depth]]
        if deepest is not None and looks_like_id(deepest) and depth > 0:
            # an ID says everything above it: take the ancestors from the row itself
            res = self._by_ref(kinds[levels[depth]], deepest, scope, None, "")
            row = self.store.get_row(res["id"])
            assert row is not None
            chain = {"org": row["org_id"], "project": row["project_id"], "app": row["app_id"]}
            for level in levels[:depth]:
                value = given[level]
                kname = kinds.get(level, "org")
                up = self._by_ref(kname, chain[level], scope, None, "")
                if value is not None and value not in (up["id"], up["name"]):
                    raise errors.NotFound(
                        f"{levels[depth]} {deepest} is not in {level} {value}",
                        hint="drop the outer names, or make them match",
                    )
                setattr(ctx, level, up)
            setattr(ctx, levels[depth], res)
            return ctx
        if org is None:
            orgs = sorted(who.org_ids)
            if len(orgs) == 1:
                org = orgs[0]
            else:
                raise errors.UserError(
                    "which org? you belong to several" if orgs else "you belong to no org",
                    code="org_required",
                    hint="pass org=NAME (the CLI: `cove use ORG/PROJECT`)",
                )
        ctx.org = self._by_ref("org", org, scope, None, "")
        parent = ctx.org
        for level in levels[1 : depth + 1]:
            value = given[level]
            if value is None:
                raise errors.UserError(
                    f"this call needs {level}=NAME",
                    code=f"{level}_required",
                    hint=f"pass {level}= (the CLI: --{level} or `cove use`)",
                )
            res = self._by_ref(
                kinds[level], value, scope, parent, f" in {parent['kind']} {parent['name']}"
            )
            setattr(ctx, level, res)
            parent = res
        return ctx

    def lookup(
        self,
        who: auth.Principal,
        kind: Kind,
        ref: str,
        org: str | None,
        project: str | None,
        app: str | None,
        env: str | None,
    ) -> dict[str, Any]:
        scope = who.scope()
        if looks_like_id(ref):
            return self._by_ref(kind.name, ref, scope, None, "")
        if kind.name in ("operation", "event"):
            raise errors.NotFound(f"{kind.title}s are looked up by ID, not name ({ref!r})")
        if kind.scope == "cluster" or not kind.parents:
            return self._by_ref(kind.name, ref, scope, None, "")
        need = {"org": "org", "project": "project", "app": "app", "environment": "env"}.get(
            kind.parents[0]
        )
        if need is None:  # deeper kinds (instance): find by name within the environment
            ctx = self.context(who, org, project, app, env, need="env")
            items, _ = self.store.list(
                kind.name, scope, ancestors=ctx.ancestors(), name=ref, limit=2
            )
            if not items:
                where = ctx.env["name"] if ctx.env else ""
                raise errors.NotFound(
                    f"no {kind.title} named {ref!r} in environment {where}",
                    hint=f"`cove {kind.plural} list` shows what exists",
                )
            if len(items) > 1:
                raise errors.Conflict(
                    f"several {kind.plural} are named {ref!r}", hint="use the ID instead"
                )
            return items[0]
        parent_level = {"org": "org", "project": "project", "app": "app", "env": "env"}[need]
        ctx = self.context(who, org, project, app, env, need=need)
        parent = getattr(ctx, parent_level)
        return self._by_ref(kind.name, ref, scope, parent, f" in {parent['kind']} {parent['name']}")

    # -- authorisation -----------------------------------------------------------------------

    @staticmethod
    def require_user(who: auth.Principal) -> None:
        if who.kind != "user":
            raise errors.Forbidden("node credentials can't make this call")

    @staticmethod
    def require_member(who: auth.Principal, org_id: str | None, *, owner: bool = False) -> None:
        if org_id is None:
            return
        role = who.role_in(org_id)
        if role is None:  # not yours: indistinguishable from absent
            raise errors.NotFound("no such resource")
        if owner and role != "owner":
            raise errors.Forbidden(
                "only an owner of the org can do this", hint="ask an owner of the org"
            )


def _org_of(res: dict[str, Any], parent: dict[str, Any] | None) -> str | None:
    if res["kind"] == "org":
        return str(res["id"])
    k = get_kind(res["kind"])
    if k.scope == "cluster":
        return None
    if parent is not None:
        return str(parent["id"]) if parent["kind"] == "org" else _org_of(parent, None)
    return None


def _org_id(store: Store, res: dict[str, Any]) -> str | None:
    row = store.get_row(res["id"])
    return None if row is None else row["org_id"]


# ----------------------------------------------------------------------------- conditions

WAIT_HELP = "ready, done (operations), deleted, caught-up, condition=TYPE[=true|false]"


def evaluate(res: dict[str, Any] | None, cond: str) -> tuple[bool, str | None]:
    """(satisfied, failure). A failure means the condition can never be met."""
    if cond == "deleted":
        return res is None, None
    if res is None:
        return False, "it was deleted"
    status = res["status"]
    failed = get_condition(status, "Failed")
    if res["kind"] == "operation":
        state = status.get("state")
        if cond in ("done", "succeeded", "ready"):
            if state == "succeeded":
                return True, None
            if state == "failed":
                return False, f"operation failed: {status.get('message', '')}"
            return False, None
    if failed and failed.get("status") == "true":
        return False, f"{failed.get('reason')}: {failed.get('message', '')}"
    if cond == "caught-up":
        return is_caught_up(res), None
    if cond in ("ready", "done"):
        ready = get_condition(status, "Ready")
        return bool(ready and ready.get("status") == "true" and is_caught_up(res)), None
    if cond.startswith("condition="):
        ctype, _, want = cond[len("condition=") :].partition("=")
        want = want or "true"
        c = get_condition(status, ctype)
        return bool(c and c.get("status") == want), None
    raise errors.UserError(f"unknown condition {cond!r}", hint=f"use one of: {WAIT_HELP}")


# ----------------------------------------------------------------------------- app


def create_app(
    store: Store,
    notifier: RevisionNotifier | None = None,
    master_key: MasterKey | None = None,
    pools: Pools | None = None,
    api_url: str | None = None,
    prices: PriceList | None = None,
) -> FastAPI:
    """The API. ``pools`` are the public address pools endpoints draw from (default: the
    embedded one-machine pools of a throwaway data dir, for tests). ``api_url`` is this
    server's own URL: the web console's shells talk to the API there."""
    notifier = notifier or RevisionNotifier()
    store.on_commit(notifier.bump)
    pools = pools or default_pools(Path(tempfile.gettempdir()) / f"cove-api-{id(store)}")
    api = Api(store, notifier, pools)
    api.prices = prices or PriceList()
    app = FastAPI(
        title="cove API",
        version=__version__,
        description=(
            "Resource-oriented JSON API of cove. Every mutation answers 202 with a receipt; "
            "errors are application/problem+json with a stable `code`, `detail` and `hint`."
        ),
    )
    app.state.api = api
    app.state.store = store
    app.state.notifier = notifier
    problems.install(app)
    app.add_middleware(BodyLimit)

    @app.on_event("startup")
    async def _bind() -> None:
        notifier.bind(asyncio.get_running_loop())
        notifier.revision = await run_in_threadpool(store.head_revision)

    async def principal(authorization: Annotated[str | None, Header()] = None) -> auth.Principal:
        return await run_in_threadpool(api.principal, authorization)

    async def user(who: Annotated[auth.Principal, Depends(principal)]) -> auth.Principal:
        api.require_user(who)
        return who

    Who = Annotated[auth.Principal, Depends(principal)]
    User = Annotated[auth.Principal, Depends(user)]
    OrgQ = Annotated[str | None, Query(max_length=64, description="org name or ID")]
    ProjectQ = Annotated[str | None, Query(max_length=64)]
    EnvQ = Annotated[str | None, Query(max_length=64)]

    def sync(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def run(*a: Any, **kw: Any) -> Any:
            return await run_in_threadpool(fn, *a, **kw)

        return run

    def accepted(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse(body, status_code=202, headers={"Location": body["links"]["operation"]})

    # -- meta --------------------------------------------------------------------------------

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "revision": notifier.revision}

    @app.get("/v1/cluster", tags=["meta"])
    async def cluster(request: Request, who: Who) -> dict[str, Any]:
        """The control plane: which replica runs the controllers (the lease holder, see
        cove.control.lease) and what this replica is."""
        _ = who  # any signed-in principal may look
        raw = await run_in_threadpool(store.setting, "leader")  # written by the lease holder
        leader = json.loads(raw) if raw else None
        lead = getattr(request.app.state, "leadership", None)
        this: dict[str, Any] = {"store": store.dialect}
        if lead is not None:
            this.update(lead.replica.doc(), leading=lead.leading, terms=lead.terms)
        return {"leader": leader, "this_replica": this}

    @app.get("/v1/deferred", tags=["meta"])
    async def list_deferred() -> list[dict[str, Any]]:
        """What v1 deliberately does not do, why, and what to do instead."""
        return [d.as_dict() for d in deferred.REGISTRY]

    # -- auth --------------------------------------------------------------------------------

    @app.post("/v1/auth/signup", status_code=202, tags=["auth"])
    async def signup(body: SignupBody) -> JSONResponse:
        """Create an account and its first org (you are its owner); returns a session token."""

        def run() -> dict[str, Any]:
            with store.write() as tx:
                if tx.find("org", None, body.org) is not None:
                    raise errors.Conflict(
                        f"the org name {body.org!r} is taken",
                        hint="pick another org name",
                        code="already_exists",
                    )
                u = auth.create_user(tx, body.email, body.password)
                org = tx.create("org", body.org, spec={})
                auth.add_member(tx, u["id"], org["id"], "owner")
                tx.event(org, "Normal", "Created", f"org {body.org} created by {u['email']}")
                who = auth.Principal("user", "", "session", user_id=u["id"], email=u["email"])
                op = service.start_operation(tx, "create", org, who)
                token, tok = auth.issue_token(
                    tx, "session", name="login", user_id=u["id"], expires_days=auth.SESSION_DAYS
                )
            rec = service.receipt(op, org)
            rec.update({"token": token, "token_id": tok["id"], "user": u, "org": service.ref(org)})
            return rec

        return accepted(await run_in_threadpool(run))

    @app.post("/v1/auth/login", tags=["auth"])
    async def login(body: LoginBody) -> dict[str, Any]:
        """Exchange email and password for a session token."""

        def run() -> dict[str, Any]:
            u = auth.check_login(store, body.email, body.password)
            with store.write() as tx:
                token, tok = auth.issue_token(
                    tx, "session", name="login", user_id=u["id"], expires_days=auth.SESSION_DAYS
                )
            return {
                "token": token,
                "token_id": tok["id"],
                "user": u,
                "orgs": auth.user_orgs(store, u["id"]),
            }

        return await run_in_threadpool(run)

    @app.post("/v1/auth/logout", tags=["auth"])
    async def logout(who: User) -> dict[str, Any]:
        """Revoke the token this request carries."""
        await run_in_threadpool(_revoke, store, who.token_id)
        return {"revoked": who.token_id}

    @app.get("/v1/auth/whoami", tags=["auth"])
    async def whoami(who: Who) -> dict[str, Any]:
        if who.kind == "node":
            return {"kind": "node", "node": who.node_id, "token": who.token_id}
        orgs = await run_in_threadpool(auth.user_orgs, store, who.user_id or "")
        if who.token_kind == "api":
            orgs = [o for o in orgs if o["id"] in who.org_ids]
        return {
            "kind": "user",
            "user": {"id": who.user_id, "email": who.email},
            "token": {"id": who.token_id, "kind": who.token_kind},
            "orgs": orgs,
        }

    # -- tokens ------------------------------------------------------------------------------

    @app.post("/v1/tokens", status_code=201, tags=["auth"])
    async def create_token(body: TokenBody, who: User) -> dict[str, Any]:
        """An API token scoped to one org. The secret is shown once, here."""

        def run() -> dict[str, Any]:
            ctx = api.context(who, body.org, None, None, None, need="org")
            assert ctx.org is not None
            with store.write() as tx:
                token, view = auth.issue_token(
                    tx,
                    "api",
                    name=body.name,
                    user_id=who.user_id,
                    org_id=ctx.org["id"],
                    expires_days=body.expires_in_days,
                )
                tx.event(
                    ctx.org,
                    "Normal",
                    "TokenCreated",
                    f"API token {body.name} ({view['id']}) created by {who.email}",
                )
            return dict(view, token=token, org_name=ctx.org["name"])

        return await run_in_threadpool(run)

    @app.get("/v1/tokens", tags=["auth"])
    async def list_tokens(who: User) -> list[dict[str, Any]]:
        """Your tokens (never their secrets)."""
        return await run_in_threadpool(_list_tokens, store, who)

    @app.delete("/v1/tokens/{token_id}", tags=["auth"])
    async def revoke_token(
        token_id: Annotated[str, PathParam(max_length=64)], who: User
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            mine = {t_["id"]: t_ for t_ in _list_tokens(store, who, include_revoked=True)}
            if token_id not in mine:
                raise errors.NotFound(f"no token {token_id}", hint="`cove tokens list` shows yours")
            _revoke(store, token_id)
            return {"revoked": token_id}

        return await run_in_threadpool(run)

    # -- org members -------------------------------------------------------------------------

    @app.get("/v1/orgs/{ref}/members", tags=["orgs"])
    async def list_members(ref: str, who: User) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            org = api.lookup(who, get_kind("org"), ref, None, None, None, None)
            return _members(store, org["id"])

        return await run_in_threadpool(run)

    @app.post("/v1/orgs/{ref}/members", status_code=201, tags=["orgs"])
    async def add_member(ref: str, body: MemberBody, who: User) -> dict[str, Any]:
        """Add an existing account to the org as owner or member."""

        def run() -> dict[str, Any]:
            org = api.lookup(who, get_kind("org"), ref, None, None, None, None)
            api.require_member(who, org["id"], owner=True)
            if body.role not in ("owner", "member"):
                raise deferred.BY_KEY["advanced-rbac"].error(f"role {body.role!r}")
            import sqlalchemy as sa

            from cove.store import schema as t

            with store.write() as tx:
                uid = tx.conn.execute(
                    sa.select(t.users.c.id).where(t.users.c.email == body.email.strip().lower())
                ).scalar()
                if uid is None:
                    raise errors.NotFound(
                        f"no account for {body.email}",
                        hint="they sign up first with `cove auth signup`",
                    )
                if any(m["user_id"] == uid for m in _members(store, org["id"])):
                    raise errors.Conflict(
                        f"{body.email} is already a member", code="already_exists"
                    )
                auth.add_member(tx, uid, org["id"], body.role)
                tx.event(
                    org,
                    "Normal",
                    "MemberAdded",
                    f"{body.email} added as {body.role} by {who.email}",
                )
            return {"email": body.email.strip().lower(), "role": body.role, "org": org["name"]}

        return await run_in_threadpool(run)

    # -- nodes (agent side) -------------------------------------------------------------------

    @app.post("/v1/nodes/register", status_code=201, tags=["nodes"])
    async def register_node(body: RegisterNodeBody) -> dict[str, Any]:
        """An agent joins with the cluster's join token and gets node credentials."""

        def run() -> dict[str, Any]:
            from cove import security

            expected = store.setting("join_token_hash")
            if expected is None or security.hash_token(body.join_token) != expected:
                raise errors.Unauthenticated(
                    "the join token is not valid",
                    hint="`cove up` prints the path of the join token",
                )
            status = {
                "capacity": body.capacity,
                "allocatable": body.capacity,
                "driver": body.driver,
                "driver_detail": body.driver_detail,
                "accel": body.accel,
                "version": body.version,
                "last_heartbeat": None,
            }
            with store.write() as tx:
                node = tx.find("node", None, body.name)
                status["network"] = _node_network(tx, body)
                if node is None:
                    node = tx.create(
                        "node",
                        body.name,
                        spec={"cordoned": False, "region": body.region},
                        labels=body.labels,
                        status=status,
                    )
                    tx.event(
                        node, "Normal", "Registered", f"node {body.name} joined ({body.driver})"
                    )
                else:
                    node = tx.update(
                        node["id"], labels=body.labels, status=dict(node["status"], **status)
                    )
                    tx.event(
                        node, "Normal", "Reregistered", f"node {body.name} rejoined ({body.driver})"
                    )
                auth.revoke_node_tokens(tx, node["id"])  # a rejoin replaces the old credentials
                token, _ = auth.issue_token(tx, "node", name=body.name, node_id=node["id"])
            api.node_tokens.forget(node["id"])
            return {"node": node, "token": token, "network": status["network"]}

        return await run_in_threadpool(run)

    # Heartbeats (and their token check) have threads of their own: when the shared pool is
    # full of requests queued for the store's write lock, a heartbeat waiting there comes
    # late, the node turns NodeLost and its instances are evicted - more work on a server
    # that is already behind (500 nodes, 10,000 instances). A heartbeat is two short reads
    # and one small upsert: a few threads keep up with 100 a second.
    beats = CapacityLimiter(4)

    async def beating_node(
        authorization: Annotated[str | None, Header()] = None,
    ) -> auth.Principal:
        return await to_thread.run_sync(api.principal, authorization, limiter=beats)

    @app.post("/v1/nodes/{node_id}/heartbeat", tags=["nodes"])
    async def heartbeat(
        node_id: str,
        body: HeartbeatBody,
        who: Annotated[auth.Principal, Depends(beating_node)],
    ) -> dict[str, Any]:
        """The agent is alive. Recorded in the node's liveness row only (no revision, no
        wake-up); what it reports about the node (capacity, driver) is written to the
        node's status, as a revisioned write, only when it differs from what is there."""

        def changes(status: dict[str, Any]) -> dict[str, Any]:
            reported: dict[str, Any] = {
                "capacity": body.capacity or None,
                "allocatable": body.allocatable or None,
                "driver": body.driver,
                "driver_detail": body.driver_detail,
            }
            return {k: v for k, v in reported.items() if v is not None and status.get(k) != v}

        def run() -> dict[str, Any]:
            if who.kind != "node" or who.node_id != node_id:
                raise errors.Forbidden("only the node itself sends its heartbeat")
            row = store.get_row(node_id)
            if row is None or row["kind"] != "node":
                raise errors.NotFound(f"no node {node_id}")
            store.heartbeat(node_id)
            revision = int(row["revision"])
            if changes(row["status"] or {}):  # rare: the node itself changed
                with store.write() as tx:
                    node = tx.get(node_id, for_update=True)
                    if node is None:
                        raise errors.NotFound(f"no node {node_id}")
                    node = tx.update(
                        node_id, status=dict(node["status"], **changes(node["status"]))
                    )
                revision = node["metadata"]["revision"]
            return {"node": node_id, "revision": revision}

        return await to_thread.run_sync(run, limiter=beats)

    # -- events stream ------------------------------------------------------------------------

    @app.get("/v1/events/stream", tags=["events"])
    async def event_stream(
        request: Request,
        who: Who,
        since: Annotated[int, Query(ge=0)] = 0,
        follow: Annotated[bool, Query()] = True,
        for_: Annotated[str | None, Query(alias="for", max_length=120)] = None,
        org: OrgQ = None,
        project: ProjectQ = None,
        app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
        env: EnvQ = None,
        timeout: Annotated[str | None, Query(max_length=16)] = None,
    ) -> StreamingResponse:
        """Events after revision `since` as NDJSON, one event per line; with `follow`
        the stream stays open (blank keep-alive lines every 15 s)."""
        object_id, ctx = await run_in_threadpool(
            _event_filter, api, who, for_, org, project, app_, env
        )
        limit_s = parse_duration(timeout, 3600.0)

        async def gen() -> AsyncIterator[bytes]:
            cursor = since
            deadline = time.monotonic() + limit_s
            last_sent = time.monotonic()
            while True:
                batch = await run_in_threadpool(
                    store.events,
                    who.scope(),
                    since=cursor,
                    object_id=object_id,
                    ancestors=ctx.ancestors(),
                    limit=500,
                )
                for ev in batch:
                    cursor = ev["metadata"]["revision"]
                    yield (json.dumps(ev) + "\n").encode()
                    last_sent = time.monotonic()
                if batch and len(batch) == 500:
                    continue
                if not follow or time.monotonic() > deadline or await request.is_disconnected():
                    return
                await notifier.wait(max(cursor, notifier.revision), 1.0)
                if time.monotonic() - last_sent > 15:
                    yield b"\n"
                    last_sent = time.monotonic()

        return StreamingResponse(gen(), media_type="application/x-ndjson")

    # -- status -------------------------------------------------------------------------------

    @app.get("/v1/status", tags=["status"])
    async def status(
        who: User,
        org: OrgQ = None,
        project: ProjectQ = None,
        app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
        env: EnvQ = None,
    ) -> dict[str, Any]:
        """Desired vs current for a project, an app, or one environment."""
        return await run_in_threadpool(_status, api, who, org, project, app_, env)

    # -- generic per-kind routes ----------------------------------------------------------------

    deploys.register(app, api, master_key or MasterKey.ephemeral(), pools)
    edge_routes.register(app, api, pools)
    billing.register(app, api, api.prices)
    exec_relay.register(app, api)

    async def console_user(token: str) -> console.ConsoleUser:
        who: auth.Principal = await run_in_threadpool(api.principal, f"Bearer {token}")
        api.require_user(who)
        return console.ConsoleUser(user_id=who.user_id or "", email=who.email or "")

    console.register(app, console_user, console.config_from_env(api_url))
    for kind in KINDS:
        _register_kind(app, api, kind, principal, user, accepted)

    # deferred routes: anything a user reaches for there is explained
    for d in deferred.REGISTRY:
        for route in d.api_routes:
            _register_deferred_route(app, route, d)

    _ = (Body, Response, sync)
    return app


def _register_deferred_route(app: FastAPI, route: str, d: deferred.Deferred) -> None:
    async def not_in_v1(request: Request) -> JSONResponse:
        return problems.problem_response(d.error(f"{request.method} {request.url.path}"))

    app.add_api_route(  # every method: whatever a user tries there, they get the why
        route,
        not_in_v1,
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        tags=["deferred"],
        include_in_schema=False,
    )


def _revoke(store: Store, token_id: str) -> None:
    import sqlalchemy as sa

    from cove.model.resource import now_iso
    from cove.store import schema as t

    with store.write() as tx:
        tx.conn.execute(
            sa.update(t.tokens)
            .where(t.tokens.c.id == token_id, t.tokens.c.revoked_at.is_(None))
            .values(revoked_at=now_iso())
        )


def _list_tokens(
    store: Store, who: auth.Principal, include_revoked: bool = False
) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from cove.store import schema as t

    q = sa.select(t.tokens).where(t.tokens.c.user_id == who.user_id)
    if not include_revoked:
        q = q.where(t.tokens.c.revoked_at.is_(None))
    if who.token_kind == "api":
        q = q.where(t.tokens.c.org_id.in_(sorted(who.org_ids)))
    with store.read() as conn:
        rows = list(conn.execute(q.order_by(t.tokens.c.id)).mappings())
    return [auth.token_view(r) for r in rows]


def _node_network(tx: Any, body: RegisterNodeBody) -> dict[str, Any] | None:
    """The registering node's instance subnets: what it proposes unless another node has
    them (then free ones, or a Conflict when the operator fixed them), and its address."""
    if body.network is None:
        return None
    import cove.net.subnets as subnets

    proposed = subnets.parse(body.network.ipv4, body.network.ipv6)
    others = endpoints.node_networks(tx.conn, exclude=body.name)
    got = subnets.assign(proposed, others, fixed=body.network.fixed)
    return {**got.as_dict(), "address": body.network.address}


def _members(store: Store, org_id: str) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from cove.store import schema as t

    with store.read() as conn:
        rows = conn.execute(
            sa.select(
                t.memberships.c.user_id,
                t.users.c.email,
                t.memberships.c.role,
                t.memberships.c.created_at,
            )
            .join(t.users, t.users.c.id == t.memberships.c.user_id)
            .where(t.memberships.c.org_id == org_id)
            .order_by(t.users.c.email)
        ).all()
    return [{"user_id": r[0], "email": r[1], "role": r[2], "since": r[3]} for r in rows]


def _event_filter(
    api: Api,
    who: auth.Principal,
    for_: str | None,
    org: str | None,
    project: str | None,
    app: str | None,
    env: str | None,
) -> tuple[str | None, Ctx]:
    object_id = None
    if for_:
        kname, _, ref = for_.partition("/")
        k = kind_by_name(kname)  # singular, plural or alias: for=app/web, for=apps/web
        if k is None and looks_like_id(for_):
            k = kind_by_prefix(for_.split("_", 1)[0])
            ref = for_
        if k is None or not ref:
            raise errors.UserError(
                f"invalid for={for_!r}", hint="use KIND/NAME or an ID, e.g. for=app/web"
            )
        object_id = api.lookup(who, k, ref, org, project, app, env)["id"]
        return object_id, Ctx()
    return None, api.context(who, org, project, app, env)


def _check_environment_change(tx: Any, cur: dict[str, Any], spec: dict[str, Any]) -> None:
    """What a PATCH may change on an environment: the scale of the release's workloads.
    The release itself moves only through deploys and rollbacks, which check it."""
    if spec.get("release") != cur["spec"].get("release"):
        raise errors.UserError(
            "an environment's release changes only through a deploy or a rollback",
            hint="cove deploy, or cove rollback vN",
            code="release_readonly",
        )
    rel = tx.get(cur["spec"]["release"]) if cur["spec"].get("release") else None
    templates = rel["spec"]["workloads"] if rel else {}
    for name, count in (spec.get("scale") or {}).items():
        if (cur["spec"].get("scale") or {}).get(name) == count:
            continue
        if name not in templates:
            known = ", ".join(sorted(templates)) or "none: nothing is deployed yet"
            raise errors.UserError(
                f"no workload {name!r} in the current release (workloads: {known})",
                hint="scale a workload the deployed release has",
                code="unknown_workload",
            )
        if count > 100:
            raise errors.UserError(f"at most 100 instances of {name}", code="too_many")
        if templates[name].get("mounts") and count > 1:
            raise errors.UserError(
                f"workload {name} mounts a volume, so it runs at most one instance",
                hint=f"cove scale {name}=1 (or 0)",
                code="volume_bound",
            )
    if rel is not None and spec.get("scale") != cur["spec"].get("scale"):
        project_id = deploys.env_project(tx, cur)
        after = (cur["id"], templates, dict(spec.get("scale") or {}))
        quotas.check(
            tx,
            project_id,
            quotas.project_use(tx, project_id),
            quotas.project_use(tx, project_id, env_override=after),
            f"scaling {cur['name']}",
        )


def _release_name(store: Store, rel_id: str | None) -> str | None:
    row = store.get_row(rel_id) if rel_id else None
    return None if row is None else str(row["name"])


def _status(
    api: Api,
    who: auth.Principal,
    org: str | None,
    project: str | None,
    app: str | None,
    env: str | None,
) -> dict[str, Any]:
    ctx = api.context(who, org, project, app, env, need="project")
    scope = who.scope()
    store = api.store
    assert ctx.project is not None
    apps = (
        [ctx.app]
        if ctx.app
        else store.list("app", scope, parent_id=ctx.project["id"], limit=1000)[0]
    )
    out_apps = []
    for a in apps:
        assert a is not None
        envs = (
            [ctx.env]
            if ctx.env
            else store.list("environment", scope, parent_id=a["id"], limit=100)[0]
        )
        out_envs = []
        for e in envs:
            assert e is not None
            wls = store.list("workload", scope, parent_id=e["id"], limit=1000)[0]
            ready = get_condition(e["status"], "Ready")
            out_envs.append(
                {
                    "environment": service.ref(e),
                    "desired": {
                        "release": e["spec"].get("release"),
                        "release_name": _release_name(store, e["spec"].get("release")),
                        "scale": e["spec"].get("scale", {}),
                    },
                    "current": {
                        "release": e["status"].get("release"),
                        "release_name": e["status"].get("release_name"),
                        "workloads": {
                            w["name"]: {
                                "desired": w["spec"].get("count", 0),
                                "running": w["status"].get("running", 0),
                                "ready": w["status"].get("ready", 0),
                            }
                            for w in wls
                        },
                    },
                    "generation": e["metadata"]["generation"],
                    "observed_generation": e["status"].get("observed_generation"),
                    "caught_up": is_caught_up(e),
                    "ready": ready,
                }
            )
        out_apps.append({"app": service.ref(a), "environments": out_envs})
    return {
        "org": service.ref(ctx.org) if ctx.org else None,
        "project": service.ref(ctx.project),
        "apps": out_apps,
        "revision": store.head_revision(),
    }


def _with_cost(api: Api, res: dict[str, Any]) -> dict[str, Any]:
    """An instance, volume or endpoint with ``status.cost``: what it costs per month, computed
    on read at today's prices (list and describe show the same)."""
    cost = billing.monthly_cost(api.prices, res)
    if cost is not None:
        res["status"] = dict(res["status"], cost=cost)
    return res


def _register_kind(
    app: FastAPI,
    api: Api,
    kind: Kind,
    principal: Callable[..., Any],
    user: Callable[..., Any],
    accepted: Callable[[dict[str, Any]], JSONResponse],
) -> None:
    store = api.store
    base = f"/v1/{kind.plural}"
    tag = kind.plural
    Who = Annotated[auth.Principal, Depends(principal)]
    User = Annotated[auth.Principal, Depends(user)]
    Q64 = Annotated[str | None, Query(max_length=64)]

    @app.get(
        base,
        response_model=Page,
        tags=[tag],
        name=f"list_{kind.plural}",
        summary=f"List {kind.plural}",
        description=f"List {kind.plural}: {kind.summary}.",
    )
    async def list_(
        who: Who,
        org: Q64 = None,
        project: Q64 = None,
        app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
        env: Q64 = None,
        parent: Q64 = None,
        name: Q64 = None,
        label: Annotated[list[str] | None, Query(max_length=20, description="key=value")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Q64 = None,
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            labels: dict[str, str] = {}
            for item in label or []:
                k_, sep, v = item.partition("=")
                if not sep or not k_:
                    raise errors.UserError(
                        f"invalid label filter {item!r}", hint="use label=key=value"
                    )
                labels[k_] = v
            scope = who.scope()
            rev = store.head_revision()
            if kind.name == "event":
                ctx = api.context(who, org, project, app_, env)
                evs = store.events(
                    scope,
                    since=int(after.split(":")[-1]) if after and after.isdigit() else 0,
                    object_id=parent,
                    ancestors=ctx.ancestors(),
                    limit=limit + 1,
                )
                nxt = str(evs[limit - 1]["metadata"]["revision"]) if len(evs) > limit else None
                return {"items": evs[:limit], "next": nxt, "revision": rev}
            ctx = api.context(who, org, project, app_, env) if kind.scope == "org" else Ctx()
            if kind.name == "org" and not (org or project or app_ or env):
                ctx = Ctx()
            items, nxt = store.list(
                kind.name,
                scope,
                parent_id=parent,
                ancestors=ctx.ancestors(),
                name=name,
                labels=labels,
                after=after,
                limit=limit,
            )
            return {"items": [_with_cost(api, i) for i in items], "next": nxt, "revision": rev}

        return await run_in_threadpool(run)

    @app.get(
        base + "/{ref}",
        response_model=Resource,
        tags=[tag],
        name=f"describe_{kind.name}",
        summary=f"Describe a {kind.title}",
    )
    async def describe(
        ref: Annotated[str, PathParam(max_length=64)],
        who: Who,
        org: Q64 = None,
        project: Q64 = None,
        app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
        env: Q64 = None,
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            if kind.name == "event":
                if not looks_like_id(ref):
                    raise errors.NotFound(f"events are looked up by ID, not name ({ref!r})")
                return store.event(ref, who.scope())
            return _with_cost(api, api.lookup(who, kind, ref, org, project, app_, env))

        return await run_in_threadpool(run)

    @app.get(
        base + "/{ref}/events",
        response_model=Page,
        tags=[tag],
        name=f"events_{kind.name}",
        summary=f"Events about a {kind.title}",
    )
    async def events(
        ref: Annotated[str, PathParam(max_length=64)],
        who: Who,
        org: Q64 = None,
        project: Q64 = None,
        app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
        env: Q64 = None,
        since: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            if kind.name == "event":
                store.event(ref, who.scope()) if looks_like_id(ref) else None
                if not looks_like_id(ref):
                    raise errors.NotFound(f"events are looked up by ID, not name ({ref!r})")
                return {"items": [], "next": None, "revision": store.head_revision()}
            res = api.lookup(who, kind, ref, org, project, app_, env)
            evs = store.events(who.scope(), since=since, object_id=res["id"], limit=limit + 1)
            nxt = str(evs[limit - 1]["metadata"]["revision"]) if len(evs) > limit else None
            return {"items": evs[:limit], "next": nxt, "revision": store.head_revision()}

        return await run_in_threadpool(run)

    @app.get(
        base + "/{ref}/wait",
        response_model=Resource | None,
        tags=[tag],
        name=f"wait_{kind.name}",
        summary=f"Wait for a {kind.title} to reach a condition",
        responses={408: {"description": "timed out"}, 409: {"description": "failed for good"}},
    )
    async def wait(
        ref: Annotated[str, PathParam(max_length=64)],
        who: Who,
        for_: Annotated[str, Query(alias="for", max_length=80, description=WAIT_HELP)] = "ready",
        timeout: Annotated[
            str | None, Query(max_length=16, description="e.g. 30s, 5m (max 10m)")
        ] = None,
        org: Q64 = None,
        project: Q64 = None,
        app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
        env: Q64 = None,
    ) -> Any:
        if kind.name == "event":
            raise errors.UserError("events have no conditions to wait for")
        limit_s = parse_duration(timeout, 60.0)
        if limit_s > MAX_WAIT:
            raise errors.UserError(
                f"timeout is at most {int(MAX_WAIT)}s", hint="wait again after it"
            )
        evaluate(
            {"kind": kind.name, "status": {}, "metadata": {}}, for_
        ) if for_ != "deleted" else None
        try:
            res = await run_in_threadpool(api.lookup, who, kind, ref, org, project, app_, env)
        except errors.NotFound:
            if for_ == "deleted":  # already gone: the wait is over (absent and not yours
                return None  # answer alike, so this tells nothing about other orgs)
            raise
        rid = res["id"]
        deadline = time.monotonic() + limit_s
        scope = who.scope()

        def fetch() -> dict[str, Any] | None:
            try:
                return store.get(rid, scope)
            except errors.NotFound:
                return None

        while True:
            ok, failure = evaluate(res, for_)
            if ok:
                return res
            if failure:
                raise errors.WaitFailed(
                    f"{kind.title} {res['name'] if res else rid} will not become {for_}: {failure}",
                    hint=f"`cove {kind.plural} events {rid}` shows what happened",
                    extra={"resource": res},
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.WaitTimeout(
                    f"{kind.title} {rid} did not become {for_} within {limit_s:g}s",
                    hint=f"wait longer, or see `cove {kind.plural} events {rid}`",
                    extra={"resource": res},
                )
            before = res["metadata"]["revision"] if res else 0
            await api.notifier.wait(max(before, api.notifier.revision), min(remaining, 1.0))
            res = await run_in_threadpool(fetch)  # type: ignore[arg-type]

    if kind.creatable:
        CreateBody = _create_model(kind)

        @app.post(
            base,
            status_code=202,
            response_model=Receipt,
            tags=[tag],
            name=f"create_{kind.name}",
            summary=f"Create a {kind.title}",
        )
        async def create(body: CreateBody, who: User) -> JSONResponse:  # type: ignore[valid-type]
            data: dict[str, Any] = body.model_dump()  # type: ignore[attr-defined]

            def run() -> dict[str, Any]:
                parent_id = None
                if kind.name == "org":
                    if who.token_kind == "api":
                        raise errors.Forbidden(
                            "an org-scoped API token can't create orgs",
                            hint="sign in with `cove auth login`",
                        )
                else:
                    need = {"org": "org", "project": "project", "app": "app", "environment": "env"}[
                        kind.parents[0]
                    ]
                    ctx = api.context(
                        who, data["org"], data["project"], data["app"], data["env"], need=need
                    )
                    parent = getattr(ctx, need)
                    assert parent is not None
                    if parent["metadata"]["deleting"]:
                        raise errors.Conflict(f"{parent['kind']} {parent['name']} is being deleted")
                    parent_id = parent["id"]
                spec = kind.spec_model.model_validate(data["spec"]).model_dump(mode="json")
                with store.write() as tx:
                    if kind.name == "volume":
                        assert ctx.project is not None
                        pid = ctx.project["id"]
                        quotas.check(
                            tx,
                            pid,
                            quotas.project_use(tx, pid),
                            quotas.project_use(tx, pid, extra_volume_gb=int(spec["size_gb"])),
                            f"volume {data['name']} ({spec['size_gb']} GB)",
                        )
                    rec = service.create_resource(
                        tx,
                        who,
                        kind.name,
                        data["name"],
                        parent=parent_id,
                        spec=spec,
                        labels=data["labels"],
                    )
                    if kind.name == "org":
                        auth.add_member(tx, who.user_id or "", rec["resource"]["id"], "owner")
                    elif kind.name == "endpoint":
                        assert parent_id is not None
                        ep = tx.get(rec["resource"]["id"])
                        assert ep is not None
                        endpoints.on_write(
                            tx, api.pools, ep, endpoints.release_templates(tx, parent_id)
                        )
                return rec

            return accepted(await run_in_threadpool(run))

    if kind.mutable:
        UpdateBody = _update_model(kind)

        @app.patch(
            base + "/{ref}",
            status_code=202,
            response_model=Receipt,
            tags=[tag],
            name=f"update_{kind.name}",
            summary=f"Change a {kind.title} (compare-and-swap)",
        )
        async def update(
            ref: Annotated[str, PathParam(max_length=64)],
            body: UpdateBody,  # type: ignore[valid-type]
            who: User,
            if_match: Annotated[str | None, Header(max_length=32)] = None,
            org: Q64 = None,
            project: Q64 = None,
            app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
            env: Q64 = None,
        ) -> JSONResponse:
            data: dict[str, Any] = body.model_dump(exclude_unset=True)  # type: ignore[attr-defined]

            def run() -> dict[str, Any]:
                res = api.lookup(who, kind, ref, org, project, app_, env)
                org_id = _org_id(store, res)
                api.require_member(who, org_id, owner=kind.name == "org")
                if kind.scope == "cluster" and not (who.operator and who.token_kind == "session"):
                    raise errors.Forbidden(
                        f"only the cluster operator can change {kind.plural}",
                        hint="the operator is the first account signed up on this cluster",
                    )
                expected = data.get("revision")
                if if_match is not None:
                    try:
                        expected = int(if_match.strip('"'))
                    except ValueError as exc:
                        raise errors.UserError("If-Match must be a revision number") from exc
                with store.write() as tx:
                    # merge onto the row as it is inside the write transaction, and write
                    # only if it is still that row: a concurrent change is never reverted
                    cur = tx.get(res["id"], for_update=True)
                    if cur is None:
                        raise errors.NotFound(f"no {kind.title} {ref}")
                    spec = None
                    if data.get("spec") is not None:
                        merged = dict(cur["spec"], **data["spec"])
                        try:
                            checked = kind.spec_model.model_validate(merged)
                        except ValidationError as exc:  # as if the body itself were wrong
                            raise RequestValidationError(
                                [dict(e, loc=("body", "spec", *e["loc"])) for e in exc.errors()]
                            ) from exc
                        spec = checked.model_dump(mode="json")
                        if kind.name == "environment":
                            _check_environment_change(tx, cur, spec)
                    rec = service.update_resource(
                        tx,
                        who,
                        cur,
                        spec=spec,
                        labels=data.get("labels"),
                        expected_revision=(
                            expected if expected is not None else cur["metadata"]["revision"]
                        ),
                    )
                    if kind.name == "endpoint" and spec is not None:
                        ep = tx.get(cur["id"])
                        assert ep is not None and cur["parent"] is not None
                        templates = endpoints.release_templates(tx, cur["parent"]["id"])
                        endpoints.on_write(tx, api.pools, ep, templates)
                    return rec

            return accepted(await run_in_threadpool(run))

    if kind.deletable:

        @app.delete(
            base + "/{ref}",
            status_code=202,
            response_model=Receipt,
            tags=[tag],
            name=f"delete_{kind.name}",
            summary=f"Delete a {kind.title} and everything in it",
        )
        async def delete(
            ref: Annotated[str, PathParam(max_length=64)],
            who: User,
            org: Q64 = None,
            project: Q64 = None,
            app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
            env: Q64 = None,
            if_match: Annotated[str | None, Header(max_length=32)] = None,
        ) -> JSONResponse:
            def run() -> dict[str, Any]:
                res = api.lookup(who, kind, ref, org, project, app_, env)
                api.require_member(who, _org_id(store, res), owner=kind.name in ("org", "project"))
                expected = None
                if if_match is not None:
                    try:
                        expected = int(if_match.strip('"'))
                    except ValueError as exc:
                        raise errors.UserError("If-Match must be a revision number") from exc
                with store.write() as tx:
                    cur = tx.get(res["id"], for_update=True)
                    if cur is None:
                        raise errors.NotFound(f"no {kind.title} {ref}")
                    return service.delete_resource(tx, who, cur, expected_revision=expected)

            return accepted(await run_in_threadpool(run))
