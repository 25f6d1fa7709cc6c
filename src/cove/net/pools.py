"""Public address pools: where endpoint addresses come from (server config).

Every endpoint gets one IPv6 address from the IPv6 prefix; an endpoint that asks for the
IPv4 add-on also gets one address from the IPv4 pool. The embedded default suits one
machine: a unique-local /64 and a /24 inside 127.0.0.0/8, both derived from the data
directory so two installs on one host never share addresses. The node agent makes the
pools local (an AnyIP ``local`` route on ``lo``), so any address in them can be bound.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cove import errors

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SCAN_LIMIT = 1 << 16  # pools up to this size are allocated lowest-free-first


@dataclass(frozen=True, slots=True)
class Pools:
    ipv6: ipaddress.IPv6Network
    ipv4: ipaddress.IPv4Network

    def as_dict(self) -> dict[str, str]:
        return {"ipv6": str(self.ipv6), "ipv4": str(self.ipv4)}


def parse(value: str, family: int) -> Network:
    """A pool from user text (``fd12:3456::/64``, ``127.77.1.0/24``), with a clear error."""
    try:
        net = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise errors.UserError(
            f"invalid IPv{family} pool {value!r}: {exc}",
            hint="give a network with its prefix length, e.g. "
            + ("2001:db8:42::/64" if family == 6 else "198.51.100.0/28"),
            code="bad_pool",
        ) from exc
    if net.version != family:
        raise errors.UserError(
            f"{value!r} is not an IPv{family} network", code="bad_pool", hint="check the flag"
        )
    if net.num_addresses < (4 if family == 4 else 2):
        raise errors.UserError(f"the pool {value} is too small", code="bad_pool")
    return net


def default_pools(data_dir: Path) -> Pools:
    """The embedded default for one machine, unique per data directory."""
    h = hashlib.sha256(b"cove-public:" + str(data_dir.resolve()).encode()).digest()
    # RFC 4193: fd00::/8 + a 40-bit global id + a 16-bit subnet id
    v6 = ipaddress.IPv6Network((b"\xfd" + h[:7] + bytes(8), 64))
    v4 = ipaddress.IPv4Network((bytes([127, 100 + h[8] % 150, h[9], 0]), 24))
    return Pools(ipv6=v6, ipv4=v4)


def configured(data_dir: Path, ipv6: str | None = None, ipv4: str | None = None) -> Pools:
    """Flags first, then COVE_PUBLIC_IPV6 / COVE_PUBLIC_IPV4, then the embedded default."""
    base = default_pools(data_dir)
    v6 = ipv6 or os.environ.get("COVE_PUBLIC_IPV6")
    v4 = ipv4 or os.environ.get("COVE_PUBLIC_IPV4")
    net6 = parse(v6, 6) if v6 else base.ipv6
    net4 = parse(v4, 4) if v4 else base.ipv4
    assert isinstance(net6, ipaddress.IPv6Network) and isinstance(net4, ipaddress.IPv4Network)
    return Pools(ipv6=net6, ipv4=net4)


def usable(net: Network) -> tuple[int, int]:
    """First and last usable address (as ints): never the network's first address, and
    for IPv4 never its last (broadcast on a real LAN)."""
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    return first, last


def pick(net: Network, taken: Callable[[str], bool], *, tries: int = 64) -> str | None:
    """A free address of ``net``: lowest first for small pools (predictable, dense),
    random for large ones (a /64 is never scanned). ``None`` when the pool is full."""
    first, last = usable(net)
    cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
    if last - first + 1 <= SCAN_LIMIT:
        for n in range(first, last + 1):
            addr = str(cls(n))
            if not taken(addr):
                return addr
        return None
    for _ in range(tries):
        addr = str(cls(first + secrets.randbelow(last - first + 1)))
        if not taken(addr):
            return addr
    return None
