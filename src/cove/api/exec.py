"""Exec through the API: the user's WebSocket is spliced to one the node agent opens back.

    CLI ──ws /v1/instances/{id}/exec──▶ server ◀──ws /v1/nodes/{n}/channel── agent
                                          │  "exec" request on the channel
                                          ◀──ws /v1/nodes/{n}/exec/{session}── agent

Frames on both legs: binary = bytes (client→agent: stdin; agent→client: a first byte of
1 for stdout or 2 for stderr, then the data); text = JSON control: ``resize`` {rows, cols},
``signal`` {sig}, ``eof``; from the agent ``exit`` {code} or ``error`` {detail}.

The agent only ever connects to the server (it is an API client like any other). Sessions
live in this server process: a node's channel and the user's socket meet on the replica
the agent is connected to.
"""

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool

from cove import errors
from cove.api import auth

log = logging.getLogger("cove.api.exec")

CONNECT_TIMEOUT = 15.0


class Relay:
    def __init__(self) -> None:
        self.channels: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.pending: dict[str, asyncio.Future[WebSocket]] = {}


def register(app: FastAPI, api: Any) -> None:
    relay = Relay()
    app.state.exec_relay = relay

    async def authenticate(ws: WebSocket) -> auth.Principal:
        header = ws.headers.get("authorization")  # never a token in the URL: URLs get logged
        p: auth.Principal = await run_in_threadpool(api.principal, header)
        return p

    async def refuse(ws: WebSocket, err: errors.CoveError) -> None:
        await ws.accept()
        await ws.send_text(json.dumps({**err.problem(), "type": "error"}))
        await ws.close(code=4000 + min(err.status, 999))

    @app.websocket("/v1/nodes/{node_id}/channel")
    async def channel(ws: WebSocket, node_id: str) -> None:
        """The agent's control channel: the server pushes exec requests down it."""
        try:
            who = await authenticate(ws)
            if who.kind != "node" or who.node_id != node_id:
                raise errors.Forbidden("only the node itself opens its channel")
        except errors.CoveError as exc:
            await refuse(ws, exc)
            return
        await ws.accept()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        relay.channels[node_id] = queue

        async def pump() -> None:
            while True:
                msg = await queue.get()
                await ws.send_text(json.dumps(msg))

        sender = asyncio.ensure_future(pump())
        try:
            while True:  # the agent sends pings; a disconnect ends the channel
                await ws.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
            if relay.channels.get(node_id) is queue:
                relay.channels.pop(node_id, None)

    @app.websocket("/v1/nodes/{node_id}/exec/{session}")
    async def agent_leg(ws: WebSocket, node_id: str, session: str) -> None:
        try:
            who = await authenticate(ws)
            if who.kind != "node" or who.node_id != node_id:
                raise errors.Forbidden("only the node itself joins its sessions")
            fut = relay.pending.get(session)
            if fut is None or fut.done():
                raise errors.NotFound("no such exec session")
        except errors.CoveError as exc:
            await refuse(ws, exc)
            return
        await ws.accept()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ws.state.done = done
        fut.set_result(ws)
        await done  # the user's side runs the splice and resolves this

    @app.websocket("/v1/instances/{ref}/exec")
    async def user_leg(ws: WebSocket, ref: str) -> None:
        """``?cmd=...&cmd=...&tty=1&rows=&cols=``; then frames as described above."""
        try:
            who = await authenticate(ws)
            api.require_user(who)
            argv = ws.query_params.getlist("cmd")
            if not argv or any(len(a) > 4096 for a in argv) or len(argv) > 256:
                raise errors.UserError("exec needs a command: cmd=PROG&cmd=ARG...")
            tty = ws.query_params.get("tty") in ("1", "true")
            rows = _int(ws.query_params.get("rows"), 24)
            cols = _int(ws.query_params.get("cols"), 80)
            from cove.model.kinds import get_kind

            q = ws.query_params
            ins = await run_in_threadpool(
                api.lookup,
                who,
                get_kind("instance"),
                ref,
                q.get("org"),
                q.get("project"),
                q.get("app"),
                q.get("env"),
            )
            node = ins["spec"].get("node")
            if ins["status"].get("state") != "running" or not node:
                raise errors.Conflict(
                    f"instance {ins['name']} is not running ({ins['status'].get('state')})",
                    hint="`cove instances list` shows which are",
                )
            queue = relay.channels.get(node)
            if queue is None:
                raise errors.Transient(
                    "the instance's node agent is not connected", hint="retry in a moment"
                )
        except errors.CoveError as exc:
            await refuse(ws, exc)
            return
        await ws.accept()
        session = secrets.token_urlsafe(18)
        fut: asyncio.Future[WebSocket] = asyncio.get_running_loop().create_future()
        relay.pending[session] = fut
        await queue.put(
            {
                "type": "exec",
                "session": session,
                "instance": ins["id"],
                "argv": argv,
                "tty": tty,
                "rows": rows,
                "cols": cols,
            }
        )
        try:
            agent_ws = await asyncio.wait_for(fut, CONNECT_TIMEOUT)
        except TimeoutError:
            relay.pending.pop(session, None)
            await ws.send_text(json.dumps({"type": "error", "detail": "the node did not answer"}))
            await ws.close(code=4504)
            return
        relay.pending.pop(session, None)
        await _splice(ws, agent_ws)


async def _splice(user: WebSocket, agent: WebSocket) -> None:
    async def forward(src: WebSocket, dst: WebSocket) -> None:
        while True:
            msg = await src.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                await dst.send_bytes(msg["bytes"])
            elif msg.get("text") is not None:
                await dst.send_text(msg["text"])

    up = asyncio.ensure_future(forward(user, agent))
    down = asyncio.ensure_future(forward(agent, user))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (up, down):
            t.cancel()
        for w in (user, agent):
            with contextlib.suppress(Exception):
                await w.close()
        done = getattr(agent.state, "done", None)
        if done is not None and not done.done():
            done.set_result(None)


def _int(value: str | None, default: int) -> int:
    try:
        n = int(value) if value is not None else default
    except ValueError:
        return default
    return max(1, min(n, 1000))
