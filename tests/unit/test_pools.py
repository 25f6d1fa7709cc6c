"""Public address pools: parsing, the per-install default, picking free addresses."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from cove import errors
from cove.net.pools import configured, default_pools, parse, pick, usable


def test_the_default_is_unique_local_and_loopback_and_differs_per_data_dir(tmp_path: Path) -> None:
    a, b = default_pools(tmp_path / "a"), default_pools(tmp_path / "b")
    assert a == default_pools(tmp_path / "a")  # stable
    assert a.ipv6 != b.ipv6 and a.ipv6.prefixlen == 64
    assert a.ipv6.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert a.ipv4.prefixlen == 24 and a.ipv4.subnet_of(ipaddress.IPv4Network("127.0.0.0/8"))
    assert not a.ipv4.subnet_of(ipaddress.IPv4Network("127.0.0.0/16"))  # never 127.0.0.1


def test_flags_then_environment_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COVE_PUBLIC_IPV4", "198.51.100.0/28")
    p = configured(tmp_path, ipv6="2001:db8:1::/64")
    assert str(p.ipv6) == "2001:db8:1::/64" and str(p.ipv4) == "198.51.100.0/28"
    assert configured(tmp_path, ipv4="203.0.113.0/29").ipv4.prefixlen == 29
    monkeypatch.delenv("COVE_PUBLIC_IPV4")
    assert configured(tmp_path).ipv4 == default_pools(tmp_path).ipv4


@pytest.mark.parametrize(
    ("value", "family", "words"),
    [
        ("nonsense", 6, "invalid IPv6 pool"),
        ("2001:db8::1/64", 6, "host bits"),
        ("192.0.2.0/24", 6, "not an IPv6"),
        ("2001:db8::/64", 4, "not an IPv4"),
        ("192.0.2.0/31", 4, "too small"),
        ("", 4, "invalid"),
    ],
)
def test_bad_pools_are_clear_errors(value: str, family: int, words: str) -> None:
    with pytest.raises(errors.UserError) as exc:
        parse(value, family)
    assert words in exc.value.detail and exc.value.code == "bad_pool"


def test_small_pools_fill_lowest_first_and_skip_network_and_broadcast() -> None:
    net = ipaddress.IPv4Network("192.0.2.0/29")
    assert usable(net) == (int(net.network_address) + 1, int(net.broadcast_address) - 1)
    taken: set[str] = set()
    got = []
    while (a := pick(net, taken.__contains__)) is not None:
        got.append(a)
        taken.add(a)
    assert got == [f"192.0.2.{i}" for i in range(1, 7)]
    taken.discard("192.0.2.3")
    assert pick(net, taken.__contains__) == "192.0.2.3"  # a freed address comes back first


def test_large_pools_are_random_and_never_the_subnet_router_anycast() -> None:
    net = ipaddress.IPv6Network("2001:db8:5::/64")
    seen = {pick(net, lambda _a: False) for _ in range(50)}
    assert len(seen) == 50
    assert all(a is not None and ipaddress.IPv6Address(a) in net for a in seen)
    assert "2001:db8:5::" not in seen
    # a pool whose every try is taken says so instead of looping forever
    assert pick(net, lambda _a: True, tries=5) is None
