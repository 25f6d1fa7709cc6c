"""Run a command inside a running sandbox: ``python -m cove.runtime.nsexec <control fd>``.

Started (as root) by ``SandboxDriver.exec``; receives its orders as one JSON message on the
control socket (a SOCK_SEQPACKET socketpair) and answers ``{"ok": true, "pid": N}`` - with the
PTY master attached (SCM_RIGHTS) for a TTY session - or ``{"ok": false, "error": ...}``.

Entering safely (plain ``nsenter`` keeps the host's capabilities and cgroup):

1. open every namespace of the sandbox's pid 1 and check its start time (no pid reuse);
2. join the instance's cgroups (memory, cpu, pids): the command is limited like the rest;
3. setns into the *user* namespace first (this gives capabilities in it and only in it), then
   mnt (which also moves root and cwd to the sandbox's root), uts, ipc, net, cgroup and pid;
4. allocate the PTY from the sandbox's own devpts, owned by the instance user (ids are those
   of the sandbox's user namespace from here on: image ids);
5. fork (the child is in the sandbox's pid namespace); in the child: new session, controlling
   TTY, chdir, drop the capability bounding set, clear ambient capabilities, switch to the
   instance user and groups, clear every capability, set no_new_privs, parent-death signal,
   install the instance's seccomp filter, exec;
6. the parent relays signals to the command and exits with its exit status (128 + N when it
   was killed by signal N).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import termios
from typing import Any, NoReturn

from cove.runtime._util import proc_starttime
from cove.runtime.seccomp import build_filter, load_filter

_libc = ctypes.CDLL(None, use_errno=True)

NAMESPACES = (  # user first: it is what makes joining the others allowed
    ("user", 0x10000000),
    ("mnt", 0x00020000),
    ("uts", 0x04000000),
    ("ipc", 0x08000000),
    ("net", 0x40000000),
    ("cgroup", 0x02000000),
    ("pid", 0x20000000),
)
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
EXIT_SETUP_FAILED = 125
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGWINCH,
)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg2: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), 0), what)


def drop_capabilities() -> None:
    """Empty the bounding set (needs CAP_SETPCAP: call while still privileged)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")
    _check(
        _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0),
        "clear ambient capabilities",
    )


def clear_capabilities() -> None:
    """Effective, permitted and inheritable sets to zero."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def _child(cfg: dict[str, Any], slave: int | None, err_w: int) -> NoReturn:
    try:
        os.setsid()
        if slave is not None:
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            if slave > 2:
                os.close(slave)
        try:
            os.chdir(cfg["cwd"])
        except OSError:
            os.chdir("/")
        drop_capabilities()
        uid, gid = int(cfg["uid"]), int(cfg["gid"])
        os.setgroups([int(g) for g in cfg.get("groups", [])])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        clear_capabilities()
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "parent-death signal")
        prog = build_filter()
        if prog is not None:
            load_filter(prog)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, *FORWARDED):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(err_w, f"setup: {exc}".encode())
        os._exit(EXIT_SETUP_FAILED)
    argv = [str(a) for a in cfg["argv"]]
    env = {str(k): str(v) for k, v in cfg["env"].items()}
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(err_w, f"{argv[0]}: {exc.strerror}".encode())
        os._exit(127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126)


def enter(cfg: dict[str, Any]) -> tuple[int, int | None, str | None]:
    """Enter the sandbox and start the command: (child pid, PTY master or None, exec error)."""
    init_pid = int(cfg["init_pid"])
    ns_fds: list[tuple[int, int]] = []
    try:
        for name, flag in NAMESPACES:
            ns_fds.append((os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY), flag))
        # the fds pin the namespaces; the start time proves they are the instance's
        if proc_starttime(init_pid) != int(cfg["init_starttime"]):
            raise ProcessLookupError("the instance is not running any more")
        for path in cfg["cgroups"]:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        for fd, flag in ns_fds:
            _check(_libc.setns(fd, flag), f"setns {flag:#x}")
    finally:
        for fd, _ in ns_fds:
            os.close(fd)

    master: int | None = None
    slave: int | None = None
    if cfg.get("tty"):
        # the new terminal belongs to the instance user: create it with that fsuid/fsgid
        # (ids of the sandbox's user namespace; this drops only file capabilities)
        _libc.setfsgid(int(cfg["gid"]))
        _libc.setfsuid(int(cfg["uid"]))
        master, slave = os.openpty()  # /dev/ptmx of the sandbox's mount namespace
        rows, cols = int(cfg.get("rows", 24)), int(cfg.get("cols", 80))
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        if master is not None:
            os.close(master)
        _child(cfg, slave, err_w)
    os.close(err_w)
    if slave is not None:
        os.close(slave)
    chunks = []
    while chunk := os.read(err_r, 4096):  # EOF: exec succeeded (the pipe is close-on-exec)
        chunks.append(chunk)
    os.close(err_r)
    error = b"".join(chunks).decode(errors="replace") or None
    return pid, master, error


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m cove.runtime.nsexec <control fd>\n")
        return 2
    ctl = socket.socket(fileno=int(argv[1]))
    ctl.set_inheritable(False)
    try:
        cfg = json.loads(ctl.recv(1 << 20))
        pid, master, error = enter(cfg)
    except Exception as exc:
        with contextlib.suppress(OSError):
            ctl.send(json.dumps({"ok": False, "error": str(exc)}).encode())
        return EXIT_SETUP_FAILED

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    reply = json.dumps({"ok": error is None, "pid": pid, "error": error}).encode()
    with contextlib.suppress(OSError):
        if master is not None:
            socket.send_fds(ctl, [reply], [master])
        else:
            ctl.send(reply)
    if master is not None:
        os.close(master)
    ctl.close()
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return EXIT_SETUP_FAILED
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
