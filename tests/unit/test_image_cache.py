"""The layer cache without skopeo: records, cache lookups, locks, gc, overlay options."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cove.errors import UserError
from cove.image import (
    Image,
    ImageConfig,
    assemble_overlay,
    forget,
    gc,
    load_cached,
    overlay_lowerdir,
)
from cove.image.cache import Cache, flock, write_record
from cove.image.model import layer_dirs_for
from cove.image.overlay import _plan


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def fake_image(cache: Cache, image_n: int, layer_ns: list[int]) -> Image:
    """An image whose layers exist as (tiny) directories, recorded in the cache."""
    cache.ensure()
    diff_ids = tuple(digest(n) for n in layer_ns)
    for d in diff_ids:
        layer = cache.layer_dir(d)
        layer.mkdir(exist_ok=True)
        (layer / "marker").write_text(d)
    image = Image(
        digest=digest(image_n),
        config=ImageConfig(cmd=("/bin/sh",), env=("A=1",), user="app"),
        diff_ids=diff_ids,
        layer_dirs=layer_dirs_for(cache.layers, diff_ids),
        source="reg.example.com/x:1",
    )
    write_record(cache, image, {})
    return image


def test_a_recorded_image_loads_back_identically(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    image = fake_image(cache, 1, [10, 11])
    assert load_cached(cache.root, image.digest) == image
    assert stat_mode(cache.root) == 0o700  # layers hold setuid files: host users stay out
    assert load_cached(cache.root, digest(2)) is None


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


def test_a_record_whose_layer_is_gone_is_not_a_cache_hit(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    image = fake_image(cache, 1, [10, 11])
    (cache.layer_dir(digest(11)) / "marker").unlink()
    cache.layer_dir(digest(11)).rmdir()
    assert load_cached(cache.root, image.digest) is None


def test_a_corrupt_record_is_not_a_cache_hit(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    image = fake_image(cache, 1, [10])
    cache.record_path(image.digest).write_text("{not json")
    assert load_cached(cache.root, image.digest) is None


def test_load_cached_refuses_a_non_digest() -> None:
    with pytest.raises(ValueError):
        load_cached("/nonexistent", "sha256:../../etc")


def test_gc_removes_only_unreferenced_layers_and_stale_staging(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    a = fake_image(cache, 1, [10, 11])  # base 10 shared with b
    b = fake_image(cache, 2, [10, 12])
    orphan = cache.layer_dir(digest(99))
    orphan.mkdir()
    (orphan / "sub").mkdir(mode=0o500)  # a read-only dir inside: still removed
    (cache.tmp / "pull-crashed" / "layer-x").mkdir(parents=True)
    (cache.images / "garbage.json").write_text("[]")

    report = asyncio.run(gc(cache.root))
    assert report.removed_layers == (digest(99),)
    assert set(report.removed_tmp) == {"pull-crashed"}
    assert report.removed_records == ("garbage.json",)
    assert report.kept_layers == 3
    assert load_cached(cache.root, a.digest) == a
    assert load_cached(cache.root, b.digest) == b
    assert sorted(os.listdir(cache.tmp)) == []

    assert forget(cache.root, a.digest) is True
    assert forget(cache.root, a.digest) is False
    report = asyncio.run(gc(cache.root))
    assert report.removed_layers == (digest(11),)  # 10 is still b's base
    assert sorted(p.name for p in cache.layers.iterdir()) == [
        digest(10).split(":")[1],
        digest(12).split(":")[1],
    ]
    assert load_cached(cache.root, b.digest) == b


def test_gc_of_a_missing_cache_is_a_no_op(tmp_path: Path) -> None:
    report = asyncio.run(gc(tmp_path / "never-created"))
    assert report.removed_layers == () and not (tmp_path / "never-created").exists()


def test_gc_waits_for_a_pull_holding_the_shared_lock(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    cache.ensure()
    orphan = cache.layer_dir(digest(5))
    orphan.mkdir()

    async def scenario() -> list[str]:
        events: list[str] = []

        async def puller() -> None:
            async with flock(cache.gc_lock, shared=True):
                events.append("pull-start")
                await asyncio.sleep(0.2)
                events.append("pull-end")

        async def collector() -> None:
            await asyncio.sleep(0.05)
            report = await gc(cache.root)
            events.append(f"gc-removed-{len(report.removed_layers)}")

        await asyncio.gather(puller(), collector())
        return events

    assert asyncio.run(scenario()) == ["pull-start", "pull-end", "gc-removed-1"]


def test_exclusive_locks_serialise_and_shared_locks_coexist(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"

    async def holder(name: str, shared: bool, log: list[str]) -> None:
        async with flock(path, shared=shared):
            log.append(f"+{name}")
            await asyncio.sleep(0.05)
            log.append(f"-{name}")

    async def run(shared: bool) -> list[str]:
        log: list[str] = []
        await asyncio.gather(holder("a", shared, log), holder("b", shared, log))
        return log

    exclusive = asyncio.run(run(False))
    assert exclusive in (["+a", "-a", "+b", "-b"], ["+b", "-b", "+a", "-a"])
    shared = asyncio.run(run(True))
    assert shared[:2] in (["+a", "+b"], ["+b", "+a"])


def test_a_lock_wait_can_be_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"

    async def scenario() -> bool:
        async with flock(path):
            waiter = asyncio.create_task(_take(path))
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        # the cancelled waiter holds nothing: the lock is free again
        await asyncio.wait_for(_take(path), 1)
        return True

    assert asyncio.run(scenario())


async def _take(path: Path) -> None:
    async with flock(path):
        pass


def test_overlay_lowerdir_puts_the_top_layer_first(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    image = fake_image(cache, 1, [1, 2, 3])
    dirs = [str(cache.layer_dir(digest(n))) for n in (3, 2, 1)]
    assert overlay_lowerdir(image) == ":".join(dirs)


def test_overlay_refuses_paths_mount_options_cannot_carry(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "a,b")
    image = fake_image(cache, 1, [1])
    with pytest.raises(UserError) as exc:
        overlay_lowerdir(image)
    assert exc.value.code == "invalid_path"


def test_long_layer_lists_fall_back_to_relative_names_then_to_short_aliases(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path / ("long" * 10))
    upper, work = tmp_path / "upper", tmp_path / "work"
    few = fake_image(cache, 1, list(range(1, 11)))
    assert _plan(few, upper, work).cwd is None  # absolute paths fit
    some = fake_image(cache, 2, list(range(1, 51)))  # 50 absolute paths: > 4 KiB
    plan = _plan(some, upper, work)
    assert plan.cwd == cache.layers and not plan.aliases
    assert plan.options.startswith(f"lowerdir={digest(50).split(':')[1]}:")
    many = fake_image(cache, 3, list(range(1, 201)))  # 200 names of 64 hex: > 4 KiB
    plan = _plan(many, upper, work)
    assert plan.aliases[0] == ("0", cache.layer_dir(digest(200)))  # top layer first
    assert plan.options.startswith("lowerdir=0:1:2:")
    for p in (plan, _plan(some, upper, work)):
        assert len(p.options) <= 3900


def test_unknown_mount_flags_are_refused(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    image = fake_image(cache, 1, [1])
    with pytest.raises(UserError) as exc:
        asyncio.run(
            assemble_overlay(
                image, tmp_path / "u", tmp_path / "w", tmp_path / "r", flags=("upperdir=/etc",)
            )
        )
    assert exc.value.code == "invalid_mount_flags"
    assert not (tmp_path / "r").exists()
