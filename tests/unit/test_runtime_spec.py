"""The spec, the bwrap command line built from it, and what create() refuses up front."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

import cove.runtime
from cove.errors import UserError
from cove.runtime import InstanceSpec, NetConfig, SandboxDriver, VolumeMount
from cove.runtime.bwrap import SECRETS_PATH, BwrapFds, build_argv, id_map

SRC = Path(__file__).resolve().parents[2] / "src" / "cove" / "runtime"


def _spec(tmp_path: Path, **kw: object) -> InstanceSpec:
    layer = tmp_path / "layer"
    layer.mkdir(exist_ok=True)
    base: dict[str, object] = {
        "instance_id": "ins_1",
        "hostname": "web-1",
        "layers": [layer],
        "argv": ["/bin/sh", "-c", "echo hi"],
        "env": {"A": "1"},
    }
    base.update(kw)
    return InstanceSpec(**base)  # type: ignore[arg-type]


def test_spec_json_round_trip_keeps_secrets_out(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        secrets_json=b'{"values": {"K": "s3cr3t-value"}}',
        volumes=[VolumeMount(tmp_path, "/data", read_only=True)],
        network=NetConfig("br0", "10.0.0.2/24", "fd00::2/64", "10.0.0.1", "fd00::1", "ns1"),
    )
    doc = spec.to_json()
    assert "secrets_json" not in doc and "s3cr3t" not in str(doc)
    back = InstanceSpec.from_json(doc, secrets_json=spec.secrets_json)
    assert back == spec


def test_bwrap_command_line(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        workdir="/srv",
        hostname="h1",
        memory_mb=64,
        volumes=[VolumeMount(Path("/v/rw"), "/data"), VolumeMount(Path("/v/ro"), "/conf", True)],
    )
    argv = build_argv(
        spec,
        Path("/state/merged"),
        BwrapFds(info=3, userns_block=4, seccomp=5, secrets=6),
        volume_sources=[Path("/state/vol/0"), Path("/state/vol/1")],
    )
    joined = " ".join(argv)
    for flag in (
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--die-with-parent",
        "--new-session",
        "--cap-drop ALL",
        "--seccomp 5",
        "--userns-block-fd 4",
        "--info-fd 3",
        "--hostname h1",
        "--bind /state/merged /",
        "--proc /proc",
        "--dev /dev",
        f"--size {64 * 1024 * 1024} --tmpfs /tmp",
        f"--perms 0400 --ro-bind-data 6 {SECRETS_PATH}",
        "--bind /state/vol/0 /data",
        "--ro-bind /state/vol/1 /conf",
        "--chdir /srv",
    ):
        assert flag in joined, flag
    # the environment is exactly the spec's (after --clearenv), PATH defaulted
    env_start = argv.index("--clearenv")
    sets = argv[env_start + 1 : argv.index("--chdir")]
    assert sets == ["--setenv", "A", "1", "--setenv", "PATH", sets[-1]]
    assert sets[-1].startswith("/usr/local/sbin")
    assert argv[-4:] == ["--", "/bin/sh", "-c", "echo hi"]
    assert id_map(1 << 30) == f"0 {1 << 30} 65536\n"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"instance_id": "../etc"}, "bad instance id"),
        ({"instance_id": ""}, "bad instance id"),
        ({"hostname": "no spaces"}, "bad hostname"),
        ({"layers": []}, "at least one image layer"),
        ({"layers": [Path("relative")]}, "not a directory"),
        ({"argv": []}, "empty command"),
        ({"argv": ["a\0b"]}, "NUL"),
        ({"env": {"A=B": "1"}}, "bad environment variable"),
        ({"workdir": "srv"}, "absolute"),
        ({"workdir": "/a/../b"}, "absolute"),
        ({"memory_mb": 1}, "too small"),
        ({"pids_max": 0}, "too small"),
        ({"secrets_json": b"{not json"}, "not JSON"),
        ({"volumes": [VolumeMount(Path("/nonexistent-dir"), "/data")]}, "not a directory"),
        ({"volumes": [VolumeMount(Path("/"), "/proc/x")]}, "reserved"),
        ({"volumes": [VolumeMount(Path("/"), "/")]}, "bad volume mount path"),
        ({"volumes": [VolumeMount(Path("/"), "relative")]}, "bad volume mount path"),
        (
            {"network": NetConfig("br0", "10.0.0.2", "fd00::2/64", "10.0.0.1", "fd00::1")},
            "prefix length",
        ),
        (
            {"network": NetConfig("br0", "10.0.0.2/24", "fd00::2/64", "10.9.0.1", "fd00::1")},
            "inside the instance's subnets",
        ),
        (
            {
                "network": NetConfig(
                    "a-very-long-bridge", "10.0.0.2/24", "fd00::2/64", "10.0.0.1", "fd00::1"
                )
            },
            "bad bridge name",
        ),
    ],
)
def test_create_refuses_bad_specs_before_touching_anything(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    state = tmp_path / "state"
    driver = SandboxDriver(state)
    spec = _spec(tmp_path, **changes)
    with pytest.raises(UserError, match=message):
        asyncio.run(driver.create(spec))
    assert not state.exists()


def test_public_surface() -> None:
    assert sorted(cove.runtime.__all__) == [
        "Driver",
        "ExecProcess",
        "InstanceSpec",
        "InstanceStatus",
        "LogLine",
        "NetConfig",
        "SandboxDriver",
        "SandboxExecProcess",
        "VolumeMount",
    ]


def test_runtime_knows_nothing_of_the_api() -> None:
    """CONVENTIONS: runtime, image, net know nothing of the API (nor store, model...)."""
    bad = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("cove") and not name.startswith(("cove.runtime", "cove.errors")):
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad
