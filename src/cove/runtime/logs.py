"""Instance output: one JSON object per line, size-bounded by rotation.

``logs/output.log`` is written by the supervisor; when it reaches ``max_bytes`` it becomes
``output.log.1`` (the previous ``.1`` is dropped), so at most ``2 * max_bytes`` are kept.
Each record: ``{"seq": 7, "ts": "2026-...Z", "stream": "stdout", "line": "..."}``. ``seq``
continues across rotations and restarts, so a reader resumes with ``after_seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from cove.runtime._util import now_ts
from cove.runtime.base import LogLine, Stream

CURRENT = "output.log"
PREVIOUS = "output.log.1"
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
MAX_LINE = 16 * 1024  # longer output lines are split into several records


def _parse(raw: bytes) -> LogLine | None:
    try:
        doc = json.loads(raw)
        return LogLine(
            ts=str(doc["ts"]), stream=doc["stream"], line=str(doc["line"]), seq=int(doc["seq"])
        )
    except (ValueError, KeyError, TypeError):
        return None


def last_seq(log_dir: Path) -> int:
    """The highest seq written so far (0 when there are no records)."""
    for name in (CURRENT, PREVIOUS):
        path = log_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if size == 0:
            continue
        with open(path, "rb") as f:
            f.seek(max(0, size - 4 * MAX_LINE - 4096))
            lines = f.read().splitlines()
        for raw in reversed(lines):
            rec = _parse(raw)
            if rec is not None:
                return rec.seq
    return 0


class LogWriter:
    """Appends records; rotates at *max_bytes*. One writer per instance (the supervisor)."""

    def __init__(self, log_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dir = log_dir
        self.max_bytes = max_bytes
        log_dir.mkdir(parents=True, exist_ok=True)
        self.seq = last_seq(log_dir)
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        path = self.dir / CURRENT
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        os.close(self._fd)
        os.replace(self.dir / CURRENT, self.dir / PREVIOUS)
        self._open()

    def write(self, stream: Stream, line: str, ts: str | None = None) -> LogLine:
        self.seq += 1
        rec = LogLine(ts=ts or now_ts(), stream=stream, line=line, seq=self.seq)
        data = (
            json.dumps(
                {"seq": rec.seq, "ts": rec.ts, "stream": rec.stream, "line": rec.line},
                ensure_ascii=False,
            )
            + "\n"
        ).encode("utf-8", "surrogateescape")
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        os.write(self._fd, data)  # one write per record: readers never see half a record
        self._size += len(data)
        return rec

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LineSplitter:
    """Turns a byte stream into lines (without the newline), splitting very long ones."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.buf = bytearray()
        self.max_line = max_line

    def feed(self, data: bytes) -> list[str]:
        self.buf += data
        out: list[str] = []
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                while len(self.buf) >= self.max_line:
                    out.append(_decode(bytes(self.buf[: self.max_line])))
                    del self.buf[: self.max_line]
                return out
            chunk = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            for i in range(0, max(len(chunk), 1), self.max_line):
                out.append(_decode(chunk[i : i + self.max_line]))

    def flush(self) -> list[str]:
        if not self.buf:
            return []
        rest = _decode(bytes(self.buf))
        self.buf.clear()
        return [rest]


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\r").decode("utf-8", "replace")


class _Tail:
    """Reads complete records from one open file, remembering a partial last line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.partial = b""

    def read(self) -> list[LogLine]:
        out: list[LogLine] = []
        while True:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return out
            data = self.partial + chunk
            lines = data.split(b"\n")
            self.partial = lines.pop()
            for raw in lines:
                rec = _parse(raw)
                if rec is not None:
                    out.append(rec)

    def close(self) -> None:
        os.close(self.fd)


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


async def read_logs(
    log_dir: Path,
    *,
    after_seq: int = 0,
    follow: bool = False,
    alive: Callable[[], bool] = lambda: False,
    poll: float = 0.05,
) -> AsyncIterator[LogLine]:
    """Records with ``seq > after_seq``; with *follow*, keep going while ``alive()``."""
    last = after_seq
    prev_fd = _open(log_dir / PREVIOUS)
    if prev_fd is not None:
        tail = _Tail(prev_fd)
        try:
            for rec in tail.read():
                if rec.seq > last:
                    last = rec.seq
                    yield rec
        finally:
            tail.close()

    cur: _Tail | None = None
    try:
        while True:
            if cur is None:
                fd = _open(log_dir / CURRENT)
                cur = None if fd is None else _Tail(fd)
            if cur is not None:
                for rec in cur.read():
                    if rec.seq > last:
                        last = rec.seq
                        yield rec
                # rotated under us? finish the old file (done above), then switch
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(log_dir / CURRENT).st_ino != os.fstat(cur.fd).st_ino:
                        for rec in cur.read():
                            if rec.seq > last:
                                last = rec.seq
                                yield rec
                        cur.close()
                        cur = None
                        continue
            if not follow:
                return
            if not alive():
                # the writer is gone: one last read, then stop
                if cur is not None:
                    for rec in cur.read():
                        if rec.seq > last:
                            last = rec.seq
                            yield rec
                return
            await asyncio.sleep(poll)
    finally:
        if cur is not None:
            cur.close()
