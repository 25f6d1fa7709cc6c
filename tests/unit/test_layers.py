"""Import layering (CONVENTIONS: lower layers never import higher ones; the CLI and the
agent reach the server only through the client). Parsed from the source, so a lazy
import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "cove"

# package -> cove modules it may import (prefixes)
ALLOWED: dict[str, tuple[str, ...]] = {
    "model": ("cove.model", "cove.errors", "cove.ids"),
    "store": ("cove.store", "cove.model", "cove.errors", "cove.ids"),
    "control": (
        "cove.control",
        "cove.store",
        "cove.model",
        "cove.errors",
        "cove.ids",
        "cove.net.pools",  # a leaf: address pools, no sockets
        "cove.net.subnets",  # a leaf: instance subnets, no sockets
    ),
    "api": (
        "cove.api",
        "cove.store",
        "cove.model",
        "cove.errors",
        "cove.ids",
        "cove.deferred",
        "cove.security",
        "cove.image",  # the control plane pins image references to digests at deploy time
        "cove.__version__",
        "cove.net.pools",
        "cove.net.subnets",
        # endpoint addresses are allocated in the API's own write transaction (a refused
        # quota writes nothing); the functions live beside the endpoint controller
        "cove.control.endpoints",
        # the API mounts the web console and hands it its authentication
        "cove.console",
    ),
    # the web console knows nothing of the API or the store: create_app hands it an
    # authenticate(token) callable, and the shell it serves is the CLI in another process
    "console": ("cove.console", "cove.errors"),
    # node-side building blocks know nothing of the API
    "image": ("cove.image", "cove.errors"),
    "runtime": ("cove.runtime", "cove.image", "cove.errors"),
    "net": ("cove.net", "cove.errors"),
    "client": ("cove.client", "cove.errors"),
    "agent": (
        "cove.agent",
        "cove.client",
        "cove.errors",
        "cove.model",
        "cove.image",
        "cove.runtime",
        "cove.net",
        "cove.__version__",
    ),
    "cli": (
        "cove.cli",
        "cove.client",
        "cove.errors",
        "cove.model",
        "cove.ids",
        "cove.deferred",
    ),
}
# process entry points: `cove server` / `cove agent` start those processes
ENTRY_POINTS = {("cli", "up.py"): ("cove.server", "cove.agent", "cove.net.pools")}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "cove":
            out.extend(f"cove.{a.name}" for a in node.names)  # from cove import errors
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return [m for m in out if m == "cove" or m.startswith("cove.")]


def _allowed(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layering(package: str) -> None:
    files = sorted((SRC / package).rglob("*.py"))
    assert files, f"no sources under {package}"
    bad = []
    for f in files:
        extra = ENTRY_POINTS.get((package, f.name), ())
        for mod in _imports(f):
            if not _allowed(mod, ALLOWED[package] + extra):
                bad.append(f"{f.relative_to(SRC)} imports {mod}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_the_checker_catches_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from cove.api import app\n")
    assert _imports(f) == ["cove.api"]
    assert not _allowed("cove.api", ALLOWED["store"])
