"""Small helpers shared by the driver, the supervisor and the exec helper."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def now_ts() -> str:
    """RFC 3339 UTC timestamp with microseconds, e.g. ``2026-01-02T03:04:05.123456Z``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write *data* to *path* so readers see the old or the new content, never a mix. The
    temporary file has a unique name (two writers, even threads of one process, never share
    it) and is removed if anything fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, doc: Any, mode: int = 0o600) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def proc_starttime(pid: int) -> int | None:
    """The process start time (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        if rest[0] == b"Z":  # a zombie is not alive for our purposes
            return None
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def pid_matches(pid: int | None, starttime: int | None) -> bool:
    """True when *pid* is alive and is the same process as recorded (not a reused pid)."""
    if not pid or starttime is None:
        return False
    return proc_starttime(pid) == starttime


def read_text(path: str | Path) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def write_text(path: str | Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
