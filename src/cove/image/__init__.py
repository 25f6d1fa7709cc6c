"""cove.image: image references, resolve-to-digest, pull by digest, the layer cache, overlay.

The public surface (everything else in this package is private)::

    parse_ref(text) -> ImageRef                        validate a reference (UserError if bad)
    on_loopback(host) -> bool                          the only registries plain HTTP may reach
    await resolve(ref, *, creds=None, tls_verify=True, platform="linux/amd64") -> Resolved
    await pull(resolved, cache_dir, *, creds=None, tls_verify=True, limits=None) -> Image
    load_cached(cache_dir, digest) -> Image | None     no I/O beyond reading the record
    forget(cache_dir, digest) -> bool                  drop a record (then gc its layers)
    await gc(cache_dir) -> GcReport                    remove unreferenced layers and staging
    overlay_lowerdir(image) -> str                     "top:...:bottom" for overlayfs
    await assemble_overlay(image, upper, work, target, *, flags=())   mount the image root
    await unmount(target, *, lazy=False)               no-op if nothing is mounted there
    is_mounted(target) -> bool
    unpack_layer(blob, dest, *, limits, expected_diff_id) -> diff_id   the safe unpacker

Cache layout, locking and gc: ``cove/image/cache.py``. What the unpacker accepts and
rejects: ``cove/image/unpack.py``. Credentials go to skopeo in a 0600 auth file, never on
a command line: ``cove/image/skopeo.py``.

Errors are ``cove.errors`` classes, plus ``ImageRejected`` (a ``UserError``, code
``image_rejected``) for images whose content is unsafe or corrupt.

This package knows nothing of the API, the store or the runtime: it imports only
``cove.errors`` and itself.
"""

from cove.image.cache import GcReport, forget, gc, load_cached
from cove.image.errors import ImageRejected
from cove.image.model import DEFAULT_PLATFORM, Image, ImageConfig, Resolved
from cove.image.overlay import assemble_overlay, is_mounted, overlay_lowerdir, unmount
from cove.image.pull import pull, resolve
from cove.image.ref import VALID_FORMS, ImageRef, on_loopback, parse_ref
from cove.image.skopeo import Creds
from cove.image.unpack import UnpackLimits, unpack_layer

__all__ = [
    "DEFAULT_PLATFORM",
    "VALID_FORMS",
    "Creds",
    "GcReport",
    "Image",
    "ImageConfig",
    "ImageRef",
    "ImageRejected",
    "Resolved",
    "UnpackLimits",
    "assemble_overlay",
    "forget",
    "gc",
    "is_mounted",
    "load_cached",
    "on_loopback",
    "overlay_lowerdir",
    "parse_ref",
    "pull",
    "resolve",
    "unmount",
    "unpack_layer",
]
