"""Instance logs: records, rotation bounds, resuming by seq, following, line splitting."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cove.runtime.base import LogLine
from cove.runtime.logs import CURRENT, PREVIOUS, LineSplitter, LogWriter, last_seq, read_logs


def _read(log_dir: Path, **kw: object) -> list[LogLine]:
    async def run() -> list[LogLine]:
        return [x async for x in read_logs(log_dir, **kw)]  # type: ignore[arg-type]

    return asyncio.run(run())


def test_records_are_json_lines_with_seq_ts_and_stream(tmp_path: Path) -> None:
    w = LogWriter(tmp_path)
    w.write("stdout", "hello")
    w.write("stderr", "oops ✓")
    w.close()
    raw = [json.loads(x) for x in (tmp_path / CURRENT).read_text().splitlines()]
    assert [(r["seq"], r["stream"], r["line"]) for r in raw] == [
        (1, "stdout", "hello"),
        (2, "stderr", "oops ✓"),
    ]
    assert all(r["ts"].endswith("Z") and "T" in r["ts"] for r in raw)
    assert [x.line for x in _read(tmp_path)] == ["hello", "oops ✓"]
    assert [x.seq for x in _read(tmp_path, after_seq=1)] == [2]


def test_rotation_keeps_the_log_bounded_and_seq_continuous(tmp_path: Path) -> None:
    w = LogWriter(tmp_path, max_bytes=2000)
    for i in range(500):
        w.write("stdout", f"line {i:04d} " + "x" * 40)
    w.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [CURRENT, PREVIOUS]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    lines = _read(tmp_path)
    seqs = [x.seq for x in lines]
    assert seqs == list(range(seqs[0], 501))  # the newest records, no gaps, no duplicates
    assert lines[-1].line.startswith("line 0499")
    # a new writer (supervisor restart) continues the sequence
    w2 = LogWriter(tmp_path, max_bytes=2000)
    assert w2.write("stdout", "after restart").seq == 501
    w2.close()
    assert last_seq(tmp_path) == 501


def test_a_corrupt_or_partial_record_is_skipped(tmp_path: Path) -> None:
    w = LogWriter(tmp_path)
    w.write("stdout", "ok")
    w.close()
    with open(tmp_path / CURRENT, "a") as f:
        f.write("not json\n")
        f.write('{"seq": 9, "ts": "x", "stream": "stdout", "line": "half')  # no newline yet
    assert [x.line for x in _read(tmp_path)] == ["ok"]


def test_follow_sees_new_records_and_rotation_then_stops_when_the_writer_is_gone(
    tmp_path: Path,
) -> None:
    w = LogWriter(tmp_path, max_bytes=300)
    alive = True

    async def produce() -> None:
        nonlocal alive
        for i in range(40):
            w.write("stdout", f"record {i} " + "y" * 20)
            await asyncio.sleep(0.002)
        alive = False

    async def run() -> list[LogLine]:
        task = asyncio.create_task(produce())
        got = [x async for x in read_logs(tmp_path, follow=True, alive=lambda: alive, poll=0.001)]
        await task
        return got

    got = asyncio.run(run())
    w.close()
    seqs = [x.seq for x in got]
    assert seqs == sorted(set(seqs))  # in order, no duplicates
    assert seqs[-1] == 40  # saw the end, across several rotations


def test_line_splitter() -> None:
    s = LineSplitter(max_line=8)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\r\nd\n\n") == ["abc", "d", ""]
    assert s.feed(b"0123456789abcdefXY") == ["01234567", "89abcdef"]
    assert s.feed(b"\n") == ["XY"]
    assert s.feed(b"\xff\xfe tail") == []
    assert s.flush() == ["\ufffd\ufffd tail"]
    assert s.flush() == []
