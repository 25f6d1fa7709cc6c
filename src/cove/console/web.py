"""The web console's routes: the page, its assets, and the terminal WebSocket.

    GET  /console                 the page (its whole UI is a ghostty-web terminal)
    GET  /console/assets/{name}   console.js, console.css, ghostty-web.js, ghostty-vt.wasm
    WS   /console/ws              one PTY running `cove shell` as the signed-in user

Every response carries a strict Content-Security-Policy (no inline script or style, wasm
allowed to compile, connections only to this origin) and ``nosniff``.

WebSocket protocol (docs/api.md): browsers can't set Authorization on a WebSocket, so the
token travels in ``Sec-WebSocket-Protocol``: the client offers ``cove.console.v1`` and
``cove.bearer.<token>``, the server answers ``cove.console.v1``. A missing or bad token
(401), a foreign Origin (403) or too many sessions (429) are refused before the handshake
completes, with a problem+json body. Then binary frames carry terminal bytes both ways and
text frames carry JSON control: ``{"type":"resize","cols":C,"rows":R}`` from the client;
``{"type":"exit","code":N}`` and ``{"type":"error","code":...,"detail":...}`` from the
server. Close codes: 1000 the shell exited, 4408 idle timeout, 1011 the shell could not
start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from cove import errors
from cove.console.pty import Pty, shell_argv

log = logging.getLogger("cove.console")

SUBPROTOCOL = "cove.console.v1"
BEARER_PREFIX = "cove.bearer."
CSP = (
    "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; "
    "style-src 'self'; img-src 'self'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
STATIC = Path(__file__).resolve().parent / "static"
REPO_ROOT = Path(__file__).resolve().parents[3]  # src/cove/console/web.py -> the checkout
GHOSTTY_VERSION = "0.4.0"  # package.json pins it; package-lock.json has its integrity hash
# name -> (where, media type); "ghostty" files come from ghostty-web's dist/
ASSETS: dict[str, tuple[str, str]] = {
    "console.js": ("static", "text/javascript; charset=utf-8"),
    "console.css": ("static", "text/css; charset=utf-8"),
    "favicon.svg": ("static", "image/svg+xml"),
    "ghostty-web.js": ("ghostty", "text/javascript; charset=utf-8"),
    "ghostty-vt.wasm": ("ghostty", "application/wasm"),
}
# ghostty-web.js imports this Vite stub (a Node fs shim, empty in browsers) by relative URL
VITE_STUB = re.compile(r"^__vite-browser-external-[0-9a-f]{8}\.js$")
CLOSE_EXITED = 1000
CLOSE_IDLE = 4408
CLOSE_FAILED = 1011


@dataclass(frozen=True)
class ConsoleUser:
    """Who a token belongs to (the API's authentication, handed in by create_app)."""

    user_id: str
    email: str


@dataclass
class ConsoleConfig:
    api_url: str | None = None  # the server's own URL: the shell's COVE_API_URL
    idle_timeout: float = 15 * 60.0  # seconds without input before the session closes
    hangup_grace: float = 2.0  # SIGHUP, then SIGKILL after this long
    max_sessions_per_user: int = 8
    assets: Path | None = None  # ghostty-web's dist/ (default: see ghostty_dist())
    sessions: dict[str, int] = field(default_factory=dict)  # user_id -> open sessions


def ghostty_dist(override: Path | None = None) -> Path | None:
    """ghostty-web's ``dist/`` directory: ``COVE_CONSOLE_ASSETS`` (the package directory or
    its dist/), else the checkout's node_modules (``make setup`` runs ``npm ci``)."""
    candidates: list[Path] = []
    if override is not None:
        candidates.append(override)
    env = os.environ.get("COVE_CONSOLE_ASSETS")
    if env:
        candidates.append(Path(env))
    if not candidates:
        candidates.append(REPO_ROOT / "node_modules" / "ghostty-web")
    for c in candidates:
        for d in (c / "dist", c):
            if (d / "ghostty-web.js").is_file() and (d / "ghostty-vt.wasm").is_file():
                return d
    return None


def parse_duration(value: str) -> float:
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", value)
    if not m:
        raise ValueError(f"invalid duration {value!r}: use 90s, 15m, 1h")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def config_from_env(api_url: str | None) -> ConsoleConfig:
    cfg = ConsoleConfig(api_url=api_url)
    idle = os.environ.get("COVE_CONSOLE_IDLE_TIMEOUT")
    if idle:
        cfg.idle_timeout = parse_duration(idle)
    return cfg


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**SECURITY_HEADERS, **(extra or {})}


def _missing_assets_page() -> Response:
    body = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        "<title>cove console: not installed</title></head><body>\n"
        "<h1>The cove console is not installed on this server</h1>\n"
        "<p>Its terminal (the npm package ghostty-web) was not found. On the server's "
        "checkout run <code>make setup</code> (it runs <code>npm ci</code>), or point "
        "<code>COVE_CONSOLE_ASSETS</code> at an installed ghostty-web package, then reload "
        "this page.</p>\n</body></html>\n"
    )
    return Response(
        body,
        status_code=503,
        media_type="text/html; charset=utf-8",
        headers=_headers({"Cache-Control": "no-store"}),
    )


def _problem(err: errors.CoveError) -> JSONResponse:
    return JSONResponse(
        err.problem(),
        status_code=err.status,
        media_type="application/problem+json",
        headers=_headers(),
    )


def same_origin(origin: str | None, host: str | None, secure: bool) -> bool:
    """A browser's Origin must be this server as the browser reached it (the Host header);
    clients that send no Origin (not browsers) are judged by their token alone."""
    if origin is None:
        return True
    if not host:
        return False
    parts = urlsplit(origin)
    want = "https" if secure else "http"
    return parts.scheme == want and parts.netloc.lower() == host.lower()


def token_from_subprotocols(offered: list[str]) -> str | None:
    if SUBPROTOCOL not in offered:
        return None
    tokens = [p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)]
    if len(tokens) != 1 or not tokens[0] or len(tokens[0]) > 512:
        return None
    return tokens[0]


def register(
    app: FastAPI,
    authenticate: Callable[[str], Awaitable[ConsoleUser]],
    cfg: ConsoleConfig,
) -> None:
    """Add the console's routes to *app*. ``authenticate(token)`` answers who the token
    belongs to, or raises ``errors.Unauthenticated``/``Forbidden``."""

    @app.get("/console", include_in_schema=False)
    async def page() -> Response:
        if ghostty_dist(cfg.assets) is None:
            return _missing_assets_page()
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers=_headers({"Cache-Control": "no-store"}),
        )

    @app.get("/console/assets/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        where, media = ASSETS.get(name, ("", ""))
        if not where and VITE_STUB.match(name):
            where, media = "ghostty", "text/javascript; charset=utf-8"
        if not where:
            return _problem(errors.NotFound(f"no console asset {name!r}"))
        if where == "static":
            path = STATIC / name
        else:
            dist = ghostty_dist(cfg.assets)
            if dist is None:
                return _problem(
                    errors.Transient(
                        "the console's terminal (ghostty-web) is not installed",
                        hint="run `make setup` on the server (or set COVE_CONSOLE_ASSETS)",
                    )
                )
            path = dist / name
        if not path.is_file():
            return _problem(errors.NotFound(f"no console asset {name!r}"))
        return FileResponse(path, media_type=media, headers=_headers({"Cache-Control": "no-cache"}))

    @app.websocket("/console/ws")
    async def terminal(ws: WebSocket) -> None:
        secure = ws.url.scheme == "wss"
        try:
            if not same_origin(ws.headers.get("origin"), ws.headers.get("host"), secure):
                raise errors.Forbidden(
                    "cross-origin console connections are refused",
                    hint="open the console from this server's own /console page",
                )
            token = token_from_subprotocols(list(ws.scope.get("subprotocols") or []))
            if token is None:
                raise errors.Unauthenticated(
                    "the console WebSocket needs a token",
                    hint=f"offer the subprotocols {SUBPROTOCOL} and {BEARER_PREFIX}<token>",
                )
            who = await authenticate(token)
            if cfg.sessions.get(who.user_id, 0) >= cfg.max_sessions_per_user:
                raise errors.CoveError(
                    f"you have {cfg.max_sessions_per_user} console sessions open already",
                    hint="close one (exit in its terminal) and try again",
                    code="too_many_sessions",
                )
        except errors.CoveError as exc:
            await _deny(ws, exc)
            return
        cfg.sessions[who.user_id] = cfg.sessions.get(who.user_id, 0) + 1
        try:
            await ws.accept(subprotocol=SUBPROTOCOL)
            await Session(ws, who, token, cfg).run()
        finally:
            cfg.sessions[who.user_id] -= 1
            if not cfg.sessions[who.user_id]:
                del cfg.sessions[who.user_id]


async def _deny(ws: WebSocket, err: errors.CoveError) -> None:
    """Refuse the handshake with an HTTP answer (problem+json) where the server supports
    it, a plain close (HTTP 403) otherwise."""
    status = err.status if err.code != "too_many_sessions" else 429
    doc = {**err.problem(), "status": status}
    resp = JSONResponse(doc, status_code=status, media_type="application/problem+json")
    try:
        await ws.send_denial_response(resp)
    except RuntimeError:
        await ws.close(code=1008)


class Session:
    """One connection: its PTY, its private COVE_HOME, the pumps both ways."""

    def __init__(self, ws: WebSocket, who: ConsoleUser, token: str, cfg: ConsoleConfig) -> None:
        self.ws = ws
        self.who = who
        self.token = token
        self.cfg = cfg
        self.last_input = time.monotonic()

    def _env(self, home: Path) -> dict[str, str]:
        """Only what the shell needs: none of the server's own environment (database URL,
        master key) reaches the user's shell."""
        base = self.cfg.api_url or _own_url(self.ws)
        return {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "TERM": "xterm-256color",
            "COLORTERM": "truecolor",
            "HOME": str(home),
            "COVE_HOME": str(home),
            "COVE_API_URL": base,
            "COVE_TOKEN": self.token,
            "COVE_CONSOLE": "1",
        }

    async def run(self) -> None:
        home = Path(tempfile.mkdtemp(prefix="cove-console-"))  # 0700, this connection's only
        pty: Pty | None = None
        try:
            try:
                pty = await Pty.spawn(shell_argv(), env=self._env(home), cwd=home)
            except errors.CoveError as exc:
                await self._send_json({"type": "error", "code": exc.code, "detail": exc.detail})
                await self.ws.close(code=CLOSE_FAILED)
                return
            log.info("console session for %s: shell pid %s", self.who.email, pty.pid)
            await self._bridge(pty)
        finally:
            try:
                if pty is not None:
                    await pty.close(self.cfg.hangup_grace)
            finally:  # even when cancelled (the server stopping)
                shutil.rmtree(home, ignore_errors=True)

    async def _bridge(self, pty: Pty) -> None:
        out: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)
        pty.start_reading(out)
        tasks = {
            asyncio.ensure_future(self._pump_out(pty, out)),
            asyncio.ensure_future(self._pump_in(pty)),
            asyncio.ensure_future(self._watch_idle()),
        }
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _pump_out(self, pty: Pty, out: asyncio.Queue[bytes | None]) -> None:
        """The shell's output to the browser; when it ends, its exit code, then close."""
        while True:
            data = await out.get()
            if data is None:
                break
            await self.ws.send_bytes(data)
            if out.qsize() < 8:
                pty.resume_reading()
        code = await pty.close(self.cfg.hangup_grace)
        await self._send_json({"type": "exit", "code": code if code is not None else -1})
        await self.ws.close(code=CLOSE_EXITED)

    async def _pump_in(self, pty: Pty) -> None:
        """The browser's keystrokes (binary) and control messages (text) to the PTY."""
        while True:
            try:
                msg = await self.ws.receive()
            except WebSocketDisconnect:
                return
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes")
            if data is not None:
                self.last_input = time.monotonic()
                await pty.write(data)
                continue
            text = msg.get("text")
            if text is not None:
                await self._control(pty, text)

    async def _control(self, pty: Pty, text: str) -> None:
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            if doc.get("type") == "resize":
                cols, rows = doc.get("cols"), doc.get("rows")
                if not (isinstance(cols, int) and isinstance(rows, int)) or cols < 1 or rows < 1:
                    raise ValueError("resize needs positive integer cols and rows")
                pty.resize(rows, cols)
                return
            raise ValueError(f"unknown message type {doc.get('type')!r}")
        except ValueError as exc:
            await self._send_json(
                {"type": "error", "code": "invalid", "detail": f"bad control message: {exc}"}
            )

    async def _watch_idle(self) -> None:
        """Warn in the terminal a while before the idle timeout (a minute, or a quarter of a
        short timeout), then close; any input in between starts the count again."""
        timeout = self.cfg.idle_timeout
        warn_before = min(60.0, timeout / 4)
        warned_at: float | None = None  # the last_input the warning was about
        while True:
            idle_for = time.monotonic() - self.last_input
            if idle_for >= timeout:
                break
            if idle_for >= timeout - warn_before and warned_at != self.last_input:
                warned_at = self.last_input
                await self._say(
                    f"[cove console: no input for {_span(idle_for)}; this session closes "
                    f"in {_span(timeout - idle_for)} unless you type]"
                )
                continue
            until_warning = timeout - warn_before - idle_for
            step = until_warning if until_warning > 0 else timeout - idle_for
            await asyncio.sleep(min(step, 30.0) + 0.01)
        said = _span(timeout)
        await self._say(f"[cove console: closing after {said} without input]")
        await self._send_json(
            {"type": "error", "code": "idle_timeout", "detail": f"no input for {said}"}
        )
        with contextlib.suppress(Exception):
            await self.ws.close(code=CLOSE_IDLE)

    async def _say(self, text: str) -> None:
        """A line from the console itself, written into the terminal."""
        with contextlib.suppress(Exception):
            await self.ws.send_bytes(f"\r\n{text}\r\n".encode())

    async def _send_json(self, doc: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self.ws.send_text(json.dumps(doc))


def _span(seconds: float) -> str:
    if seconds >= 90:
        return f"{seconds / 60:.0f} minutes"
    return f"{max(1, round(seconds))} seconds"


def _own_url(ws: WebSocket) -> str:
    """This server's URL as the WebSocket reached it (when create_app was not told)."""
    scheme = "https" if ws.url.scheme == "wss" else "http"
    return f"{scheme}://{ws.url.netloc}"
