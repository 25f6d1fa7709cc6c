"""Errors of the image layer.

``ImageRejected`` is the one error this package adds to cove's tree (``cove.errors``): the
image itself is unacceptable — a hostile or corrupt layer (path escapes, device nodes, wrong
digests, truncated blobs, sizes over the limit) or a format cove does not run. Retrying does
not help; a different image does. Everything else is reported with the existing classes:
``UserError`` for a bad reference, ``Unauthenticated`` for registry credentials, ``NotFound``
for an absent image or tag, ``Transient`` for an unreachable registry or a timeout, and
``Permanent`` for failures of this host (a missing tool, a full disk, a refused mount).
"""

from __future__ import annotations

from cove.errors import UserError


class ImageRejected(UserError):
    """The image content is unsafe or corrupt; nothing of it was kept."""

    status = 422
    code = "image_rejected"
    title = "Image rejected"
