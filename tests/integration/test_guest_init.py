"""cove-init's protocol mode (guest/PROTOCOL.md): real QEMU (TCG) boots with a ``cove.ctl``
virtio-serial port; the test speaks the frames as the supervisor would.

Needs qemu-system-x86_64, a /boot/vmlinuz-* kernel with its modules, gcc (the guest init is
built on demand), mkfs.ext4/debugfs and busybox-static. Run with ``-s`` to see boot figures.
Networking uses QEMU's user-mode stack with ``restrict=on``: no packet leaves QEMU.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from cove.runtime.microvm import (
    GuestConfig,
    boot_image,
    build_ext4_image,
    build_initramfs,
    find_kernel,
    kernel_cmdline,
    write_guest_config,
)
from cove.runtime.microvm import protocol as P

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if not glob.glob("/boot/vmlinuz-*"):
        return "no /boot/vmlinuz-* kernel (apt-get install linux-image-amd64)"
    if shutil.which("gcc") is None:
        return "gcc is not installed: the guest init cannot be built"
    for tool in ("mkfs.ext4", "debugfs"):
        if shutil.which(tool, path=SBIN_PATH) is None:
            return f"{tool} is not installed (apt-get install e2fsprogs)"
    if not Path("/bin/busybox").is_file():
        return "/bin/busybox is not installed (apt-get install busybox-static)"
    return None


pytestmark = [
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
    pytest.mark.timeout(300),
]

TIMEOUT = 60.0  # per wait; a TCG boot takes ~2-6 s, generous for a loaded CI machine
APPLETS = (
    "sh", "echo", "cat", "id", "pwd", "env", "ls", "sleep", "kill", "hostname", "true",
    "tty", "stty", "ip", "stat", "mkdir", "mount", "grep", "awk", "dd", "head",
)  # fmt: skip
PATH_ENV = ("env", "PATH=/bin")


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-init-cache")


@pytest.fixture(scope="module")
def initramfs(cache: Path) -> Path:
    return build_initramfs(cache)


@pytest.fixture(scope="module")
def kernel_image(cache: Path) -> Path:
    return boot_image(find_kernel(), cache)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "tmp", "home/app", "dev", "proc", "sys"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "tmp").chmod(0o1777)
    os.chown(root / "home" / "app", 1000, 1000)
    return root


# -- the host side of the channel -----------------------------------------------------------


class Guest:
    """One microVM: QEMU with a cove.ctl port, a reader thread collecting the frames."""

    def __init__(
        self,
        workdir: Path,
        initramfs: Path,
        kernel: Path,
        root_image: Path,
        *,
        memory_mb: int = 256,
        disks: Sequence[Path] = (),
        net: bool = False,
        port_name: str = P.PORT_NAME,
    ) -> None:
        self.console_path = workdir / "console.log"
        self._sockdir = tempfile.mkdtemp(prefix="cove-ctl-")  # short: sun_path is 108 bytes
        sock_path = os.path.join(self._sockdir, "ctl.sock")
        cmd = [
            "qemu-system-x86_64",
            "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mb),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", f"file:{self.console_path}",
            "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", kernel_cmdline(root="/dev/vda"),
            "-drive", f"id=root,file={root_image},format=raw,if=none",
            "-device", "virtio-blk-device,drive=root",
        ]  # fmt: skip
        for i, disk in enumerate(disks):
            cmd += ["-drive", f"id=vol{i},file={disk},format=raw,if=none"]
            cmd += ["-device", f"virtio-blk-device,drive=vol{i}"]
        if net:
            cmd += ["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-device,netdev=n0"]
        cmd += [
            "-device", "virtio-serial-device,max_ports=2",
            "-chardev", f"socket,id=ctl,path={sock_path},server=on,wait=on",
            "-device", f"virtserialport,chardev=ctl,name={port_name}",
        ]  # fmt: skip
        self.frames: list[P.Frame] = []
        self.times: list[float] = []  # seconds since QEMU start, per frame
        self._cond = threading.Condition()
        self._closed = False
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.sock = self._connect(sock_path)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _connect(self, path: str) -> socket.socket:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                pytest.fail(f"QEMU exited ({self.proc.returncode}) before listening: {out}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except OSError:
                s.close()
                time.sleep(0.02)
        pytest.fail("QEMU's cove.ctl socket never appeared")

    def _read(self) -> None:
        decoder = P.Decoder()
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                for frame in decoder.feed(data):
                    self.frames.append(frame)
                    self.times.append(time.monotonic() - self.start)
                self._cond.notify_all()

    # sending

    def send(self, type_: int, channel: int, payload: bytes = b"") -> None:
        self.sock.sendall(P.encode(type_, channel, payload))

    def config(self, items: Sequence[tuple[str, str]]) -> None:
        self.send(P.CONFIG, 0, P.records([("version", "1"), *items]))

    def exec(self, channel: int, items: Sequence[tuple[str, str]]) -> None:
        self.send(P.EXEC, channel, P.records(items))

    # waiting

    def wait(self, pred: Callable[[P.Frame], bool], what: str) -> P.Frame:
        deadline = time.monotonic() + TIMEOUT
        with self._cond:
            while True:
                for frame in self.frames:
                    if pred(frame):
                        return frame
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    pytest.fail(f"no {what}; frames {self.frames}; console:\n{self.console()}")
                self._cond.wait(left)

    def wait_frame(self, type_: int, channel: int = 0) -> P.Frame:
        return self.wait(lambda f: f.type == type_ and f.channel == channel, P.NAMES[type_])

    def time_of(self, frame: P.Frame) -> float:
        with self._cond:
            return self.times[self.frames.index(frame)]

    def output(self, channel: int, type_: int = P.STDOUT) -> bytes:
        with self._cond:
            return b"".join(
                f.payload for f in self.frames if f.type == type_ and f.channel == channel
            )

    def wait_output(self, channel: int, needle: bytes) -> bytes:
        self.wait(lambda f: needle in self.output(channel), f"{needle!r} on channel {channel}")
        return self.output(channel)

    def result(self, channel: int) -> tuple[bytes, bytes, str]:
        """(stdout, stderr, EXIT text) of a channel, once it exited."""
        exit_text = self.wait_frame(P.EXIT, channel).text
        with self._cond:
            frames = [f for f in self.frames if f.channel == channel]
        # everything of a channel comes before its EXIT
        assert frames[-1].type == P.EXIT, frames
        return self.output(channel), self.output(channel, P.STDERR), exit_text

    def texts(self, type_: int, channel: int) -> list[str]:
        with self._cond:
            return [f.text for f in self.frames if f.type == type_ and f.channel == channel]

    def wait_exit(self) -> int:
        """QEMU's exit status (the guest powers off after EXIT ch 0)."""
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU did not exit by itself; console:\n{self.console()}")

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.sock.close()
        self._reader.join(5)
        shutil.rmtree(self._sockdir, ignore_errors=True)


@contextlib.contextmanager
def guest(
    tmp_path: Path,
    initramfs: Path,
    kernel_image: Path,
    rootfs: Path,
    *,
    memory_mb: int = 256,
    disks: Sequence[Path] = (),
    net: bool = False,
    port_name: str = P.PORT_NAME,
) -> Iterator[Guest]:
    image = build_ext4_image(rootfs, tmp_path / "root.img", 32)
    g = Guest(
        tmp_path,
        initramfs,
        kernel_image,
        image,
        memory_mb=memory_mb,
        disks=disks,
        net=net,
        port_name=port_name,
    )
    try:
        if port_name == P.PORT_NAME:
            hello = g.wait_frame(P.HELLO)
            assert hello.text == P.VERSION
        yield g
    finally:
        g.close()


def started_at(g: Guest, label: str) -> None:
    t = g.time_of(g.wait_frame(P.STARTED))
    print(f"\n[guest-init] {label}: QEMU start -> STARTED {t:.2f}s")


def sh(script: str) -> list[tuple[str, str]]:
    return [("arg", "sh"), ("arg", "-c"), ("arg", script)]


# -- tests ----------------------------------------------------------------------------------


def test_command_ids_env_hostname_secrets_and_separate_streams(
    tmp_path: Path, initramfs: Path, kernel_image: Path, rootfs: Path
) -> None:
    script = (
        "echo to-stdout; echo to-stderr >&2; "
        'echo "ids=$(id -u):$(id -g) groups=$(id -G) pwd=$(pwd) foo=$FOO host=$(hostname)"; '
        "cat /run/cove/secrets.json; echo; stat -c 'mode=%a owner=%u:%g' /run/cove/secrets.json; "
        "stat -c 'run=%a' /run/cove; grep ' /run/cove ' /proc/mounts; "
        "sleep 600 & exit 3"  # the sleeper keeps stdout open: init stops waiting after 2 s
    )
    with guest(tmp_path, initramfs, kernel_image, rootfs) as g:
        g.config(
            [
                *sh(script),
                PATH_ENV,
                ("env", "FOO=bar baz"),
                ("workdir", "/home/app/new/dir"),
                ("uid", "1000"),
                ("gid", "1000"),
                ("group", "10"),
                ("group", "20"),
                ("hostname", "vm-7"),
                ("secrets", '{"token": "s3cret"}'),
            ]
        )
        started_at(g, "command")
        pid = int(g.wait_frame(P.STARTED).text)
        assert pid > 1
        # a malformed frame: init stops reading the port but the command runs to its end
        g.sock.sendall(b"\x00\x00\x00\x03\x10\x00\x00\x00\x00")
        out, err, exit_text = g.result(0)
        assert exit_text == "exit 3"
        assert g.wait_exit() == 0
    lines = out.decode().splitlines()
    assert err == b"to-stderr\n"
    assert lines[0] == "to-stdout"
    assert lines[1] == (
        "ids=1000:1000 groups=1000 10 20 pwd=/home/app/new/dir foo=bar baz host=vm-7"
    )
    assert lines[2] == '{"token": "s3cret"}'
    assert lines[3] == "mode=400 owner=1000:1000"
    assert lines[4] == "run=755"
    assert lines[5].startswith("tmpfs /run/cove tmpfs "), lines
    assert not g.texts(P.FATAL, 0)
    assert "cove-init: bad frame length 3 on cove.ctl: no longer reading it" in g.console()


def test_execs_network_ping_and_stop_with_a_trapping_command(
    tmp_path: Path, initramfs: Path, kernel_image: Path, rootfs: Path
) -> None:
    main = 'trap "echo got TERM; exit 42" TERM; echo ready; while true; do sleep 0.1; done'
    with guest(tmp_path, initramfs, kernel_image, rootfs, net=True) as g:
        g.config(
            [
                *sh(main),
                PATH_ENV,
                ("ip4", "10.0.2.15/24"),
                ("gw4", "10.0.2.2"),
                ("ip6", "fd00:c0e::5/64"),
                ("gw6", "fd00:c0e::1"),
            ]
        )
        started_at(g, "command with network")
        g.wait_output(0, b"ready\n")

        # 1: pipes, separate streams, exit code, env replaced, workdir
        g.exec(
            1,
            [*sh('echo "o $X $(pwd)"; echo e >&2; exit 5'), PATH_ENV, ("env", "X=y"),
             ("workdir", "/tmp")],
        )  # fmt: skip
        # 2: stdin through to cat, then EOF
        g.exec(2, [("arg", "cat"), PATH_ENV])
        # 3: a terminal, resized while it runs
        tty_script = "tty; stty size; read line; stty size; echo got=$line"
        g.exec(3, [("tty", "1"), ("rows", "30"), ("cols", "90"), *sh(tty_script), PATH_ENV])
        # 4: no such program
        g.exec(4, [("arg", "no-such-program"), PATH_ENV])
        # 5: SIGNAL to the exec's process group
        g.exec(5, [("arg", "sleep"), ("arg", "100"), PATH_ENV])
        # 6: the network as configured
        g.exec(6, [*sh("ip addr show dev eth0; ip route; ip -6 route; ip link show lo"),
                   PATH_ENV])  # fmt: skip
        # 7: an unknown key is refused without killing anything
        g.exec(7, [("arg", "true"), ("bogus", "1"), PATH_ENV])
        # 8: more stdin than a frame (and than a pipe buffer), echoed back in <= 64 KiB frames
        g.exec(8, [("arg", "cat"), PATH_ENV])
        big = bytes(range(256)) * 1200  # 300 KiB

        assert g.result(1) == (b"o y /tmp\n", b"e\n", "exit 5")
        assert int(g.wait_frame(P.EXEC_STARTED, 1).text) > 1

        g.wait_frame(P.EXEC_STARTED, 2)
        g.send(P.STDIN, 2, b"hello ")
        g.send(P.STDIN, 2, b"world\n")
        g.send(P.STDIN, 2, b"")
        assert g.result(2) == (b"hello world\n", b"", "exit 0")

        g.wait_output(3, b"30 90")
        g.send(P.RESIZE, 3, b"40 100")
        g.send(P.STDIN, 3, b"line\r")
        out3, err3, exit3 = g.result(3)
        text3 = out3.decode().replace("\r", "")
        assert exit3 == "exit 0"
        assert err3 == b""
        tty_lines = text3.splitlines()
        assert tty_lines[0].startswith("/dev/pts/"), text3
        assert "30 90" in tty_lines and "40 100" in tty_lines and "got=line" in tty_lines
        assert tty_lines.index("30 90") < tty_lines.index("40 100")

        assert g.texts(P.FATAL, 4) == ["exec no-such-program: No such file or directory"]
        assert g.result(4)[2] == "exit 127"
        assert not g.texts(P.EXEC_STARTED, 4)

        g.wait_frame(P.EXEC_STARTED, 5)
        g.send(P.SIGNAL, 5, b"TERM")
        assert g.result(5)[2] == "signal 15"

        net, _, exit6 = g.result(6)
        assert exit6 == "exit 0"
        net_text = net.decode()
        assert "inet 10.0.2.15/24" in net_text, net_text
        assert "inet6 fd00:c0e::5/64" in net_text, net_text
        assert "tentative" not in net_text, net_text  # DAD is off: usable at once
        assert "default via 10.0.2.2 dev eth0" in net_text, net_text
        assert "default via fd00:c0e::1 dev eth0" in net_text, net_text
        assert "LOOPBACK,UP" in net_text, net_text

        assert g.texts(P.FATAL, 7) == ["exec: unknown key 'bogus'"]
        assert g.result(7)[2] == "exit 125"

        g.wait_frame(P.EXEC_STARTED, 8)
        for i in range(0, len(big), P.MAX_DATA):
            g.send(P.STDIN, 8, big[i : i + P.MAX_DATA])
        g.send(P.STDIN, 8, b"")
        assert g.result(8) == (big, b"", "exit 0")
        assert all(len(f.payload) <= P.MAX_DATA for f in g.frames)

        # frames for unknown channels are dropped; the instance keeps running
        g.send(P.STDIN, 99, b"nobody")
        g.send(P.SIGNAL, 99, b"KILL")

        ping = g.wait_frame(P.PING)
        assert ping.payload == b""

        g.send(P.STOP, 0, b"TERM 20000")
        out0, err0, exit0 = g.result(0)
        assert b"got TERM" not in err0  # (sh may report its killed sleep: "Terminated")
        assert exit0 == "exit 42"
        assert out0 == b"ready\ngot TERM\n"
        assert g.wait_exit() == 0


def test_volumes_ro_rw_and_stop_deadline_kills_an_ignoring_command(
    tmp_path: Path, initramfs: Path, kernel_image: Path, rootfs: Path
) -> None:
    rw_img = build_ext4_image(_empty_dir(tmp_path / "rw"), tmp_path / "rw.img", 16)
    ro_src = tmp_path / "ro"
    (ro_src / "data").mkdir(parents=True)
    (ro_src / "data" / "given.txt").write_text("from the host\n")
    ro_img = build_ext4_image(ro_src, tmp_path / "ro.img", 16)
    main = (
        'trap "" TERM; echo written > /srv/rw/out.txt; cat /srv/ro/given.txt; '
        "touch_ro() { echo x > /srv/ro/new.txt; }; touch_ro 2>/dev/null || echo ro-refused; "
        "grep -E ' /srv/(rw|ro) ' /proc/mounts; echo ready; while true; do sleep 0.1; done"
    )
    with guest(tmp_path, initramfs, kernel_image, rootfs, disks=[rw_img, ro_img]) as g:
        g.config(
            [
                *sh(main),
                PATH_ENV,
                ("volume", "/dev/vdb:rw:/srv/rw"),
                ("volume", "/dev/vdc:ro:/srv/ro"),
            ]
        )
        started_at(g, "command with volumes")
        out = g.wait_output(0, b"ready\n").decode()
        assert "from the host\n" in out
        assert "ro-refused\n" in out
        mounts = [line.split() for line in out.splitlines() if line.startswith("/dev/vd")]
        opts = {m[1]: m[3].split(",") for m in mounts}
        assert {"rw", "nosuid", "nodev"} <= set(opts["/srv/rw"]), mounts
        assert {"ro", "nosuid", "nodev"} <= set(opts["/srv/ro"]), mounts

        g.send(P.STOP, 0, b"TERM 1500")
        stop_sent = time.monotonic() - g.start
        exit_frame = g.wait_frame(P.EXIT)
        assert exit_frame.text == "signal 9"
        assert g.time_of(exit_frame) - stop_sent >= 1.4  # not before the deadline
        assert g.wait_exit() == 0
    assert _debugfs_cat(rw_img, "/data/out.txt") == "written\n"
    assert _debugfs_cat(ro_img, "/data/new.txt") == ""


def test_a_second_stop_with_sigkill_acts_at_once(
    tmp_path: Path, initramfs: Path, kernel_image: Path, rootfs: Path
) -> None:
    with guest(tmp_path, initramfs, kernel_image, rootfs) as g:
        g.config([*sh('trap "" TERM; echo ready; while true; do sleep 0.1; done'), PATH_ENV])
        g.wait_output(0, b"ready\n")
        g.send(P.STOP, 0, b"SIGTERM 60000")
        time.sleep(0.5)
        assert not g.texts(P.EXIT, 0)  # TERM is ignored; the deadline is far
        sent = time.monotonic() - g.start
        g.send(P.STOP, 0, b"KILL 60000")
        exit_frame = g.wait_frame(P.EXIT)
        assert exit_frame.text == "signal 9"
        assert g.time_of(exit_frame) - sent < 10
        assert g.wait_exit() == 0


def test_oom_kill_is_reported(
    tmp_path: Path, initramfs: Path, kernel_image: Path, rootfs: Path
) -> None:
    hog = "x=0123456789abcdef; while true; do x=$x$x; done"
    with guest(tmp_path, initramfs, kernel_image, rootfs, memory_mb=128) as g:
        g.config([*sh(hog), PATH_ENV])
        exit_text = g.result(0)[2]
        assert exit_text == "signal 9 oom", g.console()
        assert g.wait_exit() == 0


def test_missing_command_is_fatal_then_exit_127(
    tmp_path: Path, initramfs: Path, kernel_image: Path, rootfs: Path
) -> None:
    with guest(tmp_path, initramfs, kernel_image, rootfs) as g:
        g.config([("arg", "no-such-program"), PATH_ENV])
        assert g.result(0)[2] == "exit 127"
        assert g.texts(P.FATAL, 0) == ["exec no-such-program: No such file or directory"]
        assert not g.texts(P.STARTED, 0)
        assert g.wait_exit() == 0
    assert "cove-init: fatal: exec no-such-program" in g.console()


def test_unknown_config_key_is_fatal_and_powers_off(
    tmp_path: Path, initramfs: Path, kernel_image: Path, rootfs: Path
) -> None:
    with guest(tmp_path, initramfs, kernel_image, rootfs) as g:
        g.config([("arg", "true"), ("colour", "blue")])
        assert g.wait_frame(P.FATAL).text == "config: unknown key 'colour'"
        assert g.wait_exit() == 0
        assert not g.texts(P.STARTED, 0) and not g.texts(P.EXIT, 0)


def test_a_serial_port_with_another_name_means_file_mode(
    tmp_path: Path, initramfs: Path, kernel_image: Path, rootfs: Path
) -> None:
    # a virtio console device but no cove.ctl port: after its wait (<= 2 s) init falls back
    # to the config file and the console protocol, exactly as without the device
    write_guest_config(rootfs, GuestConfig(argv=["echo", "file mode"], env={"PATH": "/bin"}))
    with guest(tmp_path, initramfs, kernel_image, rootfs, port_name="other.port") as g:
        assert g.wait_exit() == 0
        assert not g.frames
    lines = [line.rstrip("\r") for line in g.console().splitlines()]
    assert "file mode" in lines
    assert [line for line in lines if line.startswith("cove-init: ")] == ["cove-init: exit 0"]


# -- helpers --------------------------------------------------------------------------------


def _empty_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _debugfs_cat(image: Path, path: str) -> str:
    debugfs = shutil.which("debugfs", path=SBIN_PATH)
    assert debugfs is not None
    proc = subprocess.run(
        [debugfs, "-R", f"cat {path}", str(image)], capture_output=True, text=True, check=True
    )
    return proc.stdout
