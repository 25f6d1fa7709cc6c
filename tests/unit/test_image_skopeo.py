"""The skopeo adapter: credentials never on a command line, failures mapped to cove errors,
children killed on timeout and cancellation."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from cove.errors import NotFound, Permanent, Transient, Unauthenticated, UserError
from cove.image import ImageRejected, parse_ref
from cove.image import skopeo as sk

REG = parse_ref("reg.example.com:5000/team/app:v1")


def test_credentials_go_to_a_private_auth_file_that_is_removed_after() -> None:
    async def scenario() -> tuple[list[str], Path]:
        async with sk.auth_args(REG, ("alice", "pa:ss w0rd"), side="src-") as args:
            assert args[0] == "--src-authfile"
            path = Path(args[1])
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            doc = json.loads(path.read_text())
            token = doc["auths"]["reg.example.com:5000"]["auth"]
            assert base64.b64decode(token).decode() == "alice:pa:ss w0rd"
            return args, path
        raise AssertionError("unreachable")

    args, path = asyncio.run(scenario())
    assert not path.exists() and not path.parent.exists()
    assert not any("pa:ss" in a for a in args)  # the password is not an argument


def test_no_credentials_means_anonymous_not_the_hosts_saved_logins() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        async with sk.auth_args(REG, None) as a, sk.auth_args(REG, None, side="src-") as b:
            return a, b

    assert asyncio.run(scenario()) == (["--no-creds"], ["--src-no-creds"])


def test_local_references_take_no_credentials_or_tls_flags() -> None:
    local = parse_ref("oci:/x:v1")

    async def scenario() -> list[str]:
        async with sk.auth_args(local, ("u", "p")) as a:
            return a

    assert asyncio.run(scenario()) == []
    assert sk.tls_args(local, False) == []
    assert sk.tls_args(REG, False, side="src-") == ["--src-tls-verify=false"]


def test_a_user_name_with_a_colon_is_refused() -> None:
    async def scenario() -> None:
        async with sk.auth_args(REG, ("a:b", "p")):
            pass

    with pytest.raises(UserError):
        asyncio.run(scenario())


def fatal(msg: str) -> str:
    return f'time="2024-01-01T00:00:00Z" level=fatal msg="{msg}"\n'


TRANSLATIONS = [
    (
        "reading manifest v1 in reg.example.com:5000/team/app: unauthorized: "
        "authentication required",
        Unauthenticated,
        "registry_unauthorized",
    ),
    (
        "reading manifest v1 in reg.example.com:5000/team/app: manifest unknown: manifest unknown",
        NotFound,
        "image_not_found",
    ),
    (
        'pinging container registry reg.example.com:5000: Get \\"https://reg.example.com:5000/v2/\\"'
        ": http: server gave HTTP response to HTTPS client",
        UserError,
        "registry_insecure",
    ),
    (
        "pinging container registry reg.example.com:5000: Get https://reg.example.com:5000/v2/: "
        "x509: certificate signed by unknown authority",
        UserError,
        "registry_tls",
    ),
    (
        "pinging container registry reg.example.com:5000: Get https://reg.example.com:5000/v2/: "
        "dial tcp 10.0.0.1:5000: connect: connection refused",
        Transient,
        "registry_unavailable",
    ),
    (
        "writing blob: happened during read: Digest did not match, expected sha256:aa, "
        "got sha256:bb",
        ImageRejected,
        "image_rejected",
    ),
    ("something nobody anticipated", Permanent, "image_pull_failed"),
]


@pytest.mark.parametrize(("stderr", "cls", "code"), TRANSLATIONS, ids=[t[2] for t in TRANSLATIONS])
def test_skopeo_failures_become_cove_errors(stderr: str, cls: type, code: str) -> None:
    err = sk.translate(sk.SkopeoFailed(["skopeo", "inspect"], 1, fatal(stderr)), REG, action="pull")
    assert type(err) is cls
    assert err.code == code
    assert err.hint
    assert 'level=fatal msg="' not in err.detail  # the message, not the log line


def test_a_timeout_kills_the_child_and_is_transient() -> None:
    start = time.monotonic()
    with pytest.raises(Transient, match=r"did not finish within 0\.3 s"):
        asyncio.run(sk.run(["sleep", "30"], timeout=0.3, what="sleeping"))
    assert time.monotonic() - start < 5


def test_cancelling_a_run_kills_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(30)"

    async def scenario() -> int:
        task = asyncio.create_task(sk.run([sys.executable, "-c", code], timeout=60, what="x"))
        for _ in range(200):
            await asyncio.sleep(0.02)
            if pidfile.exists() and pidfile.read_text():
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return int(pidfile.read_text())

    pid = asyncio.run(scenario())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (killed and reaped)


def test_a_failing_command_raises_skopeo_failed_with_its_stderr() -> None:
    with pytest.raises(sk.SkopeoFailed) as exc:
        asyncio.run(sk.run(["sh", "-c", "echo boom >&2; exit 3"], timeout=10, what="x"))
    assert exc.value.returncode == 3 and "boom" in exc.value.stderr
