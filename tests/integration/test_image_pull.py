"""Resolve and pull real images: umoci-built busybox images, skopeo, Debian's docker-registry.

No mocks: every image here is built by the fixtures in ``tests/fixtures/images.py``, pushed
to a real registry on loopback (or used as a local OCI layout / archive), and pulled by
``cove.image`` through the real skopeo.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cove.errors import Conflict, NotFound, Transient, Unauthenticated, UserError
from cove.image import (
    Image,
    ImageRejected,
    forget,
    gc,
    load_cached,
    parse_ref,
    pull,
    resolve,
)
from tests.fixtures import (
    CORRUPTIONS,
    HOSTILE_KINDS,
    PRIVATE_CREDS,
    BuiltImage,
    FileSpec,
    ImageBuilder,
    RegistryServer,
    hostile_image,
    push,
    sha256_digest,
    write_oci_layout,
)
from tests.fixtures.images import free_port, require_tools
from tests.fixtures.tars import directory, file, tar_bytes

# the fixtures: image_builder, busybox_image, registry, private_registry
pytest_plugins = ["tests.fixtures.images"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: unpacking keeps owners"),
    pytest.mark.timeout(120),
]


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools("skopeo", "umoci")


@pytest.fixture(scope="module")
def web_image(image_builder: ImageBuilder) -> BuiltImage:
    """An HTTP server image: busybox base + one layer with a page and a script."""
    return image_builder.build(
        "web",
        entrypoint=["/bin/busybox"],
        cmd=["httpd", "-f", "-p", "8080", "-h", "/srv/www"],
        env={"GREETING": "hello", "PORT": "8080"},
        workdir="/srv/www",
        user="app",
        exposed_ports=["8080/tcp"],
        labels={"org.example.team": "core"},
        files={
            "/srv/www/index.html": "<h1>hello from cove</h1>\n",
            "/usr/local/bin/start": FileSpec("#!/bin/sh\nexec httpd -f\n", mode=0o755),
            "/usr/local/bin/suid-tool": FileSpec(b"\x7fELF", mode=0o4755, uid=0, gid=0),
            "/home/app/.profile": FileSpec("export A=1\n", mode=0o600, uid=1000, gid=1000),
        },
    )


def cache_contents(cache: Path) -> dict[str, list[str]]:
    out = {}
    for sub in ("layers", "images", "tmp"):
        d = cache / sub
        out[sub] = sorted(os.listdir(d)) if d.is_dir() else []
    return out


def leftover_auth_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("cove-auth-")}


# --- registry: resolve, pull, share, hit ----------------------------------------------------


def test_push_resolve_pull_by_digest(
    registry: RegistryServer, web_image: BuiltImage, busybox_image: BuiltImage, tmp_path: Path
) -> None:
    ref = push(web_image, registry, "team/web", "v1")

    resolved = asyncio.run(resolve(ref, tls_verify=False))
    assert resolved.digest == web_image.digest  # the manifest digest, as built
    assert resolved.pinned.transport_ref() == (
        f"docker://{registry.address}/team/web@{web_image.digest}"
    )
    assert str(resolved.pinned) == f"{registry.address}/team/web:v1@{web_image.digest}"

    cache = tmp_path / "cache"
    start = time.perf_counter()
    image = asyncio.run(pull(resolved, cache, tls_verify=False))
    elapsed = time.perf_counter() - start
    print(f"\npull+unpack of the busybox web image: {elapsed * 1000:.0f} ms")

    assert image.digest == web_image.digest
    assert image.diff_ids == tuple(web_image.diff_ids)
    assert [d.name for d in image.layer_dirs] == [d.split(":")[1] for d in web_image.diff_ids]
    cfg = image.config
    assert cfg.argv == ("/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www")
    assert cfg.env_dict["GREETING"] == "hello" and "PATH" in cfg.env_dict
    assert (cfg.working_dir, cfg.user, cfg.exposed_ports) == ("/srv/www", "app", ("8080/tcp",))
    assert cfg.labels == {"org.example.team": "core"}

    base, top = image.layer_dirs
    busybox = base / "bin" / "busybox"
    assert busybox.is_file() and os.access(busybox, os.X_OK)
    assert (
        hashlib.sha256(busybox.read_bytes()).digest()
        == hashlib.sha256(Path("/bin/busybox").read_bytes()).digest()
    )
    assert os.readlink(base / "bin" / "sh") == "/bin/busybox"  # absolute symlinks allowed
    assert "app:x:1000:1000" in (base / "etc" / "passwd").read_text()
    assert stat.S_IMODE(os.lstat(base / "tmp").st_mode) == 0o1777
    assert os.lstat(base / "home" / "app").st_uid == 1000
    assert (top / "srv/www/index.html").read_text() == "<h1>hello from cove</h1>\n"
    suid = os.lstat(top / "usr/local/bin/suid-tool")
    assert stat.S_IMODE(suid.st_mode) == 0o4755
    profile = os.lstat(top / "home/app/.profile")
    assert (profile.st_uid, profile.st_gid, stat.S_IMODE(profile.st_mode)) == (1000, 1000, 0o600)

    # the record: image digest -> config + ordered diff_ids
    record = json.loads((cache / "images" / f"{web_image.digest.split(':')[1]}.json").read_text())
    assert record["diff_ids"] == web_image.diff_ids
    assert record["source"] == str(resolved.pinned)
    assert cache_contents(cache)["tmp"] == []
    assert load_cached(cache, image.digest) == image


def test_a_second_image_shares_the_base_layer_and_a_second_pull_is_a_cache_hit(
    registry: RegistryServer,
    web_image: BuiltImage,
    busybox_image: BuiltImage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert busybox_image.diff_ids[0] == web_image.diff_ids[0]  # built on the same base
    cache = tmp_path / "cache"
    web = asyncio.run(resolve(push(web_image, registry, "share/web", "v1"), tls_verify=False))
    plain = asyncio.run(
        resolve(push(busybox_image, registry, "share/busybox", "v1"), tls_verify=False)
    )
    first = asyncio.run(pull(web, cache, tls_verify=False))
    second = asyncio.run(pull(plain, cache, tls_verify=False))
    assert second.layer_dirs[0] == first.layer_dirs[0]
    assert len(cache_contents(cache)["layers"]) == 2  # base once + web's own layer
    assert len(cache_contents(cache)["images"]) == 2

    # a cache hit runs no skopeo at all: with no PATH, skopeo could not even be found
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    start = time.perf_counter()
    again = asyncio.run(pull(web, cache, tls_verify=False))
    elapsed = time.perf_counter() - start
    print(f"\ncache hit: {elapsed * 1e6:.0f} µs")
    assert again == first
    assert elapsed < 0.5


def test_resolving_a_pinned_reference_and_pulling_concurrently(
    registry: RegistryServer, web_image: BuiltImage, tmp_path: Path
) -> None:
    ref = push(web_image, registry, "pin/web", "v1")
    pinned = parse_ref(ref).pinned(web_image.digest)
    resolved = asyncio.run(resolve(pinned, tls_verify=False))
    assert resolved.digest == web_image.digest

    cache = tmp_path / "cache"

    async def three_at_once() -> list[Image]:
        return list(
            await asyncio.gather(*(pull(resolved, cache, tls_verify=False) for _ in range(3)))
        )

    images = asyncio.run(three_at_once())
    assert images[0] == images[1] == images[2]
    contents = cache_contents(cache)
    assert len(contents["layers"]) == 2 and contents["tmp"] == []


def test_a_digest_the_registry_does_not_have_is_not_found(
    registry: RegistryServer, web_image: BuiltImage
) -> None:
    ref = push(web_image, registry, "nf/web", "v1")
    for missing in (
        parse_ref(ref).pinned("sha256:" + "e" * 64),
        parse_ref(f"{registry.address}/nf/web:no-such-tag"),
        parse_ref(f"{registry.address}/no/such/repo:v1"),
    ):
        with pytest.raises(NotFound) as exc:
            asyncio.run(resolve(missing, tls_verify=False))
        assert exc.value.code == "image_not_found"
        assert str(missing) in exc.value.detail


def test_an_unreachable_registry_is_transient() -> None:
    ref = f"127.0.0.1:{free_port()}/app:v1"  # nothing listens there
    with pytest.raises(Transient) as exc:
        asyncio.run(resolve(ref, tls_verify=False))
    assert exc.value.code == "registry_unavailable"


def test_a_plain_http_registry_with_tls_verification_says_so(registry: RegistryServer) -> None:
    with pytest.raises(UserError) as exc:
        asyncio.run(resolve(f"{registry.address}/anything:v1"))
    assert exc.value.code == "registry_insecure"
    assert "tls_verify=False" in (exc.value.hint or "")


# --- multi-platform index -------------------------------------------------------------------


def add_index(image: BuiltImage, tag: str) -> tuple[str, str]:
    """Tag *tag* in *image*'s layout: an image index with an arm64 decoy and the amd64 image.

    Returns (index digest, arm64 manifest digest).
    """
    blobs = image.layout / "blobs" / "sha256"

    def put(doc: dict[str, object]) -> tuple[str, int]:
        raw = json.dumps(doc).encode()
        digest = sha256_digest(raw)
        (blobs / digest.split(":")[1]).write_bytes(raw)
        return digest, len(raw)

    config = image.config()
    config["architecture"] = "arm64"
    config_digest, config_size = put(config)
    manifest = image.manifest()
    manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    manifest["config"] = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": config_digest,
        "size": config_size,
    }
    arm_digest, arm_size = put(manifest)
    amd_size = image.blob_path(image.digest).stat().st_size
    m = "application/vnd.oci.image.manifest.v1+json"
    index_digest, index_size = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": m,
                    "digest": arm_digest,
                    "size": arm_size,
                    "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                },
                {
                    "mediaType": m,
                    "digest": image.digest,
                    "size": amd_size,
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
            ],
        }
    )
    index_path = image.layout / "index.json"
    index = json.loads(index_path.read_text())
    index["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest,
            "size": index_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    )
    index_path.write_text(json.dumps(index))
    return index_digest, arm_digest


def test_an_image_index_resolves_to_the_linux_amd64_manifest(
    registry: RegistryServer, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    image = image_builder.build("multi", cmd=["echo", "multi"])
    index_digest, arm_digest = add_index(image, "multi")
    ref = f"{registry.address}/multi/app:v1"
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
            f"oci:{image.layout}:multi",
            f"docker://{ref}",
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )
    resolved = asyncio.run(resolve(ref, tls_verify=False))
    assert resolved.digest == image.digest
    assert resolved.index_digest == index_digest
    pulled = asyncio.run(pull(resolved, tmp_path / "cache", tls_verify=False))
    assert pulled.config.cmd == ("echo", "multi")

    # by the index digest too
    by_index = asyncio.run(resolve(parse_ref(ref).pinned(index_digest), tls_verify=False))
    assert by_index.digest == image.digest
    # the same index from the local layout
    local = asyncio.run(resolve(f"oci:{image.layout}:multi"))
    assert (local.digest, local.index_digest) == (image.digest, index_digest)
    assert asyncio.run(pull(local, tmp_path / "cache2")).digest == image.digest
    # no image for the platform asked for
    with pytest.raises(UserError) as exc:
        asyncio.run(resolve(ref, tls_verify=False, platform="linux/s390x"))
    assert exc.value.code == "image_platform"
    assert "linux/arm64" in exc.value.detail and "linux/amd64" in exc.value.detail
    assert arm_digest != image.digest


# --- local references ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["oci", "oci-archive", "docker-archive"])
def test_local_references_resolve_and_pull(
    web_image: BuiltImage, tmp_path: Path, transport: str
) -> None:
    if transport == "oci":
        ref = web_image.ref
    else:
        archive = tmp_path / f"web-{transport}.tar"
        dest = f"{transport}:{archive}" + (":v1" if transport == "oci-archive" else "")
        subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "--quiet", web_image.ref, dest],
            check=True,
            timeout=60,
            capture_output=True,
        )
        ref = dest
    resolved = asyncio.run(resolve(ref))
    if transport != "docker-archive":  # docker-archive re-describes the image (v2s2)
        assert resolved.digest == web_image.digest
    image = asyncio.run(pull(resolved, tmp_path / "cache"))
    # docker-archive layers are plain tars labelled tar.gzip: same diff_ids regardless
    assert image.diff_ids == tuple(web_image.diff_ids)
    assert (image.layer_dirs[0] / "bin" / "busybox").is_file()
    assert image.config.user == "app"


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_zstd_and_uncompressed_layers_pull(compression: str, tmp_path: Path) -> None:
    layers = [
        tar_bytes([directory("etc"), file("etc/os-release", "ID=cove\n")]),
        tar_bytes([directory("srv"), file("srv/app", "#!/bin/sh\n", mode=0o755)]),
    ]
    built = write_oci_layout(tmp_path / "layout", layers, compression=compression)
    image = asyncio.run(pull(asyncio.run(resolve(built.ref)), tmp_path / "cache"))
    assert image.diff_ids == tuple(sha256_digest(t) for t in layers)
    assert (image.layer_dirs[0] / "etc/os-release").read_text() == "ID=cove\n"
    assert stat.S_IMODE(os.lstat(image.layer_dirs[1] / "srv/app").st_mode) == 0o755


def test_a_local_image_that_changed_after_resolve_is_a_conflict(
    image_builder: ImageBuilder, tmp_path: Path
) -> None:
    image = image_builder.build("changing", dest=tmp_path / "layout", cmd=["v1"])
    resolved = asyncio.run(resolve(image.ref))
    image_builder.build("changing", dest=tmp_path / "layout", cmd=["v2"])  # retagged
    with pytest.raises(Conflict) as exc:
        asyncio.run(pull(resolved, tmp_path / "cache"))
    assert exc.value.code == "image_changed"
    assert cache_contents(tmp_path / "cache")["layers"] == []


def test_a_missing_local_layout_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        asyncio.run(resolve(f"oci:{tmp_path}/nothing-here:v1"))


# --- hostile images --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_images_are_rejected_and_leave_nothing_behind(kind: str, tmp_path: Path) -> None:
    image = hostile_image(kind, tmp_path / kind)
    cache = tmp_path / "cache"
    with pytest.raises(ImageRejected) as exc:
        asyncio.run(pull(asyncio.run(resolve(image.ref)), cache))
    err = exc.value
    assert err.code == "image_rejected" and err.status == 422
    assert err.hint
    print(f"\n{kind}: {err.detail}")
    expected = {
        "path_traversal": "escapes the layer with '..'",
        "absolute_path": "is an absolute path",
        "symlink_escape": "goes through 'a', which is a symlink",
        "device_node": "is a device node",
        "hardlink_escape": "escapes the layer",
        "wrong_digest": "does not match its digest",
        "truncated_layer": "does not match its digest",
        "truncated_stream": "corrupt or truncated",
        "diff_id_mismatch": "does not match its diff_id",
    }[kind]
    assert expected in err.detail
    if kind not in CORRUPTIONS[:2]:  # rejected while unpacking: says which layer
        assert "layer 2 of 2" in err.detail
    # nothing kept: not even the benign first layer, no staging, no record
    assert cache_contents(cache) == {"layers": [], "images": [], "tmp": []}


def test_a_hostile_image_from_a_registry_is_rejected_too(
    registry: RegistryServer, tmp_path: Path
) -> None:
    image = hostile_image("symlink_escape", tmp_path / "evil")
    ref = push(image, registry, "evil/app", "v1")
    resolved = asyncio.run(resolve(ref, tls_verify=False))
    with pytest.raises(ImageRejected, match="which is a symlink"):
        asyncio.run(pull(resolved, tmp_path / "cache", tls_verify=False))
    assert cache_contents(tmp_path / "cache") == {"layers": [], "images": [], "tmp": []}


# --- private registry ------------------------------------------------------------------------


def test_a_private_registry_needs_credentials(
    private_registry: RegistryServer, web_image: BuiltImage, tmp_path: Path
) -> None:
    ref = push(web_image, private_registry, "private/web", "v1")
    before = leftover_auth_dirs()

    resolved = asyncio.run(resolve(ref, creds=PRIVATE_CREDS, tls_verify=False))
    assert resolved.digest == web_image.digest
    image = asyncio.run(pull(resolved, tmp_path / "cache", creds=PRIVATE_CREDS, tls_verify=False))
    assert (image.layer_dirs[0] / "bin/busybox").is_file()

    for creds in (None, ("cove", "wrong-password"), ("nobody", PRIVATE_CREDS[1])):
        with pytest.raises(Unauthenticated) as exc:
            asyncio.run(resolve(ref, creds=creds, tls_verify=False))
        assert exc.value.code == "registry_unauthorized"
        assert private_registry.address in exc.value.detail
        assert "credentials" in (exc.value.hint or "")
    with pytest.raises(Unauthenticated):
        asyncio.run(pull(resolved, tmp_path / "cache2", tls_verify=False))
    assert cache_contents(tmp_path / "cache2") == {"layers": [], "images": [], "tmp": []}
    assert leftover_auth_dirs() == before  # the auth files were removed
    # the password never appears in an error
    with pytest.raises(Unauthenticated) as exc:
        asyncio.run(resolve(ref, creds=("cove", "leak-me-not"), tls_verify=False))
    assert "leak-me-not" not in json.dumps(exc.value.problem())


# --- gc and cancellation ---------------------------------------------------------------------


def test_gc_collects_layers_of_forgotten_images_only(
    registry: RegistryServer, web_image: BuiltImage, busybox_image: BuiltImage, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    web = asyncio.run(
        pull(
            asyncio.run(resolve(push(web_image, registry, "gc/web"), tls_verify=False)),
            cache,
            tls_verify=False,
        )
    )
    plain = asyncio.run(
        pull(
            asyncio.run(resolve(push(busybox_image, registry, "gc/plain"), tls_verify=False)),
            cache,
            tls_verify=False,
        )
    )
    assert asyncio.run(gc(cache)).removed_layers == ()
    assert forget(cache, web.digest)
    report = asyncio.run(gc(cache))
    assert report.removed_layers == (web.diff_ids[1],)
    assert load_cached(cache, web.digest) is None
    assert load_cached(cache, plain.digest) == plain


def test_a_cancelled_pull_leaves_a_consistent_cache(web_image: BuiltImage, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    resolved = asyncio.run(resolve(web_image.ref))

    async def cancel_after(delay: float) -> bool:
        task = asyncio.create_task(pull(resolved, cache))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    outcomes = []
    for delay in (0.0, 0.005, 0.01, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1, 0.13, 0.17, 0.25):
        shutil.rmtree(cache, ignore_errors=True)
        cancelled = asyncio.run(cancel_after(delay))
        contents = cache_contents(cache)
        assert contents["tmp"] == []
        outcomes.append(cancelled)
        if cancelled:
            assert contents["layers"] == [] and contents["images"] == []
        else:  # finished first: complete
            assert load_cached(cache, resolved.digest) is not None
    assert True in outcomes  # at least some cancellations landed mid-pull
