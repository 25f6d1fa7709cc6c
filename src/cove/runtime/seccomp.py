"""A small seccomp filter (classic BPF, assembled here: no libseccomp needed).

Deny-list, Docker-default in spirit: everything is allowed except

- syscalls an instance never needs and that widen the kernel attack surface (module loading,
  kexec, bpf, perf events, io_uring, keyrings, userfaultfd, mount API, clock setting, swap,
  reboot, ...): ``EPERM``;
- creating namespaces: ``unshare``/``clone`` with any ``CLONE_NEW*`` flag: ``EPERM``
  (in particular no nested user namespace, which would hand back capabilities);
- ``clone3``: ``ENOSYS`` (its flags live in memory BPF cannot read; libc falls back to clone);
- other architectures' syscall ABIs (x32, i386): the process is killed.

Only x86_64 is described; on other machines :func:`build_filter` returns None and the sandbox
runs without seccomp (said in the instance's supervisor log).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E

_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARG0_LO = 16  # seccomp_data.args[0], low 32 bits (little endian)

CLONE_NS_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)

X86_64_DENY: dict[str, int] = {
    "acct": 163,
    "add_key": 248,
    "adjtimex": 159,
    "afs_syscall": 183,
    "bpf": 321,
    "chroot": 161,
    "clock_adjtime": 305,
    "clock_settime": 227,
    "create_module": 174,
    "delete_module": 176,
    "fanotify_init": 300,
    "finit_module": 313,
    "fsconfig": 431,
    "fsmount": 432,
    "fsopen": 430,
    "fspick": 433,
    "get_kernel_syms": 177,
    "init_module": 175,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "io_uring_setup": 425,
    "ioperm": 173,
    "iopl": 172,
    "kcmp": 312,
    "kexec_file_load": 320,
    "kexec_load": 246,
    "keyctl": 250,
    "lookup_dcookie": 212,
    "mount": 165,
    "mount_setattr": 442,
    "move_mount": 429,
    "name_to_handle_at": 303,
    "nfsservctl": 180,
    "open_by_handle_at": 304,
    "open_tree": 428,
    "perf_event_open": 298,
    "pivot_root": 155,
    "query_module": 178,
    "quotactl": 179,
    "quotactl_fd": 443,
    "reboot": 169,
    "request_key": 249,
    "security": 185,
    "setdomainname": 171,
    "sethostname": 170,
    "setns": 308,
    "settimeofday": 164,
    "swapoff": 168,
    "swapon": 167,
    "_sysctl": 156,
    "sysfs": 139,
    "syslog": 103,
    "tuxcall": 184,
    "umount2": 166,
    "uselib": 134,
    "userfaultfd": 323,
    "ustat": 136,
    "vhangup": 153,
    "vserver": 236,
}
X86_64_CLONE = 56
X86_64_UNSHARE = 272
X86_64_CLONE3 = 435
X32_SYSCALL_BIT = 0x40000000

Insn = tuple[int, int | str, int | str, int]


def _assemble(program: list[Insn | str]) -> bytes:
    """Resolve label names (strings in the list) to relative jumps; pack ``sock_filter``s."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(insns):

        def rel(target: int | str, i: int = i) -> int:
            if isinstance(target, int):
                return target
            off = labels[target] - i - 1
            if not 0 <= off <= 255:
                raise ValueError(f"jump to {target} out of range ({off})")
            return off

        out += struct.pack("<HBBI", code, rel(jt), rel(jf), k)
    return bytes(out)


def build_filter(machine: str | None = None) -> bytes | None:
    """The filter as raw ``struct sock_filter`` bytes (what ``bwrap --seccomp FD`` reads)."""
    machine = machine or platform.machine()
    if machine not in ("x86_64", "amd64"):
        return None
    prog: list[Insn | str] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _OFF_NR),
        (_JGE_K, "kill", 0, X32_SYSCALL_BIT),
    ]
    for nr in sorted(set(X86_64_DENY.values())):
        prog.append((_JEQ_K, "eperm", 0, nr))
    prog += [
        (_JEQ_K, "enosys", 0, X86_64_CLONE3),
        (_JEQ_K, "ns_flags", 0, X86_64_CLONE),
        (_JEQ_K, "ns_flags", 0, X86_64_UNSHARE),
        (_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        "ns_flags",
        (_LD_W_ABS, 0, 0, _OFF_ARG0_LO),
        (_JSET_K, "eperm", 0, CLONE_NS_FLAGS),
        (_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        "eperm",
        (_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
        "enosys",
        (_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        "kill",
        (_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
    ]
    return _assemble(prog)


PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_filter(program: bytes) -> None:
    """Install *program* on the calling thread (no_new_privs must already be set)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {errno.errorcode.get(err, err)}")
