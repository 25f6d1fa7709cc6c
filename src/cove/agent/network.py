"""Private addresses for instances on this node's bridge: one IPv4 and one IPv6 each,
allocated from the node's pools and remembered on disk, so an agent restart keeps them."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from cove import errors


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
