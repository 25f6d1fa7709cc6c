"""The seccomp filter: well-formed, and it really denies what it says (loaded in a child)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import struct

import pytest

from cove.runtime.seccomp import X86_64_DENY, build_filter, load_filter

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the filter describes x86_64 syscalls only"
)


def test_filter_is_well_formed() -> None:
    prog = build_filter()
    assert prog is not None and len(prog) % 8 == 0
    insns = [struct.unpack("<HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    assert len(insns) < 4096  # BPF_MAXINSNS
    for i, (code, jt, jf, _k) in enumerate(insns):
        if code & 0x07 == 0x05:  # jumps stay inside the program
            assert i + 1 + max(jt, jf) < len(insns)
    assert insns[-1][0] == 0x06  # ends with a return
    assert build_filter("aarch64") is None


def _run_in_filtered_child() -> dict[str, int]:
    """Fork; the child installs the filter and reports errno per probed syscall."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        libc = ctypes.CDLL(None, use_errno=True)
        res: dict[str, int] = {}
        try:
            libc.prctl(38, 1, 0, 0, 0)  # no_new_privs (lets an unprivileged process do it)
            load_filter(build_filter() or b"")

            def probe(name: str, *args: int) -> None:
                rc = libc.syscall(*args)
                res[name] = 0 if rc >= 0 else ctypes.get_errno()

            probe("unshare_user", 272, 0x10000000)
            probe("unshare_net", 272, 0x40000000)
            probe("unshare_files", 272, 0x400)  # not a namespace: allowed
            probe("clone3", 435, 0, 0)
            probe("mount", 165, 0, 0, 0, 0, 0)
            probe("keyctl", 250, 0, 0, 0, 0, 0)
            probe("bpf", 321, 0, 0, 0)
            probe("io_uring_setup", 425, 0, 0)
            probe("getpid", 39)
            os.write(w, json.dumps(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


def test_filter_denies_namespaces_and_dangerous_syscalls() -> None:
    res = _run_in_filtered_child()
    assert res["unshare_user"] == errno.EPERM
    assert res["unshare_net"] == errno.EPERM
    assert res["unshare_files"] == 0
    assert res["clone3"] == errno.ENOSYS  # libc falls back to clone, which is checked
    for name in ("mount", "keyctl", "bpf", "io_uring_setup"):
        assert res[name] == errno.EPERM, name
    assert res["getpid"] == 0


def test_deny_list_has_no_duplicates() -> None:
    assert len(set(X86_64_DENY.values())) == len(X86_64_DENY)
