"""Run an edge from the command line (benchmarks, trying things out)::

    python -m cove.net --tcp 127.0.0.1:8080=127.0.0.1:9001,127.0.0.1:9002 \\
                       --udp [::1]:5353=[::1]:5354 [--proxy-v2] [--no-uvloop]

Each ``--tcp``/``--udp`` is one listener (its own endpoint, ``ep_<n>``) and its backends,
tried round-robin. Prints ``ready`` on stdout once every listener is bound (exit status 2
when one cannot be), runs until SIGTERM or SIGINT, then closes and prints the counters as
JSON on stderr. Uses uvloop when it can be imported, unless ``--no-uvloop``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Literal

from cove.net.edge import Backend, Edge, Listener


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ADDR:PORT or [V6ADDR]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: write an IPv6 address as [ADDR]:PORT")
    return host, int(port)


def _listener_arg(protocol: Literal["tcp", "udp"]) -> Callable[[str], Listener]:
    def parse(text: str) -> Listener:
        front, sep, back = text.partition("=")
        if not sep or not back:
            raise argparse.ArgumentTypeError(f"{text!r}: expected ADDR:PORT=HOST:PORT[,...]")
        address, port = _hostport(front)
        backends = tuple(
            Backend(id=f"{h}:{p}" if ":" not in h else f"[{h}]:{p}", host=h, port=p)
            for h, p in (_hostport(b) for b in back.split(","))
        )
        return Listener("", protocol, address, port, False, backends)

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cove.net", description=__doc__.split("::")[0])
    p.add_argument("--tcp", action="append", default=[], type=_listener_arg("tcp"))
    p.add_argument("--udp", action="append", default=[], type=_listener_arg("udp"))
    p.add_argument("--proxy-v2", action="store_true", help="send PROXY v2 headers to backends")
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--udp-idle-timeout", type=float, default=60.0)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if not args.tcp and not args.udp:
        p.error("give at least one --tcp or --udp listener")
    return args


async def serve(args: argparse.Namespace, loop_name: str) -> int:
    listeners = [
        dataclasses.replace(spec, endpoint=f"ep_{n}", proxy_protocol=args.proxy_v2)
        for n, spec in enumerate([*args.tcp, *args.udp], start=1)
    ]
    edge = Edge(connect_timeout=args.connect_timeout, udp_idle_timeout=args.udp_idle_timeout)
    errors = await edge.apply(listeners)
    if errors:
        for e in errors:
            print(
                f"cannot listen on {e.protocol} {e.address}:{e.port}: {e.message}", file=sys.stderr
            )
        await edge.close()
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"cove.net: {len(listeners)} listener(s) on {loop_name}", file=sys.stderr, flush=True)
    print("ready", flush=True)
    await stop.wait()
    await edge.close()
    counters = {ep: dataclasses.asdict(c) for ep, c in edge.counters().items()}
    print(json.dumps({"counters": counters}), file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    loop_name = f"asyncio (Python {sys.version.split()[0]})"
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
            loop_name = f"uvloop {importlib.metadata.version('uvloop')}"
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(args, loop_name))


if __name__ == "__main__":
    sys.exit(main())
