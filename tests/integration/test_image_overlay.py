"""Pulled layers stack as an overlayfs root: whiteouts hide, opaque dirs reset, the image runs.

Needs root and overlayfs. Both are probed once (a real throwaway overlay mount); when the
probe fails the tests are skipped with the exact mount error.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cove.errors import Conflict, Permanent
from cove.image import (
    Image,
    ImageConfig,
    assemble_overlay,
    is_mounted,
    overlay_lowerdir,
    pull,
    resolve,
    unmount,
)
from tests.fixtures import FileSpec, ImageBuilder, write_oci_layout
from tests.fixtures.images import require_tools
from tests.fixtures.tars import directory, file, opaque, tar_bytes, whiteout

pytest_plugins = ["tests.fixtures.images"]  # the image_builder fixture


@functools.cache
def overlay_unavailable() -> str | None:
    """Why an overlay mount cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "overlay mounts need root"
    with tempfile.TemporaryDirectory(prefix="cove-ovl-probe-") as tmp:
        t = Path(tmp)
        for d in ("lower", "upper", "work", "merged"):
            (t / d).mkdir()
        opts = f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work"
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(t / "merged")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            return f"overlayfs mount failed here: {proc.stderr.strip() or proc.returncode}"
        subprocess.run(["umount", str(t / "merged")], check=True, timeout=30)
    return None


pytestmark = [
    pytest.mark.skipif(overlay_unavailable() is not None, reason=str(overlay_unavailable() or "")),
    pytest.mark.timeout(120),
]


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Targets to unmount at teardown, whatever the test did."""
    targets: list[Path] = []
    yield targets
    for t in reversed(targets):
        if is_mounted(t):
            subprocess.run(["umount", "-l", str(t)], check=False, timeout=30)


def run_in(root: Path, *argv: str, user: str | None = None) -> str:
    cmd = ["chroot", *([f"--userspec={user}"] if user else []), str(root), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_image_runs_from_its_overlay_root(
    image_builder: ImageBuilder, tmp_path: Path, mounts: list[Path]
) -> None:
    require_tools("skopeo", "umoci", "chroot")
    built = image_builder.build(
        "ovl-web",
        cmd=["httpd", "-f"],
        files={
            "/srv/www/index.html": "<h1>overlay</h1>\n",
            "/home/app/secret": FileSpec("mine\n", mode=0o600, uid=1000, gid=1000),
        },
    )
    cache = tmp_path / "cache"
    image = asyncio.run(pull(asyncio.run(resolve(built.ref)), cache))
    inst = tmp_path / "instances" / "i1"
    root = inst / "root"
    mounts.append(root)
    asyncio.run(assemble_overlay(image, inst / "upper", inst / "work", root))
    assert is_mounted(root)
    assert overlay_lowerdir(image) in Path("/proc/self/mountinfo").read_text()
    with pytest.raises(Conflict) as exc:  # no silent double mounts
        asyncio.run(assemble_overlay(image, inst / "upper", inst / "work", root))
    assert exc.value.code == "already_mounted"

    # busybox runs; its applets are absolute symlinks that resolve inside this root
    assert run_in(root, "/bin/sh", "-c", "echo ok; cat /srv/www/index.html") == (
        "ok\n<h1>overlay</h1>\n"
    )
    # the image's user reads its own files through the overlay, though the cache is 0700
    assert os.stat(cache).st_mode & 0o777 == 0o700
    assert run_in(root, "/bin/cat", "/home/app/secret", user="1000:1000") == "mine\n"
    assert "app:x:1000" in run_in(root, "/bin/cat", "/etc/passwd", user="1000:1000")

    # writes go to the instance's upper dir, never into the shared layers
    run_in(root, "/bin/sh", "-c", "echo changed > /etc/motd; rm /srv/www/index.html")
    assert (inst / "upper" / "etc" / "motd").read_text() == "changed\n"
    assert not (image.layer_dirs[0] / "etc" / "motd").exists()
    assert (image.layer_dirs[1] / "srv/www/index.html").read_text() == "<h1>overlay</h1>\n"

    # a second instance of the same image sees pristine layers
    inst2 = tmp_path / "instances" / "i2"
    mounts.append(inst2 / "root")
    asyncio.run(
        assemble_overlay(
            image, inst2 / "upper", inst2 / "work", inst2 / "root", flags=("nodev", "nosuid")
        )
    )
    line = next(x for x in Path("/proc/self/mountinfo").read_text().splitlines() if "i2" in x)
    assert "nosuid" in line and "nodev" in line
    assert (inst2 / "root" / "srv/www/index.html").exists()
    assert not (inst2 / "root" / "etc" / "motd").exists()

    asyncio.run(unmount(root))
    asyncio.run(unmount(inst2 / "root", lazy=True))
    assert not is_mounted(root) and not is_mounted(inst2 / "root")
    asyncio.run(unmount(root))  # unmounting what is not mounted is a no-op


def test_whiteouts_and_opaque_dirs_hide_lower_layers(tmp_path: Path, mounts: list[Path]) -> None:
    require_tools("skopeo")
    lower = tar_bytes(
        [
            directory("etc"),
            file("etc/motd", "old motd"),
            file("etc/keep", "kept"),
            directory("var/cache"),
            file("var/cache/a", "a"),
            file("var/cache/b", "b"),
            directory("old"),
            file("old/x", "x"),
        ]
    )
    upper = tar_bytes(
        [
            whiteout("etc/motd"),
            whiteout("old"),
            directory("var/cache"),
            opaque("var/cache"),
            file("var/cache/new", "new"),
        ]
    )
    built = write_oci_layout(tmp_path / "layout", [lower, upper])
    image = asyncio.run(pull(asyncio.run(resolve(built.ref)), tmp_path / "cache"))
    root = tmp_path / "root"
    mounts.append(root)
    asyncio.run(assemble_overlay(image, tmp_path / "upper", tmp_path / "work", root))

    assert not (root / "etc" / "motd").exists()
    assert (root / "etc" / "keep").read_text() == "kept"
    assert not (root / "old").exists()
    assert sorted(os.listdir(root / "var" / "cache")) == ["new"]
    asyncio.run(unmount(root))


def test_an_image_with_many_layers_mounts_with_the_top_layer_winning(
    tmp_path: Path, mounts: list[Path]
) -> None:
    n = 120  # absolute paths and even bare 64-hex names overflow the mount option page
    layers_root = tmp_path / ("cache-with-a-long-name" * 3) / "layers"
    dirs = []
    for i in range(n):
        d = layers_root / f"{i:064x}"
        d.mkdir(parents=True)
        (d / f"only-{i}").write_text(str(i))
        (d / "shared").write_text(str(i))
        dirs.append(d)
    image = Image(
        digest="sha256:" + "f" * 64,
        config=ImageConfig(),
        diff_ids=tuple(f"sha256:{i:064x}" for i in range(n)),
        layer_dirs=tuple(dirs),
    )
    root = tmp_path / "root"
    mounts.append(root)
    asyncio.run(assemble_overlay(image, tmp_path / "upper", tmp_path / "work", root))
    assert (root / "shared").read_text() == str(n - 1)  # the top layer wins
    assert all((root / f"only-{i}").exists() for i in range(n))
    asyncio.run(unmount(root))


def test_a_missing_layer_directory_is_reported_before_mounting(tmp_path: Path) -> None:
    image = Image(
        digest="sha256:" + "a" * 64,
        config=ImageConfig(),
        diff_ids=("sha256:" + "b" * 64,),
        layer_dirs=(tmp_path / "gone",),
    )
    with pytest.raises(Permanent, match="is missing"):
        asyncio.run(assemble_overlay(image, tmp_path / "u", tmp_path / "w", tmp_path / "r"))
    assert not is_mounted(tmp_path / "r")


def test_a_refused_mount_is_a_permanent_error_with_the_reason(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    image = Image(
        digest="sha256:" + "a" * 64,
        config=ImageConfig(),
        diff_ids=("sha256:" + "b" * 64,),
        layer_dirs=(layer,),
    )
    # workdir inside upperdir: overlayfs refuses
    with pytest.raises(Permanent) as exc:
        asyncio.run(assemble_overlay(image, tmp_path / "u", tmp_path / "u" / "w", tmp_path / "r"))
    assert exc.value.code == "mount_failed"
    assert "mount" in exc.value.detail
    assert not is_mounted(tmp_path / "r")
