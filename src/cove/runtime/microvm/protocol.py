"""The control channel between a microVM's supervisor and cove-init (``guest/PROTOCOL.md``).

One virtio-serial port named ``cove.ctl`` carries frames both ways::

    u32 length (big-endian; counts type + channel + payload) | u8 type | u32 channel | payload

Channel 0 is the instance itself (its command, config, stop); an exec session uses the
channel number the host chose for it (1 and up). The same frames travel between the driver
and the supervisor on the supervisor's exec socket, where the channel is implicit (always 0
on that connection; the supervisor maps it to a guest channel).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

HEADER = struct.Struct(">IBI")
MAX_FRAME = 1 << 20  # type + channel + payload; a bigger length is a protocol error
MAX_DATA = 1 << 16  # the largest STDIN/STDOUT/STDERR payload either side sends at once
PORT_NAME = "cove.ctl"
VERSION = "cove-init 1"

# guest -> host
HELLO = 0x01  # ch 0, payload "cove-init 1": the port is open, init waits for CONFIG
STARTED = 0x02  # ch 0, payload: the command's pid (decimal)
STDOUT = 0x03  # ch 0: the command's stdout; ch N: the exec's stdout (or its terminal)
STDERR = 0x04  # ch 0 / ch N: stderr
EXIT = 0x05  # "exit N" | "signal N", then " oom" when the guest's OOM killer ran
FATAL = 0x06  # a message: setup failed (ch 0), or the exec could not start (ch N)
EXEC_STARTED = 0x07  # ch N, payload: the exec's pid
PING = 0x08  # ch 0, every second: init is alive

# host -> guest
CONFIG = 0x10  # ch 0, NUL-terminated key=value records (see PROTOCOL.md)
STOP = 0x11  # ch 0, "SIGNAL TIMEOUT_MS"
EXEC = 0x12  # ch N, NUL-terminated key=value records
STDIN = 0x13  # ch N, data; an empty payload closes the exec's stdin
RESIZE = 0x14  # ch N, "ROWS COLS"
SIGNAL = 0x15  # ch N, "SIGNAL": sent to the exec's process group

NAMES = {
    HELLO: "HELLO",
    STARTED: "STARTED",
    STDOUT: "STDOUT",
    STDERR: "STDERR",
    EXIT: "EXIT",
    FATAL: "FATAL",
    EXEC_STARTED: "EXEC_STARTED",
    PING: "PING",
    CONFIG: "CONFIG",
    STOP: "STOP",
    EXEC: "EXEC",
    STDIN: "STDIN",
    RESIZE: "RESIZE",
    SIGNAL: "SIGNAL",
}


class ProtocolError(Exception):
    """The peer sent something that is not a frame."""


@dataclass(frozen=True)
class Frame:
    type: int
    channel: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return encode(self.type, self.channel, self.payload)

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")

    def __repr__(self) -> str:
        name = NAMES.get(self.type, hex(self.type))
        return f"Frame({name}, ch={self.channel}, {self.payload[:60]!r})"


def encode(type_: int, channel: int, payload: bytes = b"") -> bytes:
    if len(payload) + 5 > MAX_FRAME:
        raise ValueError(f"frame payload too large ({len(payload)} bytes)")
    return HEADER.pack(len(payload) + 5, type_, channel) + payload


def records(items: Iterable[tuple[str, str]]) -> bytes:
    """``key=value`` records, each NUL-terminated (CONFIG and EXEC payloads)."""
    out = bytearray()
    for key, value in items:
        if "\0" in key or "\0" in value or "=" in key:
            raise ValueError(f"bad record {key!r}")
        out += f"{key}={value}".encode("utf-8", "surrogateescape") + b"\0"
    return bytes(out)


def parse_records(payload: bytes) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for raw in payload.split(b"\0")[:-1]:
        key, sep, value = raw.decode("utf-8", "surrogateescape").partition("=")
        if not sep:
            raise ProtocolError(f"record without '=': {raw[:40]!r}")
        out.append((key, value))
    return out


class Decoder:
    """Incremental frame decoder: ``feed`` bytes, get complete frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            length, type_, channel = HEADER.unpack_from(self._buf)
            if length < 5 or length > MAX_FRAME:
                raise ProtocolError(f"bad frame length {length}")
            end = 4 + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            yield Frame(type_, channel, payload)

    @property
    def pending(self) -> int:
        return len(self._buf)


def parse_exit(text: str) -> tuple[int, Literal["exited", "signal", "oom"], int | None]:
    """``exit N`` / ``signal N`` [`` oom``] -> (exit code, reason, signal)."""
    words = text.split()
    oom = "oom" in words[2:]
    try:
        kind, n = words[0], int(words[1])
    except (IndexError, ValueError):
        return 255, "exited", None
    if kind == "signal":
        return 128 + n, "oom" if oom else "signal", n
    return n, "oom" if oom else "exited", None
