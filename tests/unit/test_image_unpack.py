"""The safe layer unpacker on handcrafted tars: what it keeps, what it converts, what it refuses.

Whiteouts are character devices and opaque markers are ``trusted.*`` xattrs: creating them,
and giving files away to other owners, needs root — which these tests have here and in CI.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from cove.image import ImageRejected, UnpackLimits, unpack_layer
from tests.fixtures.tars import (
    MTIME,
    Member,
    blockdev,
    chardev,
    directory,
    fifo,
    file,
    gz,
    hardlink,
    opaque,
    symlink,
    tar_bytes,
    whiteout,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: whiteout devices, trusted.* xattrs and chown"
)


def unpack(tmp_path: Path, members: list[Member], *, compress: str = "gzip", **kw: object) -> Path:
    dest = tmp_path / "layer"
    dest.mkdir(parents=True)
    raw = tar_bytes(members)
    blob = gz(raw) if compress == "gzip" else raw
    diff_id = unpack_layer(io.BytesIO(blob), dest, **kw)  # type: ignore[arg-type]
    assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    return dest


def everything_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- what is kept -------------------------------------------------------------------------


def test_files_dirs_modes_owners_and_mtimes_are_kept(tmp_path: Path) -> None:
    layer = unpack(
        tmp_path,
        [
            directory("usr", mode=0o755),
            directory("usr/bin", mode=0o711, uid=2, gid=3, mtime=MTIME - 100),
            file("usr/bin/su", b"\x7fELF...", mode=0o4755, uid=0, gid=0),
            file("usr/bin/wall", b"wall", mode=0o2755, uid=0, gid=5),
            directory("tmp", mode=0o1777),
            directory("home/app", mode=0o750, uid=1000, gid=1000),
            file("home/app/notes", "hi\n", mode=0o600, uid=1000, gid=1000, mtime=MTIME + 5),
        ],
    )
    su = os.lstat(layer / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755  # setuid survives (chmod after chown)
    assert (layer / "usr/bin/su").read_bytes() == b"\x7fELF..."
    wall = os.lstat(layer / "usr/bin/wall")
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and wall.st_gid == 5
    assert stat.S_IMODE(os.lstat(layer / "tmp").st_mode) == 0o1777
    bindir = os.lstat(layer / "usr/bin")
    assert (stat.S_IMODE(bindir.st_mode), bindir.st_uid, bindir.st_gid) == (0o711, 2, 3)
    assert bindir.st_mtime == MTIME - 100  # directory mtimes are set after their contents
    notes = os.lstat(layer / "home/app/notes")
    assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (1000, 1000, 0o600)
    assert notes.st_mtime == MTIME + 5
    # no ./ member: the layer root is a plain 0755 directory (a 0700 root would lock
    # every non-root user out of the container's /)
    assert stat.S_IMODE(os.lstat(layer).st_mode) == 0o755


def test_symlinks_with_absolute_and_dotdot_targets_are_normal(tmp_path: Path) -> None:
    layer = unpack(
        tmp_path,
        [
            file("bin/busybox", b"bb", mode=0o755),
            symlink("bin/sh", "busybox"),
            symlink("usr/bin/env", "/bin/busybox", uid=7, gid=8),
            symlink("usr/local/bin/x", "../../../bin/busybox"),
            symlink("etc/mtab", "/proc/self/mounts"),  # dangling on the host: fine
        ],
    )
    assert os.readlink(layer / "bin/sh") == "busybox"
    assert os.readlink(layer / "usr/bin/env") == "/bin/busybox"
    assert os.readlink(layer / "usr/local/bin/x") == "../../../bin/busybox"
    assert os.readlink(layer / "etc/mtab") == "/proc/self/mounts"
    env = os.lstat(layer / "usr/bin/env")
    assert (env.st_uid, env.st_gid, env.st_mtime) == (7, 8, MTIME)


def test_hardlinks_share_the_inode_of_an_earlier_member(tmp_path: Path) -> None:
    layer = unpack(
        tmp_path,
        [file("bin/gzip", b"gz", mode=0o755), hardlink("bin/gunzip", "bin/gzip")],
    )
    assert os.lstat(layer / "bin/gzip").st_ino == os.lstat(layer / "bin/gunzip").st_ino


def test_a_later_member_replaces_an_earlier_one(tmp_path: Path) -> None:
    layer = unpack(
        tmp_path,
        [
            file("etc/motd", "old"),
            file("etc/motd", "new"),
            symlink("x", "/nowhere"),
            directory("x"),
            file("x/inside", "ok"),
            directory("d", mode=0o700),
            directory("d/sub", mode=0o711),
            file("d/sub/f", "gone"),
            file("d", "now a file", mode=0o640),
            file("d2", "soon a dir"),
            directory("d2", mode=0o750),
        ],
    )
    assert (layer / "etc/motd").read_text() == "new"
    assert (layer / "d").read_text() == "now a file"
    assert stat.S_IMODE(os.lstat(layer / "d").st_mode) == 0o640
    assert stat.S_IMODE(os.lstat(layer / "d2").st_mode) == 0o750
    assert (layer / "x").is_dir() and not (layer / "x").is_symlink()
    assert (layer / "x/inside").read_text() == "ok"


@pytest.mark.parametrize("compress", ["gzip", "none"])
def test_uncompressed_and_gzip_layers_give_the_same_tree(tmp_path: Path, compress: str) -> None:
    layer = unpack(tmp_path, [file("a/b", "c")], compress=compress)
    assert everything_under(layer) == ["a", "a/b"]


def zstd_compress(data: bytes) -> bytes:
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        if shutil.which("zstd") is None:
            pytest.skip("needs zstd (apt-get install zstd) or the zstandard module")
        return subprocess.run(
            ["zstd", "-q", "-c"], input=data, capture_output=True, check=True, timeout=30
        ).stdout
    return bytes(zstandard.ZstdCompressor().compress(data))


def test_zstd_layers_unpack(tmp_path: Path) -> None:
    raw = tar_bytes([file("z", "zstd"), symlink("l", "/z")])
    dest = tmp_path / "layer"
    dest.mkdir()
    blob = zstd_compress(raw)
    assert unpack_layer(io.BytesIO(blob), dest) == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert (dest / "z").read_text() == "zstd"


def test_a_truncated_zstd_layer_is_rejected(tmp_path: Path) -> None:
    blob = zstd_compress(tar_bytes([file("z", os.urandom(20000).hex())]))
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageRejected, match="corrupt or truncated"):
        unpack_layer(io.BytesIO(blob[: len(blob) // 2]), dest)


def test_a_zstd_attack_is_rejected_mid_stream(tmp_path: Path) -> None:
    # rejecting stops the decompressor early (the zstd child is killed and reaped)
    blob = zstd_compress(tar_bytes([symlink("a", "/etc"), file("a/passwd", "x" * 100_000)]))
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageRejected, match="which is a symlink"):
        unpack_layer(io.BytesIO(blob), dest)


def test_zstd_layers_without_any_zstd_support_get_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    real_import = importlib.import_module

    def no_zstandard(name: str, *args: object) -> object:
        if name == "zstandard":
            raise ImportError(name)
        return real_import(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("cove.image.unpack.importlib.import_module", no_zstandard)
    monkeypatch.setattr("cove.image.unpack.shutil.which", lambda name, **kw: None)
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageRejected) as exc:
        unpack_layer(io.BytesIO(b"\x28\xb5\x2f\xfd" + b"\0" * 64), dest)
    assert "no zstd support" in exc.value.detail
    assert exc.value.hint and "apt-get install zstd" in exc.value.hint


def test_pax_long_names_and_utf8_survive(tmp_path: Path) -> None:
    deep = "/".join(["d" * 60] * 6) + "/ünïcødé.txt"
    layer = unpack(tmp_path, [file(deep, "long")])
    assert (layer / deep).read_text() == "long"


# --- whiteouts -----------------------------------------------------------------------------


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def test_whiteouts_become_overlay_whiteout_devices(tmp_path: Path) -> None:
    layer = unpack(tmp_path, [directory("etc"), whiteout("etc/motd"), whiteout("old-dir")])
    assert is_whiteout(layer / "etc/motd")
    assert is_whiteout(layer / "old-dir")
    assert not (layer / "etc/.wh.motd").exists()
    assert everything_under(layer) == ["etc", "etc/motd", "old-dir"]


def test_opaque_markers_become_the_overlay_opaque_xattr(tmp_path: Path) -> None:
    layer = unpack(tmp_path, [directory("var/cache"), opaque("var/cache"), file("var/cache/new")])
    assert os.getxattr(layer / "var/cache", "trusted.overlay.opaque") == b"y"
    assert everything_under(layer) == ["var", "var/cache", "var/cache/new"]
    with pytest.raises(OSError):
        os.getxattr(layer / "var", "trusted.overlay.opaque")


def test_a_whiteout_hides_only_lower_layers(tmp_path: Path) -> None:
    # OCI: a whiteout never hides what its own layer adds. A directory the layer also adds
    # becomes opaque (lower content gone, this layer's content kept); a file just stays.
    layer = unpack(
        tmp_path,
        [
            file("conf/app.ini", "mine"),
            whiteout("conf"),
            whiteout("data"),
            directory("data"),
            file("data/fresh", "x"),
            file("single", "kept"),
            whiteout("single"),
        ],
    )
    assert (layer / "conf/app.ini").read_text() == "mine"
    assert os.getxattr(layer / "conf", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(layer / "data", "trusted.overlay.opaque") == b"y"
    assert (layer / "data/fresh").exists()
    assert (layer / "single").read_text() == "kept"


def test_tar_xattrs_are_not_applied(tmp_path: Path) -> None:
    info = tarfile.TarInfo("sneaky")
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.pax_headers = {"SCHILY.xattr.trusted.overlay.opaque": "y"}
    layer = unpack(tmp_path, [Member(info)])
    with pytest.raises(OSError):
        os.getxattr(layer / "sneaky", "trusted.overlay.opaque")


# --- what is refused -------------------------------------------------------------------------

ATTACKS: list[tuple[str, list[Member], str]] = [
    ("dotdot", [file("../escaped", "x")], "escapes the layer with '..'"),
    ("dotdot-inside", [directory("a"), file("a/../../escaped", "x")], "escapes the layer"),
    ("absolute", [file("/etc/passwd", "x")], "absolute path"),
    (
        "through-symlink",
        [symlink("a", "/etc"), file("a/passwd", "x")],
        "goes through 'a', which is a symlink",
    ),
    (
        "through-relative-symlink",
        [directory("d"), symlink("d/up", "../.."), file("d/up/escaped", "x")],
        "which is a symlink",
    ),
    (
        "through-symlink-chain",
        [symlink("a", "b"), symlink("b", "/etc"), directory("a/cron.d")],
        "which is a symlink",
    ),
    ("through-file", [file("f", "x"), file("f/g", "y")], "which is not a directory"),
    ("hardlink-dotdot", [hardlink("h", "../../etc/shadow")], "escapes the layer"),
    ("hardlink-absolute", [hardlink("h", "/etc/shadow")], "absolute path"),
    ("hardlink-not-yet", [hardlink("h", "later"), file("later", "x")], "not in this layer"),
    ("hardlink-missing-dir", [hardlink("h", "no/such/file")], "not in this layer"),
    ("hardlink-to-dir", [directory("d"), hardlink("h", "d")], "not a regular file"),
    (
        "hardlink-through-symlink",
        [symlink("s", "/etc"), hardlink("h", "s/shadow")],
        "which is a symlink",
    ),
    ("hardlink-to-whiteout", [whiteout("gone"), hardlink("h", "gone")], "not a regular file"),
    ("chardev", [chardev("dev/mem", 1, 1)], "device node"),
    ("chardev-0-0", [chardev("fake-whiteout", 0, 0)], "device node"),
    ("blockdev", [blockdev("dev/sda")], "device node"),
    ("fifo", [fifo("pipe")], "FIFO"),
    ("whiteout-as-parent", [file(".wh.x/y", "z")], "whiteout as a parent"),
    ("whiteout-of-dotdot", [file("a/.wh...", "")], "names no file"),
    ("whiteout-of-dot", [file("a/.wh..", "")], "names no file"),
]


@pytest.mark.parametrize(("members", "why"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attacks_are_rejected_and_nothing_escapes(
    tmp_path: Path, members: list[Member], why: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(ImageRejected) as exc:
        unpack(tmp_path / "work", members)
    err = exc.value
    assert err.code == "image_rejected" and err.status == 422
    assert why in err.detail
    assert err.hint and "nothing of this image was kept" in err.hint
    assert everything_under(outside) == []
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "work" / "escaped").exists()


def test_a_symlink_escape_writes_nothing_at_the_symlink_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    with pytest.raises(ImageRejected):
        unpack(
            tmp_path,
            [symlink("a", str(victim)), file("a/owned", "pwned"), directory("a/sub")],
        )
    assert everything_under(victim) == []


def test_limits_on_member_size_layer_size_and_entry_count(tmp_path: Path) -> None:
    big = file("big", b"x" * 5000)
    for n, (members, limits, why) in enumerate(
        [
            ([big], UnpackLimits(max_file_bytes=4096), "over the limit of 4096"),
            ([big], UnpackLimits(max_layer_bytes=4096), "larger than the limit of 4096"),
            (
                [file(f"f{i}") for i in range(20)],
                UnpackLimits(max_entries=10),
                "more than 10 entries",
            ),
        ]
    ):
        with pytest.raises(ImageRejected) as exc:
            unpack(tmp_path / str(n), members, limits=limits)
        assert why in exc.value.detail


def test_a_gzip_bomb_stops_at_the_layer_limit(tmp_path: Path) -> None:
    # 16 MiB of zeros compress to ~16 KiB; the limit is checked on the uncompressed stream
    raw = tar_bytes([file("zeros", b"\0" * (16 * 1024 * 1024))])
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageRejected, match="larger than the limit"):
        unpack_layer(
            io.BytesIO(gzip.compress(raw, 1)), dest, limits=UnpackLimits(max_layer_bytes=1 << 20)
        )


CORRUPT = [
    ("truncated-gzip", lambda raw: gz(raw)[: len(gz(raw)) // 2], "corrupt or truncated"),
    ("truncated-tar", lambda raw: raw[:700], "corrupt or truncated"),
    ("garbage", lambda raw: b"this is not a tar file at all" * 40, "corrupt or truncated"),
    ("gzip-garbage", lambda raw: b"\x1f\x8b" + os.urandom(2000), "corrupt or truncated"),
]


@pytest.mark.parametrize(("mangle", "why"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_streams_are_rejected(tmp_path: Path, mangle: object, why: str) -> None:
    raw = tar_bytes([file("a", os.urandom(3000).hex()), file("b", "x")])
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageRejected) as exc:
        unpack_layer(io.BytesIO(mangle(raw)), dest)  # type: ignore[operator]
    assert why in exc.value.detail


def test_a_diff_id_mismatch_is_rejected(tmp_path: Path) -> None:
    raw = tar_bytes([file("a", "x")])
    dest = tmp_path / "layer"
    dest.mkdir()
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ImageRejected) as exc:
        unpack_layer(io.BytesIO(gz(raw)), dest, expected_diff_id=wrong)
    assert "does not match its diff_id" in exc.value.detail
    assert exc.value.extra["expected"] == wrong


def test_a_member_whose_header_lies_about_its_size_is_rejected(tmp_path: Path) -> None:
    # the header says 4096 bytes, the archive ends right after 10
    raw = tar_bytes([file("liar", b"0123456789", size=4096)])
    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(ImageRejected, match="truncated"):
        unpack_layer(io.BytesIO(raw[:1024]), dest)


def test_without_privileges_an_opaque_dir_fails_as_a_host_problem() -> None:
    # trusted.* xattrs need CAP_SYS_ADMIN: an unprivileged unpacker cannot mark opaque
    # directories. That is the node's problem (Permanent, with a hint), not the image's.
    # (Whiteout devices need no privilege since Linux 5.8, so they are not the probe.)
    code = (
        "import io, os, sys\n"
        "from pathlib import Path\n"
        "from cove.errors import Permanent\n"
        "from cove.image import unpack_layer\n"
        "data = sys.stdin.buffer.read()\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    unpack_layer(io.BytesIO(data), Path(sys.argv[1]))\n"
        "    print('UNPACKED')\n"
        "except Permanent as e:\n"
        "    print('PERMANENT', e.detail, '|', e.hint)\n"
    )
    base = Path(tempfile.mkdtemp(prefix="cove-unpriv-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        dest = base / "layer"
        dest.mkdir()
        os.chown(dest, 65534, 65534)
        out = subprocess.run(
            [sys.executable, "-c", code, str(dest)],
            input=gz(tar_bytes([directory("d"), opaque("d")])),
            capture_output=True,
            timeout=30,
            check=False,
            cwd="/",
        )
    finally:
        shutil.rmtree(base)
    assert b"PERMANENT" in out.stdout, (out.stdout + out.stderr).decode()
    assert b"trusted.overlay.opaque" in out.stdout
    assert b"needs root" in out.stdout
