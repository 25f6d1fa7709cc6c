"""The agent's end of exec: a control channel to the server, and one WebSocket per exec
session bridged to the runtime driver's exec process (see ``cove.api.exec``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cove import errors
from cove.client.http import unix_path

log = logging.getLogger("cove.agent")


def _ws_url(server: str, path: str) -> str:
    if unix_path(server):
        return "ws://cove" + path
    base = server.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + path
    return "ws://" + base.removeprefix("http://") + path


def _connect(server: str, path: str, **kwargs: Any) -> connect:
    """A WebSocket to the API, over TCP or the server's unix socket."""
    uds = unix_path(server)
    if uds:
        return unix_connect(uds, _ws_url(server, path), **kwargs)
    return connect(_ws_url(server, path), **kwargs)


async def channel(servers: list[str], token: str, node_id: str, driver: Any) -> None:
    """Keep the control channel open (reconnecting, to the next of *servers* - the
    replicas' URLs - each time) and serve exec requests."""
    headers = {"Authorization": f"Bearer {token}"}
    path = f"/v1/nodes/{node_id}/channel"
    sessions: set[asyncio.Task[None]] = set()
    delay = 0.5
    turn = 0
    while True:
        server = servers[turn % len(servers)]
        turn += 1
        try:
            async with _connect(server, path, additional_headers=headers, ping_interval=20) as ws:
                delay = 0.5
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("type") == "exec":
                        t = asyncio.ensure_future(_session(server, headers, node_id, driver, msg))
                        sessions.add(t)
                        t.add_done_callback(sessions.discard)
        except asyncio.CancelledError:
            for t in sessions:
                t.cancel()
            raise
        except (OSError, ConnectionClosed, InvalidStatus) as exc:
            log.debug("exec channel closed (%s); reconnecting", exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _session(
    server: str, headers: dict[str, str], node_id: str, driver: Any, msg: dict[str, Any]
) -> None:
    path = f"/v1/nodes/{node_id}/exec/{msg['session']}"
    try:
        async with _connect(server, path, additional_headers=headers, max_size=None) as ws:
            try:
                proc = await driver.exec(
                    msg["instance"],
                    list(msg["argv"]),
                    tty=bool(msg["tty"]),
                    rows=int(msg.get("rows", 24)),
                    cols=int(msg.get("cols", 80)),
                )
            except errors.CoveError as exc:
                await ws.send(json.dumps({"type": "error", "detail": exc.detail}))
                return
            await _bridge(ws, proc, bool(msg["tty"]))
    except (OSError, ConnectionClosed, InvalidStatus) as exc:
        log.warning("exec session failed: %s", exc)


async def _bridge(ws: ClientConnection, proc: Any, tty: bool) -> None:
    async def out(read: Any, tag: bytes) -> None:
        while True:
            data = await read(65536)
            if not data:
                return
            await ws.send(tag + data)

    async def inbound() -> None:
        async for frame in ws:
            if isinstance(frame, bytes):
                await proc.write(frame)
                continue
            ctl = json.loads(frame)
            kind = ctl.get("type")
            if kind == "resize":
                await proc.resize(int(ctl["rows"]), int(ctl["cols"]))
            elif kind == "signal":
                await proc.signal(int(ctl["sig"]))
            elif kind == "eof":
                await proc.close_stdin()

    readers = [asyncio.ensure_future(out(proc.read, b"\x01"))]
    if not tty:
        readers.append(asyncio.ensure_future(out(proc.read_stderr, b"\x02")))
    listener = asyncio.ensure_future(inbound())
    try:
        code = await proc.wait()
        await asyncio.gather(*readers, return_exceptions=True)
        await ws.send(json.dumps({"type": "exit", "code": code}))
    finally:
        listener.cancel()
        for r in readers:
            r.cancel()
        with contextlib.suppress(Exception):
            await proc.signal(9)
        with contextlib.suppress(Exception):
            proc.close()
