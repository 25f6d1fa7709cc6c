"""The cove.ctl frame codec and the CONFIG the supervisor sends (guest/PROTOCOL.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cove.runtime import InstanceSpec, NetConfig, VolumeMount
from cove.runtime.microvm import protocol as P
from cove.runtime.microvm.supervisor import config_records, run_dir


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
