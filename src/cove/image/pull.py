"""Resolve references to digests and pull images by digest into the layer cache.

``resolve`` runs at deploy time (the control plane pins the digest in the release);
``pull`` runs on the node. Both drive ``skopeo`` as a subprocess; everything skopeo hands
back is verified here again — manifest digest, every blob's size and sha256, every layer's
diff_id — before anything lands in the cache.

The copy goes to skopeo's ``dir:`` transport (a temporary directory of blobs named by their
hex digest plus ``manifest.json``) rather than to an OCI layout: ``dir:`` stores the manifest
bytes exactly as the source served them, for Docker v2 and OCI manifests alike, so the pinned
digest can be checked against what was actually copied. (Copying a Docker-format image into
an OCI layout converts its manifest, which changes its digest.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cove.errors import Conflict, Permanent, UserError
from cove.image import skopeo
from cove.image.cache import Cache, flock, image_from_record, read_record, write_record
from cove.image.errors import ImageRejected
from cove.image.model import DEFAULT_PLATFORM, Image, ImageConfig, Resolved, layer_dirs_for
from cove.image.ref import ImageRef, is_digest, parse_ref
from cove.image.skopeo import Creds
from cove.image.unpack import UnpackCancelled, UnpackLimits, remove_tree, unpack_layer_file

T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 8 * 1024 * 1024
_HASH_CHUNK = 1024 * 1024


# --- resolve --------------------------------------------------------------------------------


async def resolve(
    ref: ImageRef | str,
    *,
    creds: Creds | None = None,
    tls_verify: bool = True,
    platform: str = DEFAULT_PLATFORM,
    timeout: float = skopeo.INSPECT_TIMEOUT,
) -> Resolved:
    """Resolve *ref* to the digest of its image manifest (``skopeo inspect --raw``).

    The digest is the sha256 of the raw manifest bytes. For a multi-platform index (OCI
    image index or Docker manifest list) the manifest for *platform* is chosen; registry
    references are then inspected again by that digest to check it exists and is an image.
    """
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    os_name, arch, variant = _platform(platform)
    raw = await _inspect_raw(ref, creds=creds, tls_verify=tls_verify, timeout=timeout)
    digest = _sha256(raw)
    doc = _json(raw, "manifest", str(ref))
    media_type = _media_type(doc, str(ref))
    if ref.digest is not None and not ref.is_local and digest != ref.digest:
        raise ImageRejected(
            f"the registry served a manifest with digest {digest} for {ref}",
            hint="the registry is misbehaving or the transfer was altered",
        )
    if media_type in MANIFEST_TYPES:
        _check_local_pin(ref, digest, None)
        return Resolved(ref, digest, media_type, platform=platform)
    child, child_type = _choose_platform(doc, os_name, arch, variant, str(ref))
    if not ref.is_local:
        child_raw = await _inspect_raw(
            ref.pinned(child), creds=creds, tls_verify=tls_verify, timeout=timeout
        )
        if _sha256(child_raw) != child:
            raise ImageRejected(
                f"the registry served a manifest not matching digest {child} for {ref}",
                hint="the registry is misbehaving or the transfer was altered",
            )
        child_type = _media_type(_json(child_raw, "manifest", str(ref)), str(ref))
        if child_type not in MANIFEST_TYPES:
            raise ImageRejected(
                f"the {platform} entry of the index {ref} is not an image manifest ({child_type})",
                hint="nested indexes are not supported; point at an image",
            )
    _check_local_pin(ref, digest, child)
    return Resolved(ref, child, child_type, platform=platform, index_digest=digest)


def _check_local_pin(ref: ImageRef, digest: str, child: str | None) -> None:
    if ref.is_local and ref.digest is not None and ref.digest not in (digest, child):
        raise Conflict(
            f"the local image {ref.transport}:{ref.path} is no longer {ref.digest}; it is now "
            f"{child or digest}",
            code="image_changed",
            hint="deploy the reference again to pin the new content",
        )


async def _inspect_raw(
    ref: ImageRef, *, creds: Creds | None, tls_verify: bool, timeout: float
) -> bytes:
    argv = [skopeo.skopeo_binary(), "--insecure-policy", "inspect", "--raw"]
    argv += skopeo.tls_args(ref, tls_verify)
    with tempfile.TemporaryDirectory(prefix="cove-skopeo-") as tmp:
        async with skopeo.auth_args(ref, creds) as auth:
            try:
                result = await skopeo.run(
                    [*argv, *auth, ref.transport_ref()],
                    timeout=timeout,
                    env=skopeo.tool_env(Path(tmp)),
                    what=f"resolving {ref}",
                )
            except skopeo.SkopeoFailed as exc:
                raise skopeo.translate(exc, ref, action="resolve") from exc
    if len(result.stdout) > MAX_MANIFEST_BYTES:
        raise ImageRejected(f"the manifest of {ref} is larger than {MAX_MANIFEST_BYTES} bytes")
    return result.stdout


def _platform(platform: str) -> tuple[str, str, str | None]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(
            f"invalid platform {platform!r}",
            code="invalid_platform",
            hint="write os/arch[/variant], e.g. linux/amd64",
        )
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _choose_platform(
    doc: dict[str, Any], os_name: str, arch: str, variant: str | None, where: str
) -> tuple[str, str]:
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ImageRejected(f"the index of {where} has no manifests list")
    seen: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        plat = entry.get("platform") or {}
        if not isinstance(plat, dict):
            continue
        seen.append(f"{plat.get('os')}/{plat.get('architecture')}")
        if plat.get("os") != os_name or plat.get("architecture") != arch:
            continue
        if variant is not None and plat.get("variant") not in (None, variant):
            continue
        digest = entry.get("digest")
        if not isinstance(digest, str) or not is_digest(digest):
            raise ImageRejected(f"the index of {where} has an invalid digest {digest!r}")
        media_type = str(entry.get("mediaType") or OCI_MANIFEST)
        return digest, media_type
    raise UserError(
        f"{where} has no image for {os_name}/{arch} (it has: {', '.join(seen) or 'none'})",
        code="image_platform",
        hint=f"build and push a {os_name}/{arch} image",
    )


def _media_type(doc: dict[str, Any], where: str) -> str:
    if doc.get("schemaVersion") == 1:
        raise ImageRejected(
            f"{where} is a Docker schema 1 image, which cove does not run",
            hint="push the image again with a current tool (schema 2 or OCI)",
        )
    media_type = doc.get("mediaType")
    if media_type is None:  # optional in OCI (umoci omits it): infer from the shape
        if "manifests" in doc:
            return OCI_INDEX
        if "layers" in doc and "config" in doc:
            return OCI_MANIFEST
    if media_type in MANIFEST_TYPES or media_type in INDEX_TYPES:
        return str(media_type)
    raise ImageRejected(f"{where} has an unsupported manifest type {media_type!r}")


# --- pull -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class _Verified:
    manifest_media_type: str
    config_digest: str
    config_doc: dict[str, Any]
    layers: tuple[_Blob, ...]
    diff_ids: tuple[str, ...]


async def pull(
    resolved: Resolved,
    cache_dir: Path | str,
    *,
    creds: Creds | None = None,
    tls_verify: bool = True,
    limits: UnpackLimits | None = None,
    timeout: float = skopeo.COPY_TIMEOUT,
) -> Image:
    """Make image *resolved* available in *cache_dir*; return it with its layer dirs.

    A cache hit (record present, every layer present) returns without running skopeo.
    Otherwise the image is copied by digest into a temporary directory, verified, and its
    missing layers are unpacked, each once, into ``layers/<diff_id hex>``. On any failure
    the cache is left as it was.
    """
    if not is_digest(resolved.digest):
        raise UserError(f"invalid digest {resolved.digest!r}", code="invalid_image_ref")
    cache = Cache(cache_dir)
    hit = _cached(cache, resolved.digest)
    if hit is not None:
        return hit
    cache.ensure()
    async with flock(cache.image_lock(resolved.digest)):
        hit = _cached(cache, resolved.digest)  # another pull finished while we waited
        if hit is not None:
            return hit
        async with flock(cache.gc_lock, shared=True):
            return await _pull_locked(cache, resolved, creds, tls_verify, limits, timeout)


def _cached(cache: Cache, digest: str) -> Image | None:
    doc = read_record(cache, digest)
    if doc is None or doc.get("digest") != digest:
        return None
    return image_from_record(cache, doc)


async def _pull_locked(
    cache: Cache,
    resolved: Resolved,
    creds: Creds | None,
    tls_verify: bool,
    limits: UnpackLimits | None,
    timeout: float,
) -> Image:
    work = Path(tempfile.mkdtemp(prefix="pull-", dir=cache.tmp))
    try:
        src = work / "src"
        await _copy(resolved, src, work, creds=creds, tls_verify=tls_verify, timeout=timeout)
        verified = await _in_thread(lambda cancel: _verify(src, resolved, cancel))
        wanted = list(dict.fromkeys(verified.diff_ids))  # unique, image order
        blobs = dict(zip(verified.diff_ids, verified.layers, strict=True))
        async with contextlib.AsyncExitStack() as stack:
            for diff_id in sorted(wanted):  # one global order: no lock-order deadlocks
                await stack.enter_async_context(flock(cache.layer_lock(diff_id)))
            missing = [d for d in wanted if not cache.layer_dir(d).is_dir()]
            staged = await _in_thread(
                lambda cancel: _install_layers(
                    cache, src, work, missing, blobs, verified.diff_ids, resolved, limits, cancel
                )
            )
            config = verified.config_doc
            try:
                image_config = ImageConfig.from_oci(config.get("config"))
            except ValueError as exc:  # _verify checked it already; belt and braces
                raise ImageRejected(f"the image config is invalid: {exc}") from exc
            image = Image(
                digest=resolved.digest,
                config=image_config,
                diff_ids=verified.diff_ids,
                layer_dirs=layer_dirs_for(cache.layers, verified.diff_ids),
                os=str(config.get("os") or "linux"),
                architecture=str(config.get("architecture") or "amd64"),
                source=str(resolved.pinned),
            )
            extra = {
                "media_type": verified.manifest_media_type,
                "config_digest": verified.config_digest,
                "layers": [
                    {"digest": b.digest, "size": b.size, "media_type": b.media_type, "diff_id": d}
                    for b, d in zip(verified.layers, verified.diff_ids, strict=True)
                ],
            }
            _commit(cache, staged, image, extra)
            return image
    finally:
        # synchronously: an await here could itself be cancelled (a cancel that lands while
        # the pull is finishing), and the staging dir would outlive the task
        remove_tree(work)


async def _copy(
    resolved: Resolved,
    dest: Path,
    work: Path,
    *,
    creds: Creds | None,
    tls_verify: bool,
    timeout: float,
) -> None:
    ref = resolved.ref
    os_name, arch, variant = _platform(resolved.platform)
    argv = [
        skopeo.skopeo_binary(),
        "--insecure-policy",
        "--override-os",
        os_name,
        "--override-arch",
        arch,
    ]
    if variant:
        argv += ["--override-variant", variant]
    argv += ["copy", "--quiet", *skopeo.tls_args(ref, tls_verify, side="src-")]
    async with skopeo.auth_args(ref, creds, side="src-") as auth:
        try:
            await skopeo.run(
                [*argv, *auth, resolved.source_ref(), f"dir:{dest}"],
                timeout=timeout,
                env=skopeo.tool_env(work),
                what=f"pulling {resolved.pinned}",
            )
        except skopeo.SkopeoFailed as exc:
            raise skopeo.translate(exc, ref, action="pull") from exc


async def _in_thread(fn: Callable[[threading.Event], T]) -> T:
    """Run blocking *fn* in a thread; on cancellation, tell it to stop and wait for it."""
    cancel = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(fn, cancel))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await task
        raise


def _verify(src: Path, resolved: Resolved, cancel: threading.Event) -> _Verified:
    """Check what skopeo copied: manifest digest, blob sizes and digests, config, diff_ids."""
    where = str(resolved.pinned)
    raw = _read_limited(src / "manifest.json", MAX_MANIFEST_BYTES, "manifest")
    actual = _sha256(raw)
    if actual != resolved.digest:
        if resolved.ref.is_local:
            raise Conflict(
                f"the local image {resolved.ref} is no longer {resolved.digest}; it is now "
                f"{actual}",
                code="image_changed",
                hint="resolve (deploy) the reference again to pin the new content",
            )
        raise ImageRejected(
            f"pulled manifest has digest {actual}, expected {resolved.digest} ({where})",
            hint="the registry is misbehaving or the transfer was altered",
        )
    doc = _json(raw, "manifest", where)
    media_type = _media_type(doc, where)
    if media_type not in MANIFEST_TYPES:
        raise ImageRejected(f"{where} is an index, not an image manifest")
    config_desc = _descriptor(doc.get("config"), "config", where)
    if config_desc.media_type not in CONFIG_TYPES:
        raise ImageRejected(
            f"{where} has config type {config_desc.media_type!r}, not a container image",
            hint="cove runs container images (OCI or Docker), not other artifacts",
        )
    layer_docs = doc.get("layers")
    if not isinstance(layer_docs, list) or not layer_docs:
        raise ImageRejected(f"{where} has no layers")
    layers = tuple(_descriptor(d, f"layer {i}", where) for i, d in enumerate(layer_docs))
    for i, blob in enumerate(layers):
        if blob.media_type not in LAYER_TYPES:
            raise ImageRejected(
                f"layer {i} of {where} has unsupported type {blob.media_type!r}",
                hint="cove unpacks tar layers (uncompressed, gzip or zstd)",
            )
    if config_desc.size > MAX_CONFIG_BYTES:
        raise ImageRejected(f"the config of {where} is larger than {MAX_CONFIG_BYTES} bytes")
    for what, blob in [("config", config_desc)] + [(f"layer {i}", b) for i, b in enumerate(layers)]:
        if cancel.is_set():
            raise UnpackCancelled()
        _verify_blob(src, blob, what, where)
    config_raw = (src / _hex(config_desc.digest)).read_bytes()
    config = _json(config_raw, "config", where)
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageRejected(f"the config of {where} has no rootfs of type 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and is_digest(d) for d in diff_ids
    ):
        raise ImageRejected(f"the config of {where} has invalid rootfs.diff_ids")
    if len(diff_ids) != len(layers):
        raise ImageRejected(
            f"{where} lists {len(layers)} layers but its config has {len(diff_ids)} diff_ids"
        )
    os_name, arch, _ = _platform(resolved.platform)
    image_os, image_arch = config.get("os"), config.get("architecture")
    if (image_os and image_os != os_name) or (image_arch and image_arch != arch):
        raise UserError(
            f"{where} is a {image_os}/{image_arch} image; this node runs {os_name}/{arch}",
            code="image_platform",
            hint=f"build and push a {os_name}/{arch} image",
        )
    try:
        ImageConfig.from_oci(config.get("config"))
    except ValueError as exc:
        raise ImageRejected(f"the image config of {where} is invalid: {exc}") from exc
    return _Verified(media_type, config_desc.digest, config, layers, tuple(diff_ids))


def _descriptor(doc: Any, what: str, where: str) -> _Blob:
    if not isinstance(doc, dict):
        raise ImageRejected(f"the {what} descriptor of {where} is missing")
    digest, size = doc.get("digest"), doc.get("size")
    if not isinstance(digest, str) or not is_digest(digest):
        raise ImageRejected(
            f"the {what} of {where} has digest {digest!r}; cove needs sha256:<64 hex>"
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageRejected(f"the {what} of {where} has an invalid size {size!r}")
    return _Blob(digest, size, str(doc.get("mediaType") or ""))


def _verify_blob(src: Path, blob: _Blob, what: str, where: str) -> None:
    path = src / _hex(blob.digest)
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                size += len(chunk)
                if size > blob.size:
                    break
                h.update(chunk)
    except FileNotFoundError as exc:
        raise Permanent(f"skopeo did not deliver the {what} blob of {where}") from exc
    if size != blob.size:
        state = "truncated" if size < blob.size else "longer than its descriptor says"
        raise ImageRejected(
            f"the {what} blob of {where} is {state}: {size} bytes, expected {blob.size}",
            hint="the image in the source is corrupt; push it again",
            extra={"blob": blob.digest},
        )
    actual = "sha256:" + h.hexdigest()
    if actual != blob.digest:
        raise ImageRejected(
            f"the {what} blob of {where} has digest {actual}, expected {blob.digest}",
            hint="the image in the source is corrupt; push it again",
            extra={"blob": blob.digest},
        )


def _install_layers(
    cache: Cache,
    src: Path,
    work: Path,
    missing: Sequence[str],
    blobs: dict[str, _Blob],
    diff_ids: Sequence[str],
    resolved: Resolved,
    limits: UnpackLimits | None,
    cancel: threading.Event,
) -> list[tuple[str, Path]]:
    """Unpack every missing layer into its own staging directory under *work*."""
    staged: list[tuple[str, Path]] = []
    for diff_id in missing:
        blob = blobs[diff_id]
        dest = work / f"layer-{_hex(diff_id)}"
        dest.mkdir(mode=0o755)
        try:
            unpack_layer_file(
                src / _hex(blob.digest),
                dest,
                limits=limits,
                expected_diff_id=diff_id,
                cancel=cancel,
            )
        except ImageRejected as exc:
            number = diff_ids.index(diff_id) + 1
            raise ImageRejected(
                f"{resolved.pinned}: layer {number} of {len(diff_ids)} ({blob.digest}): "
                f"{exc.detail}",
                hint=exc.hint,
                extra={**exc.extra, "layer": blob.digest},
            ) from exc
        staged.append((diff_id, dest))
    if cancel.is_set():
        raise UnpackCancelled()
    return staged


def _commit(cache: Cache, staged: Sequence[tuple[str, Path]], image: Image, extra: Any) -> None:
    """Rename the staged layers into place and write the record: all or nothing.

    Runs on the event loop without awaiting (a few renames and one small file), so a
    cancellation cannot fall between the layers appearing and the record that names them.
    """
    committed: list[Path] = []
    try:
        for diff_id, dest in staged:
            final = cache.layer_dir(diff_id)
            os.rename(dest, final)
            committed.append(final)
        write_record(cache, image, extra)
    except BaseException:
        for final in committed:  # we hold these layers' locks
            remove_tree(final)
        raise


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError as exc:
        raise Permanent(f"skopeo did not deliver the {what}") from exc
    if len(data) > limit:
        raise ImageRejected(f"the {what} is larger than {limit} bytes")
    return data


def _json(raw: bytes, what: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ImageRejected(f"the {what} of {where} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ImageRejected(f"the {what} of {where} is not a JSON object")
    return doc


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]
