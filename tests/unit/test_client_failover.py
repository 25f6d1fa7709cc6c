"""The agent's client with several replicas' URLs: a replica that can't be reached is
skipped, and the client stays with the one that answered."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cove import errors
from cove.client import AsyncClient
from cove.client.http import unless_reconnected


class _Ok(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def replica() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


def test_a_dead_replica_is_skipped_and_the_live_one_kept(replica: str) -> None:
    dead = _closed_port()

    async def go() -> None:
        c = AsyncClient(f"{dead},{replica}", "tok")
        try:
            assert await c.post("/v1/x", {}) == {"ok": True}
            assert c.base_url == replica
            assert await c.post("/v1/x", {}) == {"ok": True}  # no detour any more
            assert c.base_url == replica
        finally:
            await c.aclose()

    asyncio.run(go())


def test_no_replica_reachable_is_a_transient_error() -> None:
    async def go() -> None:
        c = AsyncClient(f"{_closed_port()},{_closed_port()}")
        try:
            with pytest.raises(errors.Transient, match="can't reach the cove API"):
                await c.post("/v1/x", {})
        finally:
            await c.aclose()

    asyncio.run(go())


def test_a_request_is_given_up_when_the_connection_comes_back() -> None:
    async def go() -> None:
        back = asyncio.Event()
        slow = asyncio.ensure_future(asyncio.sleep(30, result="late"))
        asyncio.get_running_loop().call_later(0.05, back.set)
        assert await unless_reconnected(slow, back) is None
        assert slow.cancelled() and not back.is_set()  # cleared for the next round
        assert await unless_reconnected(asyncio.sleep(0, result="now"), back) == "now"

    asyncio.run(go())
