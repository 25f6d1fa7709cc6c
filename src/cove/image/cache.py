"""The on-disk image cache of a node: unpacked layers by diff_id, image records by digest.

    CACHE/                      0700: layers hold setuid binaries; host users stay out
      layers/<diff_id hex>/     one unpacked layer, an overlayfs lowerdir as is
      images/<digest hex>.json  a pulled image: config + ordered diff_ids
      locks/                    flock files: layer-<hex>.lock, image-<hex>.lock
      tmp/                      staging (pull downloads, layer unpacks); removed on exit
      gc.lock                   pulls hold it shared, ``gc`` exclusive

A layer directory only ever appears by an atomic rename of a fully unpacked and verified
staging directory, done while holding that layer's lock, and only after every layer of the
image unpacked cleanly: a failed pull leaves no layer directory and no staging behind. An
image record is written (atomically) after its layers exist; ``gc`` removes layers no record
names, so a caller that still runs an image must keep its record (``forget`` drops one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cove.errors import Permanent
from cove.image.model import Image, ImageConfig, layer_dirs_for
from cove.image.ref import is_digest
from cove.image.unpack import remove_tree

RECORD_SCHEMA = 1


class Cache:
    """Paths and locks of one cache directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.layers = self.root / "layers"
        self.images = self.root / "images"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"
        self.gc_lock = self.root / "gc.lock"

    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            for d in (self.layers, self.images, self.locks, self.tmp):
                d.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise Permanent(
                f"cannot create the image cache at {self.root}: {exc}",
                hint="the node's data directory must be writable by the agent (root)",
            ) from exc

    def layer_dir(self, diff_id: str) -> Path:
        return self.layers / _hex(diff_id)

    def record_path(self, digest: str) -> Path:
        return self.images / f"{_hex(digest)}.json"

    def layer_lock(self, diff_id: str) -> Path:
        return self.locks / f"layer-{_hex(diff_id)}.lock"

    def image_lock(self, digest: str) -> Path:
        return self.locks / f"image-{_hex(digest)}.lock"


def _hex(digest: str) -> str:
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.split(":", 1)[1]


@contextlib.asynccontextmanager
async def flock(path: Path, *, shared: bool = False) -> AsyncIterator[None]:
    """Hold an flock on *path* (created if absent). Polls, so waiting is cancellable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_record(cache: Cache, image: Image, extra: dict[str, Any]) -> None:
    doc: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "digest": image.digest,
        "source": image.source,
        "os": image.os,
        "architecture": image.architecture,
        "config": image.config.to_json(),
        "diff_ids": list(image.diff_ids),
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    path = cache.record_path(image.digest)
    tmp = cache.images / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def read_record(cache: Cache, digest: str) -> dict[str, Any] | None:
    try:
        with open(cache.record_path(digest)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != RECORD_SCHEMA:
        return None
    return doc


def image_from_record(cache: Cache, doc: dict[str, Any]) -> Image | None:
    """The ``Image`` a record describes, or None if it is unusable or a layer is missing."""
    try:
        diff_ids = tuple(str(d) for d in doc["diff_ids"])
        if not all(is_digest(d) for d in diff_ids):
            return None
        image = Image(
            digest=str(doc["digest"]),
            config=ImageConfig.from_json(doc["config"]),
            diff_ids=diff_ids,
            layer_dirs=layer_dirs_for(cache.layers, diff_ids),
            os=str(doc.get("os", "linux")),
            architecture=str(doc.get("architecture", "amd64")),
            source=str(doc.get("source", "")),
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not all(d.is_dir() for d in image.layer_dirs):
        return None
    return image


def load_cached(cache_dir: Path | str, digest: str) -> Image | None:
    """The pulled image *digest* from the cache, or None (no filesystem changes)."""
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    cache = Cache(cache_dir)
    doc = read_record(cache, digest)
    if doc is None or doc.get("digest") != digest:
        return None
    return image_from_record(cache, doc)


def forget(cache_dir: Path | str, digest: str) -> bool:
    """Drop the record of image *digest* so ``gc`` may collect its layers. True if it existed.

    Only call this when no instance runs the image any more.
    """
    cache = Cache(cache_dir)
    try:
        os.unlink(cache.record_path(digest))
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class GcReport:
    removed_layers: tuple[str, ...]  # diff_ids
    removed_records: tuple[str, ...]  # unreadable record files removed
    removed_tmp: tuple[str, ...]  # stale staging entries (from a crashed pull)
    kept_layers: int


async def gc(cache_dir: Path | str) -> GcReport:
    """Remove layers no image record references, unreadable records and stale staging.

    Holds the cache's gc lock exclusively, so no pull runs meanwhile (pulls hold it shared
    from before their first layer appears until their record is written).
    """
    cache = Cache(cache_dir)
    if not cache.root.is_dir():
        return GcReport((), (), (), 0)
    cache.ensure()
    async with flock(cache.gc_lock):
        return await asyncio.to_thread(_gc_locked, cache)


def _gc_locked(cache: Cache) -> GcReport:
    referenced: set[str] = set()
    bad_records: list[str] = []
    for path in sorted(cache.images.iterdir()):
        if path.name.startswith("."):
            bad_records.append(path.name)  # a record write that never finished
            path.unlink(missing_ok=True)
            continue
        if not path.name.endswith(".json"):
            continue
        digest = "sha256:" + path.name[: -len(".json")]
        doc = read_record(cache, digest) if is_digest(digest) else None
        if doc is None or not isinstance(doc.get("diff_ids"), list):
            bad_records.append(path.name)
            path.unlink(missing_ok=True)
            continue
        referenced.update(str(d) for d in doc["diff_ids"])
    removed: list[str] = []
    kept = 0
    for layer in sorted(cache.layers.iterdir()):
        diff_id = "sha256:" + layer.name
        if diff_id in referenced:
            kept += 1
            continue
        # rename first: the layer vanishes at once, the slow removal happens out of sight
        doomed = Path(tempfile.mkdtemp(prefix=f"gc-{layer.name[:12]}-", dir=cache.tmp))
        doomed.rmdir()  # a fresh, unique name to rename onto
        os.rename(layer, doomed)
        remove_tree(doomed)
        cache.locks.joinpath(f"layer-{layer.name}.lock").unlink(missing_ok=True)
        removed.append(diff_id)
    stale: list[str] = []
    for entry in sorted(cache.tmp.iterdir()):
        stale.append(entry.name)
        remove_tree(entry)
    return GcReport(tuple(removed), tuple(bad_records), tuple(s for s in stale), kept)
