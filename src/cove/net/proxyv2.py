"""PROXY protocol version 2 headers (the binary form, HAProxy's ``proxy-protocol.txt`` §2.2).

Only what the edge sends: command PROXY, TCP (STREAM) or UDP (DGRAM) over IPv4 or IPv6,
no TLVs. Layout::

    signature (12)  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
    ver/cmd   (1)   0x21: version 2, PROXY
    fam/proto (1)   high nibble 1 = AF_INET, 2 = AF_INET6; low nibble 1 = STREAM, 2 = DGRAM
    length    (2)   big-endian, bytes that follow: 12 (IPv4) or 36 (IPv6)
    src addr, dst addr, src port, dst port   (network byte order)
"""

from __future__ import annotations

import socket
import struct
from typing import Literal

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_PROXY = 0x21
AF_INET = 0x10
AF_INET6 = 0x20
STREAM = 0x01
DGRAM = 0x02

_V4 = struct.Struct("!12sBBH4s4sHH")
_V6 = struct.Struct("!12sBBH16s16sHH")


def header(
    transport: Literal["tcp", "udp"],
    src: tuple[str, int],
    dst: tuple[str, int],
) -> bytes:
    """The v2 header for a connection (or datagram) from *src* to *dst*, as (ip, port).

    The address family is the source's; *dst* must be of the same family."""
    proto = STREAM if transport == "tcp" else DGRAM
    v6 = ":" in src[0]
    if v6 != (":" in dst[0]):
        raise ValueError(f"source {src[0]} and destination {dst[0]} are of different families")
    if v6:
        s, d = _packed(socket.AF_INET6, src[0]), _packed(socket.AF_INET6, dst[0])
        return _V6.pack(SIGNATURE, VERSION_PROXY, AF_INET6 | proto, 36, s, d, src[1], dst[1])
    s, d = _packed(socket.AF_INET, src[0]), _packed(socket.AF_INET, dst[0])
    return _V4.pack(SIGNATURE, VERSION_PROXY, AF_INET | proto, 12, s, d, src[1], dst[1])


def _packed(family: int, ip: str) -> bytes:
    try:
        return socket.inet_pton(family, ip.partition("%")[0])  # drop an IPv6 zone ("%eth0")
    except OSError:
        raise ValueError(f"not an IP address: {ip!r}") from None
