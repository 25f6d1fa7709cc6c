"""PROXY v2 headers from cove.net.proxyv2, parsed back by the independent ``proxyprotocol``."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v2 import ProxyProtocolV2

from cove.net import proxyv2

CASES = [
    ("tcp", ("192.0.2.10", 51234), ("198.51.100.7", 443), socket.SOCK_STREAM),
    ("udp", ("192.0.2.10", 5353), ("198.51.100.7", 53), socket.SOCK_DGRAM),
    ("tcp", ("2001:db8::1234", 65535), ("2001:db8:ffff::1", 8080), socket.SOCK_STREAM),
    ("udp", ("fd00::2", 1), ("fd00::1", 65535), socket.SOCK_DGRAM),
]


@pytest.mark.parametrize(("transport", "src", "dst", "kind"), CASES)
def test_header_parses_back_with_the_exact_addresses(
    transport: str, src: tuple[str, int], dst: tuple[str, int], kind: socket.SocketKind
) -> None:
    data = proxyv2.header(transport, src, dst)  # type: ignore[arg-type]
    result = ProxyProtocolV2().unpack(data)
    v6 = ":" in src[0]
    assert isinstance(result, ProxyResultIPv6 if v6 else ProxyResultIPv4)
    addr = IPv6Address if v6 else IPv4Address
    assert result.source == (addr(src[0]), src[1])
    assert result.dest == (addr(dst[0]), dst[1])
    assert result.protocol == kind
    assert not list(result.tlv)  # no TLVs
    assert len(data) == 16 + (36 if v6 else 12)  # nothing after the addresses


def test_header_bytes_follow_the_spec_exactly() -> None:
    data = proxyv2.header("tcp", ("10.0.0.1", 0x1234), ("10.0.0.2", 80))
    assert data == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        b"\x21"  # version 2, PROXY
        b"\x11"  # AF_INET, STREAM
        b"\x00\x0c"  # 12 address bytes follow
        b"\x0a\x00\x00\x01\x0a\x00\x00\x02"
        b"\x12\x34\x00\x50"
    )
    assert proxyv2.header("udp", ("::1", 1), ("::2", 2))[12:16] == b"\x21\x22\x00\x24"


def test_an_ipv6_zone_is_left_out() -> None:
    result = ProxyProtocolV2().unpack(proxyv2.header("tcp", ("fe80::1%eth0", 1), ("fe80::2", 2)))
    assert result.source == (IPv6Address("fe80::1"), 1)


@pytest.mark.parametrize(
    ("src", "dst", "error"),
    [
        (("10.0.0.1", 1), ("::1", 2), "different families"),
        (("::1", 1), ("10.0.0.1", 2), "different families"),
        (("not-an-ip", 1), ("10.0.0.1", 2), "not an IP address"),
        (("10.0.0.300", 1), ("10.0.0.1", 2), "not an IP address"),
    ],
)
def test_bad_addresses_are_refused(src: tuple[str, int], dst: tuple[str, int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        proxyv2.header("tcp", src, dst)
