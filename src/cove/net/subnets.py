"""Instance subnets: each node's instances get addresses from a subnet of their own, and no
two nodes of a cluster share one, so a node can route to another node's instances (host-gw:
``ip route replace SUBNET via NODE_ADDRESS`` on every node).

The agent proposes a subnet (kept in its state directory, or given with ``--pool4`` /
``--pool6``); the server checks it against every other node's when the node registers. A
proposed subnet that another node already has is replaced by a free one from the default
range - unless the operator fixed it with the flags, which is an error to fix by hand. A leaf
module: no sockets, no store.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cove import errors

# the default range: 10.213.16.0/24 ... 10.213.239.0/24, one /24 per node (and one /64)
THIRDS = range(16, 240)


@dataclass(frozen=True, slots=True)
class NodeNetwork:
    ipv4: ipaddress.IPv4Network
    ipv6: ipaddress.IPv6Network

    def as_dict(self) -> dict[str, str]:
        return {"ipv4": str(self.ipv4), "ipv6": str(self.ipv6)}

    def overlaps(self, other: NodeNetwork) -> bool:
        return self.ipv4.overlaps(other.ipv4) or self.ipv6.overlaps(other.ipv6)


def default_for(third: int, salt: int = 0) -> NodeNetwork:
    """The default subnets numbered *third* (``10.213.<third>.0/24``); *salt* (0-65535) varies
    the IPv6 /64 between installs."""
    return NodeNetwork(
        ipaddress.IPv4Network(f"10.213.{third}.0/24"),
        ipaddress.IPv6Network(f"fd00:c0e:{third:x}:{salt:x}::/64"),
    )


def parse(ipv4: str, ipv6: str) -> NodeNetwork:
    """A node's subnets from text, with a clear error."""
    try:
        v4 = ipaddress.IPv4Network(ipv4.strip(), strict=True)
        v6 = ipaddress.IPv6Network(ipv6.strip(), strict=True)
    except ValueError as exc:
        raise errors.UserError(
            f"bad instance subnet: {exc}",
            hint="e.g. --pool4 10.213.20.0/24 --pool6 fd00:c0e:20::/64",
            code="bad_subnet",
        ) from exc
    if not 8 <= v4.prefixlen <= 29:
        raise errors.UserError(
            f"the IPv4 instance subnet {v4} must be a /8 to a /29", code="bad_subnet"
        )
    if not 48 <= v6.prefixlen <= 120:
        raise errors.UserError(
            f"the IPv6 instance subnet {v6} must be a /48 to a /120", code="bad_subnet"
        )
    for net in (v4, v6):
        if net.is_loopback or net.is_multicast or net.is_link_local or net.is_unspecified:
            raise errors.UserError(
                f"{net} can't be an instance subnet (loopback, multicast or link-local)",
                code="bad_subnet",
            )
    return NodeNetwork(v4, v6)


def assign(
    proposed: NodeNetwork, others: Iterable[tuple[str, NodeNetwork]], *, fixed: bool
) -> NodeNetwork:
    """The subnets the node gets: *proposed* when no other node's overlap it; else, when not
    *fixed*, the first free default; else a Conflict naming the node that has them."""
    taken = list(others)
    clash = next((name for name, net in taken if net.overlaps(proposed)), None)
    if clash is None:
        return proposed
    if fixed:
        raise errors.Conflict(
            f"the instance subnet {proposed.ipv4} / {proposed.ipv6} overlaps node {clash}'s",
            hint="give this node other --pool4/--pool6, or leave them out and the server "
            "picks free ones",
            code="subnet_taken",
        )
    salt = int(proposed.ipv6.network_address) >> 64 & 0xFFFF
    for third in THIRDS:
        candidate = default_for(third, salt)
        if not any(net.overlaps(candidate) for _, net in taken):
            return candidate
    raise errors.Conflict(
        f"every default instance subnet (10.213.{THIRDS[0]}-{THIRDS[-1]}.0/24) is taken",
        hint="give this node its own --pool4/--pool6",
        code="subnet_taken",
    )
