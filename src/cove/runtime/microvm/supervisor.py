"""The per-instance supervisor of a microVM: ``python -m cove.runtime.microvm.supervisor DIR``.

What the sandbox supervisor is to bwrap, this is to QEMU (same process life, see
``cove.runtime.supervisor.run_supervisor``):

- starts QEMU (``-M microvm``, KVM or TCG as the driver decided) in the instance's cgroups,
  as the instance's own unprivileged host uid (``-runas``), with QEMU's seccomp sandbox on;
- owns the guest's control channel (``guest/PROTOCOL.md``): answers HELLO with the CONFIG
  (command, env, user, volumes, network, secrets), reports the start once the guest's
  STARTED arrives, writes the command's STDOUT/STDERR to the instance log, records EXIT;
- relays exec sessions: the driver connects to ``exec.sock`` and speaks the same frames on
  channel 0; the supervisor gives each session a guest channel;
- stops: a STOP frame (signal, deadline), then kills QEMU when the guest does not end in
  time (reason ``killed``);
- notices what the guest cannot say: no PING for ``hang_timeout`` seconds (``hung``: QEMU
  is killed), QEMU ending without an EXIT (``crashed``: a kernel panic from the console, or
  QEMU's own exit status, or the host's OOM killer).

The serial console (kernel messages, cove-init diagnostics) goes to ``console.log``
(bounded) and its tail explains a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cove.runtime import network
from cove.runtime._util import atomic_write_json, now_ts, proc_starttime, read_json, unlink_quiet
from cove.runtime.base import InstanceSpec, InstanceStatus, Reason, Stream
from cove.runtime.bwrap import sandbox_env
from cove.runtime.cgroups import Cgroups
from cove.runtime.layout import InstancePaths
from cove.runtime.logs import DEFAULT_MAX_BYTES, LineSplitter, LogWriter
from cove.runtime.microvm import protocol as P
from cove.runtime.supervisor import DEFAULT_STOP_TIMEOUT, run_supervisor

BOOT_TIMEOUT = 90.0  # QEMU start -> STARTED; a TCG boot on a busy host takes seconds
HANG_TIMEOUT = 30.0  # no frame from the guest for this long: hung
CONSOLE_MAX = 1 << 20  # console.log is cut back to its last half beyond this
QEMU_OVERHEAD_MB = 192  # host memory QEMU may use beyond the guest's RAM (cgroup limit)
CLIENT_BUFFER_MAX = 8 << 20  # an exec client that reads slower than this loses its session
CLIENT_LINGER = 10.0  # seconds an exec client may stay connected after its command's EXIT
RUN_ROOT = Path("/run/cove/vm")


def _log(msg: str) -> None:
    sys.stderr.write(f"{now_ts()} vm-supervisor[{os.getpid()}] {msg}\n")
    sys.stderr.flush()


def run_dir(instance_dir: Path) -> Path:
    """Where the instance's sockets live: a short path (a unix socket path has ≤ 107 bytes;
    instance directories can be longer)."""
    digest = hashlib.sha256(str(instance_dir).encode()).hexdigest()[:16]
    return RUN_ROOT / digest


def config_records(
    spec: InstanceSpec,
    ident: dict[str, Any],
    secrets: bytes | None,
    volume_devices: list[str],
) -> bytes:
    """The CONFIG payload for this instance (``guest/PROTOCOL.md``)."""
    items: list[tuple[str, str]] = [("version", "1")]
    items += [("arg", a) for a in spec.argv]
    items += [("env", f"{k}={v}") for k, v in sandbox_env(spec.env).items()]
    items += [
        ("workdir", spec.workdir),
        ("uid", str(int(ident["uid"]))),
        ("gid", str(int(ident["gid"]))),
        ("hostname", spec.hostname),
        ("pids_max", str(spec.pids_max)),
    ]
    items += [("group", str(int(g))) for g in ident.get("groups", [])]
    for dev, vol in zip(volume_devices, spec.volumes, strict=True):
        items.append(("volume", f"{dev}:{'ro' if vol.read_only else 'rw'}:{vol.container_path}"))
    if spec.network is not None:
        n = spec.network
        items += [("ip4", n.ipv4), ("gw4", n.gateway4), ("ip6", n.ipv6), ("gw6", n.gateway6)]
    if secrets is not None:
        items.append(("secrets", secrets.decode("utf-8", "surrogateescape")))
    return P.records(items)


class ExecSession:
    def __init__(self, channel: int, writer: asyncio.StreamWriter) -> None:
        self.channel = channel
        self.writer: asyncio.StreamWriter | None = writer
        self.ended = False  # the guest sent the command's EXIT

    def send(self, frame: P.Frame) -> None:
        w = self.writer
        if w is None or w.is_closing():
            return
        transport = w.transport
        if transport.get_write_buffer_size() > CLIENT_BUFFER_MAX:
            _log(f"exec channel {self.channel}: the client does not keep up; dropping it")
            w.close()
            return
        w.write(P.encode(frame.type, 0, frame.payload))

    def close(self) -> None:
        """The command ended: no more frames for the client. Only half-close here: closing
        a unix socket that holds unread data (the client's end-of-input, sent as the command
        ended) resets it, and asyncio's reader then raises the reset before handing over the
        EXIT frame still buffered. ``_exec_client`` closes once the client hangs up."""
        w = self.writer
        self.writer = None
        self.ended = True
        if w is not None and not w.is_closing():
            if w.can_write_eof():
                w.write_eof()
            else:
                w.close()


class VMSupervisor:
    def __init__(self, paths: InstancePaths, ready_fd: int) -> None:
        self.paths = paths
        self.ready_fd = ready_fd
        self.run = run_dir(paths.dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.exited = asyncio.Event()
        self.started = asyncio.Event()
        self.hello = asyncio.Event()
        self.exit_text: str | None = None
        self.fatal: list[str] = []
        self.guest_pid: int | None = None
        self.started_at: str | None = None
        self.killed = False
        self.stop_sent = False
        self.hung = False
        self.last_frame = time.monotonic()
        self.pending_stop: tuple[int, float] | None = None
        self.stop_task: asyncio.Task[None] | None = None
        self.ctl: asyncio.StreamWriter | None = None
        self.sessions: dict[int, ExecSession] = {}
        self.next_channel = 1
        self.console_tail: list[str] = []
        self.splitters: dict[Stream, LineSplitter] = {
            "stdout": LineSplitter(),
            "stderr": LineSplitter(),
        }
        self.tasks: list[asyncio.Task[Any]] = []

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
    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._early_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            await self._start()
        except Exception as exc:
            _log(f"start failed: {exc!r}")
            self._kill_qemu()
            if self.proc is not None:
                await asyncio.to_thread(self.proc.wait)
            self._write_status(
                InstanceStatus(
                    state="exited",
                    finished_at=now_ts(),
                    supervisor_pid=os.getpid(),
                    message=f"start failed: {exc}",
                )
            )
            self._report_ready(False, str(exc))
            await self._cleanup()
            return 1
        self._report_ready(True)
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self._on_sigterm)
        loop.add_signal_handler(signal.SIGUSR1, self._on_stop_request)
        if self.pending_stop is not None:
            self._request_stop(*self.pending_stop)
        await self._wait_exit()
        await self._cleanup()
        return 0

    async def _start(self) -> None:
        p = self.paths
        spec = InstanceSpec.from_json(read_json(p.spec))
        secrets = p.secrets.read_bytes() if p.secrets.exists() else None
        ident = read_json(p.ident)
        drv = read_json(p.driver)
        vm = read_json(p.dir / "vm.json")
        self.spec = spec
        self.hang_timeout = float(drv.get("hang_timeout", HANG_TIMEOUT))
        atomic_write_json(
            p.supervisor, {"pid": os.getpid(), "starttime": proc_starttime(os.getpid())}
        )
        unlink_quiet(p.sandbox)
        self.run.mkdir(parents=True, exist_ok=True, mode=0o700)
        ctl_path, exec_path = self.run / "ctl.sock", self.run / "exec.sock"
        for s in (ctl_path, exec_path):
            unlink_quiet(s)

        cg = Cgroups(str(drv["cgroup_root"]), spec.instance_id)
        cg.create(
            memory_mb=spec.memory_mb + QEMU_OVERHEAD_MB,
            cpu_millis=spec.cpu_millis,
            pids_max=int(drv.get("qemu_pids_max", 256)),
        )
        self.cg = cg
        self.oom_base = cg.oom_kills()
        self.logw = LogWriter(p.logs, int(drv.get("max_log_bytes", DEFAULT_MAX_BYTES)))
        owner = int(ident["uid_base"])
        tap = None
        if spec.network is not None:
            tap = await network.attach_tap(spec.network, spec.instance_id, owner)

        argv = list(vm["argv"])
        argv += [
            "-chardev", f"socket,id=ctl,path={ctl_path},server=on,wait=on",
            "-device", "virtserialport,chardev=ctl,name=" + P.PORT_NAME,
            "-runas", f"{owner}:{owner}",
        ]  # fmt: skip
        if tap is not None:
            mac = network.instance_mac(spec.instance_id)
            argv += [
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-device,netdev=n0,mac={mac}",
            ]  # fmt: skip
            if spec.network is not None and spec.network.netns:
                argv = ["nsenter", f"--net=/run/netns/{spec.network.netns}", "--", *argv]

        def preexec() -> None:  # in the forked child: no threads, no asyncio
            cg.join(0)

        self.boot_started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,  # QEMU's own complaints go to supervisor.log
            preexec_fn=preexec,
            close_fds=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        loop = asyncio.get_running_loop()
        self.proc_pidfd = os.pidfd_open(self.proc.pid)
        loop.add_reader(self.proc_pidfd, self.exited.set)
        assert self.proc.stdout is not None
        self._capture_console(self.proc.stdout.fileno())
        atomic_write_json(
            p.sandbox,
            {
                "qemu_pid": self.proc.pid,
                "qemu_starttime": proc_starttime(self.proc.pid),
                "accel": vm.get("accel"),
                "exec_socket": str(exec_path),
            },
        )

        reader, self.ctl = await self._connect(ctl_path)
        self.tasks.append(loop.create_task(self._read_guest(reader)))
        self.tasks.append(loop.create_task(self._watch_hang()))
        await self._until(self.hello, "the guest did not boot (no HELLO from cove-init)")
        devices = [f"/dev/vd{chr(ord('b') + i)}" for i in range(len(spec.volumes))]
        await self._send(P.CONFIG, 0, config_records(spec, ident, secrets, devices))
        await self._until(self.started, "the command did not start")
        server = await asyncio.start_unix_server(self._exec_client, path=str(exec_path))
        self.exec_server = server
        self.started_at = now_ts()
        boot_s = time.monotonic() - self.boot_started
        self._write_status(
            InstanceStatus(
                state="running",
                pid=self.proc.pid,
                started_at=self.started_at,
                supervisor_pid=os.getpid(),
                message=f"microVM ({vm.get('accel')}), command started {boot_s:.2f}s after QEMU",
            )
        )
        _log(f"running: qemu {self.proc.pid}, guest pid {self.guest_pid}, boot {boot_s:.2f}s")

    async def _connect(self, path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        deadline = time.monotonic() + 20.0
        while True:
            if self.exited.is_set():
                raise RuntimeError("QEMU exited before its control socket appeared: " + self._why())
            try:
                return await asyncio.open_unix_connection(str(path), limit=P.MAX_FRAME * 2)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError("QEMU did not open its control socket") from None
                await asyncio.sleep(0.01)

    async def _until(self, event: asyncio.Event, what: str) -> None:
        left = BOOT_TIMEOUT - (time.monotonic() - self.boot_started)
        waiter = asyncio.ensure_future(event.wait())
        died = asyncio.ensure_future(self.exited.wait())
        try:
            await asyncio.wait(
                {waiter, died}, timeout=max(left, 0.1), return_when="FIRST_COMPLETED"
            )
        finally:
            waiter.cancel()
            died.cancel()
        if event.is_set():
            return
        if self.fatal:
            raise RuntimeError(f"{what}: {'; '.join(self.fatal)}")
        if self.exited.is_set():
            raise RuntimeError(f"{what}: QEMU exited ({self._why()})")
        raise RuntimeError(f"{what} within {BOOT_TIMEOUT:.0f}s; console: {self._console_hint()}")

    def _why(self) -> str:
        rc = self.proc.poll() if self.proc is not None else None
        return f"status {rc}; console: {self._console_hint()}"

    def _console_hint(self) -> str:
        lines = [ln for ln in self.console_tail if ln.strip()]
        return " | ".join(lines[-3:]) or "no output"

    # -- the console -----------------------------------------------------------------
    def _capture_console(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        path = self.paths.dir / "console.log"
        out = open(path, "ab")  # noqa: SIM115 - lives as long as QEMU's output
        splitter = LineSplitter()
        self.console_eof = asyncio.Event()

        def on_readable() -> None:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                out.write(data)
                out.flush()
                if out.tell() > CONSOLE_MAX:
                    _truncate_to_tail(path, out)
                for line in splitter.feed(data):
                    self.console_tail = [*self.console_tail[-199:], line.rstrip("\r")]
                return
            loop.remove_reader(fd)
            out.close()
            self.console_eof.set()

        loop.add_reader(fd, on_readable)

    # -- the guest channel -------------------------------------------------------------
    async def _send(self, type_: int, channel: int, payload: bytes = b"") -> None:
        if self.ctl is None or self.ctl.is_closing():
            return
        self.ctl.write(P.encode(type_, channel, payload))
        with contextlib.suppress(ConnectionError):
            await self.ctl.drain()

    async def _read_guest(self, reader: asyncio.StreamReader) -> None:
        decoder = P.Decoder()
        try:
            while data := await reader.read(1 << 16):
                self.last_frame = time.monotonic()
                for frame in decoder.feed(data):
                    self._on_frame(frame)
        except P.ProtocolError as exc:
            _log(f"guest protocol error: {exc}; no longer reading the control channel")
        except ConnectionError:
            pass
        for stream, splitter in self.splitters.items():
            for line in splitter.flush():
                self.logw.write(stream, line)

    def _on_frame(self, f: P.Frame) -> None:
        if f.channel != 0:
            sess = self.sessions.get(f.channel)
            if sess is not None:
                sess.send(f)
                if f.type == P.EXIT:
                    sess.close()
                    del self.sessions[f.channel]
            return
        if f.type in (P.STDOUT, P.STDERR):
            stream: Stream = "stdout" if f.type == P.STDOUT else "stderr"
            ts = now_ts()
            for line in self.splitters[stream].feed(f.payload):
                self.logw.write(stream, line, ts)
        elif f.type == P.PING:
            pass
        elif f.type == P.HELLO:
            if f.text != P.VERSION:
                self.fatal.append(f"unexpected guest init version {f.text!r}")
            self.hello.set()
        elif f.type == P.STARTED:
            with contextlib.suppress(ValueError):
                self.guest_pid = int(f.text)
            self.started.set()
        elif f.type == P.EXIT:
            self.exit_text = f.text
            _log(f"guest: {f.text}")
        elif f.type == P.FATAL:
            self.fatal.append(f.text)
            _log(f"guest fatal: {f.text}")
        else:
            _log(f"ignored guest frame {f!r}")

    async def _watch_hang(self) -> None:
        while not self.exited.is_set():
            await asyncio.sleep(1.0)
            if not self.hello.is_set():
                continue  # booting: the boot timeout covers it
            silent = time.monotonic() - self.last_frame
            if silent > self.hang_timeout and self.exit_text is None:
                _log(f"no word from the guest for {silent:.0f}s: hung, killing QEMU")
                self.hung = True
                self._kill_qemu()
                return

    # -- exec sessions -----------------------------------------------------------------
    async def _exec_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        decoder = P.Decoder()
        sess: ExecSession | None = None
        try:
            while data := await self._read_client(reader, sess):
                for f in decoder.feed(data):
                    if sess is not None and sess.ended:
                        continue  # the command ended: what the client still sends is moot
                    if sess is None:
                        if f.type != P.EXEC or self.exit_text is not None or self.exited.is_set():
                            writer.write(P.encode(P.FATAL, 0, b"the instance is not running"))
                            writer.write(P.encode(P.EXIT, 0, b"exit 255"))
                            return
                        channel = self._new_channel()
                        sess = ExecSession(channel, writer)
                        self.sessions[channel] = sess
                        await self._send(P.EXEC, channel, f.payload)
                    elif f.type in (P.STDIN, P.RESIZE, P.SIGNAL):
                        await self._send(f.type, sess.channel, f.payload)
        except (P.ProtocolError, ConnectionError) as exc:
            _log(f"exec client: {exc}")
        except TimeoutError:
            pass  # the command ended and the client did not hang up in time
        finally:
            if sess is not None and not sess.ended and sess.channel in self.sessions:
                # the client went away before the command ended: end the command
                await self._send(P.SIGNAL, sess.channel, b"9")
                sess.writer = None
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_client(self, reader: asyncio.StreamReader, sess: ExecSession | None) -> bytes:
        if sess is not None and sess.ended:
            # the command ended and the client was told: wait a little for it to hang up
            return await asyncio.wait_for(reader.read(1 << 16), CLIENT_LINGER)
        return await reader.read(1 << 16)

    def _new_channel(self) -> int:
        while True:
            ch = self.next_channel
            self.next_channel = 1 if ch >= 0x7FFFFFFF else ch + 1
            if ch not in self.sessions:
                return ch

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
                self.killed = True
                self._kill_qemu()
            return
        self.stop_task = asyncio.get_running_loop().create_task(self._stop(sig, timeout))

    async def _stop(self, sig: int, timeout: float) -> None:
        _log(f"stop: signal {sig}, timeout {timeout}s")
        if sig == signal.SIGKILL:
            self.killed = True
            self._kill_qemu()
            return
        self.stop_sent = True
        await self._send(P.STOP, 0, f"{int(sig)} {int(timeout * 1000)}".encode())
        try:
            # the guest kills what is left at its deadline and powers off; give it a little
            # longer before pulling the plug
            await asyncio.wait_for(self.exited.wait(), timeout + 5.0)
        except TimeoutError:
            _log("stop deadline reached: killing QEMU")
            self.killed = True
            self._kill_qemu()

    def _kill_qemu(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()

    # -- exit ------------------------------------------------------------------------
    async def _wait_exit(self) -> None:
        await self.exited.wait()
        assert self.proc is not None
        rc = await asyncio.to_thread(self.proc.wait)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.console_eof.wait(), 2.0)
        if self.stop_task is not None and not self.stop_task.done():
            self.stop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.stop_task
        # what the guest had sent is read to the end before deciding
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.tasks[0]), 2.0)
        self.logw.close()

        exit_code: int | None
        sig: int | None = None
        message: str | None = None
        reason: Reason
        if self.exit_text is not None:
            exit_code, reason, sig = P.parse_exit(self.exit_text)
            if self.stop_sent and sig == signal.SIGKILL:
                reason = "killed"  # cove-init's SIGKILL at the stop deadline
        elif self.killed:
            exit_code, reason, sig = 137, "killed", 9
        elif self.hung:
            exit_code, reason = None, "hung"
            message = f"the guest stopped answering for {self.hang_timeout:.0f}s; QEMU was killed"
        else:
            exit_code, reason = None, "crashed"
            message = self._crash_message(rc)
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
                message=message,
            )
        )
        _log(f"exited: code {exit_code}, reason {reason}" + (f" ({message})" if message else ""))

    def _crash_message(self, rc: int) -> str:
        panic = [ln for ln in self.console_tail if "Kernel panic" in ln]
        if panic:
            return "guest kernel panic: " + panic[-1].split("Kernel panic - ", 1)[-1].strip()
        if self.cg.oom_kills() > self.oom_base:
            return "QEMU was killed by the host's OOM killer (the VM's memory plus overhead)"
        if rc < 0:
            return f"QEMU ended by signal {-rc} without the guest reporting an exit"
        return f"QEMU exited with status {rc} without the guest reporting an exit"

    async def _cleanup(self) -> None:
        for t in self.tasks:
            t.cancel()
        for sess in self.sessions.values():
            sess.send(P.Frame(P.FATAL, sess.channel, b"the instance stopped"))
            sess.send(P.Frame(P.EXIT, sess.channel, b"signal 9"))
            sess.close()
        self.sessions.clear()
        server = getattr(self, "exec_server", None)
        if server is not None:
            server.close()
        if self.ctl is not None:
            self.ctl.close()
        for name in ("ctl.sock", "exec.sock"):
            unlink_quiet(self.run / name)
        with contextlib.suppress(OSError):
            self.run.rmdir()
        spec = getattr(self, "spec", None)
        if spec is not None and spec.network is not None:
            try:
                await network.detach(spec.network, spec.instance_id)
            except Exception as exc:
                _log(f"removing the tap: {exc}")


def _truncate_to_tail(path: Path, out: Any) -> None:
    """Keep the last half of console.log (a guest that floods its console)."""
    out.flush()
    with open(path, "rb") as f:
        f.seek(-CONSOLE_MAX // 2, os.SEEK_END)
        tail = f.read()
    out.seek(0)
    out.truncate()
    out.write(b"[console.log truncated]\n" + tail)
    out.flush()


def main(argv: list[str]) -> int:
    return run_supervisor(argv, lambda paths, ready_fd: VMSupervisor(paths, ready_fd).main())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
