"""cove.image's public surface is pinned, and the package imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import cove.image
from cove.errors import UserError
from cove.image import ImageRejected

PACKAGE = Path(cove.image.__file__).parent

PUBLIC = {
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
}


def test_the_public_surface_is_pinned() -> None:
    assert set(cove.image.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(cove.image, name) is not None


def test_image_knows_nothing_of_the_api_store_or_runtime() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name == "cove" or name.startswith("cove."):
                    assert name == "cove.errors" or name.startswith("cove.image"), (
                        f"{path.name} imports {name}"
                    )


def test_image_rejected_is_a_user_error_with_its_own_code() -> None:
    err = ImageRejected("layer 2 has a device node", hint="rebuild it")
    assert isinstance(err, UserError)
    problem = err.problem()
    assert problem["code"] == "image_rejected" and problem["status"] == 422
    assert problem["title"] == "Image rejected"
