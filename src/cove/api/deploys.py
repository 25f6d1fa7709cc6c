"""Deploys, rollbacks, scale, secrets, registry credentials, logs, and the node agent's side
of instances (assignments, status, events, logs, secrets).

A deploy pins the image to a digest here, at deploy time, and writes an immutable release;
the rollout controller takes it from there. A rollback writes a new release whose contents
are a prior release's (image digest, workloads, variables *and* secrets version), so history
stays linear.
"""

import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import sqlalchemy as sa
from anyio import CapacityLimiter, to_thread
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import cove.control.endpoints as endpoints
from cove import errors
from cove.api import auth, service
from cove.api.batch import WriteBatcher
from cove.api.views import NodeView
from cove.model.resource import now_iso, set_condition
from cove.model.specs import NAME_RE, EndpointSpec
from cove.model.workload import ENV_KEY_RE, WorkloadTemplate
from cove.net.pools import Pools
from cove.store import Store, Tx, quotas
from cove.store import schema as t
from cove.store.crypto import MasterKey, Sealed

LOG_LINES_KEPT = 5000  # per instance; older lines are dropped
MAX_LOG_LINE = 16 * 1024

Q64 = Annotated[str | None, Query(max_length=64)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Scoped(_Body):
    org: str | None = Field(default=None, max_length=64)
    project: str | None = Field(default=None, max_length=64)
    app: str | None = Field(default=None, max_length=64)
    env: str | None = Field(default=None, max_length=64)


class DeployBody(_Scoped):
    image: str = Field(min_length=1, max_length=512, description="registry, oci:, oci-archive:…")
    workloads: dict[Annotated[str, Field(pattern=NAME_RE.pattern)], WorkloadTemplate] = Field(
        min_length=1, max_length=16
    )
    variables: dict[str, Annotated[str, Field(max_length=32768)]] = Field(
        default_factory=dict, description="environment variables for every workload"
    )
    description: str = Field(default="", max_length=500)
    endpoints: dict[Annotated[str, Field(pattern=NAME_RE.pattern)], EndpointSpec] = Field(
        default_factory=dict,
        max_length=16,
        description="endpoints from cove.toml: created or changed with the release, never "
        "destroyed by a deploy",
    )
    region: str | None = Field(
        default=None,
        max_length=40,
        pattern=r"^([a-z0-9][a-z0-9-]*)?$",
        description="pin the environment to this region (one region, chosen explicitly; "
        "'' unpins); left out: the pin stays as it is",
    )


class RollbackBody(_Scoped):
    to: str | None = Field(
        default=None, max_length=64, description="v3 or rel_…; default: the release before"
    )


class SecretsBody(_Scoped):
    set: dict[str, Annotated[str, Field(max_length=65536)]] = Field(default_factory=dict)
    unset: list[str] = Field(default_factory=list, max_length=256)


class RegistryBody(_Body):
    org: str | None = Field(default=None, max_length=64)
    host: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.\-]+(:\d{1,5})?$")
    username: str = Field(min_length=1, max_length=255)
    password: str = Field(min_length=1, max_length=4096)


class InstanceStatusBody(_Body):
    state: str = Field(
        pattern=r"^(placed|preparing|starting|running|stopping|stopped|destroyed|failed|backoff)$"
    )
    health: str = Field(default="unknown", pattern=r"^(unknown|passing|failing)$")
    ready: bool = False
    message: str = Field(default="", max_length=2000)
    restart_count: int = Field(default=0, ge=0)
    last_exit_code: int | None = None
    last_termination_reason: str | None = Field(default=None, max_length=32)
    addresses: dict[str, str] = Field(default_factory=dict)
    driver: str | None = Field(default=None, max_length=40)
    accel: str | None = Field(default=None, pattern=r"^(kvm|tcg)$")
    started_at: str | None = Field(default=None, max_length=40)


class EventBody(_Body):
    type: str = Field(pattern=r"^(Normal|Warning)$")
    reason: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9]*$")
    message: str = Field(default="", max_length=4000)


class NodeEventBody(EventBody):
    instance: str = Field(min_length=1, max_length=64)


InstanceId = Annotated[str, Field(min_length=1, max_length=64)]


class NodeReportsBody(_Body):
    statuses: dict[InstanceId, InstanceStatusBody] = Field(default_factory=dict, max_length=500)
    events: list[NodeEventBody] = Field(default_factory=list, max_length=500)


class LogLineBody(_Body):
    seq: int = Field(ge=0)
    ts: str = Field(max_length=40)
    stream: str = Field(pattern=r"^(stdout|stderr)$")
    line: str


class LogBatch(_Body):
    lines: list[LogLineBody] = Field(max_length=5000)


def node_instance(tx: Tx, node_id: str, iid: str, *, lock: bool) -> dict[str, Any] | None:
    """Instance *iid* if it is on node *node_id* (read in the caller's transaction)."""
    ins = tx.get(iid, for_update=lock)
    if ins is None or ins["kind"] != "instance" or ins["spec"].get("node") != node_id:
        return None
    return ins


def own_instance_of(store: Store, who: auth.Principal, ins_id: str) -> dict[str, Any]:
    """Instance *ins_id* if it is on the calling node; 404 otherwise."""
    with store.read() as conn:
        ins = node_instance(Tx(conn), who.require_node(), ins_id, lock=False)
    if ins is None:
        raise errors.NotFound(f"no instance {ins_id} on this node")
    return ins


def register(app: FastAPI, api: Any, master: MasterKey, pools: Pools) -> None:
    """Add the deploy routes to *app* (``api`` is the ``cove.api.app.Api``)."""
    store = api.store

    async def principal(authorization: Annotated[str | None, Header()] = None) -> auth.Principal:
        p: auth.Principal = await run_in_threadpool(api.principal, authorization)
        return p

    Who = Annotated[auth.Principal, Depends(principal)]

    def user_only(who: auth.Principal) -> None:
        api.require_user(who)

    def env_ctx(who: auth.Principal, b: _Scoped) -> Any:
        ctx = api.context(who, b.org, b.project, b.app, b.env, need="env")
        if ctx.env["metadata"]["deleting"]:
            raise errors.Conflict(f"environment {ctx.env['name']} is being deleted")
        return ctx

    def accepted(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse(body, status_code=202, headers={"Location": body["links"]["operation"]})

    # -- deploy ---------------------------------------------------------------------------

    @app.post("/v1/deploys", status_code=202, tags=["deploys"], summary="Deploy an image")
    async def deploy(body: DeployBody, who: Who) -> JSONResponse:
        """Resolve the image to a digest, write release vN and start the rollout."""
        user_only(who)
        for key in body.variables:
            if not ENV_KEY_RE.match(key):
                raise errors.UserError(f"invalid variable name {key!r}", hint="A-Z, 0-9 and _")
        ctx = await run_in_threadpool(env_ctx, who, body)
        from cove import image as image_mod

        ref = image_mod.parse_ref(body.image)
        if ref.is_local and os.environ.get("COVE_LOCAL_IMAGES") != "1":
            raise errors.UserError(
                f"local image references ({ref.transport}:) are off on this server: they "
                "read paths on the server's own disk",
                hint="push the image to a registry; `cove up` (one machine) turns them on",
                code="local_images_off",
            )
        creds = await run_in_threadpool(registry_creds, ctx.org["id"], ref.registry)
        resolved = await image_mod.resolve(
            ref, creds=creds, tls_verify=not image_mod.on_loopback(ref.registry), timeout=60.0
        )

        def run() -> dict[str, Any]:
            with store.write() as tx:
                env = tx.get(ctx.env["id"], for_update=True)
                assert env is not None
                for wname, tmpl in body.workloads.items():
                    for m in tmpl.mounts:
                        vol = tx.find("volume", env["id"], m.volume)
                        if vol is None or vol["metadata"]["deleting"]:
                            raise errors.UserError(
                                f"workload {wname} mounts volume {m.volume}, which does not "
                                f"exist in environment {env['name']}",
                                hint=f"create it first: cove volumes create {m.volume} --size 1GB",
                                code="volume_missing",
                            )
                if body.region is not None and body.region != (env["spec"].get("region") or ""):
                    env = _pin_region(tx, env, body.region)
                bundle = _bundle(tx, env)
                spec = {
                    "image": body.image,
                    "source": resolved.source_ref(),
                    "digest": resolved.digest,
                    "workloads": {k: v.model_dump(mode="json") for k, v in body.workloads.items()},
                    "variables": body.variables,
                    "secrets": _secrets_ref(bundle),
                    "reason": "deploy",
                    "description": body.description,
                }
                rec = _release(tx, who, env, spec, scale_from_templates=True)
                templates = dict(body.workloads)
                for name, ep_spec in body.endpoints.items():
                    _declare_endpoint(
                        tx, who, env, name, ep_spec.model_dump(mode="json"), templates
                    )
                return rec

        return accepted(await run_in_threadpool(run))

    def _declare_endpoint(
        tx: Tx,
        who: auth.Principal,
        env: dict[str, Any],
        name: str,
        spec: dict[str, Any],
        templates: dict[str, Any],
    ) -> None:
        """An endpoint as cove.toml declares it: created, or changed when it differs."""
        endpoints.check_workloads(spec, templates)
        cur = tx.find("endpoint", env["id"], name)
        if cur is not None and cur["metadata"]["deleting"]:
            raise errors.Conflict(
                f"endpoint {name} is being destroyed", hint="deploy again once it is gone"
            )
        if cur is None:
            rec = service.create_resource(
                tx, who, "endpoint", name, parent=env["id"], spec=spec, labels={}
            )
        elif cur["spec"] != spec:
            rec = service.update_resource(
                tx, who, cur, spec=spec, labels=None, expected_revision=None
            )
        else:
            return
        ep = tx.get(rec["resource"]["id"])
        assert ep is not None
        endpoints.on_write(tx, pools, ep, templates)

    @app.post("/v1/rollbacks", status_code=202, tags=["deploys"], summary="Roll back")
    async def rollback(body: RollbackBody, who: Who) -> JSONResponse:
        """A new release with a prior release's contents: image digest, workloads,
        variables and secrets version."""
        user_only(who)

        def run() -> dict[str, Any]:
            ctx = env_ctx(who, body)
            with store.write() as tx:
                env = tx.get(ctx.env["id"], for_update=True)
                assert env is not None
                releases = sorted(
                    tx.children(env["id"], kinds=("release",)),
                    key=lambda r: int(r["spec"]["number"]),
                )
                if not releases:
                    raise errors.UserError("nothing to roll back: no release yet")
                current = next((r for r in releases if r["id"] == env["spec"].get("release")), None)
                if body.to is None:
                    older = [
                        r
                        for r in releases
                        if current is None or int(r["spec"]["number"]) < current["spec"]["number"]
                    ]
                    # the newest release before the current one that ever became active
                    good = [r for r in older if r["status"].get("ever_active")]
                    pick = (good or older or [None])[-1]
                else:
                    pick = next((r for r in releases if body.to in (r["id"], r["name"])), None)
                    if pick is None:
                        raise errors.NotFound(
                            f"no release {body.to} in environment {env['name']}",
                            hint="`cove releases list` shows them",
                        )
                if pick is None:
                    raise errors.UserError(
                        "nothing to roll back to: there is no earlier release",
                        hint="pass a release: cove rollback v1",
                    )
                spec = {k: v for k, v in pick["spec"].items() if k not in ("number",)}
                spec.update(reason="rollback", rolled_back_to=pick["name"], description="")
                return _release(tx, who, env, spec, scale_from_templates=False)

        return accepted(await run_in_threadpool(run))

    # -- secrets -------------------------------------------------------------------------------

    @app.post(
        "/v1/environments/{ref}/secrets",
        status_code=202,
        tags=["secrets"],
        summary="Set or unset secrets (a new bundle version and a new release)",
    )
    async def set_secrets(ref: str, body: SecretsBody, who: Who) -> JSONResponse:
        user_only(who)
        for key in [*body.set, *body.unset]:
            if not ENV_KEY_RE.match(key):
                raise errors.UserError(
                    f"invalid secret name {key!r}", hint="letters, digits and _, not first a digit"
                )
        if not body.set and not body.unset:
            raise errors.UserError("nothing to change", hint="KEY=VALUE to set, or unset KEY")
        both = set(body.set) & set(body.unset)
        if both:
            raise errors.UserError(f"{sorted(both)} both set and unset")

        def run() -> dict[str, Any]:
            ctx = env_ctx(who, _Scoped(org=body.org, project=body.project, app=body.app, env=ref))
            with store.write() as tx:
                env = tx.get(ctx.env["id"], for_update=True)
                assert env is not None
                bundle = _bundle(tx, env, create=True)
                assert bundle is not None
                values = _open_values(tx, bundle)
                missing = [k for k in body.unset if k not in values]
                if missing:
                    raise errors.NotFound(f"no secret named {', '.join(missing)}")
                values.update(body.set)
                for k in body.unset:
                    values.pop(k, None)
                version = int(bundle["spec"].get("version", 0)) + 1
                sealed = master.seal(
                    json.dumps(values).encode(), f"{bundle['id']}:{version}".encode()
                )
                tx.conn.execute(
                    sa.insert(t.secret_versions).values(
                        bundle_id=bundle["id"],
                        version=version,
                        wrapped_key=sealed.wrapped_key,
                        nonce=sealed.nonce,
                        ciphertext=sealed.ciphertext,
                        created_at=now_iso(),
                    )
                )
                keys = [
                    {
                        "name": k,
                        "digest": master.fingerprint(bundle["id"], k, v),
                        "version": version,
                    }
                    if k in body.set
                    else next(x for x in bundle["spec"].get("keys", []) if x["name"] == k)
                    for k, v in sorted(values.items())
                ]
                bundle = tx.update(bundle["id"], spec={"version": version, "keys": keys})
                changed = [f"set {k}" for k in sorted(body.set)] + [
                    f"unset {k}" for k in sorted(body.unset)
                ]
                tx.event(
                    bundle,
                    "Normal",
                    "SecretsChanged",
                    f"version {version}: {', '.join(changed)} by {service.actor(who, bundle)}",
                )
                current = env["spec"].get("release")
                rel = tx.get(current) if current else None
                if rel is None:  # nothing deployed: the next deploy picks the version up
                    op = service.start_operation(tx, "update", bundle, who)
                    return service.receipt(op, bundle)
                spec = {k: v for k, v in rel["spec"].items() if k != "number"}
                spec.update(reason="secrets", secrets=_secrets_ref(bundle), description="")
                return _release(tx, who, env, spec, scale_from_templates=False)

        return accepted(await run_in_threadpool(run))

    # -- registry credentials ------------------------------------------------------------------

    @app.post(
        "/v1/registries", status_code=201, tags=["registries"], summary="Store registry login"
    )
    async def registry_login(body: RegistryBody, who: Who) -> dict[str, Any]:
        """Credentials for a private registry, encrypted at rest, used at deploy and pull."""
        user_only(who)

        def run() -> dict[str, Any]:
            ctx = api.context(who, body.org, None, None, None, need="org")
            sealed = master.seal(body.password.encode(), f"{ctx.org['id']}:{body.host}".encode())
            with store.write() as tx:
                tx.conn.execute(
                    sa.delete(t.registry_credentials).where(
                        t.registry_credentials.c.org_id == ctx.org["id"],
                        t.registry_credentials.c.host == body.host,
                    )
                )
                tx.conn.execute(
                    sa.insert(t.registry_credentials).values(
                        org_id=ctx.org["id"],
                        host=body.host,
                        username=body.username,
                        wrapped_key=sealed.wrapped_key,
                        nonce=sealed.nonce,
                        ciphertext=sealed.ciphertext,
                        created_at=now_iso(),
                    )
                )
                tx.event(ctx.org, "Normal", "RegistryLogin", f"credentials stored for {body.host}")
            return {"org": ctx.org["name"], "host": body.host, "username": body.username}

        return await run_in_threadpool(run)

    @app.get("/v1/registries", tags=["registries"], summary="Registries with stored logins")
    async def registries(who: Who, org: Q64 = None) -> list[dict[str, Any]]:
        user_only(who)

        def run() -> list[dict[str, Any]]:
            ctx = api.context(who, org, None, None, None, need="org")
            with store.read() as conn:
                rows = conn.execute(
                    sa.select(
                        t.registry_credentials.c.host,
                        t.registry_credentials.c.username,
                        t.registry_credentials.c.created_at,
                    ).where(t.registry_credentials.c.org_id == ctx.org["id"])
                ).all()
            return [{"host": r[0], "username": r[1], "created_at": r[2]} for r in rows]

        return await run_in_threadpool(run)

    def registry_creds(org_id: str, host: str | None) -> tuple[str, str] | None:
        if not host:
            return None
        with store.read() as conn:
            row = (
                conn.execute(
                    sa.select(t.registry_credentials).where(
                        t.registry_credentials.c.org_id == org_id,
                        t.registry_credentials.c.host == host,
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        pw = master.open(
            Sealed(row["wrapped_key"], row["nonce"], row["ciphertext"]), f"{org_id}:{host}".encode()
        )
        return str(row["username"]), pw.decode()

    # -- logs (users) --------------------------------------------------------------------------

    @app.get("/v1/logs", tags=["logs"], summary="Instance logs, merged, as NDJSON")
    async def logs(
        request: Request,
        who: Who,
        org: Q64 = None,
        project: Q64 = None,
        app_: Annotated[str | None, Query(alias="app", max_length=64)] = None,
        env: Q64 = None,
        workload: Q64 = None,
        instance: Q64 = None,
        since: Annotated[str | None, Query(max_length=16, description="10m, 1h, 30s")] = None,
        after: Annotated[int, Query(ge=0, description="resume after this line id")] = 0,
        follow: bool = False,
        tail: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> StreamingResponse:
        """Lines as ``{"id", "instance", "workload", "seq", "ts", "stream", "line"}``, one per
        line, oldest first; with ``follow`` the stream stays open."""
        user_only(who)

        def resolve() -> tuple[str, str | None]:
            if instance:
                from cove.model.kinds import get_kind

                ins = api.lookup(who, get_kind("instance"), instance, org, project, app_, env)
                row = store.get_row(ins["id"])
                return str(row["env_id"]), str(ins["id"])
            ctx = api.context(who, org, project, app_, env, need="env")
            return str(ctx.env["id"]), None

        env_id, ins_id = await run_in_threadpool(resolve)
        cutoff = None
        if since:
            from cove.api.app import parse_duration

            cutoff = (
                (datetime.now(UTC) - timedelta(seconds=parse_duration(since, 0)))
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )

        def fetch(cursor: int, limit: int, newest: bool) -> list[dict[str, Any]]:
            c = t.log_lines.c
            q = sa.select(t.log_lines).where(c.env_id == env_id, c.id > cursor)
            if ins_id:
                q = q.where(c.instance_id == ins_id)
            if workload:
                q = q.where(c.workload == workload)
            if cutoff:
                q = q.where(c.ts >= cutoff)
            q = q.order_by(c.id.desc() if newest else c.id).limit(limit)
            with store.read() as conn:
                rows = [dict(r) for r in conn.execute(q).mappings()]
            if newest:
                rows.reverse()
            return [
                {
                    "id": r["id"],
                    "instance": r["instance_id"],
                    "workload": r["workload"],
                    "seq": r["seq"],
                    "ts": r["ts"],
                    "stream": r["stream"],
                    "line": r["line"],
                }
                for r in rows
            ]

        async def gen() -> AsyncIterator[bytes]:
            cursor = after
            first = await run_in_threadpool(fetch, cursor, tail, after == 0)
            for line in first:
                cursor = line["id"]
                yield (json.dumps(line) + "\n").encode()
            last_sent = time.monotonic()
            while follow:
                if await request.is_disconnected():
                    return
                batch = await run_in_threadpool(fetch, cursor, 1000, False)
                for line in batch:
                    cursor = line["id"]
                    yield (json.dumps(line) + "\n").encode()
                if batch:
                    last_sent = time.monotonic()
                    continue
                await api.notifier.wait(api.notifier.revision, 0.5)
                if time.monotonic() - last_sent > 15:
                    yield b"\n"
                    last_sent = time.monotonic()

        return StreamingResponse(gen(), media_type="application/x-ndjson")

    # -- node agent side -------------------------------------------------------------------------

    @app.get("/v1/nodes/{node_id}/assignments", tags=["nodes"], summary="Instances placed here")
    async def assignments(
        node_id: str,
        who: Who,
        since: Annotated[int, Query(ge=0)] = 0,
        wait: Annotated[float, Query(ge=0, le=60)] = 0,
    ) -> dict[str, Any]:
        """Every instance placed on this node with what it needs to run (release, template,
        pull credentials); long-polls up to ``wait`` seconds for the revision to pass
        ``since`` and, when ``since`` is the revision of this server's last answer to the
        node, for something the agent acts on to change there (see ``_Placements``):
        status reports, heartbeats and writes elsewhere in the cluster do not wake every
        agent."""
        who.require_node(node_id)
        deadline = time.monotonic() + wait
        last = answered.get(node_id)
        if last is not None and last[0] == since:
            # this node has this server's last answer: wait for what is placed on it to
            # change in the shared view (woken by the view alone, not by every write)
            while (left := deadline - time.monotonic()) > 0:
                if placements.fingerprint(node_id, await placements.now()) != last[1]:
                    break
                await placements.changed(node_id, last[1], left)
        else:  # an agent new to this server (or behind it): answer once the revision moves
            await api.notifier.wait(since, max(0.0, deadline - time.monotonic()))
        return await to_thread.run_sync(_assignments, node_id, limiter=reads)

    def _placed() -> dict[str, frozenset[tuple[str, int]]]:
        """Which instances and volumes are placed on each node, with their generations (a
        spec change, or being marked deleting, moves a generation; status reports do not):
        what an agent acts on, read in one query. The rows of one node's answer are then
        read by primary key, not found by scanning every instance."""
        c = t.resources.c
        node = c.spec["node"].as_string()
        q = sa.select(node, c.id, c.generation).where(
            c.kind.in_(("instance", "volume")), node.is_not(None)
        )
        rows: dict[str, set[tuple[str, int]]] = {}
        with store.read() as conn:
            for n, rid, gen in conn.execute(q):
                rows.setdefault(str(n), set()).add((str(rid), int(gen)))
        return {n: frozenset(v) for n, v in rows.items()}

    # the long-polls' reads have threads of their own: the API's shared pool can be full of
    # requests waiting for the store's write lock (500 nodes heartbeating), and agents
    # that cannot hear of their instances cannot report them either
    reads = CapacityLimiter(8)
    placements = NodeView(api.notifier, _placed, reads)
    # node -> (revision, fingerprint) of this server's last answer to it
    answered: dict[str, tuple[int, int]] = {}

    def _assignments(node_id: str) -> dict[str, Any]:
        # what is placed here comes from the shared view; when that view is older than a
        # change, the fingerprint kept with this answer is older too, so the next poll is
        # answered at once with the change (never a change missed)
        now = placements.current()
        fp = placements.fingerprint(node_id, now)
        rev = store.head_revision()
        ids = sorted(rid for rid, _ in now.get(node_id, ()) if rid.startswith("ins_"))
        node_col = t.resources.c.spec["node"].as_string()
        mine: list[Any] = []
        from cove.store.db import resource_from_row

        with store.read() as conn:
            for i in range(0, len(ids), 500):
                q = sa.select(t.resources).where(
                    t.resources.c.id.in_(ids[i : i + 500]), t.resources.c.kind == "instance"
                )
                rows = conn.execute(q).mappings()
                mine.extend(r for r in rows if (r["spec"] or {}).get("node") == node_id)
            # their releases, each read once
            rel_ids = sorted({str((r["spec"] or {}).get("release")) for r in mine})
            releases: dict[str, dict[str, Any] | None] = dict.fromkeys(rel_ids)
            for i in range(0, len(rel_ids), 500):
                q = sa.select(t.resources).where(t.resources.c.id.in_(rel_ids[i : i + 500]))
                for rel in conn.execute(q).mappings():
                    releases[str(rel["id"])] = resource_from_row(rel)
        creds_of: dict[tuple[str, str | None], tuple[str, str] | None] = {}
        out = []
        for r in mine:
            ins = resource_from_row(r)
            release = releases[str(ins["spec"]["release"])]
            creds = None
            if release is not None:
                from cove import image as image_mod

                try:
                    host = image_mod.parse_ref(release["spec"]["image"]).registry
                except errors.CoveError:
                    host = None
                key = (str(r["org_id"]), host)
                if key not in creds_of:
                    creds_of[key] = registry_creds(*key)
                c = creds_of[key]
                creds = {"username": c[0], "password": c[1]} if c else None
            mounts = []
            for m in ins["spec"].get("mounts") or []:
                vol = store.find("volume", r["env_id"], m["volume"])
                if vol is not None:
                    mounts.append(
                        {
                            "id": vol["id"],
                            "name": vol["name"],
                            "path": m["path"],
                            "size_gb": vol["spec"]["size_gb"],
                        }
                    )
            out.append(
                {
                    "instance": ins,
                    "release": release,
                    "env_id": r["env_id"],
                    "pull_credentials": creds,
                    "volumes": mounts,
                }
            )
        with store.read() as conn:
            vols = [
                resource_from_row(v)
                for v in conn.execute(
                    sa.select(t.resources).where(
                        t.resources.c.kind == "volume",
                        t.resources.c.deleting.is_(True),
                        node_col == node_id,
                    )
                ).mappings()
            ]
        release_vols = [
            v["id"]
            for v in vols
            if v["spec"].get("node") == node_id and not v["status"].get("released")
        ]
        answered[node_id] = (rev, fp)
        return {"revision": rev, "items": out, "release_volumes": release_vols}

    @app.post("/v1/volumes/{vol_id}/released", tags=["nodes"], summary="Volume data deleted")
    async def volume_released(vol_id: str, who: Who) -> dict[str, Any]:
        """The node deleted a destroyed volume's data; the resource can go."""

        def run() -> dict[str, Any]:
            node_id = who.require_node()
            with store.write() as tx:
                vol = tx.get(vol_id, for_update=True)
                if vol is None or vol["kind"] != "volume" or vol["spec"].get("node") != node_id:
                    raise errors.NotFound(f"no volume {vol_id} on this node")
                tx.update(vol_id, status=dict(vol["status"], released=True))
                tx.event(vol, "Normal", "DataDeleted", "the node deleted the volume's data")
            return {"volume": vol_id, "released": True}

        return await run_in_threadpool(run)

    # What agents report about their instances: status and events are parked and written
    # together, many requests in one transaction, by one thread (api.batch); logs run on
    # threads of their own. 500 agents starting 10,000 instances otherwise take every
    # thread of the API's shared pool, and a user's request waits behind them.
    reports = CapacityLimiter(16)
    batcher = WriteBatcher(store)

    def apply_status(tx: Tx, ins: dict[str, Any], body: InstanceStatusBody) -> int:
        """Write what the node reports of *ins* (read for update); the new revision."""
        st = dict(ins["status"])
        st.update({k: v for k, v in body.model_dump().items() if k not in ("ready", "message")})
        st["node"] = ins["spec"].get("node")
        st["reported_at"] = now_iso()
        st.pop("unreachable_since", None)  # its node reports again
        ready = body.ready and body.state == "running"
        set_condition(
            st,
            "Ready",
            "true" if ready else "false",
            "HealthChecksPassing" if ready else _reason(body.state, body.health),
            body.message,
        )
        if body.state == "failed":
            set_condition(st, "Failed", "true", "InstanceFailed", body.message)
        st["observed_generation"] = ins["metadata"]["generation"]
        return int(tx.update(ins["id"], status=st)["metadata"]["revision"])

    @app.put("/v1/instances/{ins_id}/status", tags=["nodes"], summary="Report instance status")
    async def report_status(ins_id: str, body: InstanceStatusBody, who: Who) -> dict[str, Any]:
        node_id = who.require_node()

        def write(tx: Tx) -> dict[str, Any]:
            ins = node_instance(tx, node_id, ins_id, lock=True)
            if ins is None:
                raise errors.NotFound(f"no instance {ins_id} on this node")
            return {"instance": ins_id, "revision": apply_status(tx, ins, body)}

        return await batcher.write(write)

    @app.put("/v1/nodes/{node_id}/reports", tags=["nodes"], summary="Report this node's instances")
    async def node_reports(node_id: str, body: NodeReportsBody, who: Who) -> dict[str, Any]:
        """Statuses (each an instance's whole report, as ``PUT /v1/instances/{id}/status``)
        and events of the node's instances, written in one transaction: what the agent sends
        for the whole node every 0.1 s. Instances that are not (or no longer) on this node
        are listed in ``missing``; nothing is written for them."""
        who.require_node(node_id)

        def write(tx: Tx) -> dict[str, Any]:
            mine: dict[str, dict[str, Any] | None] = {}
            revision = 0
            for iid, st in sorted(body.statuses.items()):
                mine[iid] = ins = node_instance(tx, node_id, iid, lock=True)
                if ins is not None:
                    revision = apply_status(tx, ins, st)
            events = 0
            for ev in body.events:
                if ev.instance not in mine:
                    mine[ev.instance] = node_instance(tx, node_id, ev.instance, lock=False)
                ins = mine[ev.instance]
                if ins is not None:
                    tx.event(ins, ev.type, ev.reason, ev.message)
                    events += 1
            missing = sorted(i for i, ins in mine.items() if ins is None)
            return {
                "statuses": len(body.statuses) - len(set(missing) & set(body.statuses)),
                "events": events,
                "missing": missing,
                "revision": revision or None,
            }

        return await batcher.write(write)

    @app.post("/v1/instances/{ins_id}/events", tags=["nodes"], summary="Record an instance event")
    async def instance_event(ins_id: str, body: EventBody, who: Who) -> dict[str, Any]:
        node_id = who.require_node()

        def write(tx: Tx) -> dict[str, Any]:
            ins = node_instance(tx, node_id, ins_id, lock=False)
            if ins is None:
                raise errors.NotFound(f"no instance {ins_id} on this node")
            return tx.event(ins, body.type, body.reason, body.message)

        return await batcher.write(write)

    @app.post("/v1/instances/{ins_id}/logs", tags=["nodes"], summary="Ship log lines")
    async def ship_logs(ins_id: str, body: LogBatch, who: Who) -> dict[str, Any]:
        """Lines are keyed by (instance, seq): resending a batch stores nothing twice."""

        def run() -> dict[str, Any]:
            ins = own_instance_of(store, who, ins_id)
            row = store.get_row(ins_id)
            assert row is not None
            workload = ins["parent"]["name"] if ins.get("parent") else ""
            with store.write() as tx:
                c = t.log_lines.c
                have = {
                    int(s)
                    for (s,) in tx.conn.execute(
                        sa.select(c.seq).where(
                            c.instance_id == ins_id, c.seq.in_([x.seq for x in body.lines])
                        )
                    )
                }
                fresh = [x for x in body.lines if x.seq not in have]
                if fresh:
                    tx.conn.execute(
                        sa.insert(t.log_lines),
                        [
                            {
                                "instance_id": ins_id,
                                "org_id": row["org_id"],
                                "env_id": row["env_id"],
                                "workload": workload,
                                "seq": x.seq,
                                "ts": x.ts,
                                "stream": x.stream,
                                "line": x.line[:MAX_LOG_LINE],
                            }
                            for x in fresh
                        ],
                    )
                    keep_from = tx.conn.execute(
                        sa.select(c.id)
                        .where(c.instance_id == ins_id)
                        .order_by(c.id.desc())
                        .offset(LOG_LINES_KEPT)
                        .limit(1)
                    ).scalar()
                    if keep_from is not None:
                        tx.conn.execute(
                            sa.delete(t.log_lines).where(c.instance_id == ins_id, c.id <= keep_from)
                        )
                    tx.next_revision()  # wakes `logs -f` followers
            return {"stored": len(fresh), "duplicates": len(body.lines) - len(fresh)}

        return await to_thread.run_sync(run, limiter=reports)

    @app.get("/v1/instances/{ins_id}/secrets", tags=["nodes"], summary="Secrets for an instance")
    async def instance_secrets(ins_id: str, who: Who) -> dict[str, Any]:
        """The decrypted bundle version of the instance's release, only to its node."""

        def run() -> dict[str, Any]:
            ins = own_instance_of(store, who, ins_id)
            rel = store.get_row(ins["spec"]["release"])
            ref = (rel["spec"] or {}).get("secrets") if rel is not None else None
            if not ref:
                return {"bundle": None, "version": 0, "values": {}}
            with store.read() as conn:
                row = (
                    conn.execute(
                        sa.select(t.secret_versions).where(
                            t.secret_versions.c.bundle_id == ref["bundle"],
                            t.secret_versions.c.version == ref["version"],
                        )
                    )
                    .mappings()
                    .first()
                )
            if row is None:
                raise errors.NotFound("the release's secrets version is gone")
            values = json.loads(
                master.open(
                    Sealed(row["wrapped_key"], row["nonce"], row["ciphertext"]),
                    f"{ref['bundle']}:{ref['version']}".encode(),
                )
            )
            return {"bundle": ref["bundle"], "version": ref["version"], "values": values}

        return await run_in_threadpool(run)

    def _open_values(tx: Tx, bundle: dict[str, Any]) -> dict[str, str]:
        version = int(bundle["spec"].get("version", 0))
        if version == 0:
            return {}
        row = (
            tx.conn.execute(
                sa.select(t.secret_versions).where(
                    t.secret_versions.c.bundle_id == bundle["id"],
                    t.secret_versions.c.version == version,
                )
            )
            .mappings()
            .one()
        )
        values: dict[str, str] = json.loads(
            master.open(
                Sealed(row["wrapped_key"], row["nonce"], row["ciphertext"]),
                f"{bundle['id']}:{version}".encode(),
            )
        )
        return values


def _reason(state: str, health: str) -> str:
    if state == "running":
        return "HealthChecksFailing" if health == "failing" else "HealthChecksPending"
    return {
        "placed": "Placed",
        "preparing": "PullingImage",
        "starting": "Starting",
        "stopping": "Stopping",
        "stopped": "Stopped",
        "destroyed": "Destroyed",
        "failed": "Failed",
        "backoff": "BackOff",
    }.get(state, "NotReady")


def _bundle(tx: Tx, env: dict[str, Any], *, create: bool = False) -> dict[str, Any] | None:
    b = tx.find("secret", env["id"], "secrets")
    if b is None and create:
        b = tx.create("secret", "secrets", parent=env["id"], spec={"version": 0, "keys": []})
    return b


def _secrets_ref(bundle: dict[str, Any] | None) -> dict[str, Any] | None:
    if bundle is None or not bundle["spec"].get("version"):
        return None
    return {"bundle": bundle["id"], "version": int(bundle["spec"]["version"])}


def _pin_region(tx: Tx, env: dict[str, Any], region: str) -> dict[str, Any]:
    """Pin the environment to *region* ('' unpins): a region some node is in."""
    if region:
        nodes = tx.conn.execute(
            sa.select(t.resources.c.spec).where(t.resources.c.kind == "node")
        ).scalars()
        regions = sorted({str((spec or {}).get("region") or "local") for spec in nodes})
        if region not in regions:
            raise errors.UserError(
                f"no node is in region {region!r} (nodes are in: {', '.join(regions) or 'none'})",
                hint="pick one of those regions, or join a node there: cove agent --region "
                f"{region}; placing in several regions is not in v1",
                code="unknown_region",
            )
    new = tx.update(env["id"], spec=dict(env["spec"], region=region or None))
    what = f"pinned to region {region}" if region else "no longer pinned to a region"
    tx.event(new, "Normal", "RegionPinned" if region else "RegionUnpinned", what)
    return new


def env_project(tx: Tx, env: dict[str, Any]) -> str:
    row = tx.row(env["id"])
    assert row is not None and row["project_id"] is not None
    return str(row["project_id"])


def _release(
    tx: Tx,
    who: auth.Principal,
    env: dict[str, Any],
    spec: dict[str, Any],
    *,
    scale_from_templates: bool,
) -> dict[str, Any]:
    """Write release vN, point the environment at it, and return the receipt."""
    numbers = [int(r["spec"]["number"]) for r in tx.children(env["id"], kinds=("release",))]
    number = max(numbers, default=0) + 1
    spec = dict(spec, number=number)
    rel = tx.create(
        "release",
        f"v{number}",
        parent=env["id"],
        spec=spec,
        status={"state": "pending"},
    )
    what = {
        "deploy": f"deploy {spec['image']} ({spec['digest'][:19]})",
        "rollback": f"rollback to {spec.get('rolled_back_to')}",
        "secrets": "secrets changed",
    }.get(spec["reason"], spec["reason"])
    tx.event(rel, "Normal", "Created", f"release v{number}: {what} by {service.actor(who, rel)}")
    scale = dict(env["spec"].get("scale") or {})
    for name, tmpl in spec["workloads"].items():
        if scale_from_templates or name not in scale:
            scale[name] = int(tmpl.get("count", 1))
    for name in list(scale):
        if name not in spec["workloads"]:
            scale.pop(name)
    project_id = env_project(tx, env)
    quotas.check(
        tx,
        project_id,
        quotas.project_use(tx, project_id),
        quotas.project_use(tx, project_id, env_override=(env["id"], spec["workloads"], scale)),
        f"{spec['reason']} v{number} of {env['name']}",
    )
    new_spec = dict(env["spec"], release=rel["id"], scale=scale)
    env2 = tx.update(env["id"], spec=new_spec)
    tx.event(env2, "Normal", "Deploying", f"rolling out v{number}: {what}")
    op = service.start_operation(tx, "update", env2, who)
    rec = service.receipt(op, env2)
    rec["release"] = service.ref(rel)
    return rec
