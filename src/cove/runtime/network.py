"""Instance networking: a veth pair from the instance's own network namespace to a bridge.

Host side (in ``NetConfig.netns``, or the current namespace): the bridge (created with the
gateway addresses when missing) and the veth end ``cv<hash>`` attached to it. Instance side:
``eth0`` with the instance's IPv4/IPv6 addresses, default routes via the gateways (``lo`` is
brought up by bwrap).
The instance's namespace is reached through its sandbox pid (``/proc/PID/ns/net``).

Uses pyroute2's asyncio API (imported lazily: only instances with a network pay for it). The
supervisor calls ``attach`` while the sandbox is still blocked, before its program runs.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import os
import socket
from typing import Any

from cove.errors import Permanent, Transient, UserError
from cove.runtime.base import NetConfig

IFNAMSIZ = 15
IFA_F_NODAD = 0x02


def host_ifname(instance_id: str) -> str:
    """The host-side veth name of an instance (stable, at most 15 characters)."""
    return "cv" + hashlib.sha256(instance_id.encode()).hexdigest()[:12]


def instance_mac(instance_id: str) -> str:
    """The MAC of the instance's ``eth0``: fixed per instance (locally administered, unicast).

    A restart is a new sandbox with a new veth; with a random MAC the host's neighbour cache
    would keep the old one for the same addresses and the instance would be unreachable
    (health checks time out) until that entry expired."""
    digest = hashlib.sha256(b"mac\x00" + instance_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def validate(net: NetConfig) -> None:
    """Reject a NetConfig that cannot work, before anything is created."""
    if not net.bridge or len(net.bridge) > IFNAMSIZ or "/" in net.bridge or " " in net.bridge:
        raise UserError(f"bad bridge name {net.bridge!r}", hint="1-15 characters, no '/' or ' '")
    try:
        v4 = ipaddress.IPv4Interface(net.ipv4)
        v6 = ipaddress.IPv6Interface(net.ipv6)
        g4 = ipaddress.IPv4Address(net.gateway4)
        g6 = ipaddress.IPv6Address(net.gateway6)
    except ValueError as exc:
        raise UserError(f"bad network address: {exc}") from exc
    if "/" not in net.ipv4 or "/" not in net.ipv6:
        raise UserError("ipv4 and ipv6 need a prefix length, e.g. 10.0.0.5/24 and fd00::5/64")
    if g4 not in v4.network or g6 not in v6.network:
        raise UserError("the gateways must be inside the instance's subnets")
    if g4 == v4.ip or g6 == v6.ip:
        raise UserError("an instance address equals its gateway")


def _ipr(netns: str | None) -> Any:
    import pyroute2.config  # type: ignore[import-untyped]
    from pyroute2 import AsyncIPRoute

    # pyroute2 forks a helper to open a socket in another netns and ends it with SIGTERM; with
    # this, the helper resets SIGTERM to the default first - otherwise an inherited asyncio
    # wakeup fd would make its SIGTERM look like one sent to this process.
    pyroute2.config.disable_mp_signal = True
    if netns is None:
        return AsyncIPRoute()
    return AsyncIPRoute(netns=netns, flags=0)


def _netlink_error() -> type[Exception]:
    from pyroute2 import NetlinkError

    return NetlinkError  # type: ignore[no-any-return]


async def _ignore_exists(coro: Any) -> None:
    try:
        await coro
    except _netlink_error() as exc:
        if getattr(exc, "code", None) != errno.EEXIST:
            raise


async def _ensure_bridge(ipr: Any, net: NetConfig) -> int:
    found = await ipr.link_lookup(ifname=net.bridge)
    if not found:
        await _ignore_exists(ipr.link("add", ifname=net.bridge, kind="bridge"))
        found = await ipr.link_lookup(ifname=net.bridge)
    idx = int(found[0])
    # the gateways, also on a bridge that already existed (left by an earlier install with
    # this name and other addresses: without ours, traffic to the instances would take the
    # host's default route instead)
    v4 = ipaddress.IPv4Interface(net.ipv4)
    v6 = ipaddress.IPv6Interface(net.ipv6)
    await _ignore_exists(
        ipr.addr("add", index=idx, address=net.gateway4, prefixlen=v4.network.prefixlen)
    )
    await _ignore_exists(
        ipr.addr(
            "add",
            index=idx,
            address=net.gateway6,
            prefixlen=v6.network.prefixlen,
            flags=IFA_F_NODAD,
        )
    )
    await ipr.link("set", index=idx, state="up")
    return idx


async def attach(net: NetConfig, instance_id: str, sandbox_pid: int) -> None:
    """Wire the instance whose sandbox init is *sandbox_pid* to its bridge."""
    netlink_error = _netlink_error()
    host = host_ifname(instance_id)
    v4 = ipaddress.IPv4Interface(net.ipv4)
    v6 = ipaddress.IPv6Interface(net.ipv6)
    try:
        ns_fd = os.open(f"/proc/{sandbox_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Transient(f"the sandbox is gone before its network was set up: {exc}") from exc
    try:
        async with _ipr(net.netns) as ipr:
            br = await _ensure_bridge(ipr, net)
            for stale in await ipr.link_lookup(ifname=host):  # left over from an earlier run
                await ipr.link("del", index=stale)
            await ipr.link(
                "add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns_fd}
            )
            idx = (await ipr.link_lookup(ifname=host))[0]
            await ipr.link("set", index=idx, master=br, state="up")
        async with _ipr(f"/proc/{sandbox_pid}/ns/net") as ipr:
            # (lo: bwrap brings it up with 127.0.0.1/::1 once released; touching it here
            # would make bwrap's own setup fail)
            eth = (await ipr.link_lookup(ifname="eth0"))[0]
            await ipr.link("set", index=eth, address=instance_mac(instance_id))
            await ipr.addr("add", index=eth, address=str(v4.ip), prefixlen=v4.network.prefixlen)
            await ipr.addr(
                "add",
                index=eth,
                address=str(v6.ip),
                prefixlen=v6.network.prefixlen,
                flags=IFA_F_NODAD,
            )
            await ipr.link("set", index=eth, state="up")
            await ipr.route("add", dst="default", gateway=net.gateway4)
            await ipr.route("add", dst="default", gateway=net.gateway6, family=socket.AF_INET6)
    except netlink_error as exc:
        raise Permanent(f"cannot set up the instance network: {exc}") from exc
    except OSError as exc:
        raise Transient(f"cannot set up the instance network: {exc}") from exc
    finally:
        os.close(ns_fd)


async def attach_tap(net: NetConfig, instance_id: str, owner_uid: int) -> str:
    """Create the instance's tap (a microVM's ``eth0`` on the host side) on its bridge, owned
    by *owner_uid* (the unprivileged QEMU process opens it), up; return its name. The guest
    configures its own addresses (cove-init, from the CONFIG frame)."""
    netlink_error = _netlink_error()
    host = host_ifname(instance_id)
    try:
        async with _ipr(net.netns) as ipr:
            br = await _ensure_bridge(ipr, net)
            for stale in await ipr.link_lookup(ifname=host):  # left over from an earlier run
                await ipr.link("del", index=stale)
            await _run_ip(
                net.netns,
                "tuntap",
                "add",
                "dev",
                host,
                "mode",
                "tap",
                "user",
                str(owner_uid),
                check=True,
            )
            idx = (await ipr.link_lookup(ifname=host))[0]
            await ipr.link("set", index=idx, master=br, state="up")
    except netlink_error as exc:
        raise Permanent(f"cannot set up the instance network: {exc}") from exc
    except OSError as exc:
        raise Transient(f"cannot set up the instance network: {exc}") from exc
    return host


async def detach(net: NetConfig, instance_id: str, timeout: float = 10.0) -> None:
    """Remove the host end of the instance's veth (the pair goes with it) or its tap.
    Idempotent.

    Uses ``ip`` in a subprocess: no forking of the (agent) process that calls it."""
    text = await _run_ip(net.netns, "link", "del", host_ifname(instance_id), timeout=timeout)
    gone = (
        "Cannot find device",
        "No such device",
        "does not exist",
        "Cannot open network namespace",
    )
    if text is not None and not any(g in text for g in gone):
        raise Transient(f"cannot remove the instance's network interface: {text.strip()}")


async def _run_ip(
    netns: str | None, *args: str, timeout: float = 10.0, check: bool = False
) -> str | None:
    """Run ``ip [-n NETNS] ARGS``; None when it succeeded, else its error output (raised as
    Transient with *check*)."""
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Transient(f"`{' '.join(cmd)}` did not finish in {timeout:.0f}s") from None
    text = err.decode(errors="replace")
    if not proc.returncode:
        return None
    if check:
        raise Transient(f"`{' '.join(cmd)}` failed: {text.strip()}")
    return text
