"""A network namespace for a test, and an event loop running inside it (no tests in here).

Network rule for these tests: traffic only to loopback or to addresses the test put inside a
namespace it made (``cove-edge-<random>``); the namespace is deleted at teardown, also when a
test fails. Network namespace membership is per thread and a socket keeps the namespace it
was created in, so:

- ``NetNS.loop(kind)`` starts a thread that ``setns()``es into the namespace and runs an
  asyncio or uvloop event loop there; ``run(coro)`` runs a coroutine on it (the edge and
  the backends live there);
- ``NetNS.socket(...)`` makes a socket inside the namespace for the test's own blocking
  client and backend code, which can then use it from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

# the namespace's addresses (all on its lo)
V6 = "fd5e:c0e:ed9e::1"  # endpoint addresses
V6_CLIENT = "fd5e:c0e:ed9e::2"
V4 = "10.251.77.1"
V4_CLIENT = "10.251.77.2"
V6_BACKEND = "::1"
V4_BACKEND = "127.0.0.1"


def skip_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed (bash scripts/setup.sh)"
    return None


def enter(name: str) -> None:
    """Move the calling thread into the named network namespace (``/run/netns/NAME``)."""
    path = f"/run/netns/{name}"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class NetNS:
    """A named network namespace with ``lo`` up and the addresses above on it."""

    def __init__(self) -> None:
        self.name = f"cove-edge-{uuid.uuid4().hex[:8]}"
        self.path = f"/run/netns/{self.name}"

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        for addr in (V6, V6_CLIENT):
            _ip("-n", self.name, "addr", "add", f"{addr}/64", "dev", "lo", "nodad")
        for addr in (V4, V4_CLIENT):
            _ip("-n", self.name, "addr", "add", f"{addr}/32", "dev", "lo")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def enter(self) -> None:
        """Move the calling thread into the namespace."""
        enter(self.name)

    def socket(
        self, family: int = socket.AF_INET6, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket created inside the namespace."""
        out: list[socket.socket] = []
        errors: list[BaseException] = []

        def make() -> None:
            try:
                self.enter()
                out.append(socket.socket(family, kind))
            except BaseException as exc:  # handed to the caller
                errors.append(exc)

        t = threading.Thread(target=make)
        t.start()
        t.join()
        if errors:
            raise errors[0]
        return out[0]

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """A process started inside the namespace (``ip netns exec``)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)

    @contextlib.contextmanager
    def loop(self, kind: str = "asyncio") -> Iterator[NsLoop]:
        ns_loop = NsLoop(self, kind)
        try:
            yield ns_loop
        finally:
            ns_loop.stop()


class NsLoop:
    """An event loop (``asyncio`` or ``uvloop``) on a thread inside a namespace."""

    def __init__(self, ns: NetNS, kind: str) -> None:
        self.kind = kind
        ready: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()

        def main() -> None:
            try:
                ns.enter()
                if kind == "uvloop":
                    import uvloop

                    loop = uvloop.new_event_loop()
                else:
                    loop = asyncio.new_event_loop()
            except BaseException as exc:
                ready.set_exception(exc)
                return
            asyncio.set_event_loop(loop)
            ready.set_result(loop)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name=f"netns-{kind}", daemon=True)
        self._thread.start()
        self.loop = ready.result(timeout=10)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        """Run *coro* on the loop; its result (or exception) here."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Call *fn* on the loop's thread (for what is not thread-safe)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
