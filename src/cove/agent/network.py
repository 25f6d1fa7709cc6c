"""Private addresses for instances on this node's bridge: one IPv4 and one IPv6 each,
allocated from the node's pools and remembered on disk, so an agent restart keeps them; and
the routes to the other nodes' instance subnets (host-gw: every node routes each other
node's subnet via that node's address, so the nodes share one link)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path

from cove import errors

log = logging.getLogger("cove.agent.network")


class AddressPool:
    def __init__(self, state: Path, bridge: str, pool4: str, pool6: str) -> None:
        self.path = state / "addresses.json"
        self.bridge = bridge
        self.net4 = ipaddress.IPv4Network(pool4)
        self.net6 = ipaddress.IPv6Network(pool6)
        if self.net4.num_addresses < 4:
            raise errors.UserError(f"IPv4 pool {pool4} is too small")
        state.mkdir(parents=True, exist_ok=True)

    def _load(self) -> dict[str, int]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in doc.items()}

    def _save(self, doc: dict[str, int]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True))
        os.replace(tmp, self.path)

    @property
    def gateway4(self) -> str:
        return str(self.net4.network_address + 1)

    @property
    def gateway6(self) -> str:
        return str(self.net6.network_address + 1)

    def allocate(self, instance_id: str) -> tuple[str, str]:
        """(ipv4/len, ipv6/len) for the instance; the same answer every time.

        Addresses are handed out round-robin, not lowest-free: a just-released address
        would still sit in the host's neighbour cache with the old instance's MAC, and
        the new instance would be unreachable until that entry expired."""
        doc = self._load()
        if instance_id not in doc:
            used = {v for k, v in doc.items() if not k.startswith("_")}
            first, last = 2, self.net4.num_addresses - 2  # not the broadcast address
            cursor = doc.get("_next", first)
            span = last - first + 1
            index = None
            for step in range(span):
                i = first + (cursor - first + step) % span
                if i not in used:
                    index = i
                    break
            if index is None:
                raise errors.Transient(f"no free address in {self.net4} on this node")
            doc[instance_id] = index
            doc["_next"] = index + 1
            self._save(doc)
        i = doc[instance_id]
        return (
            f"{self.net4.network_address + i}/{self.net4.prefixlen}",
            f"{self.net6.network_address + i}/{self.net6.prefixlen}",
        )

    def release(self, instance_id: str) -> None:
        doc = self._load()
        if doc.pop(instance_id, None) is not None:
            self._save(doc)


# -- routes to the other nodes' instances (host-gw) ------------------------------------------

ROUTE_PROTO = 163  # marks the routes this agent owns (``ip route show proto 163``)
FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")


async def apply_routes(wanted: list[dict[str, str]]) -> dict[str, str]:
    """Make this host's routes to other nodes' instance subnets exactly *wanted*
    (``{"subnet", "via"}`` each): ``ip route replace SUBNET via ADDRESS proto 163``, and the
    routes of that protocol that are no longer wanted removed. Other nodes then reach this
    node's instances through it, so IPv4 forwarding is turned on while there are peers.
    A route that can't be made (its next hop on no link here) is logged and skipped.
    Returns {subnet: via} as applied."""
    from cove.runtime.network import _ipr

    want = {r["subnet"]: r["via"] for r in wanted}
    if want and FORWARDING.read_text().strip() != "1":
        FORWARDING.write_text("1\n")
        log.info("turned on IPv4 forwarding: other nodes reach this node's instances through it")
    async with _ipr(None) as ipr:
        have: dict[str, str] = {}
        async for r in await ipr.route("dump", family=2, proto=ROUTE_PROTO):
            if r.get("table") == 254 and r.get("dst"):
                have[f"{r.get('dst')}/{r['dst_len']}"] = str(r.get("gateway"))
        for subnet, via in have.items():
            if want.get(subnet) != via:
                try:
                    await ipr.route("del", dst=subnet, proto=ROUTE_PROTO, family=2)
                except Exception as exc:  # NetlinkError: already gone
                    log.debug("route to %s: %s", subnet, exc)
        applied = {}
        for subnet, via in want.items():
            if have.get(subnet) == via:
                applied[subnet] = via
                continue
            try:
                await ipr.route("replace", dst=subnet, gateway=via, proto=ROUTE_PROTO, family=2)
            except Exception as exc:  # NetlinkError: e.g. the gateway is not on a link here
                # one peer out of reach must not keep the edge from serving the others
                log.warning("can't route %s via %s (%s); retrying with the next change",
                            subnet, via, exc)  # fmt: skip
                continue
            applied[subnet] = via
            log.info("route to the instances of another node: %s via %s", subnet, via)
    return applied
