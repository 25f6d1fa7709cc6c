"""The per-instance supervisor: ``python -m cove.runtime.supervisor <instance dir>``.

Like conmon/containerd-shim: it owns one sandbox, its output and its exit status, and keeps
running when the agent that started it goes away.

- The driver starts it in a new session; it forks once more and the first process exits as
  soon as the sandbox runs (or failed to), printing one JSON line ``{"ok": ...}`` - so the agent
  gets a clear start result and never has to reap the long-lived process.
- It creates the sandbox with bwrap, *as the instance user* (its shifted host id, see
  cove.runtime.idmap), after moving the forked child into the instance's cgroups (memory,
  cpu, pids) before exec: everything the sandbox runs is charged to the instance from its
  first instruction.
- It writes the sandbox's uid/gid map, wires the network, then releases the sandbox.
- It captures stdout/stderr line by line into the size-bounded log, and rewrites
  ``status.json`` atomically on every transition.
- Stop: SIGTERM (default signal and timeout) or SIGUSR1 with a request in ``stop.json``. It
  forwards the signal to the instance's main process, waits for the deadline, then SIGKILLs
  the sandbox (its pid 1: the kernel ends every process of the pid namespace).
- Termination reason: ``killed`` (SIGKILL from a stop), ``oom`` (the memory cgroup's OOM-kill
  counter went up), ``signal`` (ended by a signal), ``exited``.
- It never restarts the instance; it exits after recording the final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cove.runtime import network
from cove.runtime._util import (
    atomic_write_json,
    now_ts,
    proc_starttime,
    read_json,
    unlink_quiet,
    write_text,
)
from cove.runtime.base import InstanceSpec, InstanceStatus, Reason, Stream
from cove.runtime.bwrap import BwrapFds, build_argv, id_map
from cove.runtime.cgroups import Cgroups
from cove.runtime.layout import InstancePaths
from cove.runtime.logs import DEFAULT_MAX_BYTES, LineSplitter, LogWriter
from cove.runtime.seccomp import build_filter

DEFAULT_STOP_TIMEOUT = 10.0
SETUP_TIMEOUT = 20.0


def _log(msg: str) -> None:
    sys.stderr.write(f"{now_ts()} supervisor[{os.getpid()}] {msg}\n")
    sys.stderr.flush()


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_info(fd: int, timeout: float) -> dict[str, Any] | None:
    """bwrap's --info-fd JSON, or None if bwrap closed it without one (it failed)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
        try:
            doc = json.loads(buf)
        except ValueError:
            continue
        return doc if isinstance(doc, dict) else None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Supervisor:
    def __init__(self, paths: InstancePaths, ready_fd: int) -> None:
        self.paths = paths
        self.ready_fd = ready_fd
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self.init_pidfd: int | None = None
        self.app_pid: int | None = None
        self.app_pidfd: int | None = None
        self.exited = asyncio.Event()
        self.eof: list[asyncio.Event] = []
        self.stop_task: asyncio.Task[None] | None = None
        self.pending_stop: tuple[int, float] | None = None
        self.killed = False
        self.started_at: str | None = None
        self.oom_base = 0
        self.recent_stderr: list[str] = []

    # -- status ----------------------------------------------------------------------
    def _write_status(self, st: InstanceStatus) -> None:
        atomic_write_json(self.paths.status, st.to_json())

    def _report_ready(self, ok: bool, error: str | None = None) -> None:
        if self.ready_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, (json.dumps({"ok": ok, "error": error}) + "\n").encode())
        os.close(self.ready_fd)
        self.ready_fd = -1

    # -- main ------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # While starting, stop requests are only noted. asyncio's signal handling is not
        # installed yet on purpose: its wakeup fd would be inherited by pyroute2's forked
        # helpers, and a signal sent to one of those would look like one sent to us.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._early_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            await self._start()
        except Exception as exc:
            _log(f"start failed: {exc!r}")
            self._abort_sandbox()
            self._write_status(
                InstanceStatus(
                    state="exited",
                    finished_at=now_ts(),
                    supervisor_pid=os.getpid(),
                    message=f"start failed: {exc}",
                )
            )
            self._report_ready(False, str(exc))
            return 1
        self._report_ready(True)
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self._on_sigterm)
        loop.add_signal_handler(signal.SIGUSR1, self._on_stop_request)
        if self.pending_stop is not None:
            self._request_stop(*self.pending_stop)
        await self._wait_exit()
        return 0

    async def _start(self) -> None:
        p = self.paths
        spec_doc = read_json(p.spec)
        secrets = p.secrets.read_bytes() if p.secrets.exists() else None
        spec = InstanceSpec.from_json(spec_doc, secrets_json=secrets)
        ident = read_json(p.ident)
        drv = read_json(p.driver)
        self.spec = spec
        atomic_write_json(
            p.supervisor, {"pid": os.getpid(), "starttime": proc_starttime(os.getpid())}
        )
        unlink_quiet(p.sandbox)

        cg = Cgroups(str(drv["cgroup_root"]), spec.instance_id)
        cg.create(memory_mb=spec.memory_mb, cpu_millis=spec.cpu_millis, pids_max=spec.pids_max)
        self.cg = cg
        self.oom_base = cg.oom_kills()
        self.logw = LogWriter(p.logs, int(drv.get("max_log_bytes", DEFAULT_MAX_BYTES)))

        info_r, info_w = os.pipe()
        ub_r, ub_w = os.pipe()
        own_fds = [info_w, ub_r]
        seccomp = build_filter()
        if seccomp is None:
            _log("no seccomp filter for this machine architecture: running without one")
        seccomp_fd = _memfd("cove-seccomp", seccomp) if seccomp else None
        secrets_fd = _memfd("cove-secrets", secrets) if secrets is not None else None
        fds = BwrapFds(info=info_w, userns_block=ub_r, seccomp=seccomp_fd, secrets=secrets_fd)
        bwrap = str(drv.get("bwrap", "bwrap"))
        argv = build_argv(
            spec,
            p.merged,
            fds,
            volume_sources=[p.volume(i) for i in range(len(spec.volumes))],
            bwrap=bwrap,
        )
        # the options go through --args, so env values never show up in `ps`; the command
        # itself must follow on the real command line (bwrap stops parsing --args at "--")
        sep = argv.index("--")
        args_fd = _memfd("cove-bwrap-args", b"".join(a.encode() + b"\0" for a in argv[1:sep]))
        command = argv[sep:]
        own_fds += [fd for fd in (seccomp_fd, secrets_fd, args_fd) if fd is not None]

        # host ids of the instance user: its image ids shifted into the instance's block
        base = int(ident["uid_base"])
        uid, gid = base + int(ident["uid"]), base + int(ident["gid"])
        groups = [base + int(g) for g in ident.get("groups", [])]

        def preexec() -> None:  # in the forked child, before exec: no threads, no asyncio
            cg.join(0)
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)

        try:
            self.proc = subprocess.Popen(
                [bwrap, "--args", str(args_fd), *command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(own_fds),
                preexec_fn=preexec,
                close_fds=True,
                # bwrap's own environment stays readable in the sandbox (/proc/1/environ):
                # give it nothing of ours (the program's env is set with --setenv)
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        finally:
            for fd in own_fds:
                os.close(fd)
        loop = asyncio.get_running_loop()
        self.proc_pidfd = os.pidfd_open(self.proc.pid)
        loop.add_reader(self.proc_pidfd, self.exited.set)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._capture(self.proc.stdout.fileno(), "stdout")
        self._capture(self.proc.stderr.fileno(), "stderr")

        # the program is blocked until we release it: reading bwrap's info synchronously is
        # fine (and keeps the supervisor single-threaded; pyroute2 forks for netns sockets)
        try:
            info = _read_info(info_r, SETUP_TIMEOUT)
        finally:
            os.close(info_r)
        if info is None or "child-pid" not in info:
            os.close(ub_w)
            await self._wait_for_exit(5.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.eof)), 2.0)
            raise RuntimeError(
                f"bwrap did not start the sandbox (exit code {self.proc.poll()}): "
                + (" | ".join(self.recent_stderr) or "no output")
            )
        self.init_pid = int(info["child-pid"])
        self.init_pidfd = os.pidfd_open(self.init_pid)
        try:
            write_text(f"/proc/{self.init_pid}/uid_map", id_map(base))
            write_text(f"/proc/{self.init_pid}/gid_map", id_map(base))
            if spec.network is not None:
                await network.attach(spec.network, spec.instance_id, self.init_pid)
        except BaseException:
            os.close(ub_w)
            raise
        os.write(ub_w, b"1")  # release the sandbox
        os.close(ub_w)

        # bwrap's pid 1 forks the program once the mounts are done
        deadline = time.monotonic() + SETUP_TIMEOUT
        while not self.exited.is_set() and time.monotonic() < deadline:
            kids = _children(self.init_pid)
            if kids:
                self.app_pid = kids[0]
                with contextlib.suppress(OSError):
                    self.app_pidfd = os.pidfd_open(self.app_pid)
                break
            await asyncio.sleep(0.002)
        self.started_at = now_ts()
        atomic_write_json(
            p.sandbox,
            {
                "init_pid": self.init_pid,
                "init_starttime": proc_starttime(self.init_pid),
                "app_pid": self.app_pid,
            },
        )
        self._write_status(
            InstanceStatus(
                state="running",
                pid=self.app_pid,
                started_at=self.started_at,
                supervisor_pid=os.getpid(),
            )
        )
        _log(f"running: sandbox init {self.init_pid}, program {self.app_pid}")

    # -- output ----------------------------------------------------------------------
    def _capture(self, fd: int, stream: Stream) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        splitter = LineSplitter()
        done = asyncio.Event()
        self.eof.append(done)

        def on_readable() -> None:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EIO:
                    _log(f"reading {stream}: {exc}")
                data = b""
            if data:
                ts = now_ts()
                for line in splitter.feed(data):
                    self._record(stream, line, ts)
                return
            for line in splitter.flush():
                self._record(stream, line, None)
            loop.remove_reader(fd)
            done.set()

        loop.add_reader(fd, on_readable)

    def _record(self, stream: Stream, line: str, ts: str | None) -> None:
        self.logw.write(stream, line, ts)
        if stream == "stderr":  # kept to explain a failed start
            self.recent_stderr = [*self.recent_stderr[-4:], line[:300]]

    # -- stopping --------------------------------------------------------------------
    def _early_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGUSR1:
            self.pending_stop = self._read_stop_request()
        else:
            self.pending_stop = (signal.SIGTERM, DEFAULT_STOP_TIMEOUT)

    def _on_sigterm(self) -> None:
        self._request_stop(signal.SIGTERM, DEFAULT_STOP_TIMEOUT)

    def _read_stop_request(self) -> tuple[int, float]:
        sig: int = signal.SIGTERM
        timeout = DEFAULT_STOP_TIMEOUT
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = read_json(self.paths.stop_request)
            sig, timeout = int(doc["signal"]), float(doc["timeout"])
        return sig, timeout

    def _on_stop_request(self) -> None:
        self._request_stop(*self._read_stop_request())

    def _request_stop(self, sig: int, timeout: float) -> None:
        if self.stop_task is not None and not self.stop_task.done():
            if sig == signal.SIGKILL:
                self._kill_sandbox()
            return
        self.stop_task = asyncio.get_running_loop().create_task(self._stop(sig, timeout))

    def _kill_sandbox(self) -> None:
        self.killed = True
        if self.init_pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)

    def _abort_sandbox(self) -> None:
        if self.init_pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    async def _stop(self, sig: int, timeout: float) -> None:
        _log(f"stop: signal {sig}, timeout {timeout}s")
        if sig == signal.SIGKILL:
            self._kill_sandbox()
            return
        target = self.app_pidfd if self.app_pidfd is not None else self.init_pidfd
        try:
            if target is not None:
                signal.pidfd_send_signal(target, sig)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            _log("stop deadline reached: SIGKILL")
            self._kill_sandbox()

    # -- exit ------------------------------------------------------------------------
    async def _wait_for_exit(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), timeout)

    async def _wait_exit(self) -> None:
        await self.exited.wait()
        assert self.proc is not None
        rc = self.proc.wait()
        # the pipes reach EOF once every process of the sandbox is gone
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.eof)), 5.0)
        if self.stop_task is not None and not self.stop_task.done():
            self.stop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.stop_task
        self.logw.close()

        exit_code = rc if rc >= 0 else 128 - rc
        sig: int | None = exit_code - 128 if 128 < exit_code < 128 + 65 else None
        reason: Reason
        if self.killed:
            reason = "killed"
        elif self.cg.oom_kills() > self.oom_base:
            reason = "oom"
        elif sig is not None:
            reason = "signal"
        else:
            reason = "exited"
        unlink_quiet(self.paths.sandbox)
        unlink_quiet(self.paths.stop_request)
        self._write_status(
            InstanceStatus(
                state="exited",
                pid=None,
                started_at=self.started_at,
                finished_at=now_ts(),
                exit_code=exit_code,
                reason=reason,
                supervisor_pid=os.getpid(),
                signal=sig,
            )
        )
        _log(f"exited: code {exit_code}, reason {reason}")


def main(argv: list[str]) -> int:
    return run_supervisor(argv, lambda paths, ready_fd: Supervisor(paths, ready_fd).run())


def run_supervisor(
    argv: list[str], make: Callable[[InstancePaths, int], Coroutine[Any, Any, int]]
) -> int:
    """A supervisor's process life, whatever it supervises: one per instance (a lock), the
    short-lived first process relays the start result, the second (in a new session, stdio
    on /dev/null) runs ``make(paths, ready_fd)`` - which writes ``{"ok": ...}`` to
    ``ready_fd`` once the instance runs or failed to."""
    if len(argv) != 2:
        sys.stderr.write(f"usage: python -m {argv[0]} <instance dir>\n")
        return 2
    paths = InstancePaths(Path(argv[1]).resolve())
    # one supervisor per instance: the lock is held (inherited) by the long-lived process
    lock_fd = os.open(paths.dir / "supervisor.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.stdout.write(json.dumps({"ok": False, "error": "a supervisor is already running"}))
        return 1
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        # the short-lived first process: relay the start result, leave the supervisor to init
        os.close(ready_w)
        chunks = []
        while chunk := os.read(ready_r, 4096):
            chunks.append(chunk)
        out = b"".join(chunks).decode() or json.dumps(
            {"ok": False, "error": "the supervisor died while starting; see supervisor.log"}
        )
        sys.stdout.write(out)
        sys.stdout.flush()
        try:
            return 0 if json.loads(out).get("ok") else 1
        except ValueError:
            return 1
    os.close(ready_r)
    os.setsid()
    _ = lock_fd  # kept open (and locked) for the supervisor's lifetime
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the driver waits for EOF on the first process's stdout
    os.close(devnull)
    try:
        return asyncio.run(make(paths, ready_w))
    except BaseException as exc:  # last resort: leave a trace and a final status
        _log(f"crashed: {exc!r}")
        with contextlib.suppress(Exception):
            atomic_write_json(
                paths.status,
                InstanceStatus(
                    state="unknown", supervisor_pid=os.getpid(), message=f"supervisor: {exc}"
                ).to_json(),
            )
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv))
