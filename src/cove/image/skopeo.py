"""The adapter around the ``skopeo`` binary: run it without blocking, translate its failures.

Every call is ``asyncio.create_subprocess_exec`` with a timeout (the child is killed and
reaped on timeout or cancellation). skopeo's errors become cove errors here, with
``raise … from`` a ``SkopeoFailed`` carrying the command's stderr.

Credentials never reach a command line: they are written to an auth file (mode 0600, in a
private temporary directory that is removed afterwards) passed with ``--authfile``. Without
credentials ``--no-creds`` keeps skopeo from picking up whatever the host has lying around.
``--insecure-policy`` skips the host's signature policy: cove pins and verifies digests itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cove.errors import CoveError, NotFound, Permanent, Transient, Unauthenticated, UserError
from cove.image.errors import ImageRejected
from cove.image.ref import ImageRef

Creds = tuple[str, str]

INSPECT_TIMEOUT = 60.0
COPY_TIMEOUT = 900.0


class SkopeoFailed(Exception):
    """skopeo exited non-zero (the cause of the translated cove error)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv[:2])} exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Result:
    stdout: bytes
    stderr: str


def skopeo_binary() -> str:
    path = shutil.which("skopeo")
    if path is None:
        raise Permanent(
            "skopeo is not installed on this host",
            hint="install it (Debian: apt-get install skopeo; cove's scripts/setup.sh does)",
        )
    return path


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    what: str,
) -> Result:
    """Run *argv*; return its output or raise ``SkopeoFailed`` / ``Transient`` (timeout)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        await _kill(proc)
        raise Transient(
            f"{what} did not finish within {timeout:g} s",
            hint="the registry may be slow or unreachable; retry later",
        ) from None
    except BaseException:
        await _kill(proc)
        raise
    err = stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise SkopeoFailed(argv, proc.returncode or -1, err)
    return Result(stdout, err)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def auth_args(
    ref: ImageRef, creds: Creds | None, *, side: str = ""
) -> AsyncIterator[list[str]]:
    """skopeo flags for *creds* against *ref*'s registry; the auth file lives only inside.

    *side* is ``""`` for inspect, ``"src-"`` for copy sources.
    """
    if ref.is_local:
        yield []
        return
    if creds is None:
        yield [f"--{side}no-creds"]
        return
    user, password = creds
    if not user or ":" in user:
        raise UserError(
            "registry user name is empty or contains ':'",
            code="invalid_credentials",
            hint="pass credentials as (user, password)",
        )
    tmp = tempfile.mkdtemp(prefix="cove-auth-")  # 0700
    try:
        path = os.path.join(tmp, "auth.json")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        doc = {"auths": {ref.registry: {"auth": token}}}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        yield [f"--{side}authfile", path]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tls_args(ref: ImageRef, tls_verify: bool, *, side: str = "") -> list[str]:
    if ref.is_local:
        return []
    return [f"--{side}tls-verify={'true' if tls_verify else 'false'}"]


_UNAUTHORIZED = re.compile(
    r"unauthorized|authentication required|401 Unauthorized|invalid username/password"
    r"|denied: requested access",
    re.IGNORECASE,
)
_NOT_FOUND = re.compile(
    r"manifest unknown|name unknown|not found|no such file or directory|does not exist"
    r"|no descriptor found|no image found|404 Not Found",
    re.IGNORECASE,
)
_PLAIN_HTTP = re.compile(r"server gave HTTP response to HTTPS client", re.IGNORECASE)
_TLS = re.compile(r"x509:|certificate", re.IGNORECASE)
_UNREACHABLE = re.compile(
    r"connection refused|no such host|i/o timeout|network is unreachable|TLS handshake timeout"
    r"|connection reset|503 Service Unavailable|502 Bad Gateway|too many requests"
    r"|temporary failure",
    re.IGNORECASE | re.MULTILINE,
)
_CORRUPT = re.compile(
    r"digest did not match|digests? (?:do not|don't) match|size mismatch|unexpected EOF"
    r"|invalid checksum|corrupt",
    re.IGNORECASE,
)


def translate(exc: SkopeoFailed, ref: ImageRef, *, action: str) -> CoveError:
    """Map a skopeo failure to the cove error a caller can act on."""
    msg = _last_line(exc.stderr)
    where = str(ref)
    if _UNAUTHORIZED.search(exc.stderr):
        return Unauthenticated(
            f"the registry {ref.registry} refused access to {where}: {msg}",
            code="registry_unauthorized",
            hint="check the registry credentials (user, password) for this image",
        )
    if _PLAIN_HTTP.search(exc.stderr):
        return UserError(
            f"the registry {ref.registry} speaks plain HTTP, not HTTPS",
            code="registry_insecure",
            hint="use an HTTPS registry, or allow this one with tls_verify=False",
        )
    if _TLS.search(exc.stderr):
        return UserError(
            f"TLS verification of {ref.registry} failed: {msg}",
            code="registry_tls",
            hint="fix the registry's certificate, or allow it with tls_verify=False",
        )
    if _CORRUPT.search(exc.stderr):
        return ImageRejected(
            f"{action} {where}: the content does not match its digest ({msg})",
            hint="the image in the source is corrupt; push it again",
        )
    if _NOT_FOUND.search(exc.stderr):
        return NotFound(
            f"image {where} not found: {msg}",
            code="image_not_found",
            hint="check the repository, tag or digest (and the path, for a local image)",
        )
    if _UNREACHABLE.search(exc.stderr):
        return Transient(
            f"cannot reach {ref.registry or where} to {action}: {msg}",
            code="registry_unavailable",
            hint="the registry is unreachable or busy; retry later",
        )
    return Permanent(
        f"{action} {where} failed: {msg}",
        code="image_pull_failed",
        hint="see the message from skopeo above",
    )


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "no error output"
    line = lines[-1]
    # skopeo prints 'time="…" level=fatal msg="…"'
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
    if m:
        line = m.group(1).replace('\\"', '"')
    return line[:2000]


def tool_env(tmpdir: Path | None = None) -> dict[str, str]:
    """A small, predictable environment for skopeo (temporary files under *tmpdir*)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(tmpdir) if tmpdir is not None else os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    for key in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env
