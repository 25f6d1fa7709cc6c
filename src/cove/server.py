"""``cove server``: the control plane process — API plus the controller manager."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path

import uvicorn

from cove import security
from cove.api import create_app
from cove.control.controllers import foundation_controllers
from cove.control.lease import Leadership, Replica, lease_for
from cove.control.manager import Manager
from cove.model import pricing
from cove.model.pricing import PriceList
from cove.net.pools import Pools
from cove.net.pools import configured as configured_pools
from cove.store import Store
from cove.store.crypto import MasterKey
from cove.store.notify import RevisionNotifier

log = logging.getLogger("cove.server")


def database_url(data_dir: Path) -> str:
    return os.environ.get("COVE_DATABASE_URL") or f"sqlite:///{data_dir / 'cove.db'}"


def ensure_join_token(store: Store, data_dir: Path) -> Path:
    """The cluster's join token: stored hashed; the secret sits in DATA/join-token (0600)."""
    path = data_dir / "join-token"
    if store.setting("join_token_hash") is not None and path.exists():
        return path
    token = security.new_token("join")
    with store.write() as tx:
        tx.set_setting("join_token_hash", security.hash_token(token))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose protocol says TCP,
    # and without it every keep-alive response waits ~40 ms for the peer's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_unix(path: Path) -> socket.socket:
    """A unix stream socket at *path* (a stale one left by a crash is replaced), 0660."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise


def serve(
    data_dir: Path,
    host: str,
    port: int,
    *,
    url_file: Path | None = None,
    controllers: bool = True,
    access_log: bool = False,
    pools: Pools | None = None,
    unix_socket: Path | None = None,
    prices: PriceList | None = None,
    node_timing: tuple[float, float] | None = None,
) -> None:
    """Serve the API on ``host:port`` (and on ``unix_socket`` when given: agents in other
    network namespaces reach the server through the file system) and run the controllers
    (``node_timing``: the NodeController's grace and eviction delay, in seconds)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(database_url(data_dir))
    store.migrate()
    ensure_join_token(store, data_dir)
    notifier = RevisionNotifier()
    pools = pools or configured_pools(data_dir)
    sock = bind(host, port)
    socks = [sock]
    if unix_socket is not None:
        socks.append(bind_unix(unix_socket))
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{actual}"
    # the web console's shells reach this API at its own URL (a wildcard host by loopback)
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, shown)
    app = create_app(
        store,
        notifier,
        MasterKey.load(data_dir),
        pools,
        api_url=f"http://{local}:{actual}",
        prices=prices or pricing.configured(data_dir),
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=3,
        # longer than the agents' 5 s heartbeat: with uvicorn's 5 s default the server closed
        # an idle connection just as the next heartbeat went out on it (ReadError at the
        # agent, a lost heartbeat; 80 in a run of 500 agents)
        timeout_keep_alive=30,
        ws="websockets-sansio",
    )
    server = uvicorn.Server(config)

    replica = Replica(url=url)
    leadership = Leadership(store, lease_for(store, data_dir), replica)
    app.state.leadership = leadership

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop_listening = threading.Event()
        if store.dialect == "postgresql":  # other replicas' writes wake our watchers at once
            loop.run_in_executor(None, store.listen, notifier.bump, stop_listening)
        try:
            async with asyncio.TaskGroup() as tg:
                serving = tg.create_task(server.serve(sockets=socks))
                while not server.started and not serving.done():
                    await asyncio.sleep(0.02)
                log.info("cove API listening on %s (store: %s)", url, store.dialect)
                if unix_socket is not None:
                    log.info("cove API also on unix:%s", unix_socket)
                log.info("public pools: IPv6 %s, IPv4 %s", pools.ipv6, pools.ipv4)
                if url_file is not None:
                    tmp = url_file.with_suffix(".tmp")
                    tmp.write_text(url + "\n")
                    tmp.replace(url_file)
                ctl = None
                if controllers:
                    ctl = tg.create_task(
                        leadership.run(
                            lambda fenced: Manager(
                                fenced, foundation_controllers(fenced, node_timing), notifier
                            ).run()
                        )
                    )
                await serving
                if ctl is not None:
                    ctl.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ctl
        finally:
            stop_listening.set()  # the listener thread ends within 0.5 s

    try:
        asyncio.run(main())
    finally:
        if url_file is not None:
            with contextlib.suppress(FileNotFoundError):
                url_file.unlink()
        if unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                unix_socket.unlink()
        store.close()
        _ = signal
