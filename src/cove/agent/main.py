"""``cove agent``: joins the cluster through the public API (node credentials) and
heartbeats. It is just another API client: no in-process shortcuts.

It has no runtime driver yet, and says so: the node reports ``driver: none`` and the
server marks it ``Schedulable=false (NoRuntime)``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any

from cove import __version__, errors
from cove.client import Client

log = logging.getLogger("cove.agent")
HEARTBEAT_SECONDS = 5.0


def capacity() -> dict[str, float]:
    mem_mb = 0.0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_mb = int(line.split()[1]) / 1024
                    break
    except OSError:
        pass
    return {"vcpu": float(os.cpu_count() or 1), "memory_mb": round(mem_mb)}


def default_name() -> str:
    import re

    raw = socket.gethostname().lower()
    name = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:40] or "node"
    if not name[0].isalpha():
        name = "n-" + name[:37]
    return name.rstrip("-")


def run_agent(
    server: str,
    join_token: str,
    *,
    name: str | None = None,
    region: str = "local",
    stop: threading.Event | None = None,
) -> None:
    stop = stop or threading.Event()

    def on_signal(_s: int, _f: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    name = name or default_name()
    node_id, token = _register(server, join_token, name, region, stop)
    if node_id is None:
        return
    log.info(
        "node %s (%s) registered with %s; heartbeat every %.0fs",
        name,
        node_id,
        server,
        HEARTBEAT_SECONDS,
    )
    with Client(server, token) as c:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                c.post(f"/v1/nodes/{node_id}/heartbeat", {"capacity": capacity()})
            except errors.Unauthenticated:
                log.warning("node credentials refused; registering again")
                nid, tok = _register(server, join_token, name, region, stop)
                if nid is None:
                    return
                node_id = nid
                c.close()
                c = Client(server, tok)
            except errors.CoveError as exc:
                log.warning("heartbeat failed: %s", exc.detail)
    log.info("agent stopped")


def _register(
    server: str, join_token: str, name: str, region: str, stop: threading.Event
) -> tuple[str | None, str]:
    delay = 0.5
    with Client(server) as c:
        while not stop.is_set():
            try:
                res = c.post(
                    "/v1/nodes/register",
                    {
                        "name": name,
                        "join_token": join_token,
                        "region": region,
                        "capacity": capacity(),
                        "driver": "none",
                        "version": __version__,
                        "driver_detail": "no runtime driver in this build: nothing can be placed",
                    },
                )
                return str(res["node"]["id"]), str(res["token"])
            except errors.Unauthenticated as exc:
                log.error("the server refused the join token: %s", exc.detail)
                return None, ""
            except errors.CoveError as exc:
                log.warning("can't register yet (%s); retrying in %.1fs", exc.detail, delay)
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
    return None, ""
