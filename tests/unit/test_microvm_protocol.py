"""The cove.ctl frame codec, the CONFIG the supervisor sends (guest/PROTOCOL.md), and the
supervisor's end of an exec session."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from cove.runtime import InstanceSpec, NetConfig, VolumeMount
from cove.runtime.layout import InstancePaths
from cove.runtime.microvm import protocol as P
from cove.runtime.microvm.driver import MicroVMExecProcess
from cove.runtime.microvm.supervisor import VMSupervisor, config_records, run_dir


def test_frames_survive_any_split() -> None:
    frames = [
        P.Frame(P.HELLO, 0, b"cove-init 1"),
        P.Frame(P.STDOUT, 7, bytes(range(256)) * 300),
        P.Frame(P.PING, 0),
        P.Frame(P.EXIT, 7, b"signal 9 oom"),
    ]
    wire = b"".join(f.encode() for f in frames)
    for step in (1, 3, 5, 4096, len(wire)):
        dec = P.Decoder()
        got = []
        for i in range(0, len(wire), step):
            got.extend(dec.feed(wire[i : i + step]))
        assert got == frames and dec.pending == 0


@pytest.mark.parametrize("length", [0, 4, P.MAX_FRAME + 1, 0xFFFFFFFF])
def test_a_bad_length_is_a_protocol_error(length: int) -> None:
    dec = P.Decoder()
    with pytest.raises(P.ProtocolError):
        list(dec.feed(length.to_bytes(4, "big") + b"\x01\x00\x00\x00\x00"))


def test_an_oversized_payload_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError):
        P.encode(P.STDIN, 1, b"x" * P.MAX_FRAME)


def test_records_round_trip_and_refuse_nul_and_bad_keys() -> None:
    items = [("arg", "sh"), ("arg", "-c"), ("env", "A=b=c"), ("arg", "é :")]
    assert P.parse_records(P.records(items)) == items
    for bad in [("a\0b", "x"), ("k", "v\0"), ("k=", "v")]:
        with pytest.raises(ValueError):
            P.records([bad])
    with pytest.raises(P.ProtocolError):
        P.parse_records(b"no-equals\0")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exit 0", (0, "exited", None)),
        ("exit 3", (3, "exited", None)),
        ("signal 15", (143, "signal", 15)),
        ("signal 9 oom", (137, "oom", 9)),
        ("exit 1 oom", (1, "oom", None)),
        ("garbage", (255, "exited", None)),
        ("", (255, "exited", None)),
    ],
)
def test_parse_exit(text: str, expected: tuple[int, str, int | None]) -> None:
    assert P.parse_exit(text) == expected


def test_config_carries_everything_the_guest_needs() -> None:
    spec = InstanceSpec(
        instance_id="ins_1",
        hostname="web-1",
        layers=[Path("/x")],
        argv=["httpd", "-f"],
        env={"A": "1"},
        workdir="/srv",
        volumes=[
            VolumeMount(Path("/v/a.img"), "/data"),
            VolumeMount(Path("/v/b.img"), "/ro:odd", read_only=True),
        ],
        network=NetConfig("br0", "10.0.0.5/24", "fd00::5/64", "10.0.0.1", "fd00::1"),
    )
    secrets = json.dumps({"values": {"K": "v"}}).encode()
    ident = {"uid": 1000, "gid": 1001, "groups": [50, 60]}
    recs = P.parse_records(config_records(spec, ident, secrets, ["/dev/vdb", "/dev/vdc"]))
    assert recs[0] == ("version", "1")
    assert [v for k, v in recs if k == "arg"] == ["httpd", "-f"]
    env = [v for k, v in recs if k == "env"]
    assert "A=1" in env and any(e.startswith("PATH=") for e in env)
    assert ("uid", "1000") in recs and ("gid", "1001") in recs
    assert [v for k, v in recs if k == "group"] == ["50", "60"]
    assert [v for k, v in recs if k == "volume"] == ["/dev/vdb:rw:/data", "/dev/vdc:ro:/ro:odd"]
    assert ("ip4", "10.0.0.5/24") in recs and ("gw6", "fd00::1") in recs
    assert ("secrets", secrets.decode()) in recs
    assert ("hostname", "web-1") in recs and ("workdir", "/srv") in recs


def test_socket_dir_is_short_whatever_the_instance_dir() -> None:
    long = Path("/var/lib/cove/" + "x" * 200 + "/instances/ins_" + "y" * 60)
    assert len(str(run_dir(long) / "exec.sock")) < 100
    assert run_dir(long) != run_dir(long.parent / "other")


def test_a_command_that_ends_as_its_input_closes_still_reports_its_exit(tmp_path: Path) -> None:
    """The guest's EXIT and the client's end-of-input cross: the client writes after the
    supervisor finished the session. Closing the socket then (as the supervisor once did)
    broke the client's write, and asyncio dropped the EXIT frame still unread: `cove exec`
    reported 255 for a command that exited 0."""
    path = str(tmp_path / "exec.sock")
    ended = threading.Event()
    sup_loop = asyncio.new_event_loop()
    handlers: list[asyncio.Future[None]] = []
    sup = VMSupervisor(InstancePaths(tmp_path), -1)

    async def guest(type_: int, channel: int, payload: bytes = b"") -> None:
        if type_ == P.EXEC:  # the command starts and ends at once
            sup._on_frame(P.Frame(P.EXEC_STARTED, channel, b"42"))
            sup._on_frame(P.Frame(P.EXIT, channel, b"exit 0"))
            ended.set()

    sup._send = guest  # type: ignore[method-assign]

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(sup._exec_client(r, w))
        handlers.append(task)
        await task

    server = sup_loop.run_until_complete(asyncio.start_unix_server(client, path=path))
    thread = threading.Thread(target=sup_loop.run_forever, daemon=True)
    thread.start()

    async def run() -> int:
        reader, writer = await asyncio.open_unix_connection(path)
        proc = MicroVMExecProcess(reader, writer, tty=False)
        writer.write(P.encode(P.EXEC, 0, P.records([("arg", "true")])))
        await writer.drain()
        # without yielding to this loop: the session is over on the supervisor's side
        # before this client has read a byte of it
        assert ended.wait(5)
        time.sleep(0.05)
        await proc.close_stdin()
        code = await proc.wait(5)
        proc.close()
        return code

    try:
        assert asyncio.run(run()) == 0
        # the supervisor's end closes once the client hung up
        deadline = time.monotonic() + 5
        while not (handlers and handlers[0].done()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handlers and handlers[0].done()
    finally:
        server.close()
        sup_loop.call_soon_threadsafe(sup_loop.stop)
        thread.join(5)
        sup_loop.close()
