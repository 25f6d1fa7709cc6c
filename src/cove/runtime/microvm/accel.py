"""KVM or TCG: can this host's ``/dev/kvm`` actually run a guest?

Opening ``/dev/kvm`` is not enough (FIELD-NOTES: on some hosts KVM_CREATE_VM works and the
vCPU then spins forever). The probe boots the host kernel for real under ``-accel kvm`` and
waits, briefly, for its first console line. The answer is cached per host boot (the boot id),
QEMU binary and kernel, so agents that restart do not pay for it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cove.runtime._util import atomic_write_json, now_ts, read_text

PROBE_TIMEOUT = 4.0  # KVM prints its first kernel line in well under a second


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    detail: str  # why, in a sentence


def _probe_key(qemu: str, kernel: Path) -> str:
    boot_id = (read_text("/proc/sys/kernel/random/boot_id") or "").strip()
    q = os.stat(qemu)
    return f"{boot_id}:{qemu}:{q.st_mtime_ns}:{kernel}:{kernel.stat().st_mtime_ns}"


def probe(qemu: str, kernel: Path, cache_dir: Path, *, timeout: float = PROBE_TIMEOUT) -> Accel:
    """``kvm`` when a real boot under KVM prints its first line within *timeout*, else
    ``tcg`` (emulation: correct, much slower)."""
    cache = cache_dir / "accel.json"
    key = _probe_key(qemu, kernel)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads(cache.read_text())
        if doc["key"] == key:
            return Accel(str(doc["name"]), str(doc["detail"]))
    accel = _probe(qemu, kernel, timeout)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        cache, {"key": key, "name": accel.name, "detail": accel.detail, "at": now_ts()}
    )
    return accel


def _probe(qemu: str, kernel: Path, timeout: float) -> Accel:
    if not os.path.exists("/dev/kvm"):
        return Accel("tcg", "no /dev/kvm on this host: TCG emulation")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "/dev/kvm is not accessible to the agent: TCG emulation")
    cmd = [
        qemu,
        "-M", "microvm",
        "-accel", "kvm",
        "-cpu", "host",
        "-m", "64",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio",
        "-kernel", str(kernel),
        "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = b""
    try:
        while (left := timeout - (time.monotonic() - start)) > 0:
            ready, _, _ = select.select([proc.stdout, proc.stderr], [], [], left)
            if not ready:
                break
            if proc.stdout in ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                out += chunk
                if b"Linux version" in out or b"Booting" in out:
                    took = time.monotonic() - start
                    return Accel("kvm", f"KVM: a probe guest printed its first line in {took:.2f}s")
                if not chunk:
                    break
            if proc.stderr in ready and proc.poll() is not None:
                break
    finally:
        proc.kill()
        _, err = proc.communicate()
    text = err.decode(errors="replace").strip().splitlines()
    if text:
        return Accel("tcg", f"KVM cannot run a guest here ({text[-1][:160]}): TCG emulation")
    return Accel(
        "tcg", f"KVM did not run a probe guest within {timeout:.0f}s: TCG emulation (slower)"
    )
