"""Instance subnets across nodes, against the real store (both backends): each node's are
its own (a clash is replaced, or refused when the operator fixed them), and every node's
edge configuration routes the other nodes' subnets via their addresses."""

from __future__ import annotations

from typing import Any

import pytest

from cove.store import Store
from tests.integration.helpers import ok, problem, set_join_token, snapshot
from tests.integration.test_billing import World, clock, image, world

__all__ = ["clock", "image", "world"]


_TOKENS: dict[int, str] = {}


def _register(w: World, store: Store, name: str, network: Any) -> Any:
    if id(store) not in _TOKENS:
        _TOKENS[id(store)] = set_join_token(store)
    body: dict[str, Any] = {"name": name, "join_token": _TOKENS[id(store)], "driver": "sandbox"}
    if network is not None:
        body["network"] = network
    return w.api.post("/v1/nodes/register", json=body)


def _net(ipv4: str, ipv6: str, address: str | None, fixed: bool = False) -> dict[str, Any]:
    return {"ipv4": ipv4, "ipv6": ipv6, "address": address, "fixed": fixed}


def _edge(w: World, reg: dict[str, Any]) -> dict[str, Any]:
    hdr = {"Authorization": f"Bearer {reg['token']}"}
    doc: dict[str, Any] = ok(w.api.get(f"/v1/nodes/{reg['node']['id']}/edge", headers=hdr))
    return doc


def test_each_node_gets_its_own_subnet_and_routes_to_the_others(store: Store, world: World) -> None:
    w = world
    same = _net("10.213.50.0/24", "fd00:c0e:32:7::/64", "192.0.2.11")
    a = ok(_register(w, store, "na", same), 201)
    assert a["network"] == {k: v for k, v in same.items() if k != "fixed"}
    # the second proposes the same subnets (a copied state directory, a common default)
    b = ok(_register(w, store, "nb", dict(same, address="192.0.2.12")), 201)
    assert b["network"]["ipv4"] != same["ipv4"] and b["network"]["ipv6"] != same["ipv6"], b
    assert b["network"]["ipv4"].startswith("10.213.") and b["network"]["address"] == "192.0.2.12"
    assert b["node"]["status"]["network"] == b["network"]
    # a rejoin keeps its own subnets (it does not clash with itself)
    again = ok(_register(w, store, "na", same), 201)
    assert again["network"]["ipv4"] == same["ipv4"]

    # a node with no address (one host) and a sim node (no network) route nothing, and
    # nobody routes to them
    lone = ok(_register(w, store, "nc", _net("10.213.90.0/24", "fd00:c0e:5a::/64", None)), 201)
    # an IPv4 subnet can't be routed via an IPv6 next hop: such a peer is left out
    ok(_register(w, store, "ne", _net("10.213.91.0/24", "fd00:c0e:5b::/64", "2001:db8::e")), 201)
    sim = ok(_register(w, store, "nd", None), 201)
    assert sim["network"] is None
    assert _edge(w, lone)["routes"] == [] and _edge(w, sim)["routes"] == []
    assert _edge(w, again)["routes"] == [
        {"node": "nb", "subnet": b["network"]["ipv4"], "via": "192.0.2.12"}
    ]
    assert _edge(w, b)["routes"] == [{"node": "na", "subnet": same["ipv4"], "via": "192.0.2.11"}]


def test_a_subnet_the_operator_fixed_is_refused_when_another_node_has_it(
    store: Store, world: World
) -> None:
    w = world
    ok(_register(w, store, "na", _net("10.213.50.0/24", "fd00:c0e:32::/64", "192.0.2.11")), 201)
    before = snapshot(store)
    clash = _net("10.213.50.128/25", "fd00:c0e:99::/64", "192.0.2.12", fixed=True)
    doc = problem(_register(w, store, "nb", clash), 409, "subnet_taken")
    assert "overlaps node na's" in doc["detail"] and "--pool4" in doc["hint"], doc
    assert snapshot(store) == before


@pytest.mark.parametrize(
    ("network", "field", "words"),
    [
        (_net("10.213.50.1/24", "fd00:c0e:32::/64", None), None, "has host bits set"),
        (_net("10.213.50.0/31", "fd00:c0e:32::/64", None), None, "/8 to a /29"),
        (_net("127.0.0.0/24", "fd00:c0e:32::/64", None), None, "loopback"),
        (_net("10.213.50.0/24", "not-a-net", None), None, "bad instance subnet"),
        (_net("10.213.50.0/24", "fd00:c0e:32::/64", "127.0.0.1"), "network.address", "loopback"),
        (_net("10.213.50.0/24", "fd00:c0e:32::/64", "fe80::1"), "network.address", "link-local"),
        (_net("10.213.50.0/24", "fd00:c0e:32::/64", "node-1"), "network.address", "not an IP"),
        ({"ipv4": "10.213.50.0/24"}, "network.ipv6", "required"),
    ],
)
def test_bad_networks_are_refused_and_write_nothing(
    store: Store, world: World, network: Any, field: str | None, words: str
) -> None:
    _register(world, store, "ny", None)  # (the join token is set before the snapshot)
    before = snapshot(store)
    doc = problem(_register(world, store, "nx", network), 422)
    if field is None:
        assert doc["code"] == "bad_subnet" and words in doc["detail"], doc
    else:
        [err] = [e for e in doc["errors"] if e["field"] == field]
        assert words.lower() in err["problem"].lower(), doc
    assert snapshot(store) == before
