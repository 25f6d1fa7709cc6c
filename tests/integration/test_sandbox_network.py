"""Sandbox networking: veth to a bridge inside a network namespace the test owns.

Traffic only goes to loopback or to addresses inside ``cove-t-*`` namespaces made here.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from cove.runtime import NetConfig, SandboxDriver
from cove.runtime.network import host_ifname
from tests.integration.test_sandbox_support import (
    arun,
    driver,
    exec_output,
    in_netns,
    layers,
    make_spec,
    netns_links,
    own_netns,
    requires_sandbox,
    wait_for_line,
)

__all__ = ["driver", "layers"]
pytestmark = requires_sandbox

FETCH = """
import sys, time, urllib.request
url = sys.argv[1] if len(sys.argv) > 1 else {url!r}
deadline = time.monotonic() + 8
while True:
    try:
        print(urllib.request.urlopen(url, timeout=2).read().decode(), end="")
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            print("FAILED", exc)
            sys.exit(1)
        time.sleep(0.05)
"""


def net(netns: str, bridge: str, subnet: int, host: int) -> NetConfig:
    return NetConfig(
        bridge=bridge,
        ipv4=f"10.213.{subnet}.{host}/24",
        ipv6=f"fd00:c0e:{subnet}::{host}/64",
        gateway4=f"10.213.{subnet}.1",
        gateway6=f"fd00:c0e:{subnet}::1",
        netns=netns,
    )


@arun
async def test_instance_network_reachability_and_isolation(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    with own_netns() as ns:
        web = make_spec(
            layers,
            argv=["sh", "-c", "echo ready; exec httpd -f -p 8080 -h /www"],
            network=net(ns, "cvt0", 7, 2),
        )
        neighbour = make_spec(  # same bridge
            layers, argv=["sh", "-c", "echo ready; exec sleep 1000"], network=net(ns, "cvt0", 7, 3)
        )
        stranger = make_spec(  # another bridge in the same namespace
            layers, argv=["sh", "-c", "echo ready; exec sleep 1000"], network=net(ns, "cvt1", 8, 2)
        )
        specs = (web, neighbour, stranger)
        for spec in specs:
            await driver.create(spec)
        t0 = time.monotonic()
        await asyncio.gather(*(driver.start(s.instance_id) for s in specs))
        start_time = time.monotonic() - t0
        for spec in specs:
            await wait_for_line(driver, spec.instance_id, "ready")
        assert start_time < 10

        # from the bridge's namespace, on IPv4 and IPv6
        for url in ("http://10.213.7.2:8080/index.html", "http://[fd00:c0e:7::2]:8080/index.html"):
            res = await asyncio.to_thread(in_netns, ns, FETCH.format(url=url))
            assert res.returncode == 0 and res.stdout == "hello from the sandbox\n", res

        # the instance sees only its own interfaces
        out, _, _ = await exec_output(driver, web.instance_id, ["ip", "-o", "link"])
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())
        assert names == ["eth0", "lo"]
        out, _, _ = await exec_output(driver, web.instance_id, ["ip", "-o", "addr"])
        assert "10.213.7.2/24" in out and "fd00:c0e:7::2/64" in out

        # same bridge: reachable; other bridge: not
        fetch = ["timeout", "3", "wget", "-q", "-O", "-", "http://10.213.7.2:8080/index.html"]
        out, _, code = await exec_output(driver, neighbour.instance_id, fetch)
        assert (code, out) == (0, "hello from the sandbox\n")
        _, _, code = await exec_output(driver, stranger.instance_id, fetch)
        assert code != 0

        # the host's loopback is not the instance's loopback
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        try:
            _, _, code = await exec_output(
                driver, web.instance_id, ["timeout", "3", "nc", "127.0.0.1", str(port)]
            )
            assert code != 0
            try:
                listener.accept()
                raise AssertionError("the instance reached the host's loopback")
            except BlockingIOError:
                pass
        finally:
            listener.close()

        host_ends = {host_ifname(s.instance_id) for s in specs}
        assert host_ends <= set(netns_links(ns))
        for spec in specs:
            await driver.destroy(spec.instance_id)
        assert not host_ends & set(netns_links(ns))
        assert {"cvt0", "cvt1", "lo"} == set(netns_links(ns))


@arun
async def test_a_leftover_bridge_with_other_addresses_gets_our_gateway(
    driver: SandboxDriver, layers: list[Path]
) -> None:
    """A bridge of the same name left by an earlier install (other subnet): the instance is
    still reached through the bridge, never through the host's default route."""
    import subprocess

    with own_netns() as ns:
        subprocess.run(["ip", "-n", ns, "link", "add", "cvt5", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.213.4.1/24", "dev", "cvt5"], check=True)
        web = make_spec(
            layers,
            argv=["sh", "-c", "echo ready; exec httpd -f -p 8080 -h /www"],
            network=net(ns, "cvt5", 5, 2),
        )
        await driver.create(web)
        await driver.start(web.instance_id)
        await wait_for_line(driver, web.instance_id, "ready")
        res = await asyncio.to_thread(
            in_netns, ns, FETCH.format(url="http://10.213.5.2:8080/index.html")
        )
        assert res.returncode == 0 and res.stdout == "hello from the sandbox\n", res
