"""Paths inside an image never lead out of it; overlay options; id blocks; cgroup checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cove.errors import Permanent
from cove.runtime import idmap
from cove.runtime.cgroups import Cgroups
from cove.runtime.rootfs import (
    ensure_dir_in_root,
    ensure_file_in_root,
    overlay_options,
    read_file_in_root,
)


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """An image root whose /etc/passwd and /run point outside it (at "host" files)."""
    host = tmp_path / "host"
    (host / "etc").mkdir(parents=True)
    (host / "etc" / "passwd").write_text("HOST SECRET\n")
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    os.symlink(str(host / "etc" / "passwd"), root / "etc" / "passwd")  # absolute
    os.symlink("../../../host/etc", root / "etc2")  # relative, climbing out
    os.symlink(str(host), root / "run")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root, host


def test_reads_stay_inside_the_root(hostile: tuple[Path, Path]) -> None:
    root, _ = hostile
    assert read_file_in_root(root, "/etc/passwd") is None  # resolves to <root>/<host path>
    assert read_file_in_root(root, "/etc2/passwd") is None  # '..' stops at the root
    assert read_file_in_root(root, "/etc/group") == b"root:x:0:\n"
    assert read_file_in_root(root, "/etc") is None  # not a regular file
    assert read_file_in_root(root, "/missing") is None


def test_mount_points_are_created_inside_the_root(hostile: tuple[Path, Path]) -> None:
    root, host = hostile
    before = sorted(p.name for p in host.iterdir())
    ensure_dir_in_root(root, "/run/cove")  # /run -> <host>: followed inside the root only
    ensure_file_in_root(root, "/run/cove/secrets.json")
    assert sorted(p.name for p in host.iterdir()) == before
    inside = root / str(host).lstrip("/") / "cove" / "secrets.json"
    assert inside.is_file()
    with pytest.raises(ValueError):
        ensure_dir_in_root(root, "/a/../../b")


def test_overlay_options_put_the_top_layer_first_and_escape(tmp_path: Path) -> None:
    opts = overlay_options([Path("/l/base"), Path("/l/a:b,c")], Path("/u"), Path("/w"))
    assert opts == "lowerdir=/l/a\\:b\\,c:/l/base,upperdir=/u,workdir=/w"


def test_id_blocks_are_distinct_stable_and_reclaimed(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    base_a = idmap.claim(a, reg)
    base_b = idmap.claim(b, reg)
    assert base_a >= 1 << 30 and base_b >= 1 << 30
    assert abs(base_a - base_b) >= idmap.RANGE
    assert idmap.claim(a, reg, prefer=base_a) == base_a  # re-prepare keeps its block
    a.rmdir()  # an owner that is gone without releasing: its block is taken over
    c = tmp_path / "c"
    c.mkdir()
    assert idmap.claim(c, reg) == base_a
    idmap.release(b, base_b, reg)
    idmap.release(c, base_b, reg)  # not c's block: no effect on others
    assert idmap.claim(c, reg, prefer=base_b) == base_b


def test_missing_cgroup_controllers_are_a_clear_error() -> None:
    with pytest.raises(Permanent, match="cgroup v1 controller"):
        Cgroups("cove", "ins_1", mounts={"memory": Path("/sys/fs/cgroup/memory")})
