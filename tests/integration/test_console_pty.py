"""The web console's server side without a browser, and `cove shell` on a plain terminal.

- the console WebSocket (a bare app with only the console's routes, a fake authenticate):
  the subprotocol handshake and its refusals, bytes both ways, resize reaching the child as
  SIGWINCH with the new size, exit and idle timeout as control frames and close codes, the
  child's environment, and nothing left behind after a disconnect (process group, fds, the
  private COVE_HOME), even from a child that ignores SIGHUP;
- `cove shell` in a real PTY: Tab completion, Ctrl-C at the prompt, help, Ctrl-D, history.

The browser end to end (ghostty-web, sign-in, a real server) is tests/e2e/test_console.py.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from cove import errors
from cove.console import web
from cove.console.web import ConsoleConfig, ConsoleUser

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
GOOD = "cove_s_" + "g" * 43

# Stands in for `cove shell`: says who it is, reports its terminal size on SIGWINCH, echoes
# lines, exits 3 on "exit"; with IGNORE_HUP it ignores SIGHUP and leaves a grandchild too.
CHILD = r"""
import json, os, signal, subprocess, sys
def size(*_):
    s = os.get_terminal_size(0)
    os.write(1, f"size {s.lines} {s.columns}\n".encode())  # reentrant, unlike sys.stdout
signal.signal(signal.SIGWINCH, size)
if os.environ.get("IGNORE_HUP"):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    kid = subprocess.Popen(["sleep", "1000"])  # SIG_IGN is inherited through exec
    sys.stdout.write(f"grandchild {kid.pid}\n")
me = {"pid": os.getpid(), "env": dict(os.environ), "tty": os.ttyname(0)}
me.update(pgid=os.getpgid(0), sid=os.getsid(0), fg=os.tcgetpgrp(0))
sys.stdout.write("hello " + json.dumps(me) + "\n")
sys.stdout.flush()
size()
for line in sys.stdin:
    if line.strip() == "exit":
        sys.exit(3)
    sys.stdout.write("echo " + line); sys.stdout.flush()
"""


async def _auth(token: str) -> ConsoleUser:
    if token != GOOD:
        raise errors.Unauthenticated("that token signs nobody in")
    return ConsoleUser(user_id="usr_test", email="ann@example.com")


@pytest.fixture
def child_argv(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    argv = [sys.executable, "-c", CHILD]
    monkeypatch.setattr(web, "shell_argv", lambda: argv)
    return argv


def _client(cfg: ConsoleConfig) -> TestClient:
    app = FastAPI()
    web.register(app, _auth, cfg)
    return TestClient(app, base_url="http://testserver")


@pytest.fixture
def cfg() -> ConsoleConfig:
    return ConsoleConfig(api_url="http://127.0.0.1:9", idle_timeout=60, hangup_grace=0.5)


@pytest.fixture
def client(cfg: ConsoleConfig) -> Iterator[TestClient]:
    with _client(cfg) as c:
        yield c


PROTOS = [web.SUBPROTOCOL, web.BEARER_PREFIX + GOOD]
_real_env = web.Session._env


class Reader:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen = b""
        self.controls: list[dict[str, Any]] = []
        self.closed: int | None = None

    def until(self, needle: bytes) -> bytes:
        while needle not in self.seen:
            msg = self.ws.receive()
            if msg["type"] == "websocket.close":
                self.closed = msg.get("code")
                raise AssertionError(f"closed ({self.closed}) before {needle!r}: {self.seen!r}")
            if msg.get("bytes") is not None:
                self.seen += msg["bytes"]
            elif msg.get("text") is not None:
                self.controls.append(json.loads(msg["text"]))
        return self.seen

    def until_closed(self) -> int | None:
        while True:
            msg = self.ws.receive()
            if msg["type"] == "websocket.close":
                self.closed = msg.get("code")
                return self.closed
            if msg.get("bytes") is not None:
                self.seen += msg["bytes"]
            elif msg.get("text") is not None:
                self.controls.append(json.loads(msg["text"]))

    def hello(self) -> dict[str, Any]:
        self.until(b"hello {")
        line = self.until(b"}\r\n").split(b"hello ", 1)[1].split(b"\r\n", 1)[0]
        doc: dict[str, Any] = json.loads(line)
        return doc


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ptmx_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in ("/dev/ptmx", "/dev/pts/ptmx"):
                n += 1
        except OSError:
            pass
    return n


def _wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("protocols", "headers", "status", "code"),
    [
        ([], {}, 401, "unauthenticated"),
        ([web.SUBPROTOCOL], {}, 401, "unauthenticated"),
        ([web.BEARER_PREFIX + GOOD], {}, 401, "unauthenticated"),  # no console protocol
        ([web.SUBPROTOCOL, web.BEARER_PREFIX + "cove_s_wrong"], {}, 401, "unauthenticated"),
        ([*PROTOS, web.BEARER_PREFIX + GOOD], {}, 401, "unauthenticated"),  # two tokens
        (PROTOS, {"origin": "http://evil.example"}, 403, "forbidden"),
        (PROTOS, {"origin": "https://testserver"}, 403, "forbidden"),  # another scheme
        (PROTOS, {"origin": "null"}, 403, "forbidden"),
    ],
)
def test_refused_before_the_handshake(
    client: TestClient,
    child_argv: list[str],
    protocols: list[str],
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect("/console/ws", subprotocols=protocols, headers=headers):
            pass
    resp = denied.value
    assert resp.status_code == status
    assert resp.json()["code"] == code
    assert resp.headers["content-type"].startswith("application/problem+json")


def test_too_many_sessions_are_refused(child_argv: list[str]) -> None:
    cfg = ConsoleConfig(api_url="http://127.0.0.1:9", max_sessions_per_user=1, hangup_grace=0.5)
    with _client(cfg) as client:
        with client.websocket_connect("/console/ws", subprotocols=PROTOS) as first:
            Reader(first).hello()
            with pytest.raises(WebSocketDenialResponse) as denied:
                with client.websocket_connect("/console/ws", subprotocols=PROTOS):
                    pass
            assert denied.value.status_code == 429
        # the first one closed: a new one is fine
        with client.websocket_connect("/console/ws", subprotocols=PROTOS) as again:
            Reader(again).hello()


# ----------------------------------------------------------------------------- a session


def test_a_session_end_to_end(
    client: TestClient, child_argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _ptmx_fds()
    monkeypatch.setenv("COVE_DATABASE_URL", "postgresql://secret")
    monkeypatch.setenv("COVE_MASTER_KEY", "do-not-leak")
    with client.websocket_connect(
        "/console/ws", subprotocols=PROTOS, headers={"origin": "http://testserver"}
    ) as ws:
        assert ws.accepted_subprotocol == web.SUBPROTOCOL
        r = Reader(ws)
        hello = r.hello()
        env = hello["env"]
        # the shell's environment: who and where, nothing of the server's own
        assert env["COVE_TOKEN"] == GOOD
        assert env["COVE_API_URL"] == "http://127.0.0.1:9"
        assert env["COVE_CONSOLE"] == "1"
        assert env["TERM"] == "xterm-256color"
        home = Path(env["COVE_HOME"])
        assert home.is_dir() and (home.stat().st_mode & 0o077) == 0
        assert "COVE_DATABASE_URL" not in env and "COVE_MASTER_KEY" not in env
        # a session of its own whose controlling terminal is the PTY, in the foreground
        assert hello["tty"].startswith("/dev/pts/")
        assert hello["pid"] == hello["sid"] == hello["pgid"] == hello["fg"]
        r.until(b"size 24 80")
        assert _ptmx_fds() == before + 1

        ws.send_bytes(b"hello there\r")
        r.until(b"echo hello there")
        ws.send_text(json.dumps({"type": "resize", "cols": 132, "rows": 43}))
        r.until(b"size 43 132")  # the child got SIGWINCH and reads the new size
        ws.send_text(json.dumps({"type": "resize", "cols": "wide"}))
        ws.send_text("not json")
        ws.send_text(json.dumps({"type": "bogus"}))
        ws.send_bytes(b"still here\r")
        r.until(b"echo still here")
        assert [c["code"] for c in r.controls] == ["invalid"] * 3
        ws.send_bytes(b"exit\r")
        assert r.until_closed() == web.CLOSE_EXITED
        assert {"type": "exit", "code": 3} in r.controls
    assert _wait_gone([hello["pid"]]) == []
    assert not home.exists()
    assert _ptmx_fds() == before


def test_disconnect_hangs_up_and_kills_what_ignores_it(
    client: TestClient, child_argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _ptmx_fds()
    monkeypatch.setattr(
        web.Session, "_env", lambda self, home: {**_real_env(self, home), "IGNORE_HUP": "1"}
    )
    with client.websocket_connect("/console/ws", subprotocols=PROTOS) as ws:
        r = Reader(ws)
        r.until(b"grandchild ")
        grandchild = int(r.until(b"\r\n").split(b"grandchild ", 1)[1].split(b"\r\n")[0])
        hello = r.hello()
        home = Path(hello["env"]["COVE_HOME"])
        assert _alive(grandchild) and _alive(hello["pid"])
    # the browser went away: SIGHUP to the group, SIGKILL after the grace period
    assert _wait_gone([hello["pid"], grandchild]) == []
    deadline = time.monotonic() + 5
    while home.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not home.exists()
    assert _ptmx_fds() == before


def test_idle_sessions_are_told_and_closed(child_argv: list[str]) -> None:
    cfg = ConsoleConfig(api_url="http://127.0.0.1:9", idle_timeout=4.0, hangup_grace=0.5)
    with _client(cfg) as client:
        with client.websocket_connect("/console/ws", subprotocols=PROTOS) as ws:
            r = Reader(ws)
            hello = r.hello()
            start = time.monotonic()
            r.until(b"unless you type]")  # warned a second before the end (a quarter)
            assert b"closes in 1 seconds" in r.seen
            ws.send_bytes(b"still here\r")  # input: the count starts again
            r.until(b"echo still here")
            assert r.until_closed() == web.CLOSE_IDLE
            took = time.monotonic() - start
            assert 6 < took < 15, took  # closed 4 s after the last input, not after the first
            assert r.seen.count(b"unless you type]") == 2  # warned again before closing
            assert b"[cove console: closing after 4 seconds without input]" in r.seen
            assert any(c.get("code") == "idle_timeout" for c in r.controls)
    assert _wait_gone([hello["pid"]]) == []


def test_the_spawned_shell_is_cove_shell() -> None:
    argv = web.shell_argv()
    assert argv[0] == sys.executable and argv[1:] == ["-m", "cove.cli", "shell"]


# ----------------------------------------------------------------------------- the page


def test_page_and_assets_carry_the_policy(client: TestClient, tmp_path: Path) -> None:
    if web.ghostty_dist() is None:
        pytest.skip("ghostty-web is not installed (make setup)")
    for path, media in (
        ("/console", "text/html"),
        ("/console/assets/console.js", "text/javascript"),
        ("/console/assets/console.css", "text/css"),
        ("/console/assets/ghostty-web.js", "text/javascript"),
        ("/console/assets/ghostty-vt.wasm", "application/wasm"),
    ):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(media), path
        assert r.headers["content-security-policy"] == web.CSP
        assert r.headers["x-content-type-options"] == "nosniff"
    page = client.get("/console").text
    assert "<script>" not in page and "style=" not in page  # nothing inline
    for bad in ("index.d.ts", "ghostty-web.umd.cjs", "x.wasm", "web.py", "pty.py"):
        r = client.get(f"/console/assets/{bad}")
        assert r.status_code == 404, bad
        assert r.headers["content-security-policy"] == web.CSP
    for bad in ("../web.py", "..%2Fweb.py", "%2e%2e/pty.py"):  # never the package's files
        r = client.get(f"/console/assets/{bad}")
        assert r.status_code == 404, bad
        assert "import" not in r.text


def test_missing_assets_say_to_run_make_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COVE_CONSOLE_ASSETS", str(tmp_path / "nothing-here"))
    with _client(ConsoleConfig()) as client:
        r = client.get("/console")
        assert r.status_code == 503
        assert "make setup" in r.text
        assert r.headers["content-security-policy"] == web.CSP
        r = client.get("/console/assets/ghostty-web.js")
        assert r.status_code == 503
        assert "make setup" in r.json()["hint"]
    # the variable may name the package directory or its dist/
    (tmp_path / "pkg" / "dist").mkdir(parents=True)
    for name in ("ghostty-web.js", "ghostty-vt.wasm"):
        (tmp_path / "pkg" / "dist" / name).write_text("x")
    monkeypatch.setenv("COVE_CONSOLE_ASSETS", str(tmp_path / "pkg"))
    assert web.ghostty_dist() == tmp_path / "pkg" / "dist"
    monkeypatch.setenv("COVE_CONSOLE_ASSETS", str(tmp_path / "pkg" / "dist"))
    assert web.ghostty_dist() == tmp_path / "pkg" / "dist"


def test_same_origin_rules() -> None:
    assert web.same_origin(None, "h:1", False)  # not a browser: the token decides
    assert web.same_origin("http://h:1", "h:1", False)
    assert web.same_origin("http://H:1", "h:1", False)
    assert not web.same_origin("http://h:2", "h:1", False)
    assert not web.same_origin("https://h:1", "h:1", False)
    assert web.same_origin("https://h:1", "h:1", True)
    assert not web.same_origin("http://h:1", None, False)


# ----------------------------------------------------------------------------- cove shell


def test_cove_shell_on_a_plain_terminal(tmp_path: Path) -> None:
    import pty

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
    env.update(COVE_HOME=str(home), TERM="xterm-256color", COVE_API_URL="http://127.0.0.1:9")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cove.cli", "shell"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    os.close(slave)
    seen = b""

    def until(needle: bytes, timeout: float = 20) -> None:
        """Read until *needle* shows up in what arrives from now on."""
        nonlocal seen
        start = len(seen)
        deadline = time.monotonic() + timeout
        while needle not in seen[start:] and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if b"\x1b[6n" in chunk:  # prompt_toolkit asks where the cursor is
                os.write(master, b"\x1b[1;1R")
            seen += chunk
        assert needle in seen[start:], seen.decode(errors="replace")[-2000:]

    try:
        until(b"cove>")  # the prompt (prompt_toolkit draws its space by moving the cursor)
        os.write(master, b"ap\t")  # Tab completes the one command starting with "ap"
        until(b"apps")
        os.write(master, b"\x03")  # Ctrl-C at the prompt: the line is dropped, a new prompt
        until(b"cove>")
        os.write(master, b"help exit\r")
        until(b"leave the shell")  # not "apps help exit": Ctrl-C dropped the line
        os.write(master, b"apps list\r")  # fails (nothing listens there): said, and on
        until(b"error")
        until(b"cove>")
        os.write(master, b"deferred\r")
        until(b"instead:")
        until(b"cove>")
        os.write(master, b"\x04")  # Ctrl-D at the prompt leaves
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    history = (home / "shell_history").read_text()
    assert "help exit" in history and "deferred" in history
    assert ((home / "shell_history").stat().st_mode & 0o077) == 0


def test_ghostty_web_is_pinned_and_locked() -> None:
    """package.json pins the exact version the console is written against, the lock holds
    it with its integrity hash, and what `npm ci` installed is that version."""
    pkg = json.loads((ROOT / "package.json").read_text())
    assert pkg["dependencies"] == {"ghostty-web": web.GHOSTTY_VERSION}  # exact: no ^ or ~
    lock = json.loads((ROOT / "package-lock.json").read_text())
    entry = lock["packages"]["node_modules/ghostty-web"]
    assert entry["version"] == web.GHOSTTY_VERSION
    assert entry["integrity"].startswith("sha512-")
    installed = ROOT / "node_modules" / "ghostty-web" / "package.json"
    if installed.exists():
        assert json.loads(installed.read_text())["version"] == web.GHOSTTY_VERSION
