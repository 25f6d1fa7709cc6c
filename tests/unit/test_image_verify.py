"""The puller's own checks of what skopeo copied — they must hold even if skopeo's did not.

``_verify`` reads a copied image (skopeo's ``dir:`` layout: ``manifest.json`` plus blobs named
by their hex digest) and refuses anything that does not match the pinned digest.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from cove.errors import Conflict, UserError
from cove.image import ImageRejected, Resolved, parse_ref
from cove.image.pull import _verify
from tests.fixtures.images import sha256_digest
from tests.fixtures.tars import file, gz, tar_bytes

REF = parse_ref("reg.example.com/app:v1")


def write_dir(
    src: Path,
    *,
    layers: list[bytes] | None = None,
    config: dict[str, Any] | None = None,
    manifest_patch: dict[str, Any] | None = None,
    layer_media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip",
) -> tuple[Path, str]:
    """A dir: layout; returns (dir, manifest digest)."""
    src.mkdir(parents=True, exist_ok=True)
    raws = layers if layers is not None else [tar_bytes([file("a", "1")])]

    def put(data: bytes) -> dict[str, Any]:
        digest = sha256_digest(data)
        (src / digest.split(":", 1)[1]).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    config_doc = config or {
        "os": "linux",
        "architecture": "amd64",
        "config": {"Cmd": ["/bin/sh"], "Env": ["A=1"], "ExposedPorts": {"80/tcp": {}}},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(r) for r in raws]},
    }
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **put(json.dumps(config_doc).encode()),
        },
        "layers": [{"mediaType": layer_media_type, **put(gz(r))} for r in raws],
    }
    manifest.update(manifest_patch or {})
    raw = json.dumps(manifest).encode()
    (src / "manifest.json").write_bytes(raw)
    return src, sha256_digest(raw)


def verify(src: Path, digest: str, ref: str = str(REF)) -> Any:
    return _verify(src, Resolved(parse_ref(ref), digest, ""), threading.Event())


def layer_blob(src: Path, index: int = 0) -> Path:
    manifest = json.loads((src / "manifest.json").read_bytes())
    return src / str(manifest["layers"][index]["digest"]).split(":", 1)[1]


def test_a_consistent_image_verifies(tmp_path: Path) -> None:
    src, digest = write_dir(tmp_path / "src")
    verified = verify(src, digest)
    assert len(verified.layers) == 1 and len(verified.diff_ids) == 1
    assert verified.config_doc["config"]["Env"] == ["A=1"]


def test_a_layer_with_other_bytes_is_rejected(tmp_path: Path) -> None:
    src, digest = write_dir(tmp_path / "src")
    blob = layer_blob(src)
    other = gz(tar_bytes([file("b", "2")]))
    blob.write_bytes(other.ljust(blob.stat().st_size, b"\0")[: blob.stat().st_size])
    with pytest.raises(ImageRejected) as exc:
        verify(src, digest)
    assert "layer 0 blob" in exc.value.detail and "has digest" in exc.value.detail
    assert exc.value.extra["blob"] == "sha256:" + blob.name


def test_a_truncated_layer_is_rejected(tmp_path: Path) -> None:
    src, digest = write_dir(tmp_path / "src")
    blob = layer_blob(src)
    blob.write_bytes(blob.read_bytes()[:10])
    with pytest.raises(ImageRejected, match="is truncated: 10 bytes"):
        verify(src, digest)


def test_a_layer_longer_than_its_descriptor_is_rejected(tmp_path: Path) -> None:
    src, digest = write_dir(tmp_path / "src")
    blob = layer_blob(src)
    blob.write_bytes(blob.read_bytes() + b"trailing")
    with pytest.raises(ImageRejected, match="longer than its descriptor"):
        verify(src, digest)


def test_a_tampered_config_is_rejected(tmp_path: Path) -> None:
    src, digest = write_dir(tmp_path / "src")
    manifest = json.loads((src / "manifest.json").read_bytes())
    cfg = src / manifest["config"]["digest"].split(":", 1)[1]
    cfg.write_bytes(cfg.read_bytes().replace(b"A=1", b"B=1"))
    with pytest.raises(ImageRejected, match="config blob"):
        verify(src, digest)


def test_a_manifest_that_is_not_the_pinned_one_is_rejected(tmp_path: Path) -> None:
    src, _ = write_dir(tmp_path / "src")
    other = "sha256:" + "0" * 64
    with pytest.raises(ImageRejected, match="expected sha256:0000"):
        verify(src, other)
    # a local image that changed since it was resolved is a conflict, not an attack
    with pytest.raises(Conflict) as exc:
        verify(src, other, ref="oci:/some/layout:v1")
    assert exc.value.code == "image_changed"


BAD_MANIFESTS: list[tuple[str, dict[str, Any], str]] = [
    (
        "digest-path-traversal",
        {
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:../../../etc/passwd",
                    "size": 1,
                }
            ]
        },
        "cove needs sha256:<64 hex>",
    ),
    (
        "sha512-layer",
        {
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha512:" + "a" * 128,
                    "size": 1,
                }
            ]
        },
        "cove needs sha256",
    ),
    ("negative-size", {"config": {"digest": "sha256:" + "a" * 64, "size": -1}}, "invalid size"),
    ("no-layers", {"layers": []}, "has no layers"),
    ("schema-1", {"schemaVersion": 1}, "schema 1"),
    ("an-index", {"mediaType": "application/vnd.oci.image.index.v1+json"}, "is an index"),
    ("unknown-type", {"mediaType": "application/x-something"}, "unsupported manifest type"),
    (
        "artifact-config",
        {
            "config": {
                "mediaType": "application/vnd.cncf.helm.config.v1+json",
                "digest": "sha256:" + "a" * 64,
                "size": 2,
            }
        },
        "not a container image",
    ),
]


@pytest.mark.parametrize(
    ("patch", "why"), [b[1:] for b in BAD_MANIFESTS], ids=[b[0] for b in BAD_MANIFESTS]
)
def test_bad_manifests_are_rejected(tmp_path: Path, patch: dict[str, Any], why: str) -> None:
    src, digest = write_dir(tmp_path / "src", manifest_patch=patch)
    with pytest.raises(ImageRejected) as exc:
        verify(src, digest)
    assert why in exc.value.detail


def test_unsupported_layer_media_types_are_rejected(tmp_path: Path) -> None:
    src, digest = write_dir(
        tmp_path / "src",
        layer_media_type="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    )
    with pytest.raises(ImageRejected, match="unsupported type"):
        verify(src, digest)


RAW = tar_bytes([file("a", "1")])
BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("no-rootfs", {"os": "linux", "architecture": "amd64"}, "rootfs"),
    (
        "too-few-diff-ids",
        {"rootfs": {"type": "layers", "diff_ids": []}},
        "lists 1 layers but its config has 0 diff_ids",
    ),
    (
        "bad-diff-id",
        {"rootfs": {"type": "layers", "diff_ids": ["sha256:../x"]}},
        "invalid rootfs.diff_ids",
    ),
    (
        "cmd-not-a-list",
        {
            "config": {"Cmd": {"sh": 1}},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(RAW)]},
        },
        "config.Cmd is not a list of strings",
    ),
]


@pytest.mark.parametrize(
    ("config", "why"), [b[1:] for b in BAD_CONFIGS], ids=[b[0] for b in BAD_CONFIGS]
)
def test_bad_configs_are_rejected(tmp_path: Path, config: dict[str, Any], why: str) -> None:
    src, digest = write_dir(tmp_path / "src", layers=[RAW], config=config)
    with pytest.raises(ImageRejected) as exc:
        verify(src, digest)
    assert why in exc.value.detail


def test_an_image_for_another_platform_is_a_user_error(tmp_path: Path) -> None:
    config = {
        "os": "linux",
        "architecture": "arm64",
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(RAW)]},
    }
    src, digest = write_dir(tmp_path / "src", layers=[RAW], config=config)
    with pytest.raises(UserError) as exc:
        verify(src, digest)
    assert exc.value.code == "image_platform"
    assert "linux/arm64" in exc.value.detail and "linux/amd64" in exc.value.detail
