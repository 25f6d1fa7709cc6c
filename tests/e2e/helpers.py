"""End-to-end helpers: the real ``cove`` executable against a real ``cove up``.

One ``cove up --detach --port 0`` serves the whole session (``server``) and is stopped with
``cove down`` at teardown, whatever happened. Every test runs the CLI as a subprocess, with
stdin closed (never a TTY) and a config directory of its own:

- ``alice`` signs up first, so she is the cluster operator; her COVE_HOME is the server's
  own, so her CLI finds the API through ``COVE_HOME/run/api.url``.
- ``make_user`` signs up further users, each with another COVE_HOME and ``COVE_API_URL``.

Setup that is not under test (projects, apps, tokens to revoke...) goes straight to the
HTTP API, which keeps the suite fast: each CLI run costs a Python start-up.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
COVE = ROOT / ".venv" / "bin" / "cove"
if not COVE.exists():  # a venv elsewhere: the cove next to this interpreter
    COVE = Path(sys.executable).with_name("cove")

PASSWORD = "correct-horse-battery"
RESOURCE_KEYS = {"kind", "id", "name", "parent", "labels", "spec", "status", "metadata"}
RECEIPT_KEYS = {"operation", "resource", "generation", "revision", "links"}

_counter = itertools.count(1)


def uniq(prefix: str) -> str:
    """A fresh valid resource name: lower-case, digits and '-', at most 40 characters."""
    return f"{prefix}-{next(_counter)}-{secrets.token_hex(3)}"


# ----------------------------------------------------------------------------- running cove


@dataclass
class Result:
    args: list[str]
    code: int
    out: str
    err: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return (
            f"$ cove {' '.join(self.args)}\n-> exit {self.code} in {self.seconds:.1f}s\n"
            f"--- stdout ---\n{self.out[-3000:]}\n--- stderr ---\n{self.err[-3000:]}"
        )


def cove_env(home: Path, extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment of one CLI run: no COVE_* leaks in from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
    env.update(COVE_HOME=str(home), COLUMNS="200", NO_COLOR="1", TERM="dumb")
    env.pop("PYTHONBREAKPOINT", None)
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_cove(
    args: list[str],
    *,
    home: Path,
    env: dict[str, str | None] | None = None,
    timeout: float = 60,
) -> Result:
    home.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.run(
        [str(COVE), *args],
        env=cove_env(home, env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=home,  # no stray cove.toml from the repository
    )
    return Result(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def assert_clean_error(r: Result, code: int, *needles: str) -> None:
    """Failed with *code*, said so on stderr (each needle, case-insensitive), no traceback,
    nothing on stdout."""
    assert r.code == code, str(r)
    assert "Traceback" not in r.err, str(r)
    assert r.out.strip() == "", str(r)
    low = " ".join(r.err.split()).lower()
    for n in needles:
        assert n.lower() in low, f"{n!r} not in stderr\n{r}"


def normalise(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------- the API


class ApiError(AssertionError):
    pass


class Api:
    """Direct HTTP calls for setup; raises on any error status."""

    def __init__(self, url: str, token: str | None = None) -> None:
        from cove.client.http import unix_path

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        uds = unix_path(url)  # unix:/path/api.sock
        self.http = httpx.Client(
            base_url="http://cove" if uds else url,
            headers=headers,
            timeout=30,
            transport=httpx.HTTPTransport(uds=uds) if uds else None,
        )

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        resp = self.http.request(
            method,
            path,
            json=body,
            params={k: v for k, v in params.items() if v is not None},
        )
        if resp.status_code >= 400:
            raise ApiError(f"{method} {path} -> {resp.status_code}: {resp.text}")
        return resp.json() if resp.content else None

    def wait_op(self, rec: dict[str, Any], timeout: str = "30s") -> dict[str, Any]:
        op: dict[str, Any] = self.call(
            "GET", f"/v1/operations/{rec['operation']}/wait", **{"for": "done", "timeout": timeout}
        )
        return op

    def create(self, plural: str, name: str, wait: bool = True, **body: Any) -> dict[str, Any]:
        rec: dict[str, Any] = self.call("POST", f"/v1/{plural}", dict(body, name=name))
        if wait:
            self.wait_op(rec)
        return rec

    def close(self) -> None:
        self.http.close()


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Server:
    url: str
    home: Path


@dataclass
class User:
    server: Server
    home: Path
    email: str
    org: str
    project: str | None = None
    # the server's own COVE_HOME finds the URL in run/api.url; other homes are told
    env: dict[str, str | None] = field(default_factory=dict)

    def cove(
        self, *args: str, env: dict[str, str | None] | None = None, timeout: float = 60
    ) -> Result:
        return run_cove(
            list(args), home=self.home, env={**self.env, **(env or {})}, timeout=timeout
        )

    @property
    def config(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.home / "config.json").read_text())
        return doc

    @property
    def token(self) -> str:
        return str(self.config["token"])

    def api(self) -> Api:
        return Api(self.server.url, self.token)

    def scope(self, **more: str | None) -> dict[str, str | None]:
        return {"org": self.org, "project": self.project, **more}

    def clone_home(self, dest: Path, **config: Any) -> Path:
        """Another COVE_HOME holding a copy of this user's CLI config (and *config* on top)."""
        dest.mkdir(parents=True, exist_ok=True)
        doc = dict(self.config, api_url=self.server.url, **config)
        (dest / "config.json").write_text(json.dumps(doc))
        return dest


def stop(home: Path) -> None:
    """``cove down``; if that fails, kill what ``cove up`` left running."""
    try:
        r = run_cove(["down"], home=home, timeout=60)
        if r.code == 0:
            return
    except subprocess.TimeoutExpired:
        pass
    try:
        pid = int((home / "run" / "up.pid").read_text().strip())
        os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def server_log(home: Path) -> str:
    try:
        return (home / "logs" / "cove.log").read_text()[-4000:]
    except OSError:
        return "(no log)"


def signup(server: Server, home: Path, tag: str, *, own_home: bool) -> User:
    email = f"{uniq(tag)}@example.com"
    org = uniq(tag)
    env: dict[str, str | None] = {} if own_home else {"COVE_API_URL": server.url}
    r = run_cove(
        ["auth", "signup", "--email", email, "--password", PASSWORD, "--org", org],
        home=home,
        env=env,
    )
    assert r.code == 0, str(r)
    return User(server=server, home=home, email=email, org=org, env=env)


def with_project(user: User, project: str | None = None) -> User:
    """Give *user* a project (through the API) and make it current with ``cove use``."""
    name = project or uniq("prj")
    api = user.api()
    api.create("projects", name, org=user.org)
    api.close()
    r = user.cove("use", f"{user.org}/{name}")
    assert r.code == 0, str(r)
    user.project = name
    return user


def quick_user(server: Server, home: Path, tag: str, *, project: bool = True) -> User:
    """A signed-up user without spending CLI runs: sign up through the API and write the
    CLI config (COVE_HOME/config.json: URL, token, current org/project) the way
    ``cove auth signup`` and ``cove use`` do. The CLI's own signup is tested with alice and
    in test_cli_basics."""
    email, org = f"{uniq(tag)}@example.com", uniq(tag)
    anon = Api(server.url)
    rec = anon.call("POST", "/v1/auth/signup", {"email": email, "password": PASSWORD, "org": org})
    anon.close()
    doc = {"api_url": server.url, "token": rec["token"], "email": email, "org": org}
    user = User(server=server, home=home, email=email, org=org, env={"COVE_API_URL": server.url})
    if project:
        user.project = doc["project"] = uniq("prj")
        api = Api(server.url, rec["token"])
        api.create("projects", user.project, org=org)
        api.close()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps(doc))
    (home / "config.json").chmod(0o600)
    return user


def first_node(api: Api, timeout: float = 30) -> dict[str, Any]:
    """The node of `cove up`'s agent, once it has registered."""
    deadline = time.monotonic() + timeout
    while True:
        items = api.call("GET", "/v1/nodes")["items"]
        if items:
            return dict(items[0])
        assert time.monotonic() < deadline, "the agent of `cove up` never registered"
        time.sleep(0.2)


def run_many(jobs: dict[Any, Callable[[], Result]]) -> dict[Any, Result]:
    """Run independent CLI invocations side by side. Each run is a Python start-up, mostly
    CPU; a few at a time keep both cores of a small machine busy."""
    workers = max(4, 2 * (os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: f.result() for key, f in futures.items()}
