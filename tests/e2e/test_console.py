"""The web console in a real browser (headless Chromium through Playwright, Debian's
/usr/bin/chromium) against a real ``cove up`` with a running app (sandbox driver).

One page for the module, used in order: sign in through the terminal, `apps list` and
`status` read back from the terminal's buffer, exec into the running instance (a plain
command, then `exec -it` with Ctrl-C and a full-screen program), a browser resize reaching
the PTY, Ctrl-C ending `logs -f` and `events -f`, deploy and rollback; a screenshot lands in
test-artifacts/console.png. Then the page goes away and nothing it started is left (the
shell's process, its private COVE_HOME, the server's PTY fds). WebSockets without
credentials, with a bad token and from another origin are refused.

The page's strict CSP applies throughout: Playwright's ``wait_for_function`` evals strings
(refused by the CSP, as it should be), so waits poll ``page.evaluate`` instead.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.images import BuiltImage

from .deploy_support import (  # noqa: F401  (fixtures)
    HTTP_CHECK,
    Cluster,
    Deployment,
    app_image,
    builder,
    cluster,
    cove_pids,
    is_ready,
    process_alive,
    wait_for,
)
from .helpers import PASSWORD, Api, uniq

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
CSP = (
    "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; "
    "style-src 'self'; img-src 'self'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
# the shell's prompt: `cove> `, or `cove ORG/PROJECT APP/ENV> ` (the buffer drops the space)
PROMPT = re.compile(r"^cove( [^>]*)?>$")


# ----------------------------------------------------------------------------- the page


@dataclass
class Console:
    page: Any
    url: str
    email: str
    deployment: Deployment
    instance: str
    problems: list[str]

    def lines(self) -> list[str]:
        got: list[str] = self.page.evaluate("() => window.coveConsole.lines()")
        return got

    def text(self, since: int = 0) -> str:
        return "\n".join(self.lines()[since:])

    def mark(self) -> int:
        """The index of the last line with something on it (the prompt about to be used)."""
        ls = self.lines()
        for i in range(len(ls) - 1, -1, -1):
            if ls[i].strip():
                return i
        return 0

    def state(self, key: str) -> Any:
        return self.page.evaluate(f"() => window.coveConsole && window.coveConsole.state.{key}")

    def wait_text(self, needle: str, since: int = 0, timeout: float = 30) -> str:
        return wait_for(
            lambda: (t := self.text(since)) and needle in t and t,
            timeout=timeout,
            what=f"{needle!r} in the terminal",
            every=0.1,
            explain=lambda: self.text(since)[-3000:] + f"\nbrowser: {self.problems}",
        )

    def wait_prompt(self, since: int, timeout: float = 30) -> None:
        """The shell's prompt again, on a line after *since*."""

        def probe() -> bool:
            ls = self.lines()[since + 1 :]
            return any(PROMPT.match(ln.strip()) for ln in ls)

        wait_for(
            probe,
            timeout=timeout,
            what="the shell's prompt",
            every=0.1,
            explain=lambda: self.text(since)[-3000:],
        )

    def type_line(self, line: str) -> None:
        self.page.keyboard.type(line)
        self.page.keyboard.press("Enter")

    def run(self, line: str, expect: str, timeout: float = 30) -> str:
        """Type *line* at the prompt, wait for *expect* in what follows and for the prompt
        to come back; returns what the command printed."""
        start = self.mark()
        self.type_line(line)
        self.wait_text(expect, since=start, timeout=timeout)
        self.wait_prompt(start, timeout=timeout)
        return self.text(start)


def _browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (scripts/setup.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser(cluster: Cluster) -> Iterator[Any]:  # noqa: F811
    # after the cluster, so it closes first: the cluster's teardown runs asyncio.run, which
    # Playwright's sync API (an event loop on this thread) would refuse
    _ = cluster
    yield from _browser()


@pytest.fixture(scope="module")
def deployed(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
) -> tuple[Deployment, str]:
    """An app with one Ready instance that prints a tick every second."""
    d = cluster.deployment()
    d.write_toml(
        f"oci:{app_image.layout}:{app_image.tag}",
        env={"TICK": "1"},
        checks=[HTTP_CHECK],
        deadline="30s",
    )
    r = d.deploy()
    assert r.code == 0, str(r)
    ins = wait_for(
        lambda: next((i for i in d.api_instances() if is_ready(i)), None),
        timeout=30,
        what="a Ready instance",
    )
    return d, str(ins["name"])


@pytest.fixture(scope="module")
def member(cluster: Cluster) -> str:  # noqa: F811
    """A second account (email + password) made a member of the cluster's org."""
    email = f"{uniq('console')}@example.com"
    anon = Api(cluster.url)
    anon.call("POST", "/v1/auth/signup", {"email": email, "password": PASSWORD, "org": uniq("o")})
    anon.close()
    ops = cluster.api()
    ops.call("POST", f"/v1/orgs/{cluster.org}/members", {"email": email})
    ops.close()
    return email


@pytest.fixture(scope="module")
def console(
    browser: Any,
    cluster: Cluster,  # noqa: F811
    deployed: tuple[Deployment, str],
    member: str,
) -> Iterator[Console]:
    d, instance = deployed
    page = browser.new_page(viewport={"width": 1100, "height": 640})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    resp = page.goto(cluster.url + "/console")
    assert resp is not None and resp.status == 200, resp and resp.text()
    assert resp.headers["content-security-policy"] == CSP
    assert resp.headers["x-content-type-options"] == "nosniff"
    c = Console(page, cluster.url, member, d, instance, problems)
    wait_for(
        lambda: c.state("phase") == "signin",
        timeout=20,
        what="the console to ask for sign-in (ghostty-web loaded under the CSP)",
        explain=lambda: problems,
    )
    yield c
    if not page.is_closed():
        page.close()


# ----------------------------------------------------------------------------- the tests


def test_sign_in_in_the_terminal_and_list_apps(console: Console, cluster: Cluster) -> None:  # noqa: F811
    c = console
    c.wait_text("email or token:")
    c.type_line(c.email)
    c.wait_text("password:")
    c.type_line("not-the-password")
    c.wait_text("sign-in failed")
    assert "not-the-password" not in c.text()  # the password is never echoed
    c.type_line(c.email)
    c.wait_text("password:", since=c.mark())
    c.type_line(PASSWORD)
    c.wait_text(f"signed in as {c.email}")
    assert PASSWORD not in c.text()
    wait_for(lambda: c.state("phase") == "connected", timeout=20, what="the WebSocket")
    c.wait_text("cove shell (web console)")
    c.wait_prompt(0)
    d = c.deployment
    out = c.run(f"use {cluster.org}/{cluster.project} --app {d.app} --env prod", "now using")
    assert f"project={cluster.project}" in out
    out = c.run("apps list", d.app)
    assert "NAME" in out and "READY" in out
    ARTIFACTS.mkdir(exist_ok=True)
    c.page.screenshot(path=str(ARTIFACTS / "console.png"))  # signed in, `apps list`
    out = c.run("status", "prod")
    assert d.app in out
    # a mistake is printed, and the shell goes on
    out = c.run("apps describe no-such-app", "error")
    assert "no-such-app" in out
    # no script error, no CSP violation (the one 401 is the wrong password, on purpose)
    assert [p for p in c.problems if "401 (Unauthorized)" not in p] == [], c.problems


def test_exec_into_the_running_instance(console: Console) -> None:
    c = console
    out = c.run(f"exec --instance {c.instance} -- sh -c 'echo hello-$((6*7))'", "hello-42")
    assert "hello-$((6*7))" not in out.split("hello-42", 1)[1]


def test_exec_it_ctrl_c_and_a_full_screen_program(console: Console) -> None:
    c = console
    start = c.mark()
    c.type_line(f"exec -it --instance {c.instance} -- sh")
    c.wait_text("/ #", since=start)  # busybox sh's prompt inside the instance
    c.type_line("sleep 100; echo not-$((1+1))-interrupted")
    time.sleep(1.0)
    c.page.keyboard.press("Control+C")  # reaches the remote sleep through both PTYs
    c.type_line("echo after-$((40+2))")
    c.wait_text("after-42", since=start)
    assert "not-2-interrupted" not in c.text(start)
    # a full-screen editor inside the instance: write a file with vi, read it back
    c.type_line("vi /tmp/console-note")
    wait_for(
        lambda: c.page.evaluate("() => window.coveConsole.term.buffer.active.type") == "alternate",
        timeout=10,
        what="vi on the alternate screen",
    )
    c.page.keyboard.type("ihello-from-vi")
    c.wait_text("hello-from-vi")  # on vi's screen
    c.page.keyboard.press("Escape")
    time.sleep(0.5)  # vi tells a lone Escape from an escape sequence by the pause after it
    c.page.keyboard.type(":wq")
    c.page.keyboard.press("Enter")
    wait_for(
        lambda: c.page.evaluate("() => window.coveConsole.term.buffer.active.type") == "normal",
        timeout=10,
        what="vi to leave the alternate screen",
        explain=lambda: c.text()[-2000:],
    )
    c.type_line('echo "[$(cat /tmp/console-note)]"; exit')
    c.wait_text("[hello-from-vi]", since=start)
    c.wait_prompt(start)  # back at cove's prompt


def test_a_resize_reaches_the_pty(console: Console) -> None:
    c = console
    before = c.page.evaluate("() => [window.coveConsole.term.rows, window.coveConsole.term.cols]")
    c.page.set_viewport_size({"width": 760, "height": 420})
    wait_for(
        lambda: (
            c.page.evaluate("() => [window.coveConsole.term.rows, window.coveConsole.term.cols]")
            != before
        ),
        timeout=10,
        what="the terminal to fit the smaller window",
    )
    time.sleep(0.3)  # the resize message is on its way
    rows, cols = c.page.evaluate(
        "() => [window.coveConsole.term.rows, window.coveConsole.term.cols]"
    )
    assert (rows, cols) != tuple(before) and cols < before[1]
    # exec -t hands the shell's own terminal size to the instance's PTY
    out = c.run(f"exec -t --instance {c.instance} -- stty size", f"{rows} {cols}")
    assert f"{rows} {cols}" in out
    c.page.set_viewport_size({"width": 1100, "height": 640})


def test_ctrl_c_ends_logs_f_and_events_f(console: Console) -> None:
    c = console
    for command, needle in (("logs -f", "tick "), ("events -f", "")):
        start = c.mark()
        c.type_line(command)
        if needle:
            c.wait_text(needle, since=start, timeout=20)
        else:
            time.sleep(2.0)
        assert not _prompt_after(c, start), f"`{command}` returned by itself"
        c.page.keyboard.press("Control+C")
        c.wait_text("^C", since=start)
        c.wait_prompt(start)
    out = c.run("apps list", c.deployment.app)  # the shell works on
    assert "NAME" in out


def test_deploy_and_rollback_from_the_console(console: Console, app_image: BuiltImage) -> None:  # noqa: F811
    c = console
    d = c.deployment
    before = len(d.releases())
    image = f"oci:{app_image.layout}:{app_image.tag}"
    c.run(f"deploy --image {image} --timeout 60s", "done:", timeout=90)
    c.run("rollback --timeout 60s", "done:", timeout=90)
    rels = d.releases()
    assert len(rels) == before + 2
    assert rels[-1]["spec"]["reason"] == "rollback", rels[-1]
    c.run("apps list", d.app)
    c.page.screenshot(path=str(ARTIFACTS / "console-deploy.png"))
    assert (ARTIFACTS / "console.png").stat().st_size > 5000


def test_closing_the_page_leaves_nothing_behind(console: Console, cluster: Cluster) -> None:  # noqa: F811
    c = console
    token = c.state("token")
    shells = _console_shells(token)
    assert len(shells) == 1, shells
    pid, home = shells[0]
    assert home.is_dir()
    (server,) = cove_pids(cluster.home, "server")
    assert _ptmx_fds(server) >= 1
    c.page.close()
    wait_for(lambda: not process_alive(pid), timeout=15, what="the console shell to end")
    wait_for(lambda: not home.exists(), timeout=10, what="its COVE_HOME to be removed")
    wait_for(lambda: _ptmx_fds(server) == 0, timeout=10, what="the server to close the PTY")
    assert _console_shells(token) == []


def test_an_api_token_signs_in_too(browser: Any, cluster: Cluster, member: str) -> None:  # noqa: F811
    api = Api(cluster.url)
    token = api.call("POST", "/v1/auth/login", {"email": member, "password": PASSWORD})["token"]
    api.close()
    api = Api(cluster.url, token)
    tok = api.call("POST", "/v1/tokens", {"name": uniq("console"), "org": cluster.org})["token"]
    api.close()
    assert tok.startswith("cove_a_")
    page = browser.new_page(viewport={"width": 900, "height": 500})
    try:
        page.goto(cluster.url + "/console")
        c = Console(page, cluster.url, member, None, "", [])  # type: ignore[arg-type]
        wait_for(lambda: c.state("phase") == "signin", timeout=20, what="the sign-in prompt")
        c.wait_text("email or token:")
        c.type_line("cove_a_" + "x" * 43)  # looks like a token, signs nobody in
        c.wait_text("that token does not sign in")
        c.type_line(tok)
        c.wait_text(f"signed in as {member} (with an API token)")
        c.wait_text("cove shell (web console)")
        c.wait_prompt(0)
        out = c.run("auth whoami", member)
        assert "api" in out
    finally:
        page.close()


# ----------------------------------------------------------------------------- refusals


def _ws_url(url: str) -> str:
    return "ws://" + url.removeprefix("http://") + "/console/ws"


def _connect(url: str, protocols: list[str], origin: str | None) -> Any:
    from websockets.sync.client import connect
    from websockets.typing import Origin, Subprotocol

    return connect(
        _ws_url(url),
        subprotocols=[Subprotocol(p) for p in protocols] or None,  # no header at all
        origin=Origin(origin) if origin else None,
        open_timeout=10,
    )


@pytest.mark.parametrize(
    ("case", "status"),
    [("no credentials", 401), ("bad token", 401), ("foreign origin", 403)],
)
def test_websockets_without_the_right_credentials_are_refused(
    cluster: Cluster,  # noqa: F811
    case: str,
    status: int,
) -> None:
    from websockets.exceptions import InvalidStatus

    good = ["cove.console.v1", f"cove.bearer.{cluster.token}"]
    protocols, origin = {
        "no credentials": ([], cluster.url),
        "bad token": (["cove.console.v1", "cove.bearer.cove_s_" + "x" * 43], cluster.url),
        "foreign origin": (good, "http://evil.example"),
    }[case]
    with pytest.raises(InvalidStatus) as refused:
        with _connect(cluster.url, protocols, origin):
            pass
    assert refused.value.response.status_code == status
    assert b'"code"' in refused.value.response.body  # a problem document says why
    # the same credentials from the console's own origin are let in
    with _connect(cluster.url, good, cluster.url) as ws:
        assert ws.subprotocol == "cove.console.v1"
        assert isinstance(ws.recv(timeout=20), bytes)  # the shell speaks


# ----------------------------------------------------------------------------- helpers


def _prompt_after(c: Console, since: int) -> bool:
    return any(PROMPT.match(ln.strip()) for ln in c.lines()[since + 1 :])


def _console_shells(token: str) -> list[tuple[int, Path]]:
    """Live processes whose environment carries this console token: (pid, COVE_HOME)."""
    want = f"COVE_TOKEN={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if want in env and process_alive(int(entry)):
            home = next(e for e in env if e.startswith(b"COVE_HOME=")).split(b"=", 1)[1]
            found.append((int(entry), Path(home.decode())))
    return found


def _ptmx_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in ("/dev/ptmx", "/dev/pts/ptmx"):
                n += 1
        except OSError:
            pass
    return n
