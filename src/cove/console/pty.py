"""One PTY running ``cove shell`` for one console connection.

The child is a session leader (``start_new_session``) whose controlling terminal is the
PTY's slave side, so Ctrl-C typed in the browser reaches the foreground command as SIGINT
and a resize (TIOCSWINSZ on the master) as SIGWINCH. The master is read through the event
loop (``add_reader``), never by a thread. ``close()`` hangs up the whole process group
(SIGHUP, then SIGKILL after a grace period), reaps the child and closes the master.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import struct
import sys
import termios
from collections.abc import Mapping
from pathlib import Path

from cove import errors

log = logging.getLogger("cove.console.pty")

# Becomes the session's controlling terminal (stdin is the slave), then becomes the shell.
# A tiny launcher instead of subprocess's preexec_fn, which is unsafe in a threaded server.
_TAKE_CTTY = (
    "import fcntl, os, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
READ_CHUNK = 65536
MAX_SIZE = 1000


def shell_argv() -> list[str]:
    """``cove shell``, run by this interpreter (cove.cli's ``__main__``)."""
    return [sys.executable, "-m", "cove.cli", "shell"]


def winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


def clamp(n: int) -> int:
    return max(1, min(int(n), MAX_SIZE))


class Pty:
    """A child process on a fresh PTY; bytes in and out through the master."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int) -> None:
        self.proc = proc
        self.master = master
        self.pid = proc.pid
        self.closed = False

    @classmethod
    async def spawn(
        cls,
        argv: list[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        rows: int = 24,
        cols: int = 80,
    ) -> Pty:
        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize(clamp(rows), clamp(cols)))
            os.set_blocking(master, False)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _TAKE_CTTY,
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=dict(env),
                cwd=str(cwd),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            os.close(master)
            raise errors.Transient(f"can't start the console shell: {exc}") from exc
        finally:
            os.close(slave)  # the child has its copies; EOF on the master once it exits
        return cls(proc, master)

    def resize(self, rows: int, cols: int) -> None:
        if not self.closed:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, winsize(clamp(rows), clamp(cols)))

    def size(self) -> tuple[int, int]:
        rows, cols, _, _ = struct.unpack(
            "HHHH", fcntl.ioctl(self.master, termios.TIOCGWINSZ, winsize(0, 0))
        )
        return rows, cols

    async def write(self, data: bytes) -> None:
        """Everything in *data* to the child's terminal, waiting (on the loop) while the
        PTY's input buffer is full."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view and not self.closed:
            try:
                n = os.write(self.master, view)
                view = view[n:]
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_writer(self.master, _set_done, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(self.master)
            except OSError:  # EIO: the child is gone
                return

    def start_reading(self, queue: asyncio.Queue[bytes | None]) -> None:
        """Feed what the child writes into *queue* (None at the end), pausing while the
        queue is full so a fast child can't outrun a slow browser."""
        loop = asyncio.get_running_loop()
        high = max(1, queue.maxsize - 1) if queue.maxsize else 64

        def readable() -> None:
            try:
                data = os.read(self.master, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:  # EIO: every slave fd is closed, the child has exited
                data = b""
            if not data:
                loop.remove_reader(self.master)
                queue.put_nowait(None)
                return
            queue.put_nowait(data)
            if queue.qsize() >= high:
                loop.remove_reader(self.master)
                self._paused = True

        self._readable = readable
        self._paused = False
        loop.add_reader(self.master, readable)

    def resume_reading(self) -> None:
        if getattr(self, "_paused", False) and not self.closed:
            self._paused = False
            asyncio.get_running_loop().add_reader(self.master, self._readable)

    async def close(self, grace: float = 2.0) -> int | None:
        """Hang up the process group (SIGHUP), SIGKILL what is left after *grace* seconds,
        reap the child, close the master. Returns the child's exit code."""
        if self.closed:
            return self.proc.returncode
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.master)
        for sig in (signal.SIGHUP, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            log.info("console shell %s ignored SIGHUP; killing its process group", self.pid)
        finally:  # cancelled half way (the server stopping) or not, nothing stays behind
            # whatever else is in the group (a command the shell started) goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.close(self.master)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        return self.proc.returncode


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
